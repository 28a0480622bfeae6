"""What a backbone costs and how well the base edits: one markdown table per backbone.

    python bench/backbone.py            # tiny on this CPU (~3 min on 2 cores)
    python bench/backbone.py --quick    # a smoke run (~1 min)
    python bench/backbone.py --cuda     # + the real Qwen-Image architecture on the GPU
    python bench/backbone.py --cuda-only  # that table alone (bench/cuda_check.sh)

``tiny``: the pretrained checkpoint in distill/backbones/weights/tiny if present, else random weights
(said in the table). Parameters; latency of one network evaluation (NFE) at batch 1 and 8; PSNR to
ground truth of 40-step CFG edits on held-out general edits (seeds >= 10**9, never trained on) and on
"keep it unchanged", each beside the do-nothing baseline (the source image itself); LoRA add / save /
load / switch times through distill.backbones.adapters.

``--cuda``: QwenImageTransformer2DModel with its default (20B) config and the default
AutoencoderKLQwenImage, random bf16 weights (no download), behind QwenImageEditBackbone at 1024x1024
with random prompt embeddings: parameters, one NFE, an 8-NFE student edit vs an 80-NFE teacher edit
(40 steps x CFG, VAE decode included), peak GPU memory, and the LoRA times at rank 64.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distill.backbones.base import Backbone, Condition  # noqa: E402
from distill.backbones.tiny import WEIGHTS_DIR, TinyConfig, TinyEditor  # noqa: E402
from distill.effectbench.general import GENERAL_EDITS, general_sample  # noqa: E402
from distill.images import psnr, resize, to_tensor  # noqa: E402
from distill.sampling import euler_sample  # noqa: E402

try:
    from distill.backbones import adapters
except ImportError:  # written by another part of the project; the table says n/a without it
    adapters = None

HELD_OUT_SEED = 10**9  # pretraining draws its pool from small seeds; these are never seen
TEACHER_STEPS, TEACHER_CFG, STUDENT_STEPS = 40, 4.0, 8
QWEN_TEXT_TOKENS = 300  # a typical Qwen-Image-Edit prompt with its 384x384 condition image


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def fmt_s(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        timed(fn, device)
    return statistics.median(timed(fn, device) for _ in range(repeats))


@torch.no_grad()
def nfe_latency(bb: Backbone, cond: Condition, batch: int, repeats: int) -> float:
    cond = cond.repeat(batch) if len(cond) == 1 else cond.select(slice(0, batch))
    x = torch.randn(cond.source_latents.shape, generator=torch.Generator().manual_seed(0)).to(
        bb.device, bb.dtype
    )
    s = torch.full((batch,), 0.5, device=bb.device)
    return median_time(lambda: bb.predict_velocity(x, s, cond), bb.device, repeats)


def lora_rows(
    transformer: torch.nn.Module, rank: int, device: torch.device, repeats: int
) -> list[tuple[str, str]]:
    """Add, save, load (+ activate) and switch a LoRA; the model is left as it was."""
    if adapters is None:
        return [("LoRA load / switch", "n/a (distill.backbones.adapters not available)")]
    spec = adapters.LoraSpec(rank=rank, alpha=float(rank))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_lora.safetensors"
        t_add = timed(lambda: adapters.add_lora(transformer, "bench_a", spec), device)
        lora_n = sum(p.numel() for p in adapters.lora_parameters(transformer, "bench_a"))
        t_save = timed(lambda: adapters.save_lora(transformer, "bench_a", path), device)
        size_mb = path.stat().st_size / 2**20
        t_load = timed(lambda: adapters.load_lora(transformer, path, "bench_b"), device)
        t_act = timed(lambda: adapters.activate(transformer, "bench_b"), device)
        names = ["bench_a", "bench_b"]
        switch = median_time(
            lambda: [adapters.activate(transformer, n) for n in names], device, repeats, warmup=2
        ) / len(names)
        adapters.activate(transformer, None)
        for n in names:
            adapters.delete(transformer, n)
    return [
        (
            f"LoRA rank {rank} (default targets): parameters / file",
            f"{fmt_params(lora_n)} / {size_mb:.1f} MB",
        ),
        ("LoRA add (fresh) / save", f"{fmt_s(t_add)} / {fmt_s(t_save)}"),
        ("LoRA load from file + activate", f"{fmt_s(t_load)} + {fmt_s(t_act)}"),
        ("LoRA switch (activate another loaded adapter)", fmt_s(switch)),
    ]


# tiny on the CPU --------------------------------------------------------------------------------
def tiny_backbone() -> tuple[TinyEditor, str]:
    if (WEIGHTS_DIR / "tiny_config.json").exists():
        return TinyEditor.from_pretrained(WEIGHTS_DIR), f"pretrained ({WEIGHTS_DIR.relative_to(ROOT)})"
    bb = TinyEditor.random(TinyConfig(), seed=0)
    bb.freeze()
    return (
        bb,
        "RANDOM weights: no checkpoint, run `python -m distill.backbones.pretrain_tiny` (PSNR is meaningless)",
    )


def held_out(n: int, edits, offset: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    samples = [general_sample(HELD_OUT_SEED + offset + i, 64, edits=edits) for i in range(n)]
    return (
        [s.instruction for s in samples],
        to_tensor([s.source for s in samples]),
        to_tensor([s.target for s in samples]),
    )


@torch.no_grad()
def edit_psnr(bb: Backbone, n: int, edits, offset: int) -> tuple[float, float, float]:
    """Mean PSNR of 40-step CFG edits to the ground truth, of the do-nothing baseline, and seconds."""
    prompts, src, tgt = held_out(n, edits, offset)
    src, tgt = resize(src, bb.image_size), resize(tgt, bb.image_size)
    cond = bb.encode_prompt(prompts, src)
    uncond = bb.encode_prompt([""] * n, src)
    res = euler_sample(bb, cond, uncond=uncond, cfg_scale=TEACHER_CFG, steps=TEACHER_STEPS, seed=0)
    return float(psnr(res.images, tgt).mean()), float(psnr(src, tgt).mean()), res.seconds


def tiny_rows(quick: bool) -> tuple[str, list[tuple[str, str]]]:
    bb, note = tiny_backbone()
    dev = bb.device
    repeats = 5 if quick else 20
    rows = [
        ("weights", note),
        (
            "parameters (transformer + text encoder)",
            f"{fmt_params(n_params(bb.transformer))} + {fmt_params(n_params(bb.text_encoder))}",
        ),
        (
            "image / image tokens per NFE (target + source)",
            f"{bb.image_size}px / {2 * bb.image_seq_len((1, 3, bb.image_size, bb.image_size))}",
        ),
    ]
    _, src, _ = held_out(8, GENERAL_EDITS, 0)
    cond = bb.encode_prompt(["Make the image brighter."] * 8, resize(src, bb.image_size))
    log("tiny: NFE latency")
    for batch in (1, 8):
        rows.append((f"one NFE, batch {batch}", fmt_s(nfe_latency(bb, cond, batch, repeats))))

    n_gen, n_id = (8, 4) if quick else (32, 16)
    log(f"tiny: {TEACHER_STEPS}-step CFG edits on {n_gen} held-out general samples and {n_id} identity")
    p, base, sec = edit_psnr(bb, n_gen, GENERAL_EDITS, 0)
    rows.append(
        (
            f"{TEACHER_STEPS}-step CFG {TEACHER_CFG:g} PSNR, held-out general edits (n={n_gen})",
            f"{p:.2f} dB (source as output: {base:.2f} dB; {sec:.1f} s for the batch of {n_gen})",
        )
    )
    identity = tuple(e for e in GENERAL_EDITS if e.name == "identity")
    p, _, _ = edit_psnr(bb, n_id, identity, 10**6)
    rows.append((f"same, identity ('keep it unchanged', n={n_id})", f"{p:.2f} dB"))

    log("tiny: LoRA")
    rows += lora_rows(bb.transformer, 16, dev, repeats=50 if quick else 200)
    return f"tiny (CPU, {torch.get_num_threads()} torch thread(s))", rows


# the real Qwen-Image architecture on the GPU -------------------------------------------------------
def random_qwen_transformer(device: torch.device, dtype: torch.dtype, **config) -> torch.nn.Module:
    """The default (20B) config straight on the GPU in ``dtype``: built on the meta device, then
    materialised and filled (a float32 CPU build would need 80 GB of RAM first)."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights():
        model = QwenImageTransformer2DModel(**config)
    model = model.to(dtype=dtype).to_empty(device=device)
    assert not list(model.buffers()), "a buffer would be left uninitialised"
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:  # norm scales 1, biases 0
                p.fill_(0.0 if name.endswith("bias") else 1.0)
    return model.eval().requires_grad_(False)


def qwen_rows(
    quick: bool,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    image_size: int = 1024,
    transformer_config: dict | None = None,
    vae_config: dict | None = None,
    text_tokens: int = QWEN_TEXT_TOKENS,
) -> tuple[str, list[tuple[str, str]]]:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler

    from distill.backbones.qwen_image_edit import QwenImageEditBackbone

    dev = torch.device(device)
    log("qwen: building random transformer and VAE")
    transformer = random_qwen_transformer(dev, dtype, **(transformer_config or {}))
    vae = AutoencoderKLQwenImage(**(vae_config or {})).to(dev, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
    )
    bb = QwenImageEditBackbone.from_components(
        transformer, vae, None, None, None, scheduler, image_size=image_size, device=dev
    )
    g = torch.Generator().manual_seed(0)
    src = torch.rand(1, 3, image_size, image_size, generator=g) * 2 - 1
    joint = transformer.config.joint_attention_dim

    def condition() -> Condition:
        embeds = torch.randn(1, text_tokens, joint, generator=g).to(dev, dtype)
        mask = torch.ones(1, text_tokens, dtype=torch.long, device=dev)
        return Condition(embeds, mask, bb.encode_images(src))

    cond, uncond = condition(), condition()
    tokens = 2 * bb.image_seq_len(cond.source_latents.shape) + text_tokens
    rows = [
        ("weights", f"random, {str(dtype).removeprefix('torch.')}, default configs (no download)"),
        (
            "transformer / VAE parameters",
            f"{fmt_params(n_params(transformer))} / {fmt_params(n_params(vae))}",
        ),
        ("image / tokens per NFE", f"{image_size}x{image_size} / {tokens} (target + source + text)"),
    ]
    log("qwen: one NFE")
    rows.append(("one NFE, batch 1", fmt_s(nfe_latency(bb, cond, 1, 3 if quick else 10))))
    log("qwen: 8-NFE and 80-NFE edits")
    rows.append(
        (
            f"{STUDENT_STEPS}-NFE edit ({STUDENT_STEPS} steps, no CFG, + VAE decode)",
            fmt_s(timed(lambda: euler_sample(bb, cond, steps=STUDENT_STEPS), dev)),
        )
    )
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t80 = timed(
        lambda: euler_sample(bb, cond, uncond=uncond, cfg_scale=TEACHER_CFG, steps=TEACHER_STEPS), dev
    )
    rows.append((f"80-NFE edit ({TEACHER_STEPS} steps x CFG, + VAE decode)", fmt_s(t80)))
    if dev.type == "cuda":
        rows.append(("peak GPU memory (80-NFE edit)", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"))
    log("qwen: LoRA")
    rows += lora_rows(transformer, 64, dev, repeats=5 if quick else 20)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return f"Qwen-Image architecture ({name})", rows


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n| {title} | |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and repeats (a smoke run)")
    ap.add_argument("--cuda", action="store_true", help="also the real Qwen-Image architecture on the GPU")
    ap.add_argument("--cuda-only", action="store_true", help="the Qwen-Image table alone, not the tiny one")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not args.cuda_only:
        print_table(*tiny_rows(args.quick))
    if args.cuda or args.cuda_only:
        if not torch.cuda.is_available():
            print("\n--cuda: no GPU on this machine; the Qwen-Image table is skipped.")
        else:
            print_table(*qwen_rows(args.quick))


if __name__ == "__main__":
    main()
