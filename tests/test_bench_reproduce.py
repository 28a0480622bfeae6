"""bench/reproduce.py end to end in its CI-sized --quick mode: every stage trains, every system is
scored, and the tables and the JSON summary say the same thing."""

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from distill.config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("Base", "Base+Lightning", "FM+Lightning", "Ours")


def _reproduce(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "reproduce.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reproduce")
    p = _reproduce("--quick", "--extend", "2", "--work", str(tmp / "work"), "--out", str(tmp / "out"))
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp


def test_quick_run_writes_table_json_and_grid(quick_run):
    out = quick_run / "out"
    md = (out / "table1_quick.md").read_text()
    summary = json.loads((out / "table1_quick.json").read_text())
    assert (out / "grid_quick.png").stat().st_size > 0
    assert set(summary["systems"]) == set(SYSTEMS)
    for name in SYSTEMS:
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        psnr = summary["systems"][name]["psnr"]
        assert math.isfinite(psnr) and psnr > 0
        assert f"| {psnr:.2f} |" in row  # the table prints the JSON's number
    # the paired comparison covers every system but the reference itself
    assert set(summary["psnr_vs_base"]) == set(SYSTEMS) - {"Base"}
    for gap in summary["psnr_vs_base"].values():
        assert gap["low"] <= gap["mean"] <= gap["high"]
    assert summary["distill_seconds"] > 0


def test_quick_run_caches_every_adapter_as_safetensors(quick_run):
    loras = quick_run / "work" / "quick" / "loras"
    names = {f.stem for f in loras.glob("*.safetensors")}
    assert {"lightning", "fm_all", "ours"} <= names
    assert any(n.startswith("teacher_") for n in names)
    assert not [f for f in loras.rglob("*") if f.suffix in (".pt", ".bin", ".pkl")]


@pytest.mark.parametrize(
    "value, message",
    [
        ("{not json", "--set is not JSON"),
        ("[1]", "--set takes a JSON object"),
        ('{"no_such_knob": 1}', "unknown distillation setting(s): no_such_knob"),
        ('{"tau_min": 5000}', "tau_min and tau_max are timesteps"),
    ],
)
def test_set_is_checked_before_any_training(tmp_path, monkeypatch, capsys, value, message):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import reproduce

    argv = ["reproduce.py", "--quick", "--work", str(tmp_path), "--out", str(tmp_path), "--set", value]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        reproduce.main()
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # rejected before anything was trained or written


def test_quick_run_extends_the_collection_one_effect_at_a_time(quick_run):
    """Table 5: two new effects added in turn, each by a short run from the previous CollectionLoRA."""
    summary = json.loads((quick_run / "out" / "table1_quick.json").read_text())
    ext = summary["extension"]
    assert len(ext["new_effects"]) == 2
    n0 = len(summary["effects"])
    assert [st["effects"] for st in ext["stages"]] == [n0, n0 + 1, n0 + 2]
    assert ext["coarse_lr"] == DistillConfig.for_backbone("tiny").extension_coarse_lr  # not the full run's
    # the first column is Table 1's own Base+Lightning and Ours
    assert ext["stages"][0]["ours"]["psnr"] == summary["systems"]["Ours"]["psnr"]
    assert ext["stages"][0]["base_lightning"]["psnr"] == summary["systems"]["Base+Lightning"]["psnr"]
    for st in ext["stages"][1:]:
        assert math.isfinite(st["ours"]["psnr"]) and math.isfinite(st["ours_on_first"]["psnr"])
    loras = {f.stem for f in (quick_run / "work" / "quick" / "loras").glob("*.safetensors")}
    assert {"ours_ext1", "ours_ext2"} <= loras
    md = (quick_run / "out" / "table1_quick.md").read_text()
    assert "Table 5 analogue" in md
    table5 = md.split("Table 5 analogue")[1]
    row = next(line for line in table5.splitlines() if line.startswith("| Ours |"))
    last = ext["stages"][-1]["ours"]
    assert row.endswith(f"| {last['psnr']:.2f} / {last['bcr']:.3f} |")
    # the new effects are scored in the last stage's per-effect table
    assert all(f"| {n} |" in table5.split("Per effect at")[1] for n in ext["new_effects"])


def test_recorded_command_reads_back_as_the_same_arguments(monkeypatch):
    """A run's tables carry the command that made it; with ``--set`` JSON it must stay one argument."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import reproduce

    args = ["--effects", "10", "--set", '{"ta_fm_batch": 4, "coarse_ratio": 96}', "--tag", "a b"]
    cmd = reproduce.command_line(args)
    assert shlex.split(cmd) == ["python", "bench/reproduce.py", *args]


def _student_fit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "student_fit.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_student_fit_scores_a_finished_run_on_training_and_test_sources(quick_run, tmp_path):
    rows_file = tmp_path / "fit.json"
    work = str(quick_run / "work" / "quick")
    p = _student_fit(
        "--work",
        work,
        "--effects",
        "2",
        "--train-sources",
        "1",
        "--test-per-category",
        "1",
        "--json",
        str(rows_file),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    assert len(rows) == 2
    for r in rows:
        line = next(ln for ln in p.stdout.splitlines() if ln.startswith(f"| {r['effect']} |"))
        cells = [c.strip() for c in line.split("|")[2:-1]]
        numbers = [float(c) for c in cells]
        assert all(0 < r[k] < 100 for k in ("base_train", "ours_train", "base_test", "ours_test"))
        assert numbers[2] == pytest.approx(r["ours_train"] - r["base_train"], abs=0.011)
        assert numbers[5] == pytest.approx(r["ours_test"] - r["base_test"], abs=0.011)
    # training and test sources are different images, so at least one system scores them differently
    assert any(r["base_train"] != r["base_test"] for r in rows)


def test_student_fit_names_a_folder_without_a_finished_run(tmp_path):
    p = _student_fit("--work", str(tmp_path))
    assert p.returncode != 0
    assert "holds no finished run" in p.stderr
