"""bench/scaling.py: the Table 4 analogue built from reproduce.py's JSON summaries."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_scaling", ROOT / "bench" / "scaling.py")
scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)


def _summary(tag: str, n: int, systems: dict[str, float]) -> dict:
    return {
        "tag": tag,
        "effects": [f"e{i}" for i in range(n)],
        "command": f"python bench/reproduce.py --effects {n} --tag {tag}",
        "commit": "abc1234",
        "distill_seconds": 60.0 * n,
        "systems": {
            name: {
                "n": 2 * n,
                "psnr": p,
                "ssim": 0.5,
                "consistency": 0.5,
                "accuracy": 0.9,
                "bcr": 0.1,
                "nfe": 8,
            }
            for name, p in systems.items()
        },
    }


def test_table_orders_runs_by_size_and_marks_missing_systems(tmp_path):
    (tmp_path / "table1_big.json").write_text(json.dumps(_summary("big", 50, {"Ours": 20.5})))
    (tmp_path / "table1_small.json").write_text(
        json.dumps(_summary("small", 10, {"Ours": 23.25, "FM+Lightning": 19.75}))
    )
    out = tmp_path / "t4.md"
    scaling.main(["--tags", "big", "small", "--results", str(tmp_path), "--out", str(out)])
    text = out.read_text()
    assert (
        "| System | NFE | 10 effects (small): PSNR / Acc / BCR | 50 effects (big): PSNR / Acc / BCR |" in text
    )
    assert "| Ours | 8 | 23.25 / 0.900 / 0.100 | 20.50 / 0.900 / 0.100 |" in text
    assert "| FM+Lightning | 8 | 19.75 / 0.900 / 0.100 | - |" in text
    assert "| Ours: distillation minutes | | 10.0 | 50.0 |" in text
    assert "--tag small" in text and "--tag big" in text


def test_missing_run_says_how_to_make_it(tmp_path):
    with pytest.raises(SystemExit, match="--tag nope"):
        scaling.main(["--tags", "nope", "--results", str(tmp_path), "--out", str(tmp_path / "t.md")])


def test_rerun_keeps_the_notes_and_draws_the_plot(tmp_path):
    from PIL import Image

    (tmp_path / "table1_a.json").write_text(json.dumps(_summary("a", 10, {"Ours": 23.0, "Base": 24.0})))
    (tmp_path / "table1_b.json").write_text(json.dumps(_summary("b", 50, {"Ours": 21.0, "Base": 24.5})))
    out = tmp_path / "t4.md"
    args = ["--tags", "a", "b", "--results", str(tmp_path), "--out", str(out)]
    scaling.main(args)
    out.write_text(out.read_text() + "\nNotes (session 1). Ours loses 2 dB at 50 effects.\n")
    scaling.main(args)
    text = out.read_text()
    assert text.count("Notes (session 1). Ours loses 2 dB at 50 effects.") == 1
    assert text.count("| Ours | 8 |") == 1  # the table is written once, the notes after it
    assert text.index("| Ours | 8 |") < text.index("Notes (session 1)")
    assert "![PSNR and BCR against the number of effects](t4.png)" in text
    img = Image.open(tmp_path / "t4.png").convert("RGB")
    colours = {c for _, c in img.getcolors(maxcolors=1 << 16)}
    assert scaling._COLOURS[0] in colours and scaling._COLOURS[1] in colours  # a line per system
