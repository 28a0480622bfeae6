"""bench/teachers.py on a CI-sized run: it trains, scores and records a teacher with the pair count
it was asked for, and rejects an impossible one before loading anything."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("bench_teachers", ROOT / "bench" / "teachers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pairs_out_of_range_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _script().main(["--effects", "sepia", "--pairs", "0", "--out", str(tmp_path / "t.md")])
    assert e.value.code == 2
    assert "between 1 and" in capsys.readouterr().err


def test_a_tiny_run_records_its_pairs(tmp_path, capsys):
    out = tmp_path / "t.md"
    args = ["--effects", "sepia", "--pairs", "3", "--steps", "2", "--n-test", "1", "--out", str(out)]
    _script().main(args + ["--save-loras", str(tmp_path / "loras")])
    assert "teacher_sepia: 100%" in capsys.readouterr().err  # the training's progress bar
    text = out.read_text()
    assert "Training: 3 pairs per effect" in text
    row = next(line for line in text.splitlines() if line.startswith("| sepia |"))
    teacher, base = float(row.split("|")[5]), float(row.split("|")[8])
    assert 0 < teacher < 100 and 0 < base < 100
    rec = json.loads(out.with_suffix(".jsonl").read_text().splitlines()[0])
    assert rec["key"]["pairs"] == 3 and rec["effect"] == "sepia"
    assert (tmp_path / "loras" / "teacher_sepia.safetensors").stat().st_size > 0
