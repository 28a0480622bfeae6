"""EffectBench-mini: procedural scenes, general edits, an effect library with exact ground truth,
the bench writer and a contact sheet. Needs no GPU and no downloads."""

from .bench import (
    BenchManifest,
    BenchSpec,
    ground_truth,
    load_manifest,
    load_spec,
    load_test_scenes,
    test_sources,
    train_scene,
    train_seed,
    write_bench,
)
from .contact_sheet import contact_sheet, write_contact_sheet
from .effects import (
    EFFECT_NAMES,
    EFFECTS,
    EXTENSION,
    MAIN_BENCH,
    Effect,
    compose,
    get_effect,
    split_of,
)
from .scenes import CATEGORIES, Scene, make_scene

__all__ = [
    "CATEGORIES",
    "EFFECTS",
    "EFFECT_NAMES",
    "EXTENSION",
    "MAIN_BENCH",
    "BenchManifest",
    "BenchSpec",
    "Effect",
    "Scene",
    "compose",
    "contact_sheet",
    "get_effect",
    "ground_truth",
    "load_manifest",
    "load_spec",
    "load_test_scenes",
    "make_scene",
    "split_of",
    "test_sources",
    "train_scene",
    "train_seed",
    "write_bench",
    "write_contact_sheet",
]
