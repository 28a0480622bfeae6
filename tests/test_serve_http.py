"""The HTTP server end to end on loopback: health, catalog, PNG/JSON edits, batching, limits, access."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from test_serving import CATALOG, images, make_collection, make_teacher, tiny

from distill.serving import CollectionEditor, LoraBankEditor
from studio.serve import ServeAccessError, ServeConfig, ServerThread, create_app

TOKEN = "test-token-0123456789abcdef"


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def post(client: httpx.Client, data: dict, image: bytes | None = None, **kw) -> httpx.Response:
    files = {"image": ("in.png", image if image is not None else png(images(1)[0]), "image/png")}
    return client.post("/edit", data=data, files=files, timeout=120, **kw)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return make_collection(tmp_path_factory.mktemp("http") / "collection.safetensors")


@pytest.fixture(scope="module")
def server(lora: Path):
    editor = CollectionEditor.load(lora, backbone=tiny())
    config = ServeConfig(max_batch=8, max_wait_ms=400, max_upload_bytes=200_000, max_side=1024)
    app = create_app(editor, config)
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url) as c:
        yield c


def test_health_and_effects(client: httpx.Client) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["mode"] == "collection" and h["effects"] == 3
    fx = client.get("/effects").json()
    assert [e["name"] for e in fx["effects"]] == [e.name for e in CATALOG]
    assert fx["effects"][0]["trigger"] == "<warm_Xk41>"
    assert fx["composition_template"] == "Please apply {A} to the input image, and then apply {B}."


def test_edit_png_and_json_match_the_api(client: httpx.Client, server) -> None:
    src = images(1, seed=4)[0]
    r = post(client, {"effect": "pixel", "seed": "9"}, png(src))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-nfe"] == "8" and float(r.headers["x-seconds"]) > 0
    got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    editor = server.app.state.editor
    want = np.asarray(editor.edit(src, effect="pixel", seed=9).images[0])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1

    j = post(client, {"compose": "warm-film,sepia", "seed": "9", "format": "json", "steps": "2"}, png(src))
    assert j.status_code == 200
    body = j.json()
    assert body["nfe"] == 2 and body["effect"] == "warm-film+sepia"
    assert body["prompt"].startswith("Please apply <warm_Xk41>")
    assert Image.open(io.BytesIO(base64.b64decode(body["image"]))).size == (32, 32)
    r = post(client, {"instruction": "make it blue"}, headers={"accept": "application/json"})
    assert r.status_code == 200 and r.json()["prompt"] == "make it blue"


def test_concurrent_clients_are_batched(server) -> None:
    before = server.app.state.batcher.batches
    n = 6
    barrier = threading.Barrier(n)
    results: list[httpx.Response] = [None] * n  # type: ignore[list-item]
    effects = [e.name for e in CATALOG]

    def one(i: int) -> None:
        with httpx.Client(base_url=server.url) as c:
            body = png(images(1, seed=i)[0])
            barrier.wait()
            results[i] = post(c, {"effect": effects[i % 3], "seed": str(i)}, body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    sizes = [int(r.headers["x-batch-size"]) for r in results]
    batches = server.app.state.batcher.batches - before
    assert batches < n and max(sizes) >= 2  # mixed effects shared a batch
    assert sum(1 / s for s in sizes) == pytest.approx(batches)  # each batch counted once per member


def test_bad_requests(client: httpx.Client) -> None:
    r = post(client, {"effect": "pixel"}, b"this is not an image")
    assert r.status_code == 400 and "not an image" in r.json()["error"]
    r = client.post("/edit", data={"effect": "pixel"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]
    r = post(client, {"effect": "pixl"})
    assert r.status_code == 404
    assert "Did you mean 'pixel'" in r.json()["error"] and r.json()["known"] == [e.name for e in CATALOG]
    r = post(client, {"compose": "pixel,nope"})
    assert r.status_code == 404
    for bad in (
        {"effect": "pixel", "steps": "0"},
        {"effect": "pixel", "steps": "x"},
        {"effect": "pixel", "format": "gif"},
    ):
        assert post(client, bad).status_code == 422
    assert post(client, {}).status_code == 422  # none of effect / compose / instruction
    assert post(client, {"effect": "pixel", "instruction": "x"}).status_code == 422
    rng = np.random.default_rng(0)  # incompressible: well over the 200 kB bound of this server
    big = png(Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)))
    r = post(client, {"effect": "pixel"}, big)
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    wide = png(Image.new("RGB", (2000, 8)))  # a small file, too many pixels across
    r = post(client, {"effect": "pixel"}, wide)
    assert r.status_code == 413 and "2000x8" in r.json()["error"]
    assert client.get("/health").json()["status"] == "ok"  # still serving


def test_access_rules(lora: Path) -> None:
    with pytest.raises(ServeAccessError, match="without an access token"):
        ServeConfig(host="0.0.0.0").check()
    with pytest.raises(ServeAccessError, match="at least"):
        ServeConfig(token="short").check()
    ServeConfig(host="0.0.0.0", token=TOKEN).check()
    ServeConfig(host="::1").check()
    editor = CollectionEditor.load(lora, backbone=tiny())
    with pytest.raises(ServeAccessError):
        create_app(editor, ServeConfig(host="192.168.1.5"))
    app = create_app(editor, ServeConfig(token=TOKEN))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/effects").status_code == 401
        assert (
            c.get("/effects", headers={"authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        )
        assert post(c, {"effect": "pixel"}).status_code == 401
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert c.get("/effects", headers=auth).status_code == 200
        assert post(c, {"effect": "pixel"}, headers=auth).status_code == 200


def test_cli_serve_refuses_a_public_host_without_token(lora: Path, data_dir, monkeypatch, capsys) -> None:
    from studio import cli

    if "serve" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "serve"])
    assert cli.main(["serve", "--lora", str(lora), "--host", "0.0.0.0"]) == 2
    assert "without an access token" in capsys.readouterr().err


def test_lora_bank_on_the_same_server(tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    for k, e in enumerate(CATALOG):
        make_teacher(bank / f"{e.name}.safetensors", e.teacher_prompt, seed=10 + k)
    light = make_teacher(tmp_path / "lightning.safetensors", "", seed=99)
    app = create_app(LoraBankEditor.load(bank, light, backbone=tiny()), ServeConfig(max_wait_ms=0))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/effects").json()["mode"] == "bank"
        for name in ("pixel", "pixel", "sepia"):
            r = post(c, {"effect": name})
            assert r.status_code == 200
        r = post(c, {"instruction": "pixel art please"})
        assert r.headers["x-routed-effect"] == "pixel" and float(r.headers["x-load-seconds"]) > 0
        h = c.get("/health").json()
        assert h["mode"] == "bank" and h["switches"] == 3 and h["load_seconds"] > 0
