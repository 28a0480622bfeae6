"""The next-step hints: each later tab says which earlier step is missing, and nothing once it is done."""

from __future__ import annotations

import gradio as gr
import pytest
from studio_fixtures import add_toy_effect, small_studio, toy_lora_file

from storage import LoraKind
from studio import lora_files
from studio.ui import guide
from studio.ui.app import build_app


@pytest.fixture()
def studio(data_dir, tmp_path):
    return small_studio(data_dir, tmp_path)


def _hints(studio) -> dict[str, str]:
    return dict(zip(guide.GUIDED_TABS, guide.hints_for(studio, list(guide.GUIDED_TABS))))


def test_hints_follow_the_curator_through_the_steps(studio, tmp_path):
    empty = _hints(studio)
    assert all("No effects yet" in empty[t] for t in ("teachers", "prompts", "distill"))
    assert all("No finished CollectionLoRA" in empty[t] for t in ("preview", "evaluate"))
    assert "import effects in **Effects**" in empty["preview"]

    # an effect without a teacher: Teachers and Prompts have work; Distill points to Teachers
    add_toy_effect(studio, tmp_path, "warm", 1, teacher_std=None)
    h = _hints(studio)
    assert h["teachers"] == h["prompts"] == ""
    assert "None of your 1 effect has a teacher yet" in h["distill"] and "**Teachers**" in h["distill"]
    assert "import effects" not in h["preview"] and "No finished CollectionLoRA" in h["preview"]

    # teachers, one effect still without prompts: Distill names it and points to Prompts
    add_toy_effect(studio, tmp_path, "frame", 2, toy_prompts=True)
    add_toy_effect(studio, tmp_path, "cool", 3)
    h = _hints(studio)
    assert h["distill"].startswith("**cool still needs a trigger word") and "**Prompts**" in h["distill"]
    assert "frame" not in h["distill"]

    add_toy_effect(studio, tmp_path, "dusk", 4)
    assert "cool, dusk still need a" in guide.hints_for(studio, ["distill"])[0]


def test_every_prompted_teacher_clears_distill_and_a_student_clears_the_rest(studio, tmp_path):
    add_toy_effect(studio, tmp_path, "frame", 2, toy_prompts=True)
    assert guide.hints_for(studio, ["distill"])[0] == ""
    assert guide.hints_for(studio, ["preview"])[0] != ""
    lora_files.store_lora(
        studio,
        lambda p: toy_lora_file(p, 5),
        kind=LoraKind.STUDENT,
        rank=2,
        alpha=2.0,
        backbone="tiny",
        meta={"effects": ["frame"]},
    )
    assert _hints(studio) == dict.fromkeys(guide.GUIDED_TABS, "")


def test_long_lists_are_shortened():
    r = guide.Readiness(9, tuple("abcdefg"), tuple("abcdefg"), 0)
    assert "a, b, c, d, e and 2 more still need" in guide.hint("distill", r)
    with pytest.raises(ValueError):
        guide.hint("effects", r)


def test_the_page_has_a_hint_box_on_each_guided_tab(studio):
    app = build_app(studio)
    ids = {b.elem_id for b in app.blocks.values() if isinstance(b, gr.Markdown)}
    assert {f"{t}-next-step" for t in guide.GUIDED_TABS} <= ids
    assert not ids & {"effects-next-step", "deploy-next-step"}  # they have their own empty-state lines
