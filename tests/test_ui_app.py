"""The studio UI without a browser: the page builds, the Effects tab's handlers act on the DB, and
app.py's access rule refuses to expose an unguarded studio."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from studio import library
from studio.config import StudioConfig
from studio.context import Studio
from studio.ui import effects_tab as et
from studio.ui import services
from studio.ui.access import (
    TOKEN_COOKIE,
    AccessError,
    TokenCookieMiddleware,
    is_loopback,
    read_auth_file,
    resolve_access,
    token_dependency,
)
from studio.ui.app import TABS, build_app

REPO = Path(__file__).resolve().parents[1]
TOKEN = "abcdefghijklmnop-0123456789"


def _png(color: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def _pair_zip(path: Path, n: int = 3) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            zf.writestr(f"cat_{i}_source.png", _png((20 * i, 10, 10)))
            zf.writestr(f"cat_{i}_target.png", _png((10, 20 * i, 200)))
    return path


@pytest.fixture()
def studio(data_dir) -> Studio:
    return Studio.open(StudioConfig(data_dir=data_dir))


@pytest.fixture()
def no_demo(monkeypatch):
    monkeypatch.setattr(services, "bench_importer", lambda: None)


def _imported(studio: Studio, tmp_path: Path, name: str = "warm-film", n: int = 3) -> et.View:
    view = et.import_upload(
        studio, [str(_pair_zip(tmp_path / f"{name}.zip", n))], name, "Make it warm.", "animal"
    )
    assert view.error == "", view.error
    return view


# ---------------------------------------------------------------------------------------------
# The page


def test_build_app_has_the_registered_tabs(studio):
    app = build_app(studio)
    assert isinstance(app, gr.Blocks)
    labels = [b.label for b in app.blocks.values() if isinstance(b, gr.Tab)]
    assert labels == [title for title, _ in TABS]
    assert "Effects" in labels


def test_build_app_builds_tabs_from_the_registry_given(studio):
    seen = []

    def builder(s: Studio, app: gr.Blocks) -> None:
        seen.append((s, app))
        gr.Markdown("hello", elem_id="custom-tab-body")

    app = build_app(studio, tabs=[("Custom", builder)])
    assert seen == [(studio, app)]
    assert [b.label for b in app.blocks.values() if isinstance(b, gr.Tab)] == ["Custom"]


# ---------------------------------------------------------------------------------------------
# Effects tab handlers


def test_import_zip_lists_effect_and_shows_its_pairs(studio, tmp_path, no_demo):
    view = _imported(studio, tmp_path)
    assert "Imported **warm-film** with 3 pairs" in view.notice
    assert view.table.values.tolist() == [["warm-film", 3, "", "Make it warm."]]
    assert view.names == ["warm-film"] and view.selected == "warm-film"
    assert len(view.gallery) == 3 and len(view.pair_ids) == 3
    image, caption = view.gallery[0]
    assert image.width > 2 * image.height - 10  # source | target side by side
    assert caption.startswith(f"#{view.pair_ids[0]} ")
    assert library.get_effect(studio, "warm-film").category == "animal"
    # The same set again adds nothing (content-addressed); the notice says it went to the existing effect.
    again = et.import_upload(studio, [str(tmp_path / "warm-film.zip")], "warm-film", "", "")
    assert "Added 0 new pairs to the existing effect" in again.notice


def test_import_loose_image_files_and_name_from_zip(studio, tmp_path, no_demo):
    files = []
    for role, color in (("source", (200, 0, 0)), ("target", (0, 0, 200))):
        p = tmp_path / "up" / role / f"dog_{role}.png"  # uploads live in separate cache folders
        p.parent.mkdir(parents=True)
        p.write_bytes(_png(color))
        files.append(str(p))
    view = et.import_upload(studio, files, "dogs", "", "")
    assert view.error == "" and view.table.values.tolist() == [["dogs", 1, "", ""]]

    named = et.import_upload(studio, [str(_pair_zip(tmp_path / "Warm Film.zip", 2))], "  ", "", "")
    assert named.selected == "warm-film" and "warm-film" in named.names


def test_bad_zip_shows_pairset_error_text_not_a_traceback(studio, tmp_path, no_demo):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("cat_source.png", _png((1, 2, 3)))
        zf.writestr("notes.docx", b"hello")
    view = et.import_upload(studio, [str(bad)], "bad", "", "")
    assert view.error.startswith("The pair set cannot be imported")
    assert "cat_source.png: source image without a target" in view.error
    assert "notes.docx: not an image" in view.error
    assert "Traceback" not in view.error
    assert view.names == [] and library.list_effects(studio) == []
    error_update = view.updates()[1]
    assert error_update["visible"] is True and error_update["value"] == view.error


@pytest.mark.parametrize(
    ("files", "name", "expected"),
    [
        (None, "x", "No files uploaded"),
        (["a.zip", "b.zip"], "x", "either one .zip or loose image files"),
        (["z.zip"], "Warm Film!", "is not a usable effect name"),
    ],
)
def test_upload_mistakes_are_explained(studio, files, name, expected, no_demo):
    view = et.import_upload(studio, files, name, "", "")
    assert expected in view.error
    assert view.updates()[1]["visible"] is True


def test_rename_select_and_conflicts(studio, tmp_path, no_demo):
    _imported(studio, tmp_path, "warm-film")
    _imported(studio, tmp_path, "cold-film")
    view = et.rename(studio, "warm-film", "sunset")
    assert view.error == "" and view.selected == "sunset"
    assert view.names == ["sunset", "cold-film"]
    clash = et.rename(studio, "sunset", "cold-film")
    assert "already exists" in clash.error and clash.selected == "sunset"
    assert "not a usable effect name" in et.rename(studio, "sunset", "Bad Name").error
    assert et.select_effect(studio, "cold-film").selected == "cold-film"
    assert et.select_effect(studio, "gone").selected is None


def test_exclude_and_restore_a_pair(studio, tmp_path, no_demo):
    pid = _imported(studio, tmp_path).pair_ids[1]
    view = et.set_excluded(studio, "warm-film", float(pid), True)
    assert view.error == "" and f"Pair #{pid}" in view.notice
    assert view.table.values.tolist()[0][1] == 2
    assert "2 pairs used for training, 1 excluded" in view.summary
    assert len(view.gallery) == 3 and view.gallery[1][1].endswith("(excluded)")
    assert [p.id for p in library.effect_pairs(studio, "warm-film")] == [i for i in view.pair_ids if i != pid]

    restored = et.set_excluded(studio, "warm-film", pid, False)
    assert restored.table.values.tolist()[0][1] == 3 and "(excluded)" not in restored.gallery[1][1]
    assert "has no pair #999" in et.set_excluded(studio, "warm-film", 999, True).error
    assert "Click a pair" in et.set_excluded(studio, "warm-film", None, True).error
    assert et.pair_id_at(view.pair_ids, 1) == pid and et.pair_id_at(view.pair_ids, 7) is None


def test_teacher_prompt_edit(studio, tmp_path, no_demo):
    _imported(studio, tmp_path)
    view = et.save_teacher_prompt(studio, "warm-film", "  Give it a golden-hour glow.  ")
    assert view.teacher_prompt == "Give it a golden-hour glow."
    assert view.table.values.tolist()[0][3] == "Give it a golden-hour glow."
    assert "teacher prompt is empty" in et.save_teacher_prompt(studio, "warm-film", "  ").error


def test_delete_asks_then_deletes(studio, tmp_path, no_demo):
    _imported(studio, tmp_path, n=2)
    text, row = et.ask_delete(studio, "warm-film")
    assert "Delete **warm-film** and its 2 pairs?" in text and row["visible"] is True
    assert library.list_effects(studio)  # asking deleted nothing
    view = et.delete(studio, "warm-film")
    assert view.error == "" and view.names == [] and view.selected is None
    assert library.list_effects(studio) == []
    assert "no effect called" in et.delete(studio, "warm-film").error
    assert et.ask_delete(studio, None)[1]["visible"] is False


def test_unexpected_errors_become_a_message(studio, tmp_path, no_demo, monkeypatch, caplog):
    _imported(studio, tmp_path)

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(library, "rename_effect", boom)
    view = et.rename(studio, "warm-film", "other")
    assert "Something unexpected went wrong (RuntimeError)" in view.error
    assert "Traceback" not in view.error and view.names == ["warm-film"]
    assert "disk on fire" in caplog.text  # the details go to the log


def test_demo_button_only_on_an_empty_library_with_the_bench(studio, tmp_path, monkeypatch):
    calls = []

    def fake_import_bench(s: Studio, progress=None, effects=None) -> list[str]:
        progress(0, 2, "importing warm-film")
        library.import_pairset(s, "warm-film", _pair_zip(tmp_path / "w.zip"), teacher_prompt="Warm it.")
        progress(1, 2, "importing cold-film")
        progress(2, 2, "done")
        return ["warm-film"]

    monkeypatch.setattr(services, "bench_importer", lambda: fake_import_bench)
    assert et.render(studio, None).demo_visible is True
    view = et.load_demo(studio, lambda frac, desc=None: calls.append((frac, desc)))
    assert calls == [(0.0, "importing warm-film"), (0.5, "importing cold-film"), (1.0, "done")]
    assert "1 effect from EffectBench-mini" in view.notice and view.selected == "warm-film"
    assert view.demo_visible is False  # the library is no longer empty

    library.delete_effect(studio, "warm-film")
    monkeypatch.setattr(services, "bench_importer", lambda: None)
    assert et.render(studio, None).demo_visible is False
    assert "not available" in et.load_demo(studio).error


# ---------------------------------------------------------------------------------------------
# Access rule


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("studio.example.com", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_without_auth_is_refused():
    with pytest.raises(AccessError, match="Refusing to serve the studio on 0.0.0.0 without authentication"):
        resolve_access("0.0.0.0", env={})
    with pytest.raises(AccessError, match="--auth USER:PASSWORD"):
        resolve_access("studio.example.com", env={})


def test_loopback_is_open_and_auth_or_token_unlocks_other_hosts(tmp_path):
    assert resolve_access("127.0.0.1", env={}).open
    access = resolve_access("0.0.0.0", ["ana:pw1", "bo:pw:with:colons"], env={})
    assert access.users == (("ana", "pw1"), ("bo", "pw:with:colons")) and not access.open
    assert resolve_access("0.0.0.0", env={"STUDIO_AUTH": "ana:pw1"}).users == (("ana", "pw1"),)
    assert resolve_access("0.0.0.0", token=TOKEN, env={}).token == TOKEN
    assert resolve_access("0.0.0.0", env={"STUDIO_TOKEN": TOKEN}).token == TOKEN
    f = tmp_path / "users.txt"
    f.write_text("# team\nana:pw1\n\ncy:pw3\n")
    assert read_auth_file(f) == [("ana", "pw1"), ("cy", "pw3")]
    assert resolve_access("0.0.0.0", auth_file=f, env={}).users == (("ana", "pw1"), ("cy", "pw3"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"auth": ["ana"]}, "expected USER:PASSWORD"),
        ({"auth": [":pw"]}, "expected USER:PASSWORD"),
        ({"token": "short"}, "at least 16 characters"),
        ({"token": "x" * 20 + ";evil"}, "at least 16 characters"),
        ({"auth": ["ana:pw"], "token": TOKEN}, "not both"),
        ({"auth_file": Path("/nonexistent/users.txt")}, "Cannot read the auth file"),
    ],
)
def test_bad_access_settings_are_explained(kwargs, message):
    with pytest.raises(AccessError, match=message):
        resolve_access("0.0.0.0", env={}, **kwargs)


def test_token_cookie_and_bearer():
    check = token_dependency(TOKEN)

    def whoami(request: Request) -> PlainTextResponse:
        return PlainTextResponse(check(request) or "nobody", status_code=200 if check(request) else 401)

    app = Starlette(routes=[Route("/", whoami)], middleware=[Middleware(TokenCookieMiddleware, token=TOKEN)])
    client = TestClient(app)
    assert client.get("/").status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
    assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).text == "token"
    bad = client.get("/?token=wrong-token-wrong-token", follow_redirects=False)
    assert bad.status_code == 401 and TOKEN_COOKIE not in bad.cookies
    r = client.get(f"/?token={TOKEN}&tab=effects", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/?tab=effects"
    assert "HttpOnly" in r.headers["set-cookie"]
    assert client.get("/").text == "token"  # the cookie now carries it


# ---------------------------------------------------------------------------------------------
# app.py


def _app_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "app.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": ""},
    )


def test_app_py_help():
    r = _app_py("--help")
    assert r.returncode == 0, r.stderr
    for flag in (
        "--backbone",
        "--model-path",
        "--db-url",
        "--data-dir",
        "--host",
        "--port",
        "--auth",
        "--auth-file",
        "--token",
    ):
        assert flag in r.stdout
    assert "qwen-image-edit" in r.stdout


def test_app_py_refuses_public_host_without_auth(tmp_path):
    r = _app_py("--host", "0.0.0.0", "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2
    assert "Refusing to serve the studio on 0.0.0.0 without authentication" in r.stderr
    assert not (tmp_path / "d").exists()  # refused before opening anything
