"""Pretraining the tiny backbone: ``--init`` continues the given checkpoint instead of a fresh model."""

from __future__ import annotations

import json

import torch

from distill.backbones.pretrain_tiny import main
from distill.backbones.tiny import TinyEditor
from distill.effectbench.general import GENERAL_EDIT_NAMES
from tests.studio_fixtures import SMALL


def _flat(editor: TinyEditor) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in editor.transformer.parameters()])


def test_init_continues_the_checkpoint_and_records_its_parent(tmp_path):
    parent = tmp_path / "parent"
    TinyEditor.random(SMALL, seed=3).save_pretrained(parent)
    (parent / "recipe.json").write_text(json.dumps({"seed": 3, "steps": 7}))
    out = tmp_path / "out"
    main(
        [
            "--init",
            str(parent),
            "--minutes",
            "0",
            "--pool",
            "8",
            "--eval-n",
            "1",
            "--out",
            str(out),
            "--seed",
            "5",
        ]
    )

    before, after = _flat(TinyEditor.from_pretrained(parent)), _flat(TinyEditor.from_pretrained(out))
    fresh = _flat(TinyEditor.random(SMALL, seed=5))
    assert not torch.equal(before, after)  # it trained
    # one step away from the parent, nowhere near a model started from scratch
    assert (after - before).norm() < 0.01 * (fresh - before).norm()

    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["init"]["path"] == str(parent)
    assert recipe["init"]["recipe"] == {"seed": 3, "steps": 7}
    assert set(recipe["init"]["quality_psnr_db"]) == {*GENERAL_EDIT_NAMES, "mean"}
    assert recipe["tiny_config"]["num_layers"] == SMALL.num_layers
