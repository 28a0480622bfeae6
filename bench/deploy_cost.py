"""Table 2 measured: the deployment cost of a LoRA bank vs one CollectionLoRA, for N = 10 / 20 / 50.

    python bench/deploy_cost.py            # N = 10, 20, 50; a stream of 200 queries each
    python bench/deploy_cost.py --quick    # N = 3, 5; 40 queries

Per N:
- Storage: bytes on disk of N teacher LoRAs (+ the Lightning LoRA the bank stacks) vs one student.
- Load x switches: the bank serves a seeded stream of queries spread over the N effects, loading each
  query's teacher file from disk unless it is the one loaded (``LoraBankEditor.prepare``, the code the
  server runs); the CollectionLoRA is loaded and fused once and then never switches.
- Routing: the bank must find the LoRA from the user's words. Held-out phrasings (never the teacher
  prompt): the offline describer's account of 2 training pairs (what a user might say having seen the
  effect), and "make it look like <display name>". Routers: keyword TF-IDF and the backbone's own text
  encoder (embedding), both against the teacher prompts. The CollectionLoRA is addressed by trigger:
  the catalog lookup is exact by construction (measured here on the same stream, so a bug would show).

Without trained files the LoRAs are written here at the tiny backbone's real ranks and shapes with
random weights: storage and load time depend on shapes, not values. The table says which.
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from serve import STUDENT_RANK, TEACHER_RANK, backbone, make_files  # noqa: E402

from distill.backbones import adapters  # noqa: E402
from distill.effectbench.bench import BenchSpec, ground_truth, train_scene  # noqa: E402
from distill.effectbench.effects import EFFECTS  # noqa: E402
from distill.export import read_catalog  # noqa: E402
from distill.prompts.describer import describe_effect  # noqa: E402
from distill.prompts.embedding import embedder_for  # noqa: E402
from distill.serving import CollectionEditor, InstructionRouter, LoraBankEditor, read_bank  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


def phrasings(name: str) -> dict[str, str]:
    """Held-out ways a user might ask for the effect (never its teacher prompt)."""
    effect = next(e for e in EFFECTS if e.name == name)
    pairs = []
    for i in range(2):
        s = train_scene(name, i, BenchSpec())
        pairs.append((s.to_pil(), _pil(ground_truth(effect, s))))
    return {
        "described": describe_effect(pairs, teacher_prompt="").text,
        "by name": f"make it look like {effect.display_name.lower()}",
    }


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return ""


def measure(bb, work: Path, n: int, queries: int, seed: int, embed, cache: dict) -> dict:
    names = [e.name for e in EFFECTS[:n]]
    files = make_files(bb, work / f"n{n}", names)
    bank = read_bank(files["bank"])
    out: dict = {"n": n}
    out["bank_bytes"] = sum(b.path.stat().st_size for b in bank)
    out["lightning_bytes"] = files["lightning"].stat().st_size
    out["student_bytes"] = files["lora"].stat().st_size

    rng = random.Random(seed)
    stream = [rng.choice(names) for _ in range(queries)]

    # the bank: the server's own prepare() per query
    editor = LoraBankEditor(bb, bank, files["lightning"])
    loads = []
    for name in stream:
        sec, switched = editor.prepare(editor.plan(effect=name).loras)
        if switched:
            loads.append(sec)
    out["switches"], out["load_total"] = editor.switches, editor.load_seconds
    out["load_mean"] = sum(loads) / len(loads) if loads else 0.0
    adapters.activate(bb.transformer, None)
    for a in adapters.adapter_names(bb.transformer):
        adapters.delete(bb.transformer, a)

    # the CollectionLoRA: load + fuse once, then every query is a catalog lookup
    t0 = time.perf_counter()
    ours = CollectionEditor.load(files["lora"], backbone=bb)
    out["student_load"] = time.perf_counter() - t0
    catalog = read_catalog(files["lora"])
    by_trigger = {e.trigger: e.name for e in catalog.entries}
    hits = 0
    for name in stream:
        prompt = ours.plan(effect=name).prompt
        hits += by_trigger.get(prompt.split(" ", 1)[0]) == name
    out["ours_acc"] = hits / len(stream)
    adapters.unfuse(bb.transformer)
    adapters.activate(bb.transformer, None)
    adapters.delete(bb.transformer, "student")

    # routing the held-out phrasings
    for name in names:
        if name not in cache:
            cache[name] = phrasings(name)
    descriptions = {b.name: b.teacher_prompt for b in bank}
    routers = {
        "keyword": InstructionRouter(descriptions),
        "embedding": InstructionRouter(descriptions, embed),
    }
    for rname, router in routers.items():
        for kind in ("described", "by name"):
            t0 = time.perf_counter()
            right = sum(router.route(cache[name][kind]) == name for name in stream)
            out[f"acc {rname} {kind}"] = right / len(stream)
            out[f"ms {rname} {kind}"] = (time.perf_counter() - t0) / len(stream) * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--effects", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.effects, args.queries = [3, 5], 40
    bb, source = backbone()
    embed = embedder_for(bb)
    cache: dict = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.effects:
            log(f"N = {n}")
            rows.append(measure(bb, Path(tmp), n, args.queries, args.seed, embed, cache))

    cols = " | ".join(f"{r['n']} LoRAs" for r in rows)
    print(f"\n## Deployment cost (Table 2, measured; {args.queries} queries per column)\n")
    print(
        f"Backbone: {source}. LoRA files: random weights at the real tiny ranks and shapes (teachers rank "
        f"{TEACHER_RANK}, student rank {STUDENT_RANK}, Lightning rank 16), written by this script. CPU, one "
        "torch thread.\n"
    )
    print(f"| metric | method | {cols} |")
    print("|---|---|" + "---|" * len(rows))

    def row(metric: str, method: str, cells: list[str]) -> None:
        print(f"| {metric} | {method} | " + " | ".join(cells) + " |")

    row(
        "Storage",
        "bank",
        [
            f"{fmt_bytes(r['bank_bytes'] / r['n'])} x {r['n']} + Lightning {fmt_bytes(r['lightning_bytes'])}"
            for r in rows
        ],
    )
    row("", "ours", [f"{fmt_bytes(r['student_bytes'])} x 1" for r in rows])
    row(
        "",
        "ours / bank",
        [f"{r['student_bytes'] / (r['bank_bytes'] + r['lightning_bytes']):.1%}" for r in rows],
    )
    row(
        "LoRA load x switches",
        "bank",
        [f"{r['load_mean']:.3f} s x {r['switches']} = {r['load_total']:.2f} s" for r in rows],
    )
    row("", "ours", [f"0 s x 0 (one load + fuse at start: {r['student_load']:.2f} s)" for r in rows])
    for rname in ("keyword", "embedding"):
        for kind in ("described", "by name"):
            row(
                f"Routing accuracy ({kind} phrasing)",
                f"bank, {rname} router",
                [f"{r[f'acc {rname} {kind}']:.0%} ({r[f'ms {rname} {kind}']:.2f} ms/q)" for r in rows],
            )
    row("Routing accuracy", "ours (trigger, exact lookup)", [f"{r['ours_acc']:.0%} (0 ms/q)" for r in rows])
    print(f"\nCommand: `{shlex.join(['python', 'bench/deploy_cost.py', *sys.argv[1:]])}`")


if __name__ == "__main__":
    main()
