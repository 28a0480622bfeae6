"""Where the studio keeps its state and which backbone it runs: one dataclass, read from flags/env."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_DIR = "studio-data"


def default_data_dir() -> Path:
    return Path(os.environ.get("STUDIO_DATA_DIR") or DEFAULT_DATA_DIR)


@dataclass(frozen=True)
class StudioConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    db_url: str | None = None  # None: STUDIO_DB_URL, else SQLite under data_dir
    backbone: str = "tiny"  # "tiny" (embedded) or "qwen-image-edit"
    model_path: str | None = None  # local folder or hub id for qwen-image-edit; tiny: its weights dir

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def bench_dir(self) -> Path:
        return self.data_dir / "effectbench"
