"""Shared fixtures. Tests run on CPU with one torch thread so parallel work stays predictable."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    """A fresh studio data dir; STUDIO_DATA_DIR points at it."""
    d = tmp_path / "studio-data"
    monkeypatch.setenv("STUDIO_DATA_DIR", str(d))
    return d
