"""EffectBench-mini in the studio: write the bench to disk and import its effects as pair sets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from distill.effectbench.bench import BenchSpec, load_manifest, write_bench
from distill.effectbench.effects import EFFECTS

from .context import Studio
from .library import import_pairset, list_effects

Progress = Callable[[int, int, str], None]


def write(
    studio: Studio, out: Path | None = None, spec: BenchSpec | None = None, progress: Progress | None = None
) -> Path:
    out = out or studio.config.bench_dir
    write_bench(
        out, spec or BenchSpec(), progress=(lambda i, n: progress(i, n, "writing")) if progress else None
    )
    return out


def import_bench(
    studio: Studio,
    bench_dir: Path | None = None,
    *,
    effects: list[str] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Import the bench's effects (all, or the named ones) with their teacher prompts; writes the
    bench first if it is not on disk. Effects already in the studio are left as they are."""
    bench_dir = bench_dir or studio.config.bench_dir
    if not (bench_dir / "manifest.json").exists():
        write(studio, bench_dir, progress=progress)
    manifest = load_manifest(bench_dir)
    have = {e.name for e in list_effects(studio)}
    wanted = [e for e in manifest["effects"] if effects is None or e["name"] in effects]
    unknown = set(effects or []) - {e["name"] for e in manifest["effects"]}
    if unknown:
        raise ValueError(
            f"The bench has no effect(s) {', '.join(sorted(unknown))}; known: {', '.join(e.name for e in EFFECTS)}"
        )
    done = []
    for i, e in enumerate(wanted):
        if progress:
            progress(i, len(wanted), f"importing {e['name']}")
        if e["name"] in have:
            continue
        import_pairset(
            studio,
            e["name"],
            bench_dir / e["name"],
            teacher_prompt=e["teacher_prompt"],
            display_name=e["display_name"],
            category="mixed",
        )
        done.append(e["name"])
    if progress:
        progress(len(wanted), len(wanted), "done")
    return done
