"""EffectBench-mini on disk: training pair sets per effect, held-out test sources, a manifest.

Layout written by ``write_bench(root, spec)``::

    root/manifest.json                      spec, effects (name, prompts, kind, split), file lists
    root/<effect>/source/0001.png ...       one pair set per effect (caption-free), importable as
    root/<effect>/target/0001.png ...       is by the studio's pair-set reader
    root/teacher_prompts/<effect>.txt       the effect's teacher prompt (kept outside the pair-set
                                            folder, whose reader accepts only source/ and target/)
    root/test/<category>/0001.png ...       test sources, never used for training
    root/test/<category>/masks/0001.png     their subject masks (grey, 255 = subject)

Scenes are generated from seeds: training scene seeds lie in [0, 2**30) and depend on (spec seed,
effect, pair index); test scene seeds lie in [2**30, 2**31) and depend on (spec seed, category,
index), so the two can never overlap. Each effect folder is written to a temporary folder and
renamed into place, so a folder that exists is complete; rerunning resumes, skipping those.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
from PIL import Image

from .effects import EFFECT_NAMES, Effect, get_effect, split_of
from .scenes import CATEGORIES, Category, Scene, from_pil, make_scene, to_pil

FORMAT = "effectbench-mini/1"
MANIFEST = "manifest.json"
TEST_DIR = "test"
PROMPTS_DIR = "teacher_prompts"
TEST_SEED_BASE = 1 << 30  # train seeds stay below, test seeds at or above
_SEED_BLOCK = 1_000_000  # seeds per spec seed; also the number of test seeds per spec seed
_MAX_SPEC_SEED = 1000  # 1000 * 1e6 = 1e9 < 2**30 keeps train seeds below TEST_SEED_BASE
_MAX_PAIRS = 1000  # train seed = block + effect slot * 1000 + index
_MAX_TEST = _SEED_BLOCK // len(CATEGORIES)

assert not {TEST_DIR, PROMPTS_DIR} & set(EFFECT_NAMES), "effect names must not clash with bench folders"


@dataclass(frozen=True)
class BenchSpec:
    """What the bench holds. The same spec always writes the same files."""

    n_train_pairs: int = 20
    n_test_per_category: int = 100
    size: int = 64
    seed: int = 0
    effects: tuple[str, ...] = EFFECT_NAMES

    def __post_init__(self) -> None:
        object.__setattr__(self, "effects", tuple(self.effects))
        if not 1 <= self.n_train_pairs <= _MAX_PAIRS:
            raise ValueError(
                f"Training pairs per effect must be between 1 and {_MAX_PAIRS} (got {self.n_train_pairs})."
            )
        if not 0 <= self.n_test_per_category <= _MAX_TEST:
            raise ValueError(
                f"Test images per category must be between 0 and {_MAX_TEST} (got {self.n_test_per_category})."
            )
        if not 16 <= self.size <= 1024:
            raise ValueError(f"Image size must be between 16 and 1024 px (got {self.size}).")
        if not 0 <= self.seed < _MAX_SPEC_SEED:
            raise ValueError(f"The bench seed must be between 0 and {_MAX_SPEC_SEED - 1} (got {self.seed}).")
        if not self.effects:
            raise ValueError("The bench needs at least one effect.")
        if len(set(self.effects)) != len(self.effects):
            raise ValueError("Each effect may appear only once in the bench.")
        for name in self.effects:
            get_effect(name)  # raises with the list of known effects

    def to_dict(self) -> dict:
        d = asdict(self)
        d["effects"] = list(self.effects)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BenchSpec:
        return cls(**{**d, "effects": tuple(d["effects"])})


class EffectEntry(TypedDict):
    name: str
    display_name: str
    teacher_prompt: str
    kind: str
    split: str  # "main" | "extension"
    dir: str  # the pair-set folder, relative to the bench root
    teacher_prompt_file: str
    fingerprint: str  # of the effect's output on a probe scene: changes when the procedure does
    sources: list[str]  # relative to the bench root
    targets: list[str]
    seeds: list[int]
    categories: list[str]


class TestEntry(TypedDict):
    dir: str
    images: list[str]  # relative to the bench root
    masks: list[str]
    seeds: list[int]


class BenchManifest(TypedDict):
    format: str
    complete: bool
    spec: dict
    effects: list[EffectEntry]
    test: dict[str, TestEntry]


# ----------------------------------------------------------------------------------------------
# Seeds, scenes and ground truth


def _slot(effect: str) -> int:
    return EFFECT_NAMES.index(get_effect(effect).name)


def train_seed(effect: Effect | str, index: int, seed: int = 0) -> int:
    """Scene seed of training pair ``index`` (0-based) of ``effect``; always < TEST_SEED_BASE."""
    name = effect if isinstance(effect, str) else effect.name
    return seed * _SEED_BLOCK + _slot(name) * _MAX_PAIRS + index


def train_category(index: int) -> Category:
    """Training pairs alternate animal and portrait sources."""
    return CATEGORIES[index % len(CATEGORIES)]


def train_scene(effect: Effect | str, index: int, spec: BenchSpec = BenchSpec()) -> Scene:
    return make_scene(train_category(index), train_seed(effect, index, spec.seed), spec.size)


def test_seed(category: Category, index: int, seed: int = 0) -> int:
    return TEST_SEED_BASE + seed * _SEED_BLOCK + CATEGORIES.index(category) * _MAX_TEST + index


def test_sources(category: Category, n: int, seed: int = 0, size: int = 64) -> list[Scene]:
    """The first ``n`` held-out test scenes of ``category``; disjoint from every training scene."""
    if category not in CATEGORIES:
        raise ValueError(f"Unknown category {category!r}; expected one of {', '.join(CATEGORIES)}.")
    return [make_scene(category, test_seed(category, i, seed), size) for i in range(n)]


# Not pytest tests, despite the names (a test module importing them would otherwise collect them).
test_seed.__test__ = False  # type: ignore[attr-defined]
test_sources.__test__ = False  # type: ignore[attr-defined]


def ground_truth(effect: Effect | str, scene: Scene) -> np.ndarray:
    """The exact output of ``effect`` on ``scene`` (H x W x 3 float32 in [0, 1])."""
    e = get_effect(effect) if isinstance(effect, str) else effect
    return e.fn(scene.image, scene.mask)


def mirror_flips(effect: Effect | str, spec: BenchSpec | None = None, n: int = 4) -> tuple[bool, bool]:
    """Whether the effect commutes with a left-right and with an upside-down flip, checked exactly on
    its first ``n`` training scenes: the flips under which a teacher may train on mirrored pairs
    (``LoraTrainConfig.flip_x`` / ``flip_y``), as a curator would tick them for a symmetric effect."""
    e = get_effect(effect) if isinstance(effect, str) else effect
    spec = spec or BenchSpec()
    ok = [True, True]
    for i in range(n):
        sc = train_scene(e, i, spec)
        y = e.fn(sc.image, sc.mask)
        for k, axis in enumerate((1, 0)):
            if ok[k]:
                flipped = e.fn(np.flip(sc.image, axis).copy(), np.flip(sc.mask, axis).copy())
                ok[k] = bool(np.abs(flipped - np.flip(y, axis)).max() < 0.02)
    return ok[0], ok[1]


# ----------------------------------------------------------------------------------------------
# Writing


def _png(i: int) -> str:
    return f"{i + 1:04d}.png"


def _save(arr: np.ndarray, path: Path) -> None:
    to_pil(arr).save(path, compress_level=1)  # fast; these are small images


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray((np.clip(mask, 0, 1) * 255 + 0.5).astype(np.uint8), "L").save(path, compress_level=1)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def effect_fingerprint(effect: Effect | str, size: int = 64) -> str:
    """A short hash of the effect's 8-bit output on a fixed probe scene. A resumed write compares
    it with the manifest's, so folders written by an older version of an effect are redone."""
    e = get_effect(effect) if isinstance(effect, str) else effect
    probe = make_scene("portrait", 0, size)
    out = (np.clip(e.fn(probe.image, probe.mask), 0, 1) * 255 + 0.5).astype(np.uint8)
    return hashlib.sha256(out.tobytes()).hexdigest()[:16]


def _effect_entry(name: str, spec: BenchSpec) -> EffectEntry:
    e = get_effect(name)
    files = [_png(i) for i in range(spec.n_train_pairs)]
    return EffectEntry(
        name=e.name,
        display_name=e.display_name,
        teacher_prompt=e.teacher_prompt,
        kind=e.kind,
        split=split_of(e),
        dir=e.name,
        teacher_prompt_file=f"{PROMPTS_DIR}/{e.name}.txt",
        fingerprint=effect_fingerprint(e, spec.size),
        sources=[f"{e.name}/source/{f}" for f in files],
        targets=[f"{e.name}/target/{f}" for f in files],
        seeds=[train_seed(e, i, spec.seed) for i in range(spec.n_train_pairs)],
        categories=[train_category(i) for i in range(spec.n_train_pairs)],
    )


def _test_entry(category: Category, spec: BenchSpec) -> TestEntry:
    files = [_png(i) for i in range(spec.n_test_per_category)]
    d = f"{TEST_DIR}/{category}"
    return TestEntry(
        dir=d,
        images=[f"{d}/{f}" for f in files],
        masks=[f"{d}/masks/{f}" for f in files],
        seeds=[test_seed(category, i, spec.seed) for i in range(spec.n_test_per_category)],
    )


def _manifest(spec: BenchSpec, complete: bool) -> BenchManifest:
    return BenchManifest(
        format=FORMAT,
        complete=complete,
        spec=spec.to_dict(),
        effects=[_effect_entry(n, spec) for n in spec.effects],
        test={c: _test_entry(c, spec) for c in CATEGORIES},
    )


def _complete(folder: Path, n: int) -> bool:
    """A renamed-into-place folder is complete; count its files in case someone edited it."""
    return all(len(list((folder / d).glob("*.png"))) == n for d in ("source", "target"))


def _write_effect(root: Path, name: str, spec: BenchSpec) -> None:
    final = root / name
    if final.is_dir() and _complete(final, spec.n_train_pairs):
        return
    e = get_effect(name)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "source").mkdir(parents=True)
    (tmp / "target").mkdir()
    for i in range(spec.n_train_pairs):
        scene = train_scene(e, i, spec)
        _save(scene.image, tmp / "source" / _png(i))
        _save(e.fn(scene.image, scene.mask), tmp / "target" / _png(i))
    shutil.rmtree(final, ignore_errors=True)  # an incomplete or edited folder is rewritten
    os.rename(tmp, final)


def _write_test(root: Path, category: Category, spec: BenchSpec) -> None:
    final = root / TEST_DIR / category
    n = spec.n_test_per_category
    if final.is_dir() and len(list(final.glob("*.png"))) == n and len(list(final.glob("masks/*.png"))) == n:
        return
    tmp = root / TEST_DIR / f".tmp-{category}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "masks").mkdir(parents=True)
    for i, scene in enumerate(test_sources(category, n, spec.seed, spec.size)):
        _save(scene.image, tmp / _png(i))
        _save_mask(scene.mask, tmp / "masks" / _png(i))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)


def write_bench(
    out_dir: Path | str, spec: BenchSpec = BenchSpec(), progress: Callable[[int, int], None] | None = None
) -> BenchManifest:
    """Write the bench under ``out_dir`` (created if needed) and return its manifest.

    Resumes: complete folders written by the same version of their effect (same fingerprint)
    are kept. A folder holding a bench written with a
    different spec is refused rather than mixed. ``progress(done, total)`` counts effect and
    test-category folders."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(spec, complete=True)
    if (root / MANIFEST).exists():
        old = load_manifest(root)
        if old["spec"] != spec.to_dict():
            raise ValueError(
                f"{root} already holds a bench written with other settings ({old['spec']}); "
                "write to an empty folder or delete this one first."
            )
        now = {e["name"]: e["fingerprint"] for e in manifest["effects"]}
        for e in old["effects"]:
            if e.get("fingerprint") != now[e["name"]]:  # the effect changed since: redo it
                shutil.rmtree(root / e["dir"], ignore_errors=True)
    for stale in list(root.glob(".tmp-*")) + list((root / TEST_DIR).glob(".tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted run
    _atomic_write_text(root / MANIFEST, json.dumps({**manifest, "complete": False}, indent=1))
    (root / PROMPTS_DIR).mkdir(exist_ok=True)
    (root / TEST_DIR).mkdir(exist_ok=True)
    total = len(spec.effects) + len(CATEGORIES)
    done = 0
    for name in spec.effects:
        _write_effect(root, name, spec)
        _atomic_write_text(root / PROMPTS_DIR / f"{name}.txt", get_effect(name).teacher_prompt + "\n")
        done += 1
        if progress:
            progress(done, total)
    for category in CATEGORIES:
        _write_test(root, category, spec)
        done += 1
        if progress:
            progress(done, total)
    _atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


# ----------------------------------------------------------------------------------------------
# Reading


def load_manifest(bench_dir: Path | str) -> BenchManifest:
    """The bench's manifest; raises a readable error if the folder holds no bench."""
    path = Path(bench_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"No EffectBench-mini at {bench_dir}: {MANIFEST} is missing (write the bench first)."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is damaged ({err}); write the bench again into an empty folder.") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an EffectBench-mini manifest (format {manifest.get('format')!r}).")
    return manifest


def load_spec(bench_dir: Path | str) -> BenchSpec:
    return BenchSpec.from_dict(load_manifest(bench_dir)["spec"])


def load_test_scenes(bench_dir: Path | str, category: Category, n: int | None = None) -> list[Scene]:
    """The written test sources of ``category`` (images and masks), in order."""
    root = Path(bench_dir)
    entry = load_manifest(root)["test"][category]
    pairs: Sequence[tuple[str, str]] = list(zip(entry["images"], entry["masks"]))[:n]
    scenes = []
    for img, mask in pairs:
        with Image.open(root / img) as im, Image.open(root / mask) as mk:
            arr = from_pil(im)
            m = np.asarray(mk.convert("L"), dtype=np.float32) / 255.0
        scenes.append(Scene(image=arr, mask=m, category=category))
    return scenes
