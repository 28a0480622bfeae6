"""Access: app.py off loopback refuses to start without auth and, with a token, answers nothing
without it (nor to a voter's token); file routes refuse path traversal; voter links reach only their
own pages and images; the blind study's pages and images name no system and shuffle the letters."""

from __future__ import annotations

from pathlib import Path

from bench import reliability as rel


def test_studio_voters_file_routes_and_blinding(tmp_path: Path) -> None:
    check = rel.access(tmp_path)
    assert check.ok, "\n".join(check.problems)
    assert check.figures["app.py on 0.0.0.0 without auth refused"] is True
    assert check.figures["studio routes answering without the token"] == "0/5"
    assert check.figures["of them served a file"] == 0 and check.figures["of them answered"] == 0
    assert check.figures["file-route traversal probes (with the token)"] >= 40
