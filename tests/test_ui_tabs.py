"""The Teachers, Distill, Preview, Evaluate and Deploy tabs without a browser: their handlers against a
temp studio on a random 2-layer tiny backbone.

Runs are created through the tabs with the worker launch replaced by an in-process job call (the
worker lifecycle itself is tested in test_runs.py), so the tabs read exactly the rows a worker writes.
One distillation of 2 steps is shared by the preview, evaluate and deploy tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select, update
from studio_fixtures import add_toy_effect, small_studio, toy_lora_file

from distill.backbones import adapters
from distill.config import DistillConfig
from distill.export import read_catalog
from storage import Evaluation, Run, RunStatus
from studio import jobs_distill, jobs_teacher, preview_service, runs
from studio.context import Studio
from studio.ui import deploy_tab, distill_tab, evaluate_tab, preview_tab, runs_view, teachers_tab

A, B, C = "sepia", "cool_blue", "night_vision"  # EffectBench-mini effects: exact ground truth exists
FAST_DISTILL = (
    '{"batch": 2, "coarse_ratio": 6.0, "target_steps": 2, "target_general_sources": 1, '
    '"checkpoint_every": 1, "sample_every": 1, "student_steps": 2, "student_lora": {"rank": 4, "alpha": 4.0}, '
    '"fake_lora": {"rank": 4, "alpha": 4.0}}'
)
FAST_TEACHER = '{"batch": 2, "sample_every": 1, "sample_n": 1, "sample_steps": 2, "checkpoint_every": 1}'


def _no_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs are created, no worker starts (tests run the job in-process, as the worker would)."""

    def create_only(studio, kind, config, name="", effect_id=None, parent_run_id=None):
        return runs.create_run(
            studio, kind, config, name=name, effect_id=effect_id, parent_run_id=parent_run_id
        )

    monkeypatch.setattr(runs, "submit", create_only)


def _set_status(studio: Studio, run_id: int, status: RunStatus) -> None:
    with studio.session() as s:
        s.execute(update(Run).where(Run.id == run_id).values(status=status))


class StopAfter(runs.DbReporter):
    def __init__(self, studio: Studio, run_id: int, steps: int):
        super().__init__(studio, run_id, flush_interval_s=0)
        self.stop_at = steps

    def should_stop(self) -> bool:
        return self.step >= self.stop_at


class PolledReporter(runs.DbReporter):
    """A worker's reporter while a browser tab polls the run: the tab looks after every sample grid."""

    def samples(self, step: int, grid: Image.Image) -> None:
        super().samples(step, grid)
        distill_tab.poll(self.studio, self.run_id)


def _context(studio: Studio, run_id: int, reporter: runs.DbReporter) -> runs.RunContext:
    with studio.session() as s:
        config = runs.job_config(s.get(Run, run_id))
    ckpt = runs.last_checkpoint(studio, run_id)
    return runs.RunContext(
        studio, run_id, config, runs.run_dir(studio, run_id), reporter, ckpt.path if ckpt else None
    )


@pytest.fixture()
def studio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Studio:
    _no_workers(monkeypatch)
    st = small_studio(tmp_path / "data", tmp_path)
    add_toy_effect(st, tmp_path, A, 1, toy_prompts=True)
    add_toy_effect(st, tmp_path, B, 2, toy_prompts=True)
    return st


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Studio, int]:
    """A studio with A and B distilled (2 steps) through the Distill tab, the job run in-process."""
    mp = pytest.MonkeyPatch()
    _no_workers(mp)
    tmp = tmp_path_factory.mktemp("distilled")
    st = small_studio(tmp / "data", tmp)
    add_toy_effect(st, tmp, A, 1, toy_prompts=True)
    add_toy_effect(st, tmp, B, 2, toy_prompts=True)
    form = distill_tab.defaults(st)
    form.steps, form.critic_updates = 2, 1
    view = distill_tab.launch(st, [A, B], form, FAST_DISTILL)
    assert not view.error, view.error
    run_id = view.run_id
    _set_status(st, run_id, RunStatus.RUNNING)
    metrics = jobs_distill.run_distill(_context(st, run_id, PolledReporter(st, run_id, flush_interval_s=0)))
    runs._finish(st, run_id, RunStatus.SUCCEEDED, metrics={**runs.run_status(st, run_id).metrics, **metrics})
    yield st, run_id
    mp.undo()
    preview_service.forget_backbones()


# -- Teachers ------------------------------------------------------------------------------------


def test_teacher_run_shows_progress_samples_and_finishes(studio: Studio, tmp_path: Path) -> None:
    add_toy_effect(studio, tmp_path, C, 3, teacher_std=None, toy_prompts=True)
    view = teachers_tab.render(studio, C)
    assert view.effect == C and C in view.effects
    table = view.panel.table.set_index("effect")
    assert table.loc[C, "teacher"] == "none yet" and table.loc[A, "teacher"].endswith("imported (diffusers)")

    view = teachers_tab.start_training(studio, C, 4, 2, 1e-3, FAST_TEACHER, ["left-right"])
    assert not view.error, view.error
    run_id = view.run_id
    assert f"Started run {run_id}: teacher of **{C}**, 2 steps." in view.notice
    assert run_id in [v for _, v in view.run_choices]
    assert "Queued" in view.panel.progress and view.panel.active and view.panel.can_stop
    with studio.session() as s:
        train = s.get(Run, run_id).config["train"]
    assert (train["rank"], train["alpha"], train["steps"], train["lr"], train["batch"]) == (
        4,
        4.0,
        2,
        1e-3,
        2,
    )
    assert (train["flip_x"], train["flip_y"]) == (True, False)  # the form's mirror choice reached the run

    # The worker's half (in-process): it runs one step, then is asked to stop.
    _set_status(studio, run_id, RunStatus.RUNNING)
    jobs_teacher.run_teacher(_context(studio, run_id, StopAfter(studio, run_id, 1)))
    panel = teachers_tab.poll(studio, run_id)
    assert "50%" in panel.progress and "step 1 / 2" in panel.progress and "loss " in panel.progress
    assert panel.samples is not None and panel.samples.width > 0
    assert panel.active and panel.can_stop and not panel.can_resume

    runs._finish(studio, run_id, RunStatus.STOPPED)
    panel = teachers_tab.poll(studio, run_id)
    assert "Stopped" in panel.progress and not panel.active and panel.can_resume and not panel.can_stop

    # Resumed from its checkpoint, it finishes and the effect has a trained teacher.
    _set_status(studio, run_id, RunStatus.RUNNING)
    jobs_teacher.run_teacher(_context(studio, run_id, runs.DbReporter(studio, run_id, flush_interval_s=0)))
    runs._finish(studio, run_id, RunStatus.SUCCEEDED)
    panel = teachers_tab.poll(studio, run_id)
    assert "100%" in panel.progress and "Done" in panel.progress and not panel.active
    assert panel.table.set_index("effect").loc[C, "teacher"].endswith("trained")


def test_train_every_missing_teacher_queues_one_run_each_and_never_twice(
    studio: Studio, tmp_path: Path
) -> None:
    for k, name in enumerate(("frame", "dusk", "glow")):
        add_toy_effect(studio, tmp_path, name, 10 + k, teacher_std=None)
    view = teachers_tab.train_missing(studio, None, 4, 3, 1e-3, FAST_TEACHER)
    assert not view.error, view.error
    queued = {v.effect_id: v for v in runs.list_runs(studio, "teacher")}
    assert len(queued) == 3  # A and B have teachers already
    first, last = min(v.id for v in queued.values()), max(v.id for v in queued.values())
    assert f"Queued 3 teacher trainings (runs {first}-{last}), 3 steps each" in view.notice
    assert "frame, dusk, glow" in view.notice and view.run_id == first
    assert all(v.config["train"]["steps"] == 3 and v.config["train"]["rank"] == 4 for v in queued.values())

    # pressed again while they wait: nothing new; one finished without a teacher is queued again
    again = teachers_tab.train_missing(studio, None, 4, 3, 1e-3, FAST_TEACHER)
    assert "Every effect has a teacher or one training already" in again.error
    _set_status(studio, first, RunStatus.FAILED)
    view = teachers_tab.train_missing(studio, None, 4, 3, 1e-3, "")
    assert "Queued 1 teacher training (run " in view.notice and "frame" in view.notice
    assert "Steps" in teachers_tab.train_missing(studio, None, 4, 0, 1e-3, "").error


def test_teacher_settings_and_bad_files_are_explained(studio: Studio, tmp_path: Path) -> None:
    cases = [
        ((A, 0, 10, 1e-3, ""), "Rank must be a whole number"),
        ((A, 4, 2.5, 1e-3, ""), "Steps must be a whole number"),
        ((A, 4, 10, 5.0, ""), "learning rate must be a number between 0 and 1"),
        ((A, 4, 10, 1e-3, "{batch: 2}"), '"More settings" is not valid JSON'),
        ((A, 4, 10, 1e-3, '{"bogus": 1}'), "Unknown LoRA training setting(s): bogus"),
        ((None, 4, 10, 1e-3, ""), "Pick the effect"),
    ]
    for args, message in cases:
        view = teachers_tab.start_training(studio, *args)
        assert message in view.error, (args, view.error)
        assert view.run_id is None and "Traceback" not in view.error

    pickle = tmp_path / "style.ckpt"
    pickle.write_bytes(b"\x80\x04not really")
    assert "is not a .safetensors file" in teachers_tab.import_lora(studio, A, pickle).error
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    error = teachers_tab.import_lora(studio, A, broken).error
    assert "broken.safetensors cannot be the teacher of 'sepia'" in error
    assert "is not a readable .safetensors file" in error
    assert "Upload the LoRA file" in teachers_tab.import_lora(studio, A, None).error

    good = toy_lora_file(tmp_path / "again.safetensors", 7)
    view = teachers_tab.import_lora(studio, A, good, "Give it a sepia tone.")
    assert not view.error and "Imported again.safetensors as the teacher of **sepia**" in view.notice
    row = view.panel.table.set_index("effect").loc[A]
    assert row["teacher prompt"] == "Give it a sepia tone." and row["rank"] == "2"

    # the check beside the base model, on the bench's held-out sources (sepia has exact ground truth)
    md = teachers_tab.check_teacher(studio, A, n_per_category=1)
    assert "On EffectBench-mini test sources (2)" in md and "| teacher |" in md
    assert "| base model, same prompt |" in md and "learned" in md.lower()
    assert teachers_tab.check_teacher(studio, None) == "Choose an effect first."
    assert teachers_tab.check_teacher(studio, C).startswith("**Problem:**")


# -- Distill ---------------------------------------------------------------------------------------


def test_distill_defaults_and_launch_validation(studio: Studio, tmp_path: Path) -> None:
    form = distill_tab.defaults(studio)
    tiny_steps = DistillConfig.for_backbone("tiny").steps  # the backbone's preset; the rest is §5.1
    assert (form.steps, form.p_switch, form.tau_max, form.tau_min, form.critic_updates) == (
        tiny_steps,
        0.5,
        750,
        500,
        5,
    )
    assert set(form.switches) == {"pdsr", "aop", "ta_fm", "target_simulation", "backward_simulation"}
    add_toy_effect(studio, tmp_path, C, 3, teacher_std=None, toy_prompts=True)
    view = distill_tab.render(studio)
    assert view.chosen == [A, B] and C in view.effects  # all effects with a teacher, by default

    def launch(**change) -> distill_tab.View:
        f = distill_tab.defaults(studio)
        for k, v in change.items():
            setattr(f, k, v)
        return distill_tab.launch(studio, [A, B], f)

    assert "'night_vision' needs a teacher LoRA" in distill_tab.launch(studio, [A, C], form).error
    assert "Tick the effects" in distill_tab.launch(studio, [], form).error
    assert "p_switch must be in [0, 1]" in launch(p_switch=1.5).error
    assert "Steps must be a whole number" in launch(steps=0).error
    assert "at least one of ta_fm, target_simulation, backward_simulation" in launch(switches=["pdsr"]).error
    assert "not valid JSON" in distill_tab.launch(studio, [A, B], form, "{oops").error
    assert distill_tab.render(studio).run_choices == []  # nothing was queued by a refused launch

    first = distill_tab.launch(studio, [A, B], form)
    assert not first.error and first.notice.startswith(f"Started run {first.run_id}: distilling 2 effects")
    with studio.session() as s:
        cfg = s.get(Run, first.run_id).config["distill"]
    assert (cfg["steps"], cfg["lr_student"], cfg["lr_fake"], cfg["critic_updates"]) == (
        tiny_steps,
        form.lr,
        DistillConfig.for_backbone("tiny").lr_fake,  # the form sets the student's lr alone
        5,
    )
    second = distill_tab.launch(studio, [A], form)
    assert f"queued behind run {first.run_id}" in second.notice
    assert [r for _, r in second.run_choices] == [second.run_id, first.run_id]
    assert list(second.panel.history["run"]) == [second.run_id, first.run_id]


def test_distill_poll_shows_curves_samples_and_history(distilled: tuple[Studio, int]) -> None:
    st, run_id = distilled
    panel = distill_tab.poll(st, run_id)
    assert "100%" in panel.progress and "Done" in panel.progress and not panel.active
    with st.session() as s:  # the tiny preset's coarse stage (TA-FM alone, no critic) runs first
        coarse = DistillConfig.from_dict(s.get(Run, run_id).config["distill"]).coarse
    total = coarse + 2
    assert coarse > 0
    assert "loss" in set(panel.curves["metric"]) and set(panel.curves["step"]) == set(range(1, total + 1))
    assert set(panel.critic["metric"]) == {"critic"} and list(panel.critic["step"]) == [total - 1, total]
    assert panel.curves["value"].dtype == "float64"  # a numeric axis in the LinePlot
    # The row keeps only the newest grid; the tab remembers the ones it saw while polling.
    caps = [cap for _, cap in panel.samples]
    assert caps[:2] == [f"step {total}", f"step {total - 1}"]  # newest first
    assert runs_view.latest_samples(st, runs.run_status(st, run_id)) is not None
    assert panel.history.iloc[0]["status"] == "succeeded" and panel.history.iloc[0]["run"] == run_id
    view = distill_tab.render(st)
    assert [r for _, r in view.students] == [run_id]  # a finished run to extend
    assert "Already in this CollectionLoRA: sepia" in distill_tab.extend(st, run_id, [A], 10).error


# -- Preview ----------------------------------------------------------------------------------------


def test_preview_student_beside_teacher_with_nfe_and_time(distilled: tuple[Studio, int]) -> None:
    st, run_id = distilled
    view = preview_tab.choose_run(st, None)
    assert view.run_id == run_id and view.effects == [A, B]

    src = preview_tab.source_labels()[0]
    view = preview_tab.run_preview(st, run_id, A, None, None, src)
    assert not view.error, view.error
    captions = [c for _, c in view.gallery]
    assert captions[:2] == ["Input", "Ground truth"]
    assert captions[2].startswith("Student (CollectionLoRA) · 2 NFE · ") and captions[2].endswith(" s")
    assert captions[3].startswith("Teacher · 80 NFE · ")
    assert "no Lightning LoRA" in view.notes
    assert all(im.size[0] >= 128 for im, _ in view.gallery)  # upscaled to be visible

    upload = Image.new("RGB", (48, 48), (200, 40, 40))
    view = preview_tab.run_preview(st, run_id, A, B, upload, src)  # the upload wins: no ground truth
    captions = [c for _, c in view.gallery]
    assert captions[0] == "Input" and "Ground truth" not in captions
    assert any(c.startswith("Teachers stacked · 80 NFE") for c in captions)
    assert "Please apply" in view.notes and "sepia, then cool_blue" in view.notes

    bb = preview_service.backbone(st)
    assert preview_service.backbone(st) is bb  # loaded once per process
    names = adapters.adapter_names(bb.transformer)
    assert len([n for n in names if n.startswith("pv_student")]) == 1

    assert "Pick an effect" in preview_tab.run_preview(st, run_id, None, None, upload, None).error
    assert "Upload an image" in preview_tab.run_preview(st, run_id, A, None, None, None).error
    assert (
        "does not hold night_vision"
        in preview_tab.run_preview(st, run_id, "night_vision", None, upload, None).error
    )


# -- Evaluate ---------------------------------------------------------------------------------------


def test_evaluate_shows_results_and_scores_a_student(distilled: tuple[Studio, int], tmp_path: Path) -> None:
    empty = evaluate_tab.read_results(tmp_path / "nothing")
    assert "No bench results" in empty.message and empty.files == [] and empty.overview.empty
    res = tmp_path / "res"
    res.mkdir()
    (res / "table1_10fx10.md").write_text("| system | PSNR |\n|---|---|\n| Ours | 21.3 |\n")
    for tag, n, ours in (("10fx10", 10, 23.1), ("10fx7", 10, 20.9), ("50fx8", 50, 17.6)):
        systems = {
            "Base": {"psnr": 24.0, "bcr": 0.2},
            "FM+Lightning": {"psnr": 20.0, "bcr": 0.35},
            "Ours": {"psnr": ours, "bcr": 0.25},
        }
        gap = {"Ours": {"mean": ours - 24.0, "low": ours - 24.2, "high": ours - 23.8}}
        summary = {"tag": tag, "effects": ["x"] * n, "systems": systems, "psnr_vs_base": gap}
        (res / f"table1_{tag}.json").write_text(json.dumps(summary))
    (res / "table1_broken.json").write_text("{")  # half-written: left out, nothing else breaks
    Image.new("RGB", (8, 8)).save(res / "grid_10fx10.png")
    Image.new("RGB", (8, 8)).save(res / "fig_7.png")
    r = evaluate_tab.read_results(res)
    assert list(r.overview["run"]) == ["10fx7", "10fx10", "50fx8"]  # by effects, then run number
    row = r.overview.iloc[1].tolist()
    assert row == ["10fx10", 10, "24.00 / 0.200", "20.00 / 0.350", "23.10 / 0.250", "-0.90 [-1.10, -0.70]"]
    assert r.files == ["table1_10fx10.md", "fig_7.png"]  # the grid belongs to its run's table
    text, plots = evaluate_tab.read_result("table1_10fx10.md", res)
    assert "results/table1_10fx10.md" in text and "| Ours | 21.3 |" in text
    assert plots == [(str(res / "grid_10fx10.png"), "grid 10fx10")]
    assert evaluate_tab.read_result("fig_7.png", res)[1] == [(str(res / "fig_7.png"), "fig 7")]
    assert "no result file" in evaluate_tab.read_result("../secret.md", res)[0]
    assert evaluate_tab.read_result(None, res) == ("Pick a result file to read it.", [])

    st, run_id = distilled
    view = evaluate_tab.quick_eval(st, run_id, 1)
    assert not view.error, view.error
    assert list(view.table["effect"]) == [A, B] and list(view.table["images"]) == [2, 2]
    assert all(float(p) > 0 for p in view.table["PSNR (dB)"])
    assert "2 effects × 2 test sources, 2 NFE each" in view.summary
    with st.session() as s:
        stored = s.scalars(select(Evaluation).where(Evaluation.run_id == run_id)).all()
    assert {(e.metric, e.n) for e in stored} == {("psnr_mean", 2), ("bad_case_rate", 2)}
    assert "1 to 16" in evaluate_tab.quick_eval(st, run_id, 0).error


# -- Deploy -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_deploy_export_file_catalog_and_measured_cost(distilled: tuple[Studio, int], fmt: str) -> None:
    st, run_id = distilled
    view = deploy_tab.export_file(st, run_id, fmt)
    assert not view.error, view.error
    path = Path(view.file)
    assert path.is_file() and path.name == f"collectionlora-run{run_id}-{fmt}.safetensors"
    catalog = read_catalog(path)
    assert [e.name for e in catalog.entries] == [A, B]
    assert list(view.catalog["effect"]) == [A, B] and view.catalog.iloc[0]["trigger"] == "<sepia_Xq1>"

    teachers = [preview_service.lora_path(st, t) for t in deploy_tab.teacher_files(st, run_id).values()]
    cost = deploy_tab.cost(st, run_id, path)
    assert cost.student_bytes == path.stat().st_size
    assert cost.teacher_bytes == sum(p.stat().st_size for p in teachers) and len(teachers) == 2
    assert list(view.cost["files"]) == [2, 1]

    measured = deploy_tab.measure_switch(st, run_id)
    assert not measured.error, measured.error
    bank = measured.cost.iloc[0]
    assert "ms mean" in bank["time per switch"] and "of 20 mixed queries" in bank["LoRA switches per query"]
    bb = preview_service.backbone(st)
    assert not [n for n in adapters.adapter_names(bb.transformer) if n.startswith("bank_")]  # cleaned up


def test_deploy_without_a_student_says_so(studio: Studio) -> None:
    view = deploy_tab.show(studio, None)
    assert view.run_id is None and "No finished distillation yet" in view.summary
    assert "no finished distillation to export" in deploy_tab.export_file(studio, None).error


# -- Runs on start ------------------------------------------------------------------------------------


def test_reattach_marks_dead_workers_and_lists_live_runs(studio: Studio) -> None:
    import socket

    dead = runs.create_run(studio, "teacher", {"effect": A}, name="teacher sepia")
    waiting = runs.create_run(studio, "teacher", {"effect": B}, name="teacher cool_blue")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with studio.session() as s:
        s.execute(
            update(Run)
            .where(Run.id == dead)
            .values(status=RunStatus.RUNNING, pid=gone.pid, host=socket.gethostname())
        )
    active = runs_view.reattach(studio)
    assert [v.id for v in active] == [waiting]
    view = runs_view.read_run(studio, dead)
    assert view.status == "failed" and "worker process disappeared" in view.error
    assert "worker process disappeared" in runs_view.progress_html(view)
    assert f"#{waiting} teacher cool_blue" in runs_view.active_runs_markdown(studio)


def test_run_view_formatting() -> None:
    assert runs_view.format_eta(None) == "" and runs_view.format_eta(42) == "42 s"
    assert runs_view.format_eta(185) == "3 min 05 s" and runs_view.format_eta(3720) == "1 h 02 min"
    assert runs_view.parse_extra("") == {} and runs_view.parse_extra('{"a": 1}') == {"a": 1}
    with pytest.raises(runs_view.SettingsError, match="must be a JSON object"):
        runs_view.parse_extra("[1, 2]")
