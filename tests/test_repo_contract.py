"""The promises a fresh machine relies on: README's two commands, CI and the Dockerfile agree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README must open with a bash block"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]


def test_readme_opens_with_install_and_run_then_tests() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = text.index("```bash")
    assert text[:first_block].count("\n") <= 3, "the commands come first"
    install_run, tests = _readme_commands()[:2]
    assert install_run == "pip install -r requirements.txt && python app.py"
    assert tests == "python -m pytest"


def test_ci_installs_then_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -r requirements.txt" in ci
    assert ci.strip().splitlines()[-1].replace("python3", "python") == _readme_commands()[1]


def test_dockerfile_uses_the_same_install_and_start() -> None:
    docker = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -r requirements.txt" in docker
    assert re.search(r'CMD \["python3", "app.py"', docker)
    assert "ARG BASE_IMAGE" in docker  # a build argument for a CUDA base image


def test_requirements_pin_the_torch_on_disk() -> None:
    req = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.14.1" in req and "torchvision==0.29.1" in req


def test_embedded_backbone_checkpoint_ships() -> None:
    weights = ROOT / "distill" / "backbones" / "weights" / "tiny"
    for f in ("tiny_config.json", "recipe.json", "transformer/config.json", "text_encoder/config.json"):
        assert (weights / f).is_file(), f
    assert (weights / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size > 1_000_000
