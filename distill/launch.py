"""Run a CollectionLoRA distillation from a spec file: one process, or many with ``accelerate``.

    python -m distill.launch --spec spec.json --work runs/x
    accelerate launch --num_processes 8 -m distill.launch --spec spec.json --work runs/x
    accelerate launch --cpu --num_processes 2 -m distill.launch --spec spec.json --work runs/x   # gloo

The spec (JSON) names the backbone, each effect (teacher LoRA file, teacher prompt, student
condition, source images), the DistillConfig overrides, and optionally the general stream's
instructions (``general_instructions``, one per general image). Every rank builds the same adapters from
the same seed and draws its own batches; the trainer averages LoRA gradients across ranks. The main
process writes checkpoints and ``student.safetensors``; every rank writes ``rank-<i>.json`` with a
digest of its final student, so a launcher can check the ranks stayed in sync.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from .backbones import adapters
from .callbacks import NullReporter, TqdmReporter
from .config import DistillConfig
from .effectbench.general import GENERAL_EDITS, general_images
from .images import to_tensor
from .targets import EffectSpec
from .trainer import CollectionDistiller, GeneralData, adapter_params


def _general(n: int, seed: int) -> GeneralData:
    phrasings = [p for e in GENERAL_EDITS for p in e.phrasings]
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(phrasings), (n,), generator=g).tolist()
    return GeneralData(to_tensor(general_images(n, seed)), [phrasings[i] for i in picks])


def cpu_command(spec: Path, work: Path, processes: int) -> list[str]:
    """The command that runs this script as ``processes`` CPU processes under accelerate (gloo);
    run it with ``CUDA_VISIBLE_DEVICES=""`` and ``OMP_NUM_THREADS=1`` in its environment."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "distill.launch",
        "--spec",
        str(spec),
        "--work",
        str(work),
    ]


def student_digest(transformer: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(adapter_params(transformer, "student").items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args(argv)
    from accelerate import Accelerator

    from .backbones.registry import load_backbone

    spec = json.loads(args.spec.read_text())
    acc = Accelerator(cpu=spec.get("cpu", not torch.cuda.is_available()))
    backbone = load_backbone(spec.get("backbone", "tiny"), spec.get("model_path"), device=str(acc.device))
    config = DistillConfig.for_backbone(backbone.name, **spec.get("config", {}))
    effects = []
    for e in spec["effects"]:
        name = "teacher_" + e["name"].replace("-", "_")
        adapters.load_lora(backbone.transformer, e["teacher_lora"], name)
        if config.offload_teachers:  # never all teachers on the GPU at once, loading included
            adapters.offload(backbone.transformer, name, keep=config.micro_batches)
        sources = to_tensor([Image.open(p).convert("RGB") for p in e["sources"]])
        effects.append(EffectSpec(e["name"], name, e["teacher_prompt"], e["student_prompt"], sources))
    general = _general(int(spec.get("general_images", 64)), config.seed)
    if spec.get("general_instructions"):  # a caller's own instructions for those images
        general = GeneralData(general.images, list(spec["general_instructions"]))
        if len(general.instructions) != len(general.images):
            raise SystemExit("general_instructions must hold one instruction per general image")
    reporter = TqdmReporter("distill") if acc.is_main_process and not spec.get("quiet") else NullReporter()
    args.work.mkdir(parents=True, exist_ok=True)
    result = CollectionDistiller(
        backbone, effects, general, config, args.work, reporter, accelerator=acc
    ).train()
    if acc.is_main_process:
        adapters.save_lora(backbone.transformer, "student", args.work / "student.safetensors")
    digest = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "steps": result.steps,
        "student_sha256": student_digest(backbone.transformer),
    }
    (args.work / f"rank-{acc.process_index}.json").write_text(json.dumps(digest))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
