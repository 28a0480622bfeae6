"""LoRA files in the studio: stored by content in the blob store, one ``LoraFile`` row each."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage import BlobRef, LoraFile

from .context import Studio


def lora_row(ref: BlobRef, **fields: Any) -> LoraFile:
    """A new ``LoraFile`` row for a stored blob (path, sha256 and size from ``ref``); the caller adds it."""
    return LoraFile(path=ref.relpath, sha256=ref.sha256, bytes=ref.bytes, **fields)


def store_lora(studio: Studio, write: Callable[[Path], Path], **fields: Any) -> LoraFile:
    """``write(path)`` a LoRA file into a temporary folder beside the blobs (same disk: no copy across
    filesystems), store it by content and add its row with ``fields`` (kind, rank, alpha, meta, ...)."""
    studio.blobs.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=studio.blobs.root, prefix=".tmp-lora-") as tmp:
        ref = studio.blobs.put_file(write(Path(tmp) / "lora.safetensors"), "safetensors")
    with studio.session() as s:
        lora = lora_row(ref, **fields)
        s.add(lora)
    return lora
