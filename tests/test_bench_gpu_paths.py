"""The GPU benches' real-size code paths, shrunk to a tiny Qwen-Image transformer on CPU: what
bench/cuda_check.sh runs on a GPU must at least run here (a GPU session has minutes, not hours)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "num_layers": 1,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "axes_dims_rope": [8, 12, 12],
}


def _bench(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def _row(table: str, key: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| {key}")).split("|")[-2].strip()


def test_backbone_qwen_rows_run_the_real_classes_shrunk():
    spec = importlib.util.spec_from_file_location("bench_backbone", ROOT / "bench" / "backbone.py")
    bench_backbone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_backbone)
    vae = {"base_dim": 32, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1}
    small = {**SMALL, "in_channels": 64, "out_channels": 16}
    title, rows = bench_backbone.qwen_rows(
        True, "cpu", torch.float32, 64, transformer_config=small, vae_config=vae, text_tokens=8
    )
    got = dict(rows)
    assert "CPU" in title
    assert got["image / tokens per NFE"].startswith("64x64 / 40 ")  # 16 target + 16 source + 8 text
    assert "LoRA switch (activate another loaded adapter)" in got


def test_distill_bench_qwen_path_shrunk():
    out = _bench(
        "distill.py",
        "--quick",
        "--iters",
        "1",
        "--sources",
        "2",
        "--size",
        "64",
        "--text-len",
        "8",
        "--qwen-config",
        json.dumps(SMALL),
    )
    assert float(_row(out, "generator steps per minute")) > 0
    assert float(_row(out, "seconds per coarse-stage step")) > 0
    assert "adapter `student`" in out and "adapter `fake`" in out and "adapter `teacher_1`" in out


def test_teacher_offload_bench_shrunk_keeps_outputs():
    out = _bench(
        "teacher_offload.py",
        "--size", "64", "--text-len", "8", "--teachers", "3", "--rank", "4", "--qwen-config", json.dumps(SMALL),
    )  # fmt: skip
    assert float(_row(out, "largest output change after offloading")) == 0.0
    assert _row(out, "teacher LoRAs").startswith("3 x rank 4")
