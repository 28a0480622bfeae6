"""The effect library and its CLI: import, list, show, rename, prompt, drop a pair, delete."""

from __future__ import annotations

import io
import zipfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio import library
from studio.cli import main
from studio.config import StudioConfig
from studio.context import Studio
from studio.pairsets import PairSetError


def _png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _pair_folder(root: Path, n: int = 3, seed: int = 0) -> Path:
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    for i in range(n):
        (root / "source" / f"{i:02d}.png").write_bytes(_png(seed + 2 * i))
        (root / "target" / f"{i:02d}.png").write_bytes(_png(seed + 2 * i + 1))
    return root


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


@pytest.fixture()
def studio(data_dir: Path) -> Studio:
    return Studio.open(StudioConfig(data_dir=data_dir))


def test_import_list_show(studio: Studio, tmp_path: Path) -> None:
    res = library.import_pairset(
        studio, "warm-film", _pair_folder(tmp_path / "p"), teacher_prompt="Make it warm."
    )
    assert res.pairs == 3
    [e] = library.list_effects(studio)
    assert (e.name, e.pairs, e.teacher_prompt) == ("warm-film", 3, "Make it warm.")
    pairs = library.effect_pairs(studio, "warm-film")
    assert studio.blobs.read_bytes(pairs[0].source_sha, "png")  # images really stored
    # re-importing the same set adds nothing
    assert library.import_pairset(studio, "warm-film", tmp_path / "p").pairs == 0


def test_bad_pairset_imports_nothing(studio: Studio, tmp_path: Path) -> None:
    folder = _pair_folder(tmp_path / "p")
    (folder / "target" / "01.png").write_bytes(b"not an image")
    with pytest.raises(PairSetError, match="01"):
        library.import_pairset(studio, "broken", folder)
    assert library.list_effects(studio) == []


def test_bad_names_and_unknown_effects(studio: Studio, tmp_path: Path) -> None:
    with pytest.raises(library.LibraryError, match="not a usable effect name"):
        library.import_pairset(studio, "Warm Film!", _pair_folder(tmp_path / "p"))
    with pytest.raises(library.LibraryError, match="no effect called"):
        library.get_effect(studio, "nope")
    with pytest.raises(library.LibraryError, match="Nothing found"):
        library.import_pairset(studio, "x", tmp_path / "missing")


def test_edit_operations(studio: Studio, tmp_path: Path) -> None:
    library.import_pairset(studio, "a", _pair_folder(tmp_path / "a", seed=0))
    library.import_pairset(studio, "b", _pair_folder(tmp_path / "b", seed=100))
    with pytest.raises(library.LibraryError, match="already exists"):
        library.rename_effect(studio, "a", "b")
    library.rename_effect(studio, "a", "c")
    library.set_teacher_prompt(studio, "c", "Turn it blue.")
    pid = library.effect_pairs(studio, "c")[0].id
    library.set_pair_excluded(studio, "c", pid)
    e = library.get_effect(studio, "c")
    assert (e.pairs, e.excluded, e.teacher_prompt) == (2, 1, "Turn it blue.")
    with pytest.raises(library.LibraryError, match="no pair"):
        library.set_pair_excluded(studio, "b", pid)
    library.delete_effect(studio, "c")
    assert [x.name for x in library.list_effects(studio)] == ["b"]


def test_cli_round_trip(data_dir: Path, tmp_path: Path) -> None:
    folder = _pair_folder(tmp_path / "p")
    zpath = tmp_path / "set.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in folder.rglob("*.png"):
            z.write(f, f.relative_to(folder).as_posix())
    assert _run("--data-dir", str(data_dir), "init")[0] == 0
    code, out = _run(
        "--data-dir", str(data_dir), "import", str(zpath), "--name", "zipped", "--prompt", "Do it."
    )
    assert code == 0 and "imported 3 pairs" in out
    code, out = _run("effects", "list")  # STUDIO_DATA_DIR set by the fixture
    assert code == 0 and out.splitlines()[0].startswith("zipped\t3 pairs")
    code, out = _run("effects", "show", "zipped")
    assert "teacher prompt: Do it." in out and out.count("pair #") == 3
    assert _run("effects", "delete", "zipped")[0] == 0
    assert _run("effects", "show", "zipped")[0] == 2  # a clear error, not a traceback
