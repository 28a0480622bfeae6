"""Bad input, fuzzed with hypothesis: pair-set archives, LoRA files (truncated, reshaped, pickled),
settings boxes and auth files, and the voter pages' HTTP inputs. Every input is accepted whole or
refused with a clear error; nothing crashes, nothing is half-imported, no pickle is ever loaded."""

from __future__ import annotations

from pathlib import Path

from bench import reliability as rel


def _clean(tally: rel.FuzzTally, examples: int) -> None:
    assert tally.failures == [], "\n".join(tally.failures[:10])
    assert tally.tried == examples and tally.refused > 0


def test_fuzz_pairset_import(tmp_path: Path) -> None:
    _clean(rel.fuzz_pairsets(tmp_path, examples=30, seed=1), 30)


def test_fuzz_lora_import_refuses_damaged_files_and_pickles(tmp_path: Path) -> None:
    tally = rel.fuzz_lora(tmp_path, examples=30, seed=2)
    _clean(tally, 30)
    assert not (tmp_path / "PICKLE-WAS-LOADED").exists()


def test_fuzz_settings_and_auth_files(tmp_path: Path) -> None:
    tally = rel.fuzz_settings(tmp_path, examples=80, seed=3)
    _clean(tally, 80)
    assert tally.accepted > 0  # well-formed settings still get through


def test_fuzz_voter_http_inputs(tmp_path: Path) -> None:
    _clean(rel.fuzz_api(tmp_path, examples=60, seed=4), 60)
