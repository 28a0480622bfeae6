"""Table 4 analogue: how each system holds up as one LoRA collects more effects.

Reads the JSON summaries that ``bench/reproduce.py`` writes beside its tables (``results/table1_<tag>.json``)
for runs at different numbers of effects and writes one markdown table, one row per system and number of
effects, with the distillation time of Ours.

    python bench/scaling.py --tags 10fx7 20fx8 50fx8 [--out results/table4_scaling.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load(results: Path, tag: str) -> dict:
    f = results / f"table1_{tag}.json"
    if not f.exists():
        raise SystemExit(f"No summary {f}: run bench/reproduce.py with --tag {tag} first.")
    return json.loads(f.read_text())


def scaling_table(runs: list[dict]) -> str:
    """One markdown table: systems x numbers of effects (PSNR, accuracy, BCR), runs in order of size."""
    runs = sorted(runs, key=lambda r: len(r["effects"]))
    systems = list(dict.fromkeys(name for r in runs for name in r["systems"]))
    sizes = [len(r["effects"]) for r in runs]
    head = (
        "| System | NFE | "
        + " | ".join(f"{n} effects ({r['tag']}): PSNR / Acc / BCR" for n, r in zip(sizes, runs))
        + " |"
    )
    lines = [head, "|---|---|" + "---|" * len(runs)]
    for name in systems:
        nfe = next(r["systems"][name]["nfe"] for r in runs if name in r["systems"])
        cells = []
        for r in runs:
            m = r["systems"].get(name)
            cells.append(f"{m['psnr']:.2f} / {m['accuracy']:.3f} / {m['bcr']:.3f}" if m else "-")
        lines.append(f"| {name} | {nfe} | " + " | ".join(cells) + " |")
    lines.append(
        "| Ours: distillation minutes | | "
        + " | ".join(f"{r['distill_seconds'] / 60:.1f}" for r in runs)
        + " |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", nargs="+", required=True, help="reproduce.py run tags, e.g. 10fx7 20fx8 50fx8")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "table4_scaling.md")
    args = ap.parse_args(argv)
    runs = [load(args.results, t) for t in args.tags]
    cmd = "python bench/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sources = "\n".join(f"- {r['tag']}: `{r['command']}` at commit `{r['commit']}`" for r in runs)
    text = (
        "# Table 4 analogue: scaling the number of effects in one LoRA\n\n"
        f"`{cmd}`, from the runs:\n{sources}\n\n"
        "Same test sources per effect in every run; accuracy and BCR are measured among the run's own "
        "effects (more effects: more ways to be nearest to the wrong one).\n\n" + scaling_table(runs)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
