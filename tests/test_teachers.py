"""Teacher LoRAs: eq. 2 training, checkpoint/resume/stop, import of LoRA files, evaluation, studio + CLI.

Everything runs on a random 2-layer tiny backbone (never the pretrained weights) with a few pairs.
"""

from __future__ import annotations

import io
import os
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from studio_fixtures import frozen_tiny, scene_pairs

from distill.backbones import adapters
from distill.backbones.tiny import TinyConfig, TinyEditor
from distill.callbacks import NullReporter
from distill.effectbench.effects import get_effect
from distill.effectbench.scenes import make_scene
from distill.lora_training import (
    LoraTrainConfig,
    encode_pairs,
    flow_matching_loss,
    latest_checkpoint,
    mirrored,
    train_lora,
)
from distill.teachers import evaluate_teacher, generate, ground_truths, score
from storage import LoraFile, LoraKind
from studio import cli, library, teachers_service
from studio.config import StudioConfig
from studio.context import Studio
from studio.teachers_service import TeacherError


def inverted_pairs(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """Trivially learnable: the target is the negative of the source."""
    g = torch.Generator().manual_seed(seed)
    srcs = [torch.rand(3, 32, 32, generator=g) * 2 - 1 for _ in range(n)]
    return [(s, -s, "Invert the colours.") for s in srcs]


def fast_config(**kw) -> LoraTrainConfig:
    base = dict(
        rank=8, alpha=8.0, lr=3e-3, steps=6, batch=2, caption_dropout=0.0, warmup_steps=0,
        checkpoint_every=0, sample_every=0, sample_steps=2,
    )  # fmt: skip
    return LoraTrainConfig.for_backbone("tiny", **{**base, **kw})


class Recorder(NullReporter):
    """Records what the trainer reports; asks to stop once ``stop_at`` steps are done."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at = stop_at
        self.steps: list[int] = []
        self.metrics: list[dict[str, float]] = []
        self.checkpoints: list[tuple[int, Path]] = []
        self.grids: list[tuple[int, Image.Image]] = []

    def progress(self, step, total, metrics):
        self.steps.append(step)
        self.metrics.append(metrics)

    def checkpoint(self, step, path):
        self.checkpoints.append((step, path))

    def samples(self, step, grid):
        self.grids.append((step, grid))

    def should_stop(self):
        return self.stop_at is not None and len(self.steps) >= self.stop_at


def lora_weights(backbone: TinyEditor, name: str) -> dict[str, torch.Tensor]:
    return adapters.lora_state_dict(backbone.transformer, name)


# ------------------------------------------------------------------------------------------------
# training


def test_loss_goes_down_and_only_the_adapter_trains() -> None:
    bb = frozen_tiny()
    pairs = inverted_pairs()
    data = encode_pairs(bb, pairs)
    g = torch.Generator().manual_seed(123)
    x0, cond = data.batch([0, 1, 2, 3])
    eps, s = torch.randn(x0.shape, generator=g), torch.rand(4, generator=g) * 0.8 + 0.1
    base_before = {n: p.clone() for n, p in bb.transformer.named_parameters()}
    with torch.no_grad():
        before = flow_matching_loss(bb, x0, cond, eps, s).item()

    res = train_lora(bb, "inv", pairs, fast_config(steps=30, batch=4, lr=1e-2))

    assert res.steps == 30 and not res.stopped and len(res.losses) == 30
    with torch.no_grad(), adapters.using(bb.transformer, ["inv"]):
        after = flow_matching_loss(bb, x0, cond, eps, s).item()
    with torch.no_grad(), adapters.using(bb.transformer, []):
        base_again = flow_matching_loss(bb, x0, cond, eps, s).item()
    assert after < 0.9 * before, (before, after)
    assert base_again == pytest.approx(before, rel=1e-5)  # the base model is untouched
    for n, p in bb.transformer.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])
    # sampling with the teacher differs from the base model (the adapter is really switched on)
    src = torch.stack([p[0] for p in pairs])
    with_lora, _, nfe = generate(bb, "inv", "Invert the colours.", src, steps=2)
    without, _, _ = generate(bb, None, "Invert the colours.", src, steps=2)
    assert nfe == 4 and (with_lora - without).abs().max() > 0.05


def test_mirror_augmentation_adds_flipped_copies_of_both_images() -> None:
    pairs = inverted_pairs(2)
    assert mirrored(pairs, False, False) == pairs
    xs = mirrored(pairs, True, False)
    assert len(xs) == 4 and xs[:2] == pairs
    src, tgt, prompt = xs[2]
    assert torch.equal(src[0], pairs[0][0].flip(-1)) and torch.equal(tgt[0], pairs[0][1].flip(-1))
    assert prompt == pairs[0][2] and not torch.equal(src[0], pairs[0][0])
    both = mirrored(pairs, True, True)
    assert len(both) == 8
    assert torch.equal(both[-1][0][0], pairs[1][0].flip(-2, -1))  # the copy flipped both ways
    assert len(mirrored(pairs, False, True)) == 4
    # training sees the mirrored copies: its encoded data holds 4 views per pair
    bb = frozen_tiny()
    assert len(encode_pairs(bb, mirrored(pairs, True, True))) == 8
    cfg = fast_config(steps=2, flip_x=True, flip_y=True)
    assert LoraTrainConfig.from_dict(cfg.to_dict()) == cfg
    assert train_lora(bb, "mirror", pairs, cfg).steps == 2


def test_resume_continues_the_same_trajectory(tmp_path: Path) -> None:
    cfg = fast_config(steps=6, caption_dropout=0.5, checkpoint_every=2, keep_checkpoints=2)
    pairs = inverted_pairs()

    straight = frozen_tiny()
    full = train_lora(straight, "t", pairs, cfg, checkpoint_dir=tmp_path / "a")

    first = frozen_tiny()
    rec = Recorder(stop_at=3)
    stopped = train_lora(first, "t", pairs, cfg, rec, checkpoint_dir=tmp_path / "b")
    assert stopped.stopped and stopped.steps == 3 and rec.steps == [1, 2, 3]
    assert stopped.checkpoint == tmp_path / "b" / "step-000003"
    assert [s for s, _ in rec.checkpoints] == [2, 3]
    assert latest_checkpoint(tmp_path / "b") == stopped.checkpoint

    second = frozen_tiny()  # a fresh process, in effect
    resumed = train_lora(second, "t", pairs, cfg, resume_from=tmp_path / "b", checkpoint_dir=tmp_path / "b")
    assert resumed.steps == 6 and not resumed.stopped
    assert resumed.losses == full.losses
    a, b = lora_weights(straight, "t"), lora_weights(second, "t")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it did train
    # only the newest `keep_checkpoints` remain
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-000004", "step-000006"]


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    pairs = inverted_pairs(2)
    train_lora(frozen_tiny(), "t", pairs, fast_config(steps=2), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different LoRA settings"):
        train_lora(frozen_tiny(), "t", pairs, fast_config(steps=4, rank=4, alpha=4.0), resume_from=tmp_path)


def test_preview_grids_and_presets() -> None:
    rec = Recorder()
    train_lora(frozen_tiny(), "t", inverted_pairs(4), fast_config(steps=4, sample_every=2, sample_n=4), rec)
    assert [s for s, _ in rec.grids] == [2, 4]
    grid = rec.grids[0][1]
    assert grid.width > grid.height  # 4 columns (pairs) x 3 rows (source, output, target)
    assert "sample_psnr" in rec.metrics[1] and "sample_psnr" not in rec.metrics[0]

    q = LoraTrainConfig.for_backbone("qwen-image-edit")
    assert (q.lr, q.steps, q.resolution, q.batch) == (1e-4, 2000, 1024, 1)
    assert LoraTrainConfig.from_dict(q.to_dict()) == q
    with pytest.raises(ValueError, match="No LoRA training preset"):
        LoraTrainConfig.for_backbone("sdxl")


# ------------------------------------------------------------------------------------------------
# evaluation


def test_scores_and_teacher_evaluation() -> None:
    eff = get_effect("sepia")
    scenes = [make_scene("animal", 1), make_scene("portrait", 2)]
    gt = ground_truths(eff, scenes)
    assert gt.shape == (2, 3, 64, 64) and gt.min() >= -1 and gt.max() <= 1
    small = torch.nn.functional.interpolate(gt, size=(32, 32), mode="area")
    p, s = score(small, gt)
    assert min(p) > 60 and min(s) > 0.999  # ground truth against itself
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    p, s = score(noise, gt)
    assert max(p) < 12 and max(s) < 0.3

    bb = frozen_tiny()
    ev = evaluate_teacher(bb, None, "sepia", eff.teacher_prompt, scenes, steps=2, cfg=4.0)
    assert (ev.effect, ev.system, ev.n, ev.nfe) == ("sepia", "base", 2, 4)
    assert np.isfinite(ev.psnr_mean) and ev.psnr_worst <= ev.psnr_mean and -1 <= ev.ssim_mean <= 1
    assert ev.psnr_mean < 30  # a random model does not produce the sepia print


# ------------------------------------------------------------------------------------------------
# the studio: train, import, evaluate, CLI


@pytest.fixture()
def studio(data_dir: Path, tmp_path: Path) -> Studio:
    st = Studio.open(StudioConfig(data_dir=data_dir))
    library.import_pairset(
        st, "invert", scene_pairs(tmp_path / "pairs", 3), teacher_prompt="Invert the colours."
    )
    return st


def _lora_file(tmp_path: Path, fmt: str, config: TinyConfig = TinyConfig(num_layers=2)) -> Path:
    bb = TinyEditor.random(config, seed=1)
    params = adapters.add_lora(bb.transformer, "x", adapters.LoraSpec(rank=4, alpha=2.0))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    return adapters.save_lora(bb.transformer, "x", tmp_path / f"{fmt}-{config.head_dim}.safetensors", fmt=fmt)


def test_import_teacher_formats_and_bad_files(studio: Studio, tmp_path: Path) -> None:
    bb = frozen_tiny()
    assert teachers_service.teacher_for(studio, "invert") is None
    for fmt in ("diffusers", "kohya"):
        lora = teachers_service.import_teacher(studio, "invert", _lora_file(tmp_path, fmt), backbone=bb)
        assert (lora.kind, lora.format, lora.rank, lora.alpha) == (LoraKind.IMPORTED, fmt, 4, 2.0)
        assert teachers_service.teacher_for(studio, "invert").id == lora.id  # the newest wins
        assert teachers_service.teacher_path(studio, lora).stat().st_size == lora.bytes
    assert adapters.adapter_names(bb.transformer) == []  # the check load left nothing behind
    # the stored teacher loads and changes the model's output
    name = teachers_service.load_teacher(studio, bb, "invert")
    assert adapters.adapter_names(bb.transformer) == [name]

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(TeacherError, match="not a readable .safetensors"):
        teachers_service.import_teacher(studio, "invert", junk, backbone=bb)
    other = _lora_file(tmp_path, "diffusers", TinyConfig(num_layers=2, head_dim=16))
    with pytest.raises(TeacherError, match="does not fit this backbone"):
        teachers_service.import_teacher(studio, "invert", other, backbone=bb)
    with pytest.raises(TeacherError, match="No LoRA file"):
        teachers_service.import_teacher(studio, "invert", tmp_path / "missing.safetensors", backbone=bb)
    with pytest.raises(library.LibraryError, match="no effect called"):
        teachers_service.import_teacher(studio, "nope", junk, backbone=bb)
    with studio.session() as s:
        assert s.query(LoraFile).count() == 2


def _cli(monkeypatch, *argv: str) -> tuple[int, str]:
    if "teacher" not in cli.COMMAND_MODULES:  # until studio/cli.py lists it
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "teacher"])
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


def test_train_eval_list_via_cli(studio: Studio, monkeypatch, tmp_path: Path) -> None:
    bb = frozen_tiny()
    monkeypatch.setattr(teachers_service, "open_backbone", lambda studio, device=None: bb)
    code, out = _cli(
        monkeypatch, "teacher", "train", "invert", "--here", "--steps", "3", "--rank", "4", "--mirror", "x"
    )
    assert code == 0 and "trained: 3 steps" in out
    lora = teachers_service.teacher_for(studio, "invert")
    assert (lora.meta["train_config"]["flip_x"], lora.meta["train_config"]["flip_y"]) == (True, False)
    assert (lora.kind, lora.format, lora.rank, lora.backbone) == (LoraKind.TEACHER, "diffusers", 4, "tiny")
    assert lora.meta["pairs"] == 3 and lora.meta["teacher_prompt"] == "Invert the colours."
    # the file in the blob store is a loadable LoRA with the trained weights
    check = frozen_tiny()
    report = adapters.load_lora(check.transformer, teachers_service.teacher_path(studio, lora), "c")
    assert report.rank == 4
    trained = lora_weights(bb, teachers_service.adapter_name("invert"))
    assert all(torch.equal(v, lora_weights(check, "c")[k]) for k, v in trained.items())

    code, out = _cli(monkeypatch, "teacher", "list")
    assert code == 0 and "invert\t3 pairs\tteacher" in out
    code, out = _cli(monkeypatch, "teacher", "eval", "invert", "--steps", "2")
    assert (
        code == 0 and "training pairs (3" in out and "| teacher |" in out and "| base + same prompt |" in out
    )
    assert "on its own training pairs (a fit check only)" in out  # no held-out ground truth: said so
    code, out = _cli(
        monkeypatch,
        "teacher",
        "import",
        "invert",
        str(_lora_file(tmp_path, "kohya")),
        "--prompt",
        "Negative.",
    )
    assert code == 0 and "kohya layout, rank 4" in out
    assert library.get_effect(studio, "invert").teacher_prompt == "Negative."
    library.import_pairset(studio, "invert2", scene_pairs(tmp_path / "p2", 2), teacher_prompt="Negative.")
    code, out = _cli(monkeypatch, "teacher", "train-all", "--steps", "2", "--rank", "4")
    assert code == 0 and "1 effects without a teacher: invert2" in out and "'invert2' trained: 2 steps" in out
    assert teachers_service.effects_without_teacher(studio) == []
    code, out = _cli(monkeypatch, "teacher", "train-all")
    assert code == 0 and "every effect has a teacher" in out
    code, _ = _cli(monkeypatch, "teacher", "import", "invert", str(tmp_path / "none.safetensors"))
    assert code == 2


def test_training_needs_a_prompt_and_pairs(studio: Studio, tmp_path: Path) -> None:
    library.import_pairset(studio, "no-prompt", scene_pairs(tmp_path / "p2", 1))
    with pytest.raises(TeacherError, match="no teacher prompt"):
        teachers_service.train_teacher_now(studio, "no-prompt", fast_config(), backbone=frozen_tiny())
    with pytest.raises(TeacherError, match="no teacher yet"):
        teachers_service.evaluate(studio, "invert", backbone=frozen_tiny())


@pytest.mark.slow  # a worker process imports torch + diffusers: ~20 s on 2 idle cores
def test_background_run_trains_and_registers(studio: Studio, tmp_path: Path, monkeypatch) -> None:
    from studio import runs

    weights = tmp_path / "tiny-random"
    frozen_tiny().save_pretrained(weights)
    st = Studio.open(StudioConfig(data_dir=studio.config.data_dir, model_path=str(weights)))
    monkeypatch.setenv(runs.EXTRA_JOB_MODULES_ENV, "studio.jobs_teacher")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_id = teachers_service.submit_training(st, "invert", fast_config(steps=4, checkpoint_every=2))
    deadline = time.monotonic() + 180
    while not (view := runs.run_status(st, run_id)).finished:
        assert time.monotonic() < deadline, view.log_tail
        time.sleep(0.5)
    assert view.status == "succeeded", (view.error, view.log_tail)
    assert view.step == 4 and view.checkpoint is not None and view.checkpoint.step == 4
    lora = teachers_service.teacher_for(st, "invert")
    assert lora is not None and lora.run_id == run_id and lora.kind == LoraKind.TEACHER
    assert view.metrics["lora_file_id"] == lora.id
    assert [s for s, _ in runs.metric_series(st, run_id, "loss")] == [1, 2, 3, 4]
    assert os.path.isdir(view.checkpoint.path)


def test_teachers_sample_at_their_backbones_cfg_everywhere_by_default() -> None:
    """One fact: the tiny backbone's teacher CFG is what teacher sampling, the distillation preset's
    targets and a Qwen-sized backbone's default (the pipeline's 4.0) each take."""
    from distill.backbones.base import Backbone
    from distill.config import DistillConfig

    bb = TinyEditor.random(TinyConfig(num_layers=1, num_heads=2, head_dim=16, text_dim=32, text_layers=1))
    bb.freeze()
    assert bb.teacher_cfg == TinyConfig().teacher_cfg == DistillConfig.for_backbone("tiny").teacher_cfg
    assert Backbone.teacher_cfg == 4.0 and bb.teacher_cfg != 4.0
    src = torch.rand(2, 3, 32, 32) * 2 - 1
    default, _, nfe = generate(bb, None, "Make it warmer.", src, steps=2)
    same, _, _ = generate(bb, None, "Make it warmer.", src, steps=2, cfg=bb.teacher_cfg)
    other, _, _ = generate(bb, None, "Make it warmer.", src, steps=2, cfg=4.0)
    assert nfe == 4 and torch.equal(default, same) and not torch.equal(default, other)


def test_teacher_verdict_says_whether_the_effect_was_learned() -> None:
    from distill.teachers import TeacherEval

    def ev(psnr: float) -> TeacherEval:
        return TeacherEval("e", "x", [psnr, psnr + 1.0], [0.5, 0.5], 1.0, 80)

    on = "EffectBench-mini test sources (2)"
    clear = teachers_service.TeacherComparison("e", ev(20.0), ev(20.0 - teachers_service.CLEAR_GAIN_DB), on)
    assert clear.verdict().startswith("Learned: +1.00 dB")
    weak = teachers_service.TeacherComparison("e", ev(20.0), ev(19.5), on)
    assert weak.verdict().startswith("Not clearly learned: +0.50 dB") and "More pairs" in weak.verdict()
    fit = teachers_service.TeacherComparison("e", ev(20.0), ev(25.0), "the effect's training pairs (3)")
    assert "fit check only" in fit.verdict() and "-5.00 dB" in fit.verdict()
