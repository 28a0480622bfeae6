"""Training state to disk and back without pickle: tensors in safetensors, the rest in JSON.

A checkpoint is a folder written beside its final name and renamed into place, so a kill at any
moment leaves either the previous complete checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"


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


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``path/`` with ``state.safetensors`` and ``meta.json``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    (tmp / COMPLETE).write_text("ok")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint")
    return load_file(str(path / "state.safetensors")), json.loads((path / "meta.json").read_text())


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``step-*`` checkpoint in ``folder``."""
    folder = Path(folder)
    if not folder.exists():
        return None
    done = [
        p
        for p in folder.glob("step-*")
        if p.is_dir() and (p / COMPLETE).exists() and not p.name.endswith((".tmp", ".old"))
    ]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)
