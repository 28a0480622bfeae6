"""Importing a whole LoRA bank: good folders come in (with their LoRA as teacher), bad ones are skipped
with the reason, and nothing already in the library is touched."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
from studio_fixtures import scene_pairs, small_studio, toy_lora_file

from studio import library, preview_service, teachers_service
from studio.bank import BankError, import_bank, scan_bank, unpack_bank_zip
from studio.cli import main
from studio.ui import effects_tab


@pytest.fixture()
def studio(data_dir, tmp_path):
    return small_studio(data_dir, tmp_path)


def _effect_folder(
    bank: Path, name: str, seed: int, *, prompt: str | None = "Apply it.", lora: bool = False
) -> Path:
    d = bank / name
    scene_pairs(d / "pairs", 3, seed)
    if prompt is not None:
        (d / "prompt.txt").write_text(prompt + "\n")
    if lora:
        toy_lora_file(d / f"{name}_v2.safetensors", seed)
    return d


def test_a_bank_imports_good_folders_and_explains_the_rest(studio, tmp_path) -> None:
    bank = tmp_path / "bank"
    _effect_folder(bank, "Warm Film", 1, prompt="Give the photo a  warm\nfilm look.", lora=True)
    _effect_folder(bank, "cool", 2)  # pairs and prompt only: a teacher can be trained later
    _effect_folder(bank, "no-prompt", 3, prompt=None, lora=True)
    two = _effect_folder(bank, "two-loras", 4, lora=True)
    toy_lora_file(two / "other.safetensors", 5)
    (bank / "empty").mkdir()
    broken = _effect_folder(bank, "broken", 6)
    (broken / "pairs" / "target" / "0.png").unlink()  # a source without its target
    shutil.rmtree(broken / "pairs" / "source")
    bad_lora = _effect_folder(bank, "bad-lora", 7, lora=True)
    (bad_lora / "bad-lora_v2.safetensors").write_bytes(b"not a safetensors file")
    (bank / ".git").mkdir()  # hidden folders are not effects

    seen = []
    result = import_bank(studio, bank, lambda i, n, name: seen.append((i, n, name)))
    assert [name for _, _, name in seen] == [
        "bad-lora",
        "broken",
        "cool",
        "empty",
        "no-prompt",
        "two-loras",
        "warm-film",
    ] and {n for _, n, _ in seen} == {7}
    assert result.imported == ["bad-lora", "cool", "warm-film"]
    assert result.teachers == ["warm-film"]
    skipped = dict(result.skipped)
    assert set(skipped) == {"broken", "empty", "no-prompt", "two-loras"}
    assert "no pairs/ folder or pairs.zip" in skipped["empty"]
    assert "a LoRA but no prompt.txt" in skipped["no-prompt"]
    assert "2 .safetensors files" in skipped["two-loras"]
    assert skipped["broken"].startswith("its pairs: ")
    assert any(n == "bad-lora" and "imported without its teacher" in note for n, note in result.notes)

    assert library.get_effect(studio, "warm-film").teacher_prompt == "Give the photo a warm film look."
    assert library.get_effect(studio, "cool").pairs == 3
    assert teachers_service.teacher_for(studio, "warm-film") is not None
    assert teachers_service.teacher_for(studio, "cool") is None
    assert teachers_service.teacher_for(studio, "bad-lora") is None  # kept its pairs, no teacher

    # again: what is there is left alone, nothing is doubled
    library.set_teacher_prompt(studio, "cool", "Edited by the curator.")
    again = import_bank(studio, bank)
    assert again.imported == [] and "already in the library" in dict(again.skipped)["cool"]
    assert library.get_effect(studio, "cool").teacher_prompt == "Edited by the curator."
    assert len(library.list_effects(studio)) == 3


def test_the_lora_named_like_its_folder_is_the_teacher(tmp_path) -> None:
    d = _effect_folder(tmp_path / "bank", "neon", 1, lora=True)  # neon_v2.safetensors
    toy_lora_file(d / "neon_000000250.safetensors", 2)
    assert "keep the one teacher, or name it like the folder" in scan_bank(tmp_path / "bank")[0].problem
    toy_lora_file(d / "neon.safetensors", 3)
    entry = scan_bank(tmp_path / "bank")[0]
    assert entry.problem == "" and entry.lora == d / "neon.safetensors"


def test_names_that_collide_or_are_unusable_are_reported(tmp_path, monkeypatch) -> None:
    bank = tmp_path / "bank"
    _effect_folder(bank, "Warm Film", 1)
    _effect_folder(bank, "warm-film", 2)
    _effect_folder(bank, "!!!", 3)
    by_folder = {e.folder.name: e for e in scan_bank(bank)}
    assert by_folder["Warm Film"].problem == ""
    assert by_folder["warm-film"].problem == "the same effect name as the folder Warm Film"
    assert "not a usable effect name" in by_folder["!!!"].problem
    locked = bank / "locked"
    locked.mkdir()
    iterdir = Path.iterdir

    def refuse_locked(self: Path):
        if self == locked:
            raise PermissionError(13, "Permission denied")
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refuse_locked)
    by_folder = {e.folder.name: e for e in scan_bank(bank)}
    assert by_folder["locked"].problem == "cannot be read (Permission denied)"
    assert by_folder["Warm Film"].problem == ""  # the others are still read
    monkeypatch.undo()
    with pytest.raises(BankError, match="not a folder"):
        scan_bank(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(BankError, match="no effect folders"):
        scan_bank(tmp_path / "flat")


def test_cli_import_bank(data_dir, tmp_path, capsys) -> None:
    bank = tmp_path / "bank"
    _effect_folder(bank, "cool", 2)
    assert main(["--data-dir", str(data_dir), "import-bank", str(bank)]) == 0
    assert "imported 1 effect (0 with their LoRA as teacher): cool" in capsys.readouterr().out
    assert main(["--data-dir", str(data_dir), "import-bank", str(bank)]) == 1
    assert "skipped cool/: 'cool' is already in the library" in capsys.readouterr().out
    assert main(["--data-dir", str(data_dir), "import-bank", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def _zip_folder(folder: Path, out: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, Path(folder.name) / p.relative_to(folder))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return out


def test_the_effects_tab_imports_a_zipped_bank(studio, tmp_path) -> None:
    bank = tmp_path / "bank"
    _effect_folder(bank, "warm", 1, lora=True)
    _effect_folder(bank, "cool", 2)
    (bank / "stray").mkdir()
    (bank / "stray" / "notes.md").write_text("not an effect")
    zipped = _zip_folder(bank, tmp_path / "bank.zip", {"../escape.txt": b"x"})
    try:
        seen = []
        view = effects_tab.import_bank_upload(studio, str(zipped), None, lambda i, n, name: seen.append(name))
    finally:
        preview_service.forget_backbones()
    assert not view.error, view.error
    assert "Imported 2 effects (1 with their LoRA as teacher): cool, warm." in view.notice
    assert "skipped `stray/`: no pairs/ folder or pairs.zip" in view.notice
    assert view.selected == "cool" and not (tmp_path / "escape.txt").exists()
    assert seen == ["cool", "stray", "warm"]  # the progress bar's steps
    assert teachers_service.teacher_for(studio, "warm") is not None

    assert "Upload the bank" in effects_tab.import_bank_upload(studio, None).error
    (tmp_path / "not.zip").write_bytes(b"plain bytes")
    assert "is not a readable .zip" in effects_tab.import_bank_upload(studio, str(tmp_path / "not.zip")).error


def test_a_bank_zip_is_bounded(tmp_path) -> None:
    bank = tmp_path / "bank"
    _effect_folder(bank, "cool", 2)
    zipped = _zip_folder(bank, tmp_path / "bank.zip")
    with pytest.raises(BankError, match="unpacks to more than"):
        unpack_bank_zip(zipped, tmp_path / "out", max_bytes=100)
    with pytest.raises(BankError, match="more than the 2 allowed"):
        unpack_bank_zip(zipped, tmp_path / "out2", max_entries=2)
    root = unpack_bank_zip(zipped, tmp_path / "out3")
    assert root == tmp_path / "out3" / "bank" and [e.name for e in scan_bank(root)] == ["cool"]
