"""Serving benchmark: one CollectionLoRA server vs a LoRA-bank server under the same mixed stream.

    python bench/serve.py                 # 10 effects, 4 clients, 64 requests per server
    python bench/serve.py --quick         # a smoke run (3 effects, 12 requests)
    python bench/serve.py --lora F --bank DIR --lightning F --model-path DIR   # trained files

Each server runs as its own subprocess on a loopback port (so its peak RSS is its own), one after the
other, with one torch thread. Several client threads send the same seeded stream of effects (httpx);
the run stops after --requests or --max-seconds. Without trained files the LoRAs are made here at the
tiny backbone's real ranks with random weights (timing and memory do not depend on the values), and
the backbone is the pretrained tiny editor if present, else a random one of the same shape.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402

from distill.backbones import adapters  # noqa: E402
from distill.backbones.tiny import WEIGHTS_DIR, TinyConfig, TinyEditor  # noqa: E402
from distill.effectbench.effects import EFFECTS  # noqa: E402
from distill.export import CatalogEntry, export_collection_lora  # noqa: E402
from distill.serving import TEACHER_PROMPT_KEY  # noqa: E402

TEACHER_RANK = 16  # LoraTrainConfig.for_backbone("tiny").rank
STUDENT_RANK = 16  # DistillConfig.for_backbone("tiny").student_lora.rank
LIGHTNING_RANK = 16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def backbone() -> tuple[TinyEditor, str]:
    try:
        return TinyEditor.from_pretrained(), "pretrained tiny editor"
    except FileNotFoundError:
        bb = TinyEditor.random(TinyConfig(), seed=0)
        bb.freeze()
        return bb, "random tiny editor (no pretrained checkpoint at " + str(WEIGHTS_DIR) + ")"


def random_lora(bb: TinyEditor, name: str, rank: int, seed: int, std: float = 0.02) -> None:
    adapters.add_lora(bb.transformer, name, adapters.LoraSpec(rank=rank, alpha=float(rank)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.lora_parameters(bb.transformer, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    adapters.set_trainable(bb.transformer, [])


def catalog_entries(names: list[str]) -> list[CatalogEntry]:
    fx = {e.name: e for e in EFFECTS}
    return [
        CatalogEntry(n, f"<{n.replace('-', '_')}_{k:03d}>", fx[n].teacher_prompt, fx[n].teacher_prompt)
        for k, n in enumerate(names)
    ]


def make_files(bb: TinyEditor, work: Path, names: list[str]) -> dict[str, Path]:
    """Random-weight files of the real ranks: a CollectionLoRA, one teacher per effect, a Lightning LoRA."""
    bank = work / "bank"
    bank.mkdir(parents=True, exist_ok=True)
    entries = catalog_entries(names)
    for k, e in enumerate(entries):
        random_lora(bb, "t", TEACHER_RANK, seed=100 + k)
        adapters.save_lora(
            bb.transformer, "t", bank / f"{e.name}.safetensors", {TEACHER_PROMPT_KEY: e.teacher_prompt}
        )
        adapters.delete(bb.transformer, "t")
    random_lora(bb, "lightning", LIGHTNING_RANK, seed=1)
    adapters.save_lora(bb.transformer, "lightning", work / "lightning.safetensors")
    adapters.delete(bb.transformer, "lightning")
    random_lora(bb, "student", STUDENT_RANK, seed=2)
    lora = export_collection_lora(bb.transformer, work / "collection.safetensors", entries, backbone="tiny")
    adapters.delete(bb.transformer, "student")
    return {"lora": lora, "bank": bank, "lightning": work / "lightning.safetensors"}


def test_images(n: int = 8) -> list[bytes]:
    from distill.effectbench.bench import test_sources

    out = []
    for s in test_sources("animal", n // 2) + test_sources("portrait", n - n // 2):
        buf = io.BytesIO()
        s.to_pil().save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# -- one server, as a subprocess ---------------------------------------------------------------------
def run_server(args: argparse.Namespace) -> None:
    """The child: load the editor and serve until killed."""
    torch.set_num_threads(1)
    from distill.serving import CollectionEditor, LoraBankEditor
    from studio.serve import ServeConfig, serve

    bb = TinyEditor.from_pretrained(args.model_path, device=args.device)
    t0 = time.perf_counter()
    if args.serve == "collection":
        editor = CollectionEditor.load(args.lora, backbone=bb)
    else:
        editor = LoraBankEditor.load(args.bank, args.lightning, backbone=bb)
    log(f"{args.serve}: ready in {time.perf_counter() - t0:.2f} s")
    serve(editor, ServeConfig(port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(url: str, stream: list[str], images: list[bytes], clients: int, max_seconds: float) -> dict:
    """Send ``stream`` (effect names) from ``clients`` threads; each takes the next request in turn."""
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    batch_sizes: list[int] = []
    position = iter(range(len(stream)))
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(position, None)
                if i is None:
                    return
                files = {"image": ("in.png", images[i % len(images)], "image/png")}
                t0 = time.perf_counter()
                r = c.post("/edit", data={"effect": stream[i], "seed": str(i)}, files=files)
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                        batch_sizes.append(int(r.headers["x-batch-size"]))
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) >= 2 else lat * 19
    return {
        "done": len(lat),
        "errors": errors,
        "wall": wall,
        "rps": len(lat) / wall if wall else 0.0,
        "p50": statistics.median(lat) if lat else float("nan"),
        "p95": q[18] if lat else float("nan"),
        "mean_batch": statistics.mean(batch_sizes) if batch_sizes else float("nan"),
    }


def bench_server(kind: str, files: dict, model: Path, args: argparse.Namespace, stream, images) -> dict:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", kind, "--port", str(port), "--model-path", str(model)]
    cmd += [
        "--lora",
        str(files["lora"]),
        "--bank",
        str(files["bank"]),
        "--lightning",
        str(files["lightning"]),
    ]
    cmd += [
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--device",
        args.device,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the {kind} server exited with code {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 300:
                raise RuntimeError(f"the {kind} server did not start in 300 s")
            time.sleep(0.2)
        startup = time.perf_counter() - t0
        res = drive(url, stream, images, args.clients, args.max_seconds)
        res["health"] = httpx.get(url + "/health", timeout=10).json()
        res["rss"] = peak_rss_mb(proc.pid)
        res["startup"] = startup
        return res
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--effects", type=int, default=10)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-seconds", type=float, default=75.0, help="per server")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--lora", type=Path, default=None, help="a trained CollectionLoRA (with --bank, --lightning)"
    )
    ap.add_argument("--bank", type=Path, default=None)
    ap.add_argument("--lightning", type=Path, default=None)
    ap.add_argument("--model-path", type=Path, default=None, help="tiny backbone folder")
    ap.add_argument("--serve", choices=["collection", "bank"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        run_server(args)
        return
    torch.set_num_threads(1)
    if args.quick:
        args.effects, args.requests, args.clients, args.max_seconds = 3, 12, 3, 40.0

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.lora and args.bank and args.lightning:
            from distill.export import read_catalog

            files = {"lora": args.lora, "bank": args.bank, "lightning": args.lightning}
            names = read_catalog(args.lora).names()
            model, source = args.model_path or WEIGHTS_DIR, "trained files"
        else:
            bb, bb_source = backbone()
            names = [e.name for e in EFFECTS[: args.effects]]
            model = work / "model"
            bb.save_pretrained(model)  # before any adapter is added: the servers load this clean copy
            files = make_files(bb, work, names)
            source = f"random-weight LoRAs at the real tiny ranks on the {bb_source}"
        rng = random.Random(args.seed)
        stream = [rng.choice(names) for _ in range(args.requests)]
        images = test_images()
        rows = {}
        for kind in ("collection", "bank"):
            log(f"{kind}: {args.requests} requests from {args.clients} clients")
            rows[kind] = bench_server(kind, files, model, args, stream, images)

    print(f"\n## Serving: CollectionLoRA vs LoRA bank ({len(names)} effects, {args.clients} clients, "
          f"{args.requests} requests, device {args.device})\n")  # fmt: skip
    print(
        f"Files: {source}. Max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms; one torch thread.\n"
    )
    print(
        "| server | done | req/s | p50 latency | p95 latency | mean batch | LoRA switches | load time | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, label in (
        ("collection", "CollectionLoRA (fused, 8 NFE)"),
        ("bank", "LoRA bank + Lightning (8 NFE)"),
    ):
        r, h = rows[kind], rows[kind]["health"]
        sw = h.get("switches", 0)
        load = f"{h.get('load_seconds', 0.0):.2f} s"
        print(
            f"| {label} | {r['done']}/{args.requests} | {r['rps']:.2f} | {r['p50']:.2f} s | {r['p95']:.2f} s | "
            f"{r['mean_batch']:.2f} | {sw} | {load} | {r['rss']:.0f} MB |"
        )
        if r["errors"]:
            print(f"\n{kind}: {len(r['errors'])} errors, first: {r['errors'][0]}\n")
    print(f"\nCommand: `{shlex.join(['python', 'bench/serve.py', *sys.argv[1:]])}`")
    print(
        json.dumps({k: {kk: v for kk, v in r.items() if kk != "errors"} for k, r in rows.items()}),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
