"""distill.checkpointing: atomic folder swaps, checkpoint round trips, finding and pruning step folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill import checkpointing
from distill.checkpointing import (
    atomic_dir,
    flatten_optimizer,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
    unflatten_optimizer,
)


def test_atomic_dir_swaps_in_on_success_and_keeps_the_old_on_error(tmp_path: Path) -> None:
    out = tmp_path / "weights"
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("one")
        assert not out.exists()  # nothing visible until the block ends
    assert (out / "sub" / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]  # no temp folder left behind
    assert [p.name for p in out.iterdir()] == ["sub"]

    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("two")
    assert [p.name for p in out.iterdir()] == ["b.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]


def test_checkpoint_round_trip_with_optimizer(tmp_path: Path) -> None:
    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.sum().backward()
    opt.step()
    tensors, meta = flatten_optimizer(opt, "opt")
    path = save_checkpoint(step_dir(tmp_path, 7), {"w": w, **tensors}, {"opt": meta, "losses": [0.5]})
    assert path == tmp_path / "step-000007"

    loaded, loaded_meta = load_checkpoint(path)
    assert torch.equal(loaded["w"], w.detach()) and loaded_meta["losses"] == [0.5]
    w2 = torch.nn.Parameter(loaded["w"].clone())
    opt2 = torch.optim.AdamW([w2], lr=0.5)
    unflatten_optimizer(opt2, "opt", loaded, loaded_meta["opt"])
    assert opt2.param_groups[0]["lr"] == 0.1
    for k, v in opt.state[w].items():
        assert torch.equal(opt2.state[w2][k], v), k


def test_find_and_prune_step_folders(tmp_path: Path) -> None:
    assert list_checkpoints(tmp_path / "none") == [] and latest_checkpoint(tmp_path / "none") is None
    for step in (2, 10, 4):
        save_checkpoint(step_dir(tmp_path, step), {"x": torch.zeros(1)}, {"step": step})
    (tmp_path / "step-000012").mkdir()  # incomplete: no COMPLETE marker
    (tmp_path / "step-000011.tmp").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000004", "step-000010"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000010"
    assert latest_checkpoint(tmp_path / "step-000004") == tmp_path / "step-000004"  # a checkpoint itself
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-000012")

    prune_checkpoints(tmp_path, keep=5)  # fewer than it keeps: all stay
    assert len(list_checkpoints(tmp_path)) == 3
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000010"]
    assert (tmp_path / "step-000012").exists()  # only complete checkpoints are pruned


def test_a_prune_killed_mid_delete_leaves_no_complete_folder_without_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for step in (2, 4, 6):
        save_checkpoint(step_dir(tmp_path, step), {"x": torch.zeros(1)}, {"step": step})

    def dies_after_the_tensors(path: Path, ignore_errors: bool = False) -> None:
        state = Path(path) / "state.safetensors"
        if state.exists():  # the process dies with the tensors gone and COMPLETE still there
            state.unlink()
            raise SystemExit("killed")

    monkeypatch.setattr(checkpointing.shutil, "rmtree", dies_after_the_tensors)
    with pytest.raises(SystemExit):
        prune_checkpoints(tmp_path, keep=2)
    monkeypatch.undo()
    for ck in list_checkpoints(tmp_path):  # every folder still listed loads
        load_checkpoint(ck)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    prune_checkpoints(tmp_path, keep=2)  # the next prune sweeps what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000006"]
