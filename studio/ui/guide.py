"""The next step, shown at the top of a tab whose work needs something an earlier tab makes.

A curator who opens Distill before any effect has a teacher, or Preview before any distillation
finished, sees which tab to go to instead of empty dropdowns. The hint is re-read whenever the tab is
selected, so it goes away once the earlier step is done.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import preview_service, prompts_service, teachers_service
from ..context import Studio

# The tabs that carry a hint, by their ``gr.Tab`` id (the title in lower case). Effects has its own
# empty-library banner and Deploy its own "no finished distillation" line.
GUIDED_TABS = ("teachers", "prompts", "distill", "preview", "evaluate")


@dataclass(frozen=True)
class Readiness:
    """How far the studio's effects have come, as the hints need it."""

    effects: int
    with_teacher: tuple[str, ...]
    teacher_without_prompts: tuple[str, ...]  # has a teacher, lacks a trigger or a student prompt
    students: int  # finished CollectionLoRAs of this backbone


def readiness(studio: Studio) -> Readiness:
    teachers = teachers_service.list_teachers(studio)  # every effect, with its teacher or None
    with_teacher = tuple(t.effect for t in teachers if t.lora is not None)
    rows = {r.effect: r for r in prompts_service.prompt_rows(studio)} if with_teacher else {}
    lacking = tuple(
        n
        for n in with_teacher
        if not (rows[n].trigger or "").strip() or not (rows[n].student_prompt or "").strip()
    )
    return Readiness(len(teachers), with_teacher, lacking, len(preview_service.finished_students(studio)))


def _listed(names: tuple[str, ...], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def hint(tab: str, r: Readiness) -> str:
    """Markdown for the top of ``tab``: what to do first, or "" when the tab has what it needs."""
    no_effects = (
        "**No effects yet.** Add one in the **Effects** tab (upload a pair set, or load the demo "
        "there), then come back."
    )
    if tab in ("teachers", "prompts"):
        return no_effects if r.effects == 0 else ""
    if tab == "distill":
        if r.effects == 0:
            return no_effects
        if not r.with_teacher:
            return (
                f"**None of your {r.effects} effect{'s' if r.effects != 1 else ''} has a teacher yet.** "
                "Train or import one per effect in the **Teachers** tab; distillation collects the teachers."
            )
        if r.teacher_without_prompts:
            return (
                f"**{_listed(r.teacher_without_prompts)} still need{'s' if len(r.teacher_without_prompts) == 1 else ''} "
                "a trigger word and a student prompt.** Press **Generate missing prompts** in the **Prompts** "
                "tab (or leave them unticked here)."
            )
        return ""
    if tab in ("preview", "evaluate"):
        if r.students:
            return ""
        first = "import effects in **Effects**, " if r.effects == 0 else ""
        return (
            "**No finished CollectionLoRA yet.** This tab works on the one LoRA a distillation makes: "
            f"{first}give them teachers and prompts, then start a run in the **Distill** tab."
        )
    raise ValueError(f"no hint for the tab {tab!r}")


def hints_for(studio: Studio, tabs: list[str]) -> list[str]:
    """The hints of several tabs from one reading of the studio (the page load fills them all)."""
    r = readiness(studio)
    return [hint(tab, r) for tab in tabs]
