"""The distillation script under `accelerate launch` with 2 CPU processes (gloo): ranks stay in sync."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from distill.backbones import adapters
from distill.backbones.tiny import TinyConfig, TinyEditor
from distill.images import to_pil
from distill.launch import cpu_command


def _spec(d: Path) -> Path:
    bb = TinyEditor.random(TinyConfig(num_layers=1, num_heads=2, head_dim=16, text_dim=32, text_layers=1))
    bb.freeze()
    bb.save_pretrained(d / "backbone")
    adapters.add_lora(bb.transformer, "t", adapters.LoraSpec(rank=2, alpha=2.0))
    adapters.save_lora(bb.transformer, "t", d / "teacher.safetensors")
    sources = []
    for i, im in enumerate(
        to_pil(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    ):
        im.save(d / f"src{i}.png")
        sources.append(str(d / f"src{i}.png"))
    spec = {
        "backbone": "tiny",
        "model_path": str(d / "backbone"),
        "cpu": True,
        "quiet": True,
        "general_images": 6,
        "general_instructions": ["Flip it.", "Keep it."] * 3,
        "effects": [
            {
                "name": "fx",
                "teacher_lora": str(d / "teacher.safetensors"),
                "teacher_prompt": "Do it.",
                "student_prompt": "<fx_A1> do it",
                "sources": sources,
            }
        ],
        "config": {
            "steps": 2,
            "batch": 2,
            "critic_updates": 1,
            "target_steps": 2,
            "target_general_sources": 1,
            "checkpoint_every": 1,
            "student_steps": 2,
            "coarse_ratio": 1.0,  # two coarse steps first: their gradients are averaged too
        },
    }
    (d / "spec.json").write_text(json.dumps(spec))
    return d / "spec.json"


@pytest.mark.slow
def test_two_cpu_processes_average_gradients_and_agree(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    work = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        cpu_command(spec, work, 2),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[1],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((work / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [4, 4]
    assert ranks[0]["student_sha256"] == ranks[1]["student_sha256"]  # averaged gradients keep ranks identical
    assert (work / "student.safetensors").is_file()
    assert (work / "checkpoints" / "step-000004" / "COMPLETE").is_file()
