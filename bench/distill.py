"""Distillation speed and memory: generator steps per minute, and ONE shared base vs a plain LoRA step.

    python bench/distill.py [--quick]          # tiny backbone, CPU (1 torch thread by default)
    python bench/distill.py --cuda             # Qwen-Image architecture, bf16, random weights, one GPU

Prints a markdown table. Each measurement runs in its own child process so that its peak memory is
its own:
- ``distill``: a CollectionDistiller with K teacher LoRAs, ``student`` and ``fake`` on one frozen base,
  timed through its own ``train()`` loop (a reporter notes the time and memory at each step): one step =
  ``critic_updates`` (5) fake-critic updates + 1 generator update. The teacher target cache is built
  before timing (2-step targets here; the real cost is the teachers' 40-step CFG sampling).
- ``coarse``: the same distiller's coarse-stage steps (``coarse_ratio``: TA-FM alone, no critic work).
- ``lora``: one plain LoRA training step (eq. 2, the student's rank, the same batch) on the same base.

Memory. CPU: the resident set's high-water mark (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` just before the timed steps; where that reset is refused, ``ru_maxrss`` of
the child, which then also counts loading) minus the resident set before the timed steps. The
absolute peak is shown beside it. CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, absolute and above what was allocated before the timed steps.

The ``--cuda`` mode builds the real Qwen-Image transformer (``QwenImageTransformer2DModel`` defaults:
60 blocks, 24 heads x 128, joint dim 3584; ~20B parameters) with random bf16 weights and gradient
checkpointing. Its text encoder and VAE are stand-ins (fixed random text embeddings of ``--text-len``
tokens; an 8x average-pool + fixed 1x1 projection to 16 latent channels), so the numbers are those of the
part that trains and runs every NFE: the transformer with its adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distill.backbones import adapters  # noqa: E402
from distill.backbones.base import Backbone, Condition  # noqa: E402
from distill.callbacks import NullReporter  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from distill.flow import ScheduleConfig, add_noise, sample_timesteps, velocity_target  # noqa: E402
from distill.targets import EffectSpec  # noqa: E402
from distill.trainer import STUDENT, CollectionDistiller, GeneralData  # noqa: E402


# -- the Qwen-Image architecture with stand-in encoders (``--cuda``) --------------------------------
class SyntheticQwenBackbone(Backbone):
    """Qwen-Image's transformer (random weights) with stand-ins for the text encoder and the VAE."""

    name = "qwen-image-synthetic"
    Z = 16  # latent channels of the Qwen-Image VAE
    VAE_FACTOR = 8

    def __init__(
        self, image_size: int, text_len: int, device: str, dtype: torch.dtype, config: dict | None = None
    ):
        from diffusers import QwenImageTransformer2DModel

        self.image_size, self.text_len = image_size, text_len
        self.schedule = ScheduleConfig()  # Qwen-Image: dynamic exponential shift 0.5..0.9
        self._dtype = dtype
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build directly in bf16 on the GPU (fp32 would not fit)
        try:
            with torch.device(device):
                # the defaults are Qwen-Image's; ``config`` shrinks it for the CPU test of this path
                self.transformer = QwenImageTransformer2DModel(**(config or {}))
        finally:
            torch.set_default_dtype(previous)
        self.transformer.requires_grad_(False).eval()
        self.transformer.enable_gradient_checkpointing()
        g = torch.Generator().manual_seed(0)
        dim = self.transformer.config.joint_attention_dim
        self._proj = (torch.randn(self.Z, 3, generator=g) / 3**0.5).to(device, dtype)
        self._vocab = (torch.randn(256, dim, generator=g) * 0.02).to(device, dtype)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare_images(images).to(self.device, self.dtype)
        x = torch.nn.functional.avg_pool2d(x, self.VAE_FACTOR)
        return torch.einsum("zc,bchw->bzhw", self._proj, x)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(latents[:, :3].float(), scale_factor=self.VAE_FACTOR)
        return x.clamp(-1, 1)

    def encode_prompt(self, prompts: list[str], source_images: torch.Tensor) -> Condition:
        ids = torch.tensor(
            [
                [(ord(c) % 256) for c in (p * self.text_len)[: self.text_len].ljust(self.text_len)]
                for p in prompts
            ]
        )
        embeds = self._vocab[ids.to(self.device)]
        mask = torch.ones(len(prompts), self.text_len, dtype=torch.long, device=self.device)
        return Condition(embeds, mask, self.encode_images(source_images))

    def image_seq_len(self, latents_shape: tuple[int, ...]) -> int:
        return (latents_shape[-2] // 2) * (latents_shape[-1] // 2)

    def predict_velocity(self, x_s: torch.Tensor, s: torch.Tensor, cond: Condition) -> torch.Tensor:
        from distill.backbones.tiny import pack, unpack

        b, _, h, w = x_s.shape
        src = cond.source_latents
        tokens = torch.cat([pack(x_s, 2), pack(src, 2)], dim=1)
        s = s.to(x_s.dtype).reshape(-1).expand(b) if s.numel() == 1 else s.to(x_s.dtype)
        out = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=cond.embeds,
            encoder_hidden_states_mask=cond.mask,
            timestep=s,
            img_shapes=[[(1, h // 2, w // 2), (1, src.shape[-2] // 2, src.shape[-1] // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack(out[:, : (h // 2) * (w // 2)], h, w, 2)


# -- setup shared by both measurements ------------------------------------------------------------
def _backbone(args: argparse.Namespace) -> tuple[Backbone, str]:
    if args.cuda:
        bb = SyntheticQwenBackbone(args.size, args.text_len, "cuda", torch.bfloat16)
        return bb, f"Qwen-Image transformer (random bf16 weights, {args.size}px, gradient checkpointing)"
    if args.qwen_config:  # the same path shrunk, on the CPU in float32 (tests)
        config = json.loads(args.qwen_config)
        bb = SyntheticQwenBackbone(args.size, args.text_len, "cpu", torch.float32, config)
        return bb, f"Qwen-Image transformer, shrunk ({config}), {args.size}px"
    from distill.backbones.tiny import WEIGHTS_DIR, TinyConfig, TinyEditor

    if (WEIGHTS_DIR / "tiny_config.json").exists():
        return TinyEditor.from_pretrained(
            WEIGHTS_DIR
        ), "tiny (pretrained weights, distill/backbones/weights/tiny)"
    bb = TinyEditor.random(TinyConfig(), seed=0)
    bb.freeze()
    return bb, "tiny (random weights: no pretrained checkpoint in distill/backbones/weights/tiny)"


def _config(args: argparse.Namespace) -> DistillConfig:
    name = "qwen-image-edit" if args.cuda or args.qwen_config else "tiny"
    return DistillConfig.for_backbone(
        name,
        steps=10**6,
        batch=args.batch,
        target_steps=2,  # the cache is built before timing; its quality does not matter here
        target_general_sources=1,
        target_refresh_every=0,
        checkpoint_every=10**6,
        sample_every=0,
        coarse_ratio=0.0,  # the full objective's steps; measure_distill(coarse=True) times the others
    )


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _teacher_spec(args: argparse.Namespace) -> adapters.LoraSpec:
    # Effect LoRAs for Qwen-Image-Edit are commonly rank 64 on every linear; the tiny teachers rank 16.
    r = 64 if args.cuda or args.qwen_config else 16
    return adapters.LoraSpec(rank=r, alpha=float(r))


def _counts(transformer: torch.nn.Module) -> dict[str, int]:
    counts = {"base": sum(p.numel() for n, p in transformer.named_parameters() if ".lora_" not in n)}
    for name in adapters.adapter_names(transformer):
        counts[name] = sum(p.numel() for p in adapters.lora_parameters(transformer, name))
    return counts


# -- memory ---------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Peak:
    """Peak memory of the block between ``start`` and ``stop`` (see the module docstring)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.method = ""

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return
        self.before = _status_kb("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM (reset before the steps)"
        except OSError:
            self.method = "ru_maxrss (includes loading)"

    def stop(self) -> tuple[int, int]:
        """(absolute peak, peak above the start) in bytes."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.method.startswith("VmHWM"):
            peak = _status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak - self.before


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


# -- the two measurements (child processes) ---------------------------------------------------------
class StepClock(NullReporter):
    """Times the trainer's own loop: from the end of step 1 (the warm-up) to the end of the last step,
    with the memory peak reset after the warm-up (the final checkpoint is written after the last
    ``progress`` call, so it is not counted)."""

    def __init__(self, cuda: bool, last: int | None = None):
        self.cuda = cuda
        self.peak = Peak(cuda)
        self.t0 = 0.0
        self.seconds = 0.0
        self.memory = (0, 0)
        self.last = last  # stop the run after this step (default: its last)
        self.done = False

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        _sync(self.cuda)
        if step == 1:
            self.peak.start()
            self.t0 = time.perf_counter()
        elif step == (self.last or total):
            self.seconds = time.perf_counter() - self.t0
            self.memory = self.peak.stop()
            self.done = True

    def should_stop(self) -> bool:
        return self.done


def measure_distill(args: argparse.Namespace, coarse: bool = False) -> dict[str, Any]:
    """Full generator steps, or (``coarse``) the coarse stage's TA-FM-only steps."""
    bb, label = _backbone(args)
    cfg = _config(args)
    torch.manual_seed(1)
    effects = []
    for i in range(args.effects):
        name = f"teacher_{i}"
        params = adapters.add_lora(bb.transformer, name, _teacher_spec(args))
        with torch.no_grad():  # a teacher that differs from the base
            for p in params:
                p.normal_(0, 0.02)
        effects.append(
            EffectSpec(
                f"fx{i}",
                name,
                f"Apply effect {i}.",
                f"<fx{i}_Xq{i}> Apply effect {i}.",
                _images(args.sources, bb.image_size, i),
            )
        )
    adapters.set_trainable(bb.transformer, [])
    general = GeneralData(
        _images(args.sources, bb.image_size, 99), ["Keep the image unchanged."] * args.sources
    )
    cfg = replace(cfg, steps=1 + args.iters)  # one warm-up step, then the timed ones
    if coarse:  # as many coarse steps first; the clock stops the run at their end
        cfg = replace(cfg, coarse_ratio=1.0)
    clock = StepClock(args.cuda, last=cfg.coarse if coarse else None)
    # each measurement its own run folder: a shared one would resume the other's last checkpoint
    work = Path(args.work_dir) / ("coarse" if coarse else "full")
    distiller = CollectionDistiller(bb, effects, general, cfg, work, clock)
    t0 = time.perf_counter()
    distiller.cache.build()  # train() finds the cache full and goes straight to the steps
    cache_s = time.perf_counter() - t0
    distiller.train()
    seconds, (absolute, delta) = clock.seconds, clock.memory
    return {
        "backbone": label,
        "seconds_per_step": seconds / args.iters,
        "steps_per_min": 60.0 * args.iters / seconds,
        "peak": absolute,
        "peak_delta": delta,
        "memory_method": clock.peak.method,
        "cache_build_s": cache_s,
        "critic_updates": cfg.critic_updates,
        "params": _counts(bb.transformer),
        "student_rank": cfg.student_lora.rank,
    }


def measure_lora(args: argparse.Namespace) -> dict[str, Any]:
    bb, label = _backbone(args)
    cfg = _config(args)
    params = adapters.add_lora(bb.transformer, STUDENT, cfg.student_lora)
    adapters.set_trainable(bb.transformer, [STUDENT])
    adapters.activate(bb.transformer, [STUDENT])
    opt = torch.optim.AdamW(params, lr=cfg.lr_student, weight_decay=0.0)
    src = _images(args.batch, bb.image_size, 0)
    with torch.no_grad():
        cond = bb.encode_prompt(["Apply effect 0."] * args.batch, src)
        x0 = bb.encode_images(_images(args.batch, bb.image_size, 1))
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        eps = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        s = sample_timesteps(args.batch, "logit_normal", generator=g).to(x0.device)
        v = bb.predict_velocity(add_noise(x0, eps, s), s, cond)
        loss = torch.nn.functional.mse_loss(v.float(), velocity_target(x0, eps).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    peak = Peak(args.cuda)
    peak.start()
    _sync(args.cuda)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    _sync(args.cuda)
    seconds = time.perf_counter() - t0
    absolute, delta = peak.stop()
    return {
        "backbone": label,
        "seconds_per_step": seconds / args.iters,
        "peak": absolute,
        "peak_delta": delta,
        "memory_method": peak.method,
    }


# -- orchestration ----------------------------------------------------------------------------------
def _child(args: argparse.Namespace, what: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", what]
    for flag in ("iters", "batch", "effects", "sources", "size", "text_len", "threads", "work_dir"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.cuda:
        cmd.append("--cuda")
    if args.qwen_config:
        cmd += ["--qwen-config", args.qwen_config]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the {what} measurement failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if abs(n) < 2**30 * 10 else f"{n / 2**30:,.1f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def report(args: argparse.Namespace, d: dict[str, Any], co: dict[str, Any], lo: dict[str, Any]) -> str:
    device = torch.cuda.get_device_name(0) if args.cuda else f"CPU, {args.threads} torch thread(s)"
    params = d["params"]
    base_bytes = params["base"] * (2 if args.cuda else 4)
    lines = [
        f"Backbone: {d['backbone']}; device: {device}; batch {args.batch}; {args.effects} teacher LoRAs; "
        f"{args.iters} timed steps after one warm-up.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| generator steps per minute ({d['critic_updates']} critic updates each) | {d['steps_per_min']:.2f} |",
        f"| seconds per generator step (incl. critic updates) | {d['seconds_per_step']:.2f} |",
        f"| seconds per coarse-stage step (TA-FM alone, no critic work) | {co['seconds_per_step']:.3f} |",
        f"| seconds per plain LoRA training step | {lo['seconds_per_step']:.2f} |",
        f"| peak memory, distillation on one shared base | {_mb(d['peak'])} (+{_mb(d['peak_delta'])} during the steps) |",
        f"| peak memory, one plain LoRA training step | {_mb(lo['peak'])} (+{_mb(lo['peak_delta'])} during the steps) |",
        f"| shared-base distillation / plain LoRA step (absolute peak) | {d['peak'] / lo['peak']:.2f}x |",
        f"| base transformer weights alone | {_mb(base_bytes)} |",
        f"| estimate (not measured): separate copies for student, fake, real score | >= {_mb(3 * base_bytes)} of weights |",
        f"| teacher target cache build (excluded above) | {d['cache_build_s']:.1f} s |",
        "",
        "| parameters | count |",
        "|---|---|",
        f"| base transformer | {_count(params['base'])} |",
    ]
    for name, n in params.items():
        if name != "base":
            lines.append(f"| adapter `{name}` | {_count(n)} |")
    lines += ["", f"Memory: {d['memory_method']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps on small batches (checks that it works)")
    p.add_argument("--cuda", action="store_true", help="the Qwen-Image architecture in bf16 on one GPU")
    p.add_argument("--iters", type=int, default=None, help="timed generator steps (default 10, quick 2)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: tiny 8, quick 2, cuda 1)")
    p.add_argument("--effects", type=int, default=None, help="teacher LoRAs on the base (default 8, quick 2)")
    p.add_argument("--sources", type=int, default=4, help="source images per effect and general images")
    p.add_argument("--size", type=int, default=1024, help="--cuda: image side in pixels")
    p.add_argument("--text-len", type=int, default=300, help="--cuda: text tokens (prompt + vision tokens)")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    p.add_argument("--work-dir", default=None, help="where the target cache goes (default: a temp folder)")
    p.add_argument("--qwen-config", default=None, help=argparse.SUPPRESS)  # JSON: a shrunk Qwen on CPU
    p.add_argument("--measure", choices=("distill", "coarse", "lora"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.iters = args.iters or (2 if quick else 10)
    args.batch = args.batch or (1 if args.cuda else 2 if quick else 8)
    args.effects = args.effects or (2 if quick or args.cuda else 8)
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda needs a CUDA GPU; none is visible.")
    if not args.cuda:
        torch.set_num_threads(args.threads)

    if args.measure:
        fns = {
            "distill": measure_distill,
            "coarse": lambda a: measure_distill(a, coarse=True),
            "lora": measure_lora,
        }
        print(json.dumps(fns[args.measure](args)))
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        args.work_dir = args.work_dir or tmp
        d = _child(args, "distill")
        co = _child(args, "coarse")
        lo = _child(args, "lora")
    print(report(args, d, co, lo))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
