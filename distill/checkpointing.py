"""Training state to disk and back without pickle: tensors in safetensors, the rest in JSON.

A checkpoint is a folder written beside its final name and renamed into place (``atomic_dir``), so a
kill at any moment leaves either the previous complete checkpoint or the new one, never half of one.
Trainers keep them as ``step-NNNNNN`` folders in one checkpoint folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"
STEP_PREFIX = "step-"


def flatten_optimizer(
    opt: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into named tensors and a JSON-able remainder."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        meta: dict[str, Any] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta[k] = v
        state_meta[str(pid)] = meta
    return tensors, {"param_groups": sd["param_groups"], "state": state_meta}


def unflatten_optimizer(
    opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = dict(st)
    for name, t in tensors.items():
        if name.startswith(prefix + "."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Fill the yielded folder (beside ``path``); on success its files are made durable and it is
    swapped in for ``path`` (any previous ``path`` is dropped). On an error ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):  # durable before the rename makes it visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``path/`` with ``state.safetensors`` and ``meta.json``."""
    with atomic_dir(path) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors")
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / COMPLETE).write_text("ok")
    return Path(path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint")
    return load_file(str(path / "state.safetensors")), json.loads((path / "meta.json").read_text())


def step_dir(folder: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes: ``folder/step-NNNNNN``."""
    return Path(folder) / f"{STEP_PREFIX}{step:06d}"


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE).exists() and not path.name.endswith((".tmp", ".old"))


def list_checkpoints(folder: Path) -> list[Path]:
    """The complete ``step-*`` checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob(STEP_PREFIX + "*") if _is_complete(p)]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(path: Path) -> Path | None:
    """``path`` itself if it is a complete checkpoint, else the newest complete one in it."""
    path = Path(path)
    if _is_complete(path):
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints in ``folder``.

    Each goes out of sight by a rename to ``.old`` before its files are deleted: a kill during the
    delete must not leave a folder that still carries COMPLETE without its tensors. ``.old`` folders a
    killed prune left behind are swept here too."""
    found = list_checkpoints(folder)
    for old in found[: max(len(found) - keep, 0)]:  # fewer than ``keep``: nothing goes
        gone = old.with_name(old.name + ".old")
        shutil.rmtree(gone, ignore_errors=True)
        old.rename(gone)
    for stale in Path(folder).glob(STEP_PREFIX + "*.old"):
        shutil.rmtree(stale, ignore_errors=True)
