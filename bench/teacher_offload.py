"""Teacher offloading on the Qwen-Image architecture: GPU memory with K teacher LoRAs resident vs
offloaded (``adapters.offload``), the cost of switching teachers, and that outputs do not change.

    python bench/teacher_offload.py --cuda [--teachers 8]      # 20B, random bf16 weights, one GPU
    python bench/teacher_offload.py --qwen-config JSON          # the same path shrunk, on CPU (tests)

Prints a markdown table. Memory is ``torch.cuda.memory_allocated`` (CPU: not measured).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distill.backbones import adapters  # noqa: E402


def _backbone(args: argparse.Namespace):
    """bench/distill.py's Qwen-Image transformer with stand-in encoders, built as that bench builds it
    (loaded by path: the file's name would shadow the ``distill`` package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_distill", ROOT / "bench" / "distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._backbone(args)[0]


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _gib(cuda: bool) -> float:
    return torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cuda", action="store_true", help="the 20B Qwen-Image architecture in bf16 on one GPU")
    p.add_argument("--qwen-config", default=None, help="JSON: a shrunk Qwen-Image transformer on CPU")
    p.add_argument(
        "--teachers", type=int, default=8, help="teacher LoRAs (rank --rank, every default target)"
    )
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--text-len", type=int, default=300)
    p.add_argument("--switches", type=int, default=8, help="timed forwards, each with another teacher")
    args = p.parse_args(argv)
    if args.cuda == bool(args.qwen_config):
        p.error("give exactly one of --cuda and --qwen-config")
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda needs a CUDA GPU; none is visible.")
    cuda = args.cuda
    bb = _backbone(args)
    tr = bb.transformer
    base_gib = _gib(cuda)
    names = [f"teacher_{i}" for i in range(args.teachers)]
    g = torch.Generator(device=bb.device).manual_seed(0)
    for n in names:
        with torch.no_grad():
            for prm in adapters.add_lora(tr, n, adapters.LoraSpec(rank=args.rank, alpha=float(args.rank))):
                prm.normal_(0, 0.02, generator=g)
    adapters.set_trainable(tr, [])
    resident_gib = _gib(cuda)
    src = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        cond = bb.encode_prompt(["Apply the effect."], src)
        x = torch.randn(cond.source_latents.shape, generator=torch.Generator().manual_seed(2))
        x = x.to(bb.device, bb.dtype)
        s = torch.tensor([0.7], device=bb.device)

        def forward(name: str) -> torch.Tensor:
            adapters.activate(tr, [name])
            return bb.predict_velocity(x, s, cond)

        before = {n: forward(n) for n in names[:2]}
        forward(names[0])  # warm-up

        def timed(order: list[str]) -> float:
            times = []
            for n in order:
                _sync(cuda)
                t0 = time.perf_counter()
                forward(n)
                _sync(cuda)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        same = timed([names[0]] * args.switches)
        adapters.offload(tr, names, keep=1)
        _sync(cuda)
        offloaded_gib = _gib(cuda)
        switching = timed([names[i % len(names)] for i in range(1, args.switches + 1)])
        diff = max((forward(n) - before[n]).abs().max().item() for n in before)
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    teacher_mb = sum(q.numel() * q.element_size() for q in adapters.lora_parameters(tr, names[0])) / 2**20
    rows = [
        ("device", device),
        ("teacher LoRAs", f"{args.teachers} x rank {args.rank} ({teacher_mb:,.0f} MiB each)"),
        ("GPU memory: base alone", f"{base_gib:.1f} GiB"),
        ("GPU memory: base + every teacher resident", f"{resident_gib:.1f} GiB"),
        ("GPU memory: base + teachers offloaded (one resident)", f"{offloaded_gib:.1f} GiB"),
        ("one NFE, same teacher again", f"{same * 1000:.0f} ms"),
        ("one NFE, switching to an offloaded teacher (copy in + evict)", f"{switching * 1000:.0f} ms"),
        ("largest output change after offloading", f"{diff:.2e}"),
    ]
    print("| teacher offloading | |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
