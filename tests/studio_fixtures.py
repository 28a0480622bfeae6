"""Toy builders the tests share: random tiny backbones, random LoRA weights and files, scene pair
folders, a model input batch, and a studio whose "pretrained" tiny weights are a random small model.

Imported by bare name (pytest puts tests/ on the path), like qwen_tiny.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distill.backbones import adapters
from distill.backbones.base import Condition
from distill.backbones.tiny import TinyConfig, TinyEditor
from distill.effectbench.scenes import make_scene
from distill.export import CatalogEntry, export_collection_lora
from storage import Effect, Prompt, Run
from studio import library, runs, teachers_service
from studio.config import StudioConfig
from studio.context import Studio

# The smallest tiny backbone the studio flows run on (2 layers, narrow text encoder).
SMALL = TinyConfig(num_layers=2, num_heads=2, head_dim=16, text_dim=32, text_layers=1)


def frozen_tiny(config: TinyConfig | None = None, seed: int = 0) -> TinyEditor:
    """A random tiny editor (2 layers unless told) with its base weights frozen."""
    editor = TinyEditor.random(config or TinyConfig(num_layers=2), seed=seed)
    editor.freeze()
    return editor


def randomize_lora(transformer: torch.nn.Module, name: str, seed: int, std: float = 0.05) -> None:
    """Give an adapter non-zero A and B (a fresh LoRA has B = 0 and changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.lora_parameters(transformer, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def toy_lora_file(
    path: Path, seed: int, *, std: float = 0.2, name: str = "t", catalog: list[CatalogEntry] | None = None
) -> Path:
    """A rank-2 LoRA file with random weights for the SMALL backbone; with a catalog, a CollectionLoRA."""
    bb = TinyEditor.random(SMALL, seed=0)
    adapters.add_lora(bb.transformer, name, adapters.LoraSpec(rank=2, alpha=2.0))
    randomize_lora(bb.transformer, name, seed, std)
    if catalog is not None:
        return export_collection_lora(
            bb.transformer, path, catalog, adapter=name, backbone="tiny", student_steps=2
        )
    return adapters.save_lora(bb.transformer, name, path)


def png_bytes(x: np.ndarray) -> bytes:
    """PNG bytes of an HxWx3 float image in [0, 1]."""
    buf = io.BytesIO()
    Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def scene_pairs(root: Path, n: int, seed: int = 0) -> Path:
    """A source/ + target/ pair folder: ``n`` generated scenes and their colour negatives."""
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    for i in range(n):
        img = make_scene("animal", seed + i, size=32).image
        (root / "source" / f"{i}.png").write_bytes(png_bytes(img))
        (root / "target" / f"{i}.png").write_bytes(png_bytes(1.0 - img))
    return root


def velocity_inputs() -> tuple[torch.Tensor, torch.Tensor, Condition]:
    """(x, s, condition) for two 32 px images on a TinyConfig(num_layers=2) editor."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    cond = Condition(
        torch.randn(2, 7, 128, generator=g), torch.ones(2, 7, dtype=torch.long), torch.randn_like(x)
    )
    return x, torch.tensor([0.3, 0.7]), cond


def small_studio(data_dir: Path, tmp_path: Path) -> Studio:
    """A studio whose tiny weights folder holds a random SMALL backbone (never the pretrained one)."""
    weights = tmp_path / "tiny-random"
    TinyEditor.random(SMALL, seed=0).save_pretrained(weights)
    return Studio.open(StudioConfig(data_dir=data_dir, model_path=str(weights)))


def add_toy_effect(
    studio: Studio,
    tmp: Path,
    name: str,
    seed: int,
    *,
    pairs: int = 3,
    teacher_std: float | None = 0.2,
    toy_prompts: bool = False,
) -> None:
    """An effect with ``pairs`` scene pairs and, unless ``teacher_std`` is None, a random teacher LoRA;
    with ``toy_prompts``, also a trigger word and student prompt made from name and seed (distillation
    needs both)."""
    library.import_pairset(
        studio, name, scene_pairs(tmp / name, pairs, seed), teacher_prompt=f"Apply {name}."
    )
    if teacher_std is not None:
        lora = toy_lora_file(tmp / f"{name}.safetensors", seed, std=teacher_std)
        teachers_service.import_teacher(studio, name, lora, backbone=TinyEditor.random(SMALL, seed=0))
    if toy_prompts:
        with studio.session() as s:
            row = s.query(Prompt).join(Effect).filter(Effect.name == name).one()
            row.trigger, row.student_prompt = f"<{name}_Xq{seed}>", f"Make the {name} look, seed {seed}."


def run_row(studio: Studio, run_id: int) -> Run:
    with studio.session() as s:
        return s.get(Run, run_id)


def wait_run(
    studio: Studio, run_id: int, until: Callable[[Run], bool], timeout: float = 60.0, what: str = ""
) -> Run:
    """Poll the run's row until ``until`` holds; on timeout, fail with the row and the worker's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = run_row(studio, run_id)
        if until(run):
            return run
        time.sleep(0.02)
    raise TimeoutError(
        f"run {run_id}: {what or 'condition'} not reached in {timeout} s: {run!r}\n"
        f"{runs.log_tail(studio, run_id)}"
    )
