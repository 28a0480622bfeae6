"""Distillation in the studio: up-front checks, the distill/extend jobs in-process, export, CLI.

A random 2-layer tiny backbone (saved as the studio's tiny weights folder), two effects with toy
teacher LoRAs imported from files, a few pairs each, and runs of 2 generator steps.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from studio_fixtures import add_toy_effect, small_studio

from distill.backbones import adapters
from distill.backbones.tiny import TinyEditor
from distill.config import DistillConfig
from distill.export import read_catalog, student_init
from distill.trainer import FAKE, STUDENT, adapter_params
from storage import Effect, LoraFile, LoraKind, Prompt
from studio import cli, distill_service, jobs_distill, library, runs
from studio.context import Studio
from studio.distill_service import DistillError

FAST = {
    "steps": 2,
    "coarse_ratio": 6.0,  # 12 coarse steps: the tests exercise the stage, not the preset's length
    "batch": 2,
    "critic_updates": 1,
    "target_steps": 2,
    "target_general_sources": 1,
    "checkpoint_every": 1,
    "sample_every": 0,
    "student_steps": 2,
    "student_lora": {"rank": 4, "alpha": 4.0},
    "fake_lora": {"rank": 4, "alpha": 4.0},
}

# a student shape given as a rank alone keeps the preset's alpha
PRESET_ALPHA = DistillConfig.for_backbone("tiny").student_lora.alpha


def _add_effect(studio: Studio, tmp: Path, name: str, seed: int, *, teacher=True, prompts=True) -> None:
    add_toy_effect(studio, tmp, name, seed, teacher_std=0.2 if teacher else None)
    if prompts:
        with studio.session() as s:
            row = s.query(Prompt).join(Effect).filter(Effect.name == name).one()
            row.trigger, row.student_prompt = f"<{name}_Xq{seed}>", f"Make the {name} look, seed {seed}."


@pytest.fixture()
def studio(data_dir: Path, tmp_path: Path) -> Studio:
    st = small_studio(data_dir, tmp_path)
    _add_effect(st, tmp_path, "warm", 1)
    _add_effect(st, tmp_path, "frame", 2)
    return st


@pytest.fixture()
def submitted(monkeypatch) -> list[int]:
    """Runs are created but no worker starts; the tests run the job in-process."""
    ids: list[int] = []

    def fake_submit(studio, kind, config, name="", effect_id=None, parent_run_id=None):
        ids.append(runs.create_run(studio, kind, config, name=name, parent_run_id=parent_run_id))
        return ids[-1]

    monkeypatch.setattr(runs, "submit", fake_submit)
    return ids


class StopAfter(runs.DbReporter):
    def __init__(self, studio: Studio, run_id: int, steps: int):
        super().__init__(studio, run_id, flush_interval_s=0)
        self.stop_at = steps

    def should_stop(self) -> bool:
        return self.step >= self.stop_at


def _context(studio: Studio, run_id: int) -> runs.RunContext:
    with studio.session() as s:
        config = runs.job_config(s.get(runs.Run, run_id))
    reporter = runs.DbReporter(studio, run_id, flush_interval_s=0)
    return runs.RunContext(studio, run_id, config, runs.run_dir(studio, run_id), reporter, None)


def _cli(monkeypatch, *argv: str) -> tuple[int, str]:
    if "distill" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "distill"])
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


def test_checks_list_everything_missing_with_the_fix(studio: Studio, tmp_path: Path, submitted) -> None:
    _add_effect(studio, tmp_path, "sketch", 3, teacher=False, prompts=False)
    with pytest.raises(DistillError) as err:
        distill_service.start_distillation(studio, ["warm", "sketch", "nope"])
    msg = str(err.value)
    assert "'sketch' needs a teacher LoRA (`python -m studio teacher train sketch`" in msg
    assert "teacher import sketch FILE" in msg
    assert "a trigger word (`python -m studio prompts generate sketch`)" in msg and "a student prompt" in msg
    assert "no effect called 'nope'" in msg
    assert "'warm'" not in msg  # complete effects are not listed
    with pytest.raises(DistillError, match="unknown distillation setting.*lr_teacher"):
        distill_service.start_distillation(studio, ["warm"], {"lr_teacher": 1.0})
    with pytest.raises(DistillError, match="p_switch must be in"):
        distill_service.start_distillation(studio, ["warm"], {"p_switch": 2.0})
    with pytest.raises(DistillError, match="'sketch' needs"):  # default: every effect of the library
        distill_service.start_distillation(studio)
    assert submitted == []  # nothing was queued

    for pair in library.effect_pairs(studio, "warm"):
        library.set_pair_excluded(studio, "warm", pair.id)
    with pytest.raises(DistillError, match="'warm' needs kept training pairs"):
        distill_service.start_distillation(studio, ["warm"])


def test_a_new_runs_step_budget_grows_with_its_effects(studio: Studio, submitted, monkeypatch) -> None:
    from distill import config as distill_config
    from studio.ui import distill_tab

    preset = distill_service.planned_config(studio).steps
    monkeypatch.setitem(distill_config.PRESET_EFFECTS, "tiny", 1)  # sized for one: two get twice the steps

    def steps(run_id: int) -> int:
        with studio.session() as s:
            return s.get(runs.Run, run_id).config["distill"]["steps"]

    assert steps(distill_service.start_distillation(studio, ["warm", "frame"])) == 2 * preset
    assert steps(distill_service.start_distillation(studio, ["warm"])) == preset
    assert steps(distill_service.start_distillation(studio, ["warm", "frame"], {"steps": 7})) == 7
    # the Distill tab's steps field follows the ticked effects
    assert distill_tab.steps_for(studio, ["warm", "frame"]) == 2 * preset
    assert distill_tab.steps_for(studio, []) == distill_tab.steps_for(studio, ["warm"]) == preset


def test_distill_then_extend_then_export(studio: Studio, tmp_path: Path, submitted, monkeypatch) -> None:
    # a shape given for both (the critic starts as a copy of the student); eq. 8 from step 1 here
    overrides = {**FAST, "student_lora": {"rank": 4}, "fake_lora": {"rank": 4}, "coarse_ratio": 0.0}
    run_id = distill_service.start_distillation(studio, ["warm"], overrides)
    with studio.session() as s:
        run = s.get(runs.Run, run_id)
        config = run.config
    assert config["effects"] == ["warm"] and config["backbone"] == "tiny"
    assert config["distill"]["student_lora"]["rank"] == 4
    assert config["distill"]["student_lora"]["alpha"] == PRESET_ALPHA
    assert config["plans"][0]["trigger"] == "<warm_Xq1>"

    # stopped after step 1: a checkpoint, no student yet; resumed: finishes and registers the student
    ctx = _context(studio, run_id)
    ctx.reporter = StopAfter(studio, run_id, 1)
    metrics = jobs_distill.run_distill(ctx)
    assert metrics["stopped"] and metrics["steps"] == 1 and "lora_file_id" not in metrics
    assert distill_service.student_lora(studio, run_id) is None
    ctx = _context(studio, run_id)
    ctx.resume_from = runs.last_checkpoint(studio, run_id).path
    assert ctx.resume_from.name == "step-000001"
    metrics = jobs_distill.run_distill(ctx)
    lora = distill_service.student_lora(studio, run_id)
    assert metrics["steps"] == 2 and not metrics["stopped"] and metrics["lora_file_id"] == lora.id
    assert (lora.kind, lora.rank, lora.alpha, lora.format, lora.backbone) == (
        LoraKind.STUDENT,
        4,
        PRESET_ALPHA,
        "diffusers",
        "tiny",
    )
    path = studio.blobs.root / lora.path
    assert path.stat().st_size == lora.bytes
    cat = read_catalog(path)
    assert [e.name for e in cat.entries] == ["warm"] and lora.meta["effects"] == ["warm"]
    assert cat.entries[0].prompt == "<warm_Xq1> Make the warm look, seed 1."
    assert (cat.rank, cat.alpha, cat.student_steps, cat.backbone) == (4, PRESET_ALPHA, 2, "tiny")
    assert [s for s, _ in runs.metric_series(studio, run_id, "loss")] == [1, 2]
    assert runs.last_checkpoint(studio, run_id).step == 2

    # extend with "frame": already-distilled effects are refused, the student starts from the parent
    with pytest.raises(DistillError, match="Already in this CollectionLoRA: warm"):
        distill_service.extend_collection(studio, ["warm"], from_run=run_id)
    ext_id = distill_service.extend_collection(studio, ["frame"], from_run=run_id, steps=1)
    with studio.session() as s:
        ext = s.get(runs.Run, ext_id)
        ext_config, parent_run = ext.config, ext.parent_run_id
    assert parent_run == run_id and ext_config["new_effects"] == ["frame"]
    assert ext_config["effects"] == ["warm", "frame"] and ext_config["distill"]["steps"] == 1
    assert ext_config["distill"]["student_lora"] == config["distill"]["student_lora"]
    # the extension's coarse stage runs at the parent's extension lr, not its full-run one
    assert ext_config["distill"]["coarse_lr"] == config["distill"]["extension_coarse_lr"]
    assert config["distill"]["extension_coarse_lr"] != config["distill"]["coarse_lr"]

    ctx = _context(studio, ext_id)
    prep = distill_service.prepare(studio, ctx.config, ctx.run_dir)
    parent_student = student_init(path)
    own = adapter_params(prep.backbone.transformer, STUDENT)
    assert set(own) == set(parent_student)
    assert all(torch.equal(own[k].detach(), parent_student[k]) for k in own)
    ckpt = runs.last_checkpoint(studio, run_id).path / "state.safetensors"
    with safe_open(ckpt, "pt") as f:
        fake = {k: f.get_tensor(f"{FAKE}/{k}") for k in adapter_params(prep.backbone.transformer, FAKE)}
    assert all(
        torch.equal(p.detach(), fake[k]) for k, p in adapter_params(prep.backbone.transformer, FAKE).items()
    )
    assert [e.new for e in prep.distiller.effects] == [False, True]

    jobs_distill.run_distill(ctx)
    ext_lora = distill_service.student_lora(studio, ext_id)
    assert ext_lora.meta["effects"] == ["warm", "frame"] and ext_lora.meta["new_effects"] == ["frame"]
    assert ext_lora.sha256 != lora.sha256

    # no steps given: the new effect gets one effect's share of the parent's run (2 steps over 1 effect)
    code, text = _cli(monkeypatch, "distill", "extend", "--from", str(run_id), "--effects", "frame")
    assert code == 0 and "+ frame (2 steps)" in text
    auto_id = int(text.split("queued extension run ")[1].split(":")[0])
    assert distill_service.planned_steps(studio, auto_id) == 2

    # CLI: export in both layouts, status
    out = tmp_path / "collection.safetensors"
    code, text = _cli(monkeypatch, "distill", "export", str(ext_id), "--out", str(out))
    assert code == 0 and "2 effects" in text and "<frame_Xq2> Make the frame look" in text
    assert out.read_bytes() == (studio.blobs.root / ext_lora.path).read_bytes()
    kohya = tmp_path / "comfy.safetensors"
    code, text = _cli(monkeypatch, "distill", "export", str(ext_id), "--out", str(kohya), "--format", "kohya")
    assert code == 0 and "kohya layout" in text
    bb = TinyEditor.from_pretrained(studio.config.model_path)
    report = adapters.load_lora(bb.transformer, kohya, "deployed")
    assert (report.format_detected, report.rank, report.alpha) == ("kohya", 4, PRESET_ALPHA)
    assert read_catalog(kohya).entries == read_catalog(out).entries

    code, text = _cli(monkeypatch, "distill", "status", str(ext_id))
    assert code == 0 and "step 1/1" in text and f"LoRA file #{ext_lora.id}" in text and "warm, frame" in text
    code, _ = _cli(monkeypatch, "distill", "export", "999", "--out", str(out))
    assert code == 2

    # extending an extension: the share is of the steps it took for its own new effects (as if 6 for "frame")
    with studio.session() as s:
        ext = s.get(runs.Run, ext_id)
        ext.config = {**ext.config, "distill": {**ext.config["distill"], "steps": 6}}
        s.commit()
    _add_effect(studio, tmp_path, "third", 3)
    chained = distill_service.extend_collection(studio, ["third"], from_run=ext_id)
    assert distill_service.planned_steps(studio, chained) == 6

    # a parent run recorded before a setting existed: the extension takes the preset's value for it
    with studio.session() as s:
        ext = s.get(runs.Run, ext_id)
        old_cfg = {k: v for k, v in ext.config["distill"].items() if k != "extension_coarse_lr"}
        ext.config = {**ext.config, "distill": {**old_cfg, "coarse_lr": 1e-3}}
        s.commit()
    older = distill_service.extend_collection(studio, ["third"], from_run=ext_id)
    with studio.session() as s:
        older_cfg = s.get(runs.Run, older).config["distill"]
    preset = DistillConfig.for_backbone("tiny")
    assert older_cfg["coarse_lr"] == preset.extension_coarse_lr != 1e-3


def test_cli_run_and_extend_build_the_run(studio: Studio, submitted, monkeypatch, capsys) -> None:
    code, text = _cli(
        monkeypatch,
        "distill",
        "run",
        "--effects",
        "warm",
        "frame",
        "--steps",
        "7",
        "--set",
        "p_switch=0.25",
        "--set",
        "aop=false",
        "--set",
        "student_lora.rank=8",
    )
    assert code == 0 and f"queued distillation run {submitted[-1]}" in text
    with studio.session() as s:
        config = s.get(runs.Run, submitted[-1]).config["distill"]
    assert (config["steps"], config["p_switch"], config["aop"]) == (7, 0.25, False)
    assert config["student_lora"]["rank"] == 8 and config["student_lora"]["alpha"] == PRESET_ALPHA

    code, _ = _cli(monkeypatch, "distill", "run", "--effects", "warm", "--set", "nonsense")
    assert code == 2 and "KEY=VALUE" in capsys.readouterr().err
    code, _ = _cli(monkeypatch, "distill", "extend", "--from", str(submitted[-1]), "--effects", "x")
    assert code == 2 and "no finished student LoRA yet" in capsys.readouterr().err
    with studio.session() as s:
        assert s.query(LoraFile).filter(LoraFile.kind == LoraKind.STUDENT).count() == 0
