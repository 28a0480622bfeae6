"""studio.lora_files: a LoRA file written into the blob store by content, with its LoraFile row."""

from __future__ import annotations

from pathlib import Path

import pytest
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
    same = toy_lora_file(tmp_path / "again.safetensors", seed=1).read_bytes()
    assert (studio.blobs.root / lora.path).read_bytes() == same and lora.bytes == len(same)
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
