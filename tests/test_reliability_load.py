"""Load on loopback: concurrent voters (one answer double-clicked each) and studio-page users in
bounded loops; every request answered, no vote lost or doubled, the SQLite file intact."""

from __future__ import annotations

from pathlib import Path

from bench import reliability as rel


def test_concurrent_voters_and_studio_users(tmp_path: Path) -> None:
    check = rel.load(tmp_path, voters=6, items=4, ui_users=2, ui_rounds=2, seconds=90)
    assert check.ok, "\n".join(check.problems)
    assert check.figures["votes expected / stored"] == "72 / 72"
    assert (check.figures["lost votes"], check.figures["doubled votes"]) == (0, 0)
    assert check.figures["sqlite integrity_check"] == "ok" and check.figures["5xx answers"] == 0
    assert check.figures["requests served"] >= 6 * 4 * 4 + 2 * 2 * 3
