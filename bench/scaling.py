"""Table 4 analogue: how each system holds up as one LoRA collects more effects.

Reads the JSON summaries that ``bench/reproduce.py`` writes beside its tables (``results/table1_<tag>.json``)
for runs at different numbers of effects and writes one markdown table, one row per system and number of
effects, with the distillation time of Ours, and a small PNG plot of PSNR and BCR against the runs.
Notes already written under the table of an earlier ``--out`` (paragraphs starting "Notes") are kept.

    python bench/scaling.py --tags 10fx7 20fx8 50fx8 [--out results/table4_scaling.md]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load(results: Path, tag: str) -> dict:
    f = results / f"table1_{tag}.json"
    if not f.exists():
        raise SystemExit(f"No summary {f}: run bench/reproduce.py with --tag {tag} first.")
    return json.loads(f.read_text())


def ordered(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """The runs in order of size and the systems in the order they first appear (table and plot alike)."""
    runs = sorted(runs, key=lambda r: len(r["effects"]))
    return runs, list(dict.fromkeys(name for r in runs for name in r["systems"]))


def scaling_table(runs: list[dict]) -> str:
    """One markdown table: systems x numbers of effects (PSNR, accuracy, BCR), runs in order of size."""
    runs, systems = ordered(runs)
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


def kept_notes(previous: str) -> str:
    """The "Notes ..." paragraphs of an earlier table: the analysis a rerun must not throw away."""
    at = previous.find("\nNotes")
    return previous[at:].strip() + "\n" if at >= 0 else ""


# one colour per system, in the order systems first appear
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def scaling_plot(runs: list[dict], path: Path) -> Path:
    """Two panels (PSNR, BCR), one line per system over the runs in order of size, drawn with PIL."""
    from PIL import Image, ImageDraw

    runs, systems = ordered(runs)
    w, h, pad, legend = max(300, 44 * len(runs) + 60), 220, 40, 16 * len(systems) + 8  # room for each label
    img = Image.new("RGB", (2 * w + pad, h + 2 * pad + legend), "white")
    draw = ImageDraw.Draw(img)
    for panel, (key, title) in enumerate(
        [("psnr", "PSNR (dB), higher is better"), ("bcr", "BCR, lower is better")]
    ):
        x0, y0 = pad + panel * (w + pad // 2), pad
        values = [r["systems"][n][key] for r in runs for n in systems if n in r["systems"]]
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        draw.rectangle([x0, y0, x0 + w - pad, y0 + h], outline="black")
        draw.text((x0, 8), title, fill="black")
        draw.text((x0 - 36, y0 - 5), f"{hi:.2f}", fill="black")
        draw.text((x0 - 36, y0 + h - 5), f"{lo:.2f}", fill="black")

        xs = [x0 + 10 + i * (w - pad - 20) / max(1, len(runs) - 1) for i in range(len(runs))]
        for x, r in zip(xs, runs):
            draw.text((x - 14, y0 + h + 4), f"{len(r['effects'])}", fill="black")
            draw.text((x - 14, y0 + h + 16), r["tag"][-6:], fill="gray")
        for colour, name in zip(_COLOURS * 4, systems):
            pts = [
                (x, y0 + h - 8 - (r["systems"][name][key] - lo) / span * (h - 16))
                for x, r in zip(xs, runs)
                if name in r["systems"]
            ]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    for k, (colour, name) in enumerate(zip(_COLOURS * 4, systems)):
        y = h + 2 * pad + 4 + 16 * k
        draw.rectangle([pad, y + 3, pad + 12, y + 11], fill=colour)
        draw.text((pad + 18, y), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", nargs="+", required=True, help="reproduce.py run tags, e.g. 10fx7 20fx8 50fx8")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "table4_scaling.md")
    args = ap.parse_args(argv)
    runs = [load(args.results, t) for t in args.tags]
    cmd = shlex.join(["python", "bench/scaling.py", *(argv if argv is not None else sys.argv[1:])])
    sources = "\n".join(f"- {r['tag']}: `{r['command']}` at commit `{r['commit']}`" for r in runs)
    text = (
        "# Table 4 analogue: scaling the number of effects in one LoRA\n\n"
        f"`{cmd}`, from the runs:\n{sources}\n\n"
        "Same test sources per effect in every run; accuracy and BCR are measured among the run's own "
        "effects (more effects: more ways to be nearest to the wrong one).\n\n" + scaling_table(runs)
    )
    plot = scaling_plot(runs, args.out.with_suffix(".png"))
    text += f"\n![PSNR and BCR against the number of effects]({plot.name})\n"
    notes = kept_notes(args.out.read_text()) if args.out.exists() else ""
    if notes:
        text += "\n" + notes
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
