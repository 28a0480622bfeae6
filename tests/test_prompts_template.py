"""The appendix prompt templates (verbatim), their fill functions, and reading the judge's answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.prompts.template import (
    BCR_TEMPLATE,
    STUDENT_PROMPT_TEMPLATE,
    VSA_TEMPLATE,
    clean_answer,
    fill_bcr_template,
    fill_student_prompt_template,
    fill_vsa_template,
    parse_bcr_answer,
    parse_vsa_answer,
)

PAPER_CANDIDATES = [
    Path(__file__).resolve().parents[1] / "shared" / "paper" / "CollectionLoRA.txt",
    Path("/work/shared/paper/CollectionLoRA.txt"),
]
PAPER = next((p for p in PAPER_CANDIDATES if p.is_file()), None)


def paper_block(title: str, caption: str) -> str:
    lines = PAPER.read_text(encoding="utf-8").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next(i for i, line in enumerate(lines) if line.startswith(caption))
    return "\n".join(lines[start + 1 : end]).strip("\n")


@pytest.mark.skipif(PAPER is None, reason="the paper text is not in this checkout")
@pytest.mark.parametrize(
    ("template", "title", "caption"),
    [
        (STUDENT_PROMPT_TEMPLATE, "Prompt for AAC", "Fig. 15:"),
        (BCR_TEMPLATE, "Prompt for BCR Metric Evaluation", "Fig. 11:"),
        (VSA_TEMPLATE, "Prompt for VSA (Consistency)", "Fig. 12:"),
    ],
)
def test_templates_are_verbatim(template, title, caption):
    assert template == paper_block(title, caption)


def test_fill_functions():
    student = fill_student_prompt_template("  Make it 3D.  ")
    assert 'Refer to the provided rough prompt: "Make it 3D.".' in student
    assert "{ }" not in student
    bcr = fill_bcr_template("Add a red frame.", "The frame must be red and closed.")
    assert bcr.endswith(
        'Current Editing Instruction: "Add a red frame."\n\n'
        'Current Expert Evaluation Criteria: "The frame must be red and closed."'
    )
    assert '"is_bad_case": <true/false>' in bcr  # the JSON example survives untouched
    vsa = fill_vsa_template("Add a red frame.")
    assert vsa.endswith('Current Editing Instruction: "Add a red frame."')
    assert '"scores": <1-5>' in vsa


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  Make it warm.  ", "Make it warm."),
        ('"Make it warm."', "Make it warm."),
        ("“Make it warm.”", "Make it warm."),
        ("```\nMake it warm.\n```", "Make it warm."),
        ('```text\n"Make it warm."\n```', "Make it warm."),
        ('Say "hi" to the cat.', 'Say "hi" to the cat.'),
    ],
)
def test_clean_answer(raw, clean):
    assert clean_answer(raw) == clean


def test_parse_judge_answers():
    verdict = parse_bcr_answer('```json\n{"brief_reasoning": "frame missing", "is_bad_case": true}\n```')
    assert verdict.is_bad_case is True and verdict.reasoning == "frame missing"
    assert parse_bcr_answer('{"brief_reasoning": "ok", "is_bad_case": "false"}').is_bad_case is False
    assert parse_vsa_answer('Here: {"brief_reasoning": "same cat", "scores": 4}').score == 4
    with pytest.raises(ValueError, match="no JSON"):
        parse_bcr_answer("it is fine")
    with pytest.raises(ValueError, match="true/false"):
        parse_bcr_answer('{"is_bad_case": "maybe"}')
    with pytest.raises(ValueError, match="1 to 5"):
        parse_vsa_answer('{"scores": 7}')
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_vsa_answer('{"scores": 4,,}')
