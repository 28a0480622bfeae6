"""studio.lora_files: a LoRA file written into the blob store by content, with its LoraFile row."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from studio_fixtures import toy_lora_file

from storage import LoraFile, LoraKind
from studio.config import StudioConfig
from studio.context import Studio
from studio.lora_files import store_lora


@pytest.fixture()
def studio(data_dir: Path) -> Studio:
    return Studio.open(StudioConfig(data_dir=data_dir))


def test_store_lora_keeps_the_file_and_its_row(studio: Studio, tmp_path: Path) -> None:
    lora = store_lora(
        studio,
        lambda path: toy_lora_file(path, seed=1),
        kind=LoraKind.IMPORTED,
        rank=2,
        alpha=2.0,
        format="diffusers",
        backbone="tiny",
        meta={"why": "test"},
    )
    stored = studio.blobs.root / lora.path
    assert (
        hashlib.sha256(stored.read_bytes()).hexdigest() == lora.sha256 and lora.bytes == stored.stat().st_size
    )
    # the same LoRA written again holds the same tensors and metadata (byte layout may differ)
    again = toy_lora_file(tmp_path / "again.safetensors", seed=1)
    with safe_open(str(stored), "pt") as a, safe_open(str(again), "pt") as b:
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    with studio.session() as s:
        row = s.get(LoraFile, lora.id)
        assert (row.kind, row.rank, row.meta, row.sha256) == (
            LoraKind.IMPORTED,
            2,
            {"why": "test"},
            lora.sha256,
        )
    assert not [p for p in studio.blobs.root.iterdir() if p.name.startswith(".tmp-lora-")]


def test_a_failed_write_stores_nothing(studio: Studio) -> None:
    def broken(path: Path) -> Path:
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store_lora(studio, broken, kind=LoraKind.IMPORTED, rank=2, alpha=2.0, format="diffusers")
    with studio.session() as s:
        assert s.query(LoraFile).count() == 0
    assert not [p for p in studio.blobs.root.iterdir() if p.name.startswith(".tmp-lora-")]
