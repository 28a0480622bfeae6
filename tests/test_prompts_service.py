"""AOP in the studio: triggers and student prompts stored per effect, the writers (a real local
OpenAI-format HTTP server, the offline describer), curator edits, the CLI and the Prompts tab."""

from __future__ import annotations

import base64
import io
import re
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from fake_vlm_server import FakeChatServer, completion
from PIL import Image

from distill.backbones.tiny import TinyConfig, TinyEditor
from distill.prompts import OfflineDescriber, PromptWriterConfig, VLMConfig, check_triggers
from distill.prompts.embedding import embedder_for
from studio import cli, library
from studio import prompts_service as ps
from studio.config import StudioConfig
from studio.context import Studio
from studio.prompts_service import PromptsError
from studio.ui import prompts_tab as pt

TRIGGER = re.compile(r"^<[a-z0-9_]+_[A-Za-z0-9]{7}>$")
EFFECTS = {  # name -> (teacher prompt, what the effect does to an RGB uint8 array)
    "invert": ("Invert the colours.", lambda a: 255 - a),
    "grayscale": (
        "Make it black and white.",
        lambda a: np.repeat((a @ np.array([0.299, 0.587, 0.114]))[..., None], 3, -1).astype(np.uint8),
    ),
    "flip": ("Mirror the photo.", lambda a: a[:, ::-1]),
}


def _scene(rng: np.random.Generator) -> np.ndarray:
    """A textured background with a coloured off-centre subject (so a mirror changes the image)."""
    a = rng.integers(40, 215, (48, 48, 3), dtype=np.uint8)
    a[10:30, 6:22] = rng.integers(0, 255, 3, dtype=np.uint8)
    return a


def _pair_folder(root: Path, fn, n: int = 3, seed: int = 0) -> Path:
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        src = _scene(rng)
        Image.fromarray(src).save(root / "source" / f"{i:02d}.png")
        Image.fromarray(np.ascontiguousarray(fn(src))).save(root / "target" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def embed():
    return embedder_for(TinyEditor.random(TinyConfig(num_layers=2)))


@pytest.fixture(scope="module")
def library_template(tmp_path_factory) -> Path:
    """A data dir with the three effects imported, built once (imports fsync every blob)."""
    root = tmp_path_factory.mktemp("prompts-template")
    st = Studio.open(StudioConfig(data_dir=root / "data"))
    for k, (name, (prompt, fn)) in enumerate(EFFECTS.items()):
        library.import_pairset(st, name, _pair_folder(root / name, fn, seed=k), teacher_prompt=prompt)
    st.engine.dispose()  # closes SQLite, so the copy below is complete
    return root / "data"


@pytest.fixture()
def studio(data_dir: Path, library_template: Path) -> Studio:
    """A fresh studio with three effects imported via studio.library.import_pairset."""
    shutil.copytree(library_template, data_dir)
    return Studio.open(StudioConfig(data_dir=data_dir))


def _rows(studio: Studio) -> dict[str, ps.PromptRow]:
    return {r.effect: r for r in ps.prompt_rows(studio)}


# --- A real OpenAI-format chat server in this process ------------------------------------------


class ChatServer(FakeChatServer):
    """Answers "Refined prompt <n>" to the n-th request unless a test assigns ``reply``."""

    def reply(self, body: dict) -> tuple[int, str]:
        return 200, completion(f"Refined prompt {len(self.bodies)}")

    def config(self, **kw) -> PromptWriterConfig:
        vlm = dict(model="test-vlm", timeout_s=5.0, max_retries=1, backoff_s=0.01) | kw
        return PromptWriterConfig(vlm=VLMConfig(base_url=self.base_url, **vlm))


@pytest.fixture()
def server():
    s = ChatServer()
    yield s
    s.close()


def _images(body: dict) -> list[np.ndarray]:
    prefix = "data:image/png;base64,"
    out = []
    for part in body["messages"][0]["content"]:
        if part["type"] == "image_url":
            url = part["image_url"]["url"]
            assert url.startswith(prefix)
            out.append(
                np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))).convert("RGB"))
            )
    return out


def _stored_pairs(studio: Studio, effect: str) -> list[tuple[np.ndarray, np.ndarray]]:
    def load(sha: str) -> np.ndarray:
        return np.asarray(Image.open(studio.blobs.path(sha, "png")).convert("RGB"))

    return [(load(p.source_sha), load(p.target_sha)) for p in library.effect_pairs(studio, effect)]


# --- Text embeddings -----------------------------------------------------------------------------


def test_embedder_pools_over_real_tokens_only(embed) -> None:
    alone = embed(["<warm_Xy5995a>"])
    batch = embed(["<warm_Xy5995a>", "a much longer instruction that pads the first text"])
    assert alone.shape == (1, 128) and batch.shape == (2, 128) and alone.dtype == torch.float32
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)  # padding does not leak in
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(TypeError, match="no text encoder"):
        embedder_for(object())


# --- Triggers ------------------------------------------------------------------------------------


def test_triggers_assigned_unique_stored_and_kept(studio: Studio, embed, tmp_path: Path) -> None:
    result = ps.assign_triggers(studio, embed)
    rows = _rows(studio)
    triggers = {n: r.trigger for n, r in rows.items()}
    assert all(t and TRIGGER.match(t) for t in triggers.values()), triggers
    assert len(set(triggers.values())) == 3
    assert triggers == result.triggers
    assert {r.trigger_source for r in rows.values()} == {"auto"}
    assert result.ok, result.report()

    names, matrix = ps.trigger_matrix(studio)
    assert names == list(EFFECTS)  # library order
    again = check_triggers({n: triggers[n] for n in names}, embed)  # measured independently
    np.testing.assert_allclose(matrix, again.cosine.numpy(), atol=1e-3)
    assert ps.stored_matrix(studio).is_current(ps.prompt_rows(studio))

    # Re-running keeps every trigger; a new effect gets its own.
    ps.assign_triggers(studio, embed, seed=7)
    assert {n: r.trigger for n, r in _rows(studio).items()} == triggers
    library.import_pairset(studio, "sepia", _pair_folder(tmp_path / "sepia", lambda a: a // 2, seed=9))
    ps.assign_triggers(studio, embed)
    now = {n: r.trigger for n, r in _rows(studio).items()}
    assert {n: now[n] for n in triggers} == triggers
    assert TRIGGER.match(now["sepia"]) and now["sepia"] not in triggers.values()
    assert ps.trigger_matrix(studio)[1].shape == (4, 4)


def test_set_trigger_checks_format_uniqueness_and_similarity(studio: Studio, embed) -> None:
    ps.assign_triggers(studio, embed)
    before = {n: r.trigger for n, r in _rows(studio).items()}
    for bad in ["", "flip", "<two words>", "<" + "x" * 70 + ">"]:
        with pytest.raises(PromptsError, match="not a usable trigger word"):
            ps.set_trigger(studio, "flip", bad, embed)
    with pytest.raises(PromptsError, match="already belongs to effect 'invert'"):
        ps.set_trigger(studio, "flip", before["invert"], embed)
    with pytest.raises(PromptsError, match="no effect called"):
        ps.set_trigger(studio, "nope", "<nope_Ab12345>", embed)
    assert {n: r.trigger for n, r in _rows(studio).items()} == before

    check = ps.set_trigger(studio, "flip", " <mirror_Qz81kPw> ", embed)
    row = _rows(studio)["flip"]
    assert (row.trigger, row.trigger_source) == ("<mirror_Qz81kPw>", "curator")
    assert check.ok and ps.stored_matrix(studio).triggers["flip"] == "<mirror_Qz81kPw>"

    # One character away from invert's trigger: stored (the curator decides) but reported.
    near = before["invert"][:-2] + ("a" if before["invert"][-2] != "a" else "b") + ">"
    check = ps.set_trigger(studio, "grayscale", near, embed)
    assert not check.ok
    assert ("grayscale", "invert") in {tuple(sorted(p[:2])) for p in check.failing_pairs}
    assert "too similar" in check.report()
    stored = ps.stored_matrix(studio)
    assert not stored.ok and stored.max_offdiag == pytest.approx(check.max_offdiag, abs=1e-3)


# --- Student prompts -----------------------------------------------------------------------------


def test_offline_describer_writes_from_the_stored_pairs(studio: Studio) -> None:
    results = ps.generate_student_prompts(studio, writer_config=PromptWriterConfig())
    assert [r.status for r in results] == ["written"] * 3
    rows = _rows(studio)
    assert {r.student_source for r in rows.values()} == {"offline-describer"}
    assert all(r.student_updated_at is not None and not r.student_edited_by_curator for r in rows.values())
    # The describer measured the right images: each prompt names its own transformation.
    assert "invert" in rows["invert"].student_prompt.lower()
    assert "black and white" in rows["grayscale"].student_prompt.lower()
    assert "mirror" in rows["flip"].student_prompt.lower()
    assert rows["flip"].student_prompt.startswith("Mirror the photo")  # refines the teacher prompt


def test_curator_edit_survives_generate_unless_overwritten(studio: Studio) -> None:
    offline = PromptWriterConfig()
    ps.set_student_prompt(studio, "flip", "  Swap   left and right. ")
    row = _rows(studio)["flip"]
    assert (row.student_prompt, row.student_source, row.student_edited_by_curator) == (
        "Swap left and right.",
        "curator",
        True,
    )
    results = {r.effect: r for r in ps.generate_student_prompts(studio, writer_config=offline)}
    assert results["flip"].status == "kept" and results["invert"].status == "written"
    assert _rows(studio)["flip"].student_prompt == "Swap left and right."

    [res] = ps.generate_student_prompts(studio, ["flip"], offline, overwrite_curator_edits=True)
    row = _rows(studio)["flip"]
    assert res.status == "written" and row.student_prompt == res.text != "Swap left and right."
    assert (row.student_source, row.student_edited_by_curator) == ("offline-describer", False)

    with pytest.raises(PromptsError, match="empty"):
        ps.set_student_prompt(studio, "flip", "   ")


def test_only_missing_keeps_written_prompts(studio: Studio, server: ChatServer) -> None:
    ps.generate_student_prompts(studio, ["invert"], PromptWriterConfig())
    results = ps.generate_student_prompts(studio, None, server.config(), only_missing=True)
    assert [r.status for r in results] == ["kept", "written", "written"]
    assert _rows(studio)["invert"].student_source == "offline-describer"
    assert len(server.bodies) == 2


def test_generate_through_an_openai_format_server(studio: Studio, server: ChatServer, monkeypatch) -> None:
    monkeypatch.setenv("STUDIO_VLM_API_KEY", "sekrit")
    server.reply = lambda body: (200, completion('"A refined ' + body["model"] + ' prompt."'))
    seen = []
    results = ps.generate_student_prompts(
        studio, ["invert", "flip"], server.config(), progress=lambda i, n, what: seen.append((i, n, what))
    )
    assert [r.status for r in results] == ["written", "written"]
    for name in ("invert", "flip"):
        row = _rows(studio)[name]
        assert (row.student_prompt, row.student_source) == ("A refined test-vlm prompt.", "vlm:test-vlm")
    assert _rows(studio)["grayscale"].student_prompt is None
    assert seen == [(0, 2, "invert"), (1, 2, "flip"), (2, 2, "done")]

    # Each request: the appendix-9 template with the teacher prompt, and two of the effect's pairs.
    assert len(server.bodies) == 2
    assert server.headers[0].get("Authorization") == "Bearer sekrit"
    body = server.bodies[0]
    text = body["messages"][0]["content"][-1]["text"]
    assert 'rough prompt: "Invert the colours."' in text
    images = _images(body)
    assert len(images) == 4
    stored = _stored_pairs(studio, "invert")
    sent = [(images[0], images[1]), (images[2], images[3])]
    for src, tgt in sent:
        assert any(np.array_equal(src, s) and np.array_equal(tgt, t) for s, t in stored)
    assert not np.array_equal(sent[0][0], sent[1][0])  # two different pairs

    # The same through the environment (what the CLI and the UI use).
    monkeypatch.setenv("STUDIO_VLM_BASE_URL", server.base_url)
    monkeypatch.setenv("STUDIO_VLM_MODEL", "env-vlm")
    ps.generate_student_prompts(studio, ["grayscale"])
    assert _rows(studio)["grayscale"].student_source == "vlm:env-vlm"
    assert server.bodies[-1]["model"] == "env-vlm"


@pytest.mark.parametrize(
    ("code", "payload", "message"),
    [
        (500, "overloaded", "did not answer after 2 tries"),
        (401, '{"error": "bad key"}', "Check the API key"),
        (200, "<html>not json</html>", "not with JSON"),
    ],
)
def test_endpoint_failure_changes_nothing_and_says_why(
    studio: Studio, server: ChatServer, code, payload, message
) -> None:
    ps.set_student_prompt(studio, "grayscale", "Curator words.")
    before = _rows(studio)
    server.reply = lambda body: (code, payload)
    with pytest.raises(PromptsError, match=message) as info:
        ps.generate_student_prompts(studio, writer_config=server.config())
    assert "'invert'" in str(info.value) and "Traceback" not in str(info.value)
    assert _rows(studio) == before


def test_failure_midway_keeps_the_prompts_already_written(studio: Studio, server: ChatServer) -> None:
    server.reply = lambda body: (200, completion("First.")) if len(server.bodies) == 1 else (500, "down")
    with pytest.raises(PromptsError, match="'grayscale'.*1 prompt\\(s\\) written before were saved"):
        ps.generate_student_prompts(studio, writer_config=server.config())
    rows = _rows(studio)
    assert rows["invert"].student_prompt == "First."
    assert rows["grayscale"].student_prompt is None and rows["flip"].student_prompt is None


def test_effect_with_too_few_pairs_is_skipped(studio: Studio, server: ChatServer) -> None:
    for p in library.effect_pairs(studio, "flip")[1:]:
        library.set_pair_excluded(studio, "flip", p.id)
    results = {r.effect: r for r in ps.generate_student_prompts(studio, writer_config=server.config())}
    assert results["flip"].status == "skipped" and "at least 2" in results["flip"].message
    assert results["invert"].status == results["grayscale"].status == "written"
    assert _rows(studio)["flip"].student_prompt is None
    with pytest.raises(PromptsError, match="no effect called 'nope'"):
        ps.generate_student_prompts(studio, ["nope"], PromptWriterConfig())


def test_writer_config_from_env(tmp_path: Path) -> None:
    assert ps.writer_config_from_env({}) == PromptWriterConfig()
    cfg = ps.writer_config_from_env(
        {"STUDIO_VLM_BASE_URL": "http://h:1/v1", "STUDIO_VLM_MODEL": "qwen-vl-max"}
    )
    assert (cfg.vlm.base_url, cfg.vlm.model, cfg.vlm.api_key_env) == (
        "http://h:1/v1",
        "qwen-vl-max",
        "STUDIO_VLM_API_KEY",
    )
    assert ps.writer_config_from_env({"STUDIO_VLM_LOCAL_DIR": str(tmp_path)}).local_vlm_dir == str(tmp_path)
    with pytest.raises(PromptsError, match="set STUDIO_VLM_MODEL too"):
        ps.writer_config_from_env({"STUDIO_VLM_BASE_URL": "http://h:1/v1"})
    with pytest.raises(PromptsError, match="http"):
        ps.writer_config_from_env({"STUDIO_VLM_BASE_URL": "h:1", "STUDIO_VLM_MODEL": "m"})


def test_missing_local_vlm_folder_is_explained(studio: Studio, tmp_path: Path) -> None:
    cfg = PromptWriterConfig(local_vlm_dir=tmp_path / "no-such-model")
    with pytest.raises(PromptsError, match="does not exist"):
        ps.generate_student_prompts(studio, writer_config=cfg)


def test_student_condition(studio: Studio, embed) -> None:
    with pytest.raises(PromptsError, match="no trigger word yet"):
        ps.student_condition(studio, "invert")
    ps.assign_triggers(studio, embed)
    with pytest.raises(PromptsError, match="no student prompt yet"):
        ps.student_condition(studio, "invert")
    trigger = _rows(studio)["invert"].trigger
    ps.set_student_prompt(
        studio, "invert", f"{trigger} Turn every colour into its opposite."
    )  # pasted trigger
    assert ps.student_condition(studio, "invert") == f"{trigger} Turn every colour into its opposite."
    assert _rows(studio)["invert"].condition == ps.student_condition(studio, "invert")


def test_general_instructions(server: ChatServer) -> None:
    images = [Image.new("RGB", (40, 40), c) for c in [(80, 20, 10), (120, 80, 200)]]
    offline = ps.general_instructions(images, OfflineDescriber())
    assert len(offline) == 2 and offline[0] == "Brighten the image while keeping the subject unchanged."
    from distill.prompts import make_writer

    with make_writer(server.config()) as vlm:
        assert ps.general_instructions(images, vlm) == ["Refined prompt 1", "Refined prompt 2"]
        assert "one image editing instruction" in server.bodies[0]["messages"][0]["content"][-1]["text"]
        server.reply = lambda body: (503, "down")
        with pytest.raises(PromptsError, match="general image 1"):
            ps.general_instructions(images, vlm)


# --- CLI -----------------------------------------------------------------------------------------


def _cli(data_dir: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["--data-dir", str(data_dir), "prompts", *argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_generate_show_set_matrix(studio: Studio, data_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv(ps.ENV_RANDOM_BACKBONE, "1")
    for var in (ps.ENV_BASE_URL, ps.ENV_MODEL, ps.ENV_LOCAL_DIR):
        monkeypatch.delenv(var, raising=False)

    code, out, err = _cli(data_dir, "matrix")
    assert code == 0 and "never checked" in out

    code, out, err = _cli(data_dir, "generate")
    assert code == 0, err
    rows = _rows(studio)
    assert all(r.trigger and r.student_source == "offline-describer" for r in rows.values())
    assert "3 student prompts written" in out and "randomly initialised" in err
    for name, r in rows.items():
        assert f"trigger of {name}: {r.trigger}" in out

    code, out, _ = _cli(data_dir, "set", "flip", "--student", "Swap left and right.")
    assert code == 0 and _rows(studio)["flip"].student_edited_by_curator
    code, out, _ = _cli(data_dir, "set", "flip", "--teacher", "Flip it.")
    assert code == 0 and _rows(studio)["flip"].teacher_prompt == "Flip it."
    code, out, _ = _cli(data_dir, "set", "flip", "--trigger", "<flip_Zq42Pxa>")
    assert code == 0 and _rows(studio)["flip"].trigger == "<flip_Zq42Pxa>" and "distinct enough" in out
    code, out, err = _cli(data_dir, "set", "flip", "--trigger", "flip it")
    assert code == 2 and "not a usable trigger word" in err and "Traceback" not in err

    code, out, _ = _cli(data_dir, "generate", "--all")
    assert code == 0 and "flip: kept (edited by a curator" in out and "2 student prompts written" in out
    assert _rows(studio)["flip"].student_prompt == "Swap left and right."
    code, out, _ = _cli(data_dir, "generate", "flip", "--overwrite-edits")
    assert code == 0 and not _rows(studio)["flip"].student_edited_by_curator

    code, out, _ = _cli(data_dir, "show", "flip")
    row = _rows(studio)["flip"]
    assert code == 0 and "teacher prompt: Flip it.  [curator]" in out
    assert "trigger:        <flip_Zq42Pxa>  [curator]" in out
    assert f"student condition: <flip_Zq42Pxa> {row.student_prompt}" in out

    code, out, _ = _cli(data_dir, "matrix")
    assert code == 0 and "max off-diagonal" in out and "PASS" in out
    assert all(name in out for name in EFFECTS)

    code, _, err = _cli(data_dir, "show", "nope")
    assert code == 2 and "no effect called 'nope'" in err


# --- The Prompts tab -----------------------------------------------------------------------------


def test_heatmap_marks_pairs_above_the_threshold() -> None:
    m = np.array([[1.0, 0.9, -0.8], [0.9, 1.0, 0.0], [-0.8, 0.0, 1.0]], dtype=np.float32)
    img = np.asarray(pt.heatmap_image(["a", "b", "c"], m, threshold=0.5)).astype(int)
    x0, y0, cell = pt.heatmap_layout(["a", "b", "c"])
    assert img.shape[0] > y0 + 3 * cell and img.shape[1] > x0 + 3 * cell

    def at(i: int, j: int, dy: int = 5) -> np.ndarray:  # inside the cell, clear of outline and text
        return img[y0 + i * cell + dy, x0 + j * cell + 5]

    red, blue, white = at(0, 1), at(0, 2), at(1, 2)
    assert red[0] > red[2] + 80 and blue[2] > blue[0] + 80 and np.all(white > 230)
    assert np.all(at(0, 1, dy=0) < 60)  # 0.9 > 0.5: outlined in black
    assert np.all(at(1, 2, dy=0) > 200)  # 0.0: no outline


def test_tab_handlers(studio: Studio, embed, monkeypatch) -> None:
    for var in (ps.ENV_BASE_URL, ps.ENV_MODEL, ps.ENV_LOCAL_DIR):
        monkeypatch.delenv(var, raising=False)
    view = pt.render(studio, None)
    assert list(view.table["effect"]) == list(EFFECTS) and view.heatmap is None
    assert "offline describer" in view.writer and "not been checked" in view.matrix_text

    calls = []
    view = pt.generate(studio, "flip", progress=lambda f, desc="": calls.append(f), embed=embed)
    assert not view.error, view.error
    assert "Wrote 3 student prompts with offline-describer" in view.notice
    assert all(view.table["trigger"].str.match(TRIGGER.pattern)) and all(view.table["student prompt"] != "")
    assert calls[-1] == 1.0 and isinstance(view.heatmap, Image.Image) and "**Pass**" in view.matrix_text
    assert view.selected == "flip" and view.trigger == _rows(studio)["flip"].trigger

    view = pt.save_student(studio, "flip", "Swap left and right.")
    assert "saved" in view.notice and _rows(studio)["flip"].student_edited_by_curator
    assert "(edited)" in view.table.set_index("effect").loc["flip", "written by"]
    view = pt.generate(studio, "flip", only_missing=False, embed=embed)
    assert "kept your edits of flip" in view.notice and view.student == "Swap left and right."

    view = pt.save_trigger(studio, "flip", "no brackets", embed)
    assert "not a usable trigger word" in view.error and "Traceback" not in view.error
    near = _rows(studio)["invert"].trigger[:-2] + "Q>"
    view = pt.save_trigger(studio, "flip", near, embed)
    assert view.notice.startswith("⚠") and "**Fail**" in view.matrix_text and not view.error

    view = pt.save_student(studio, None, "x")
    assert view.error == "Select an effect first."

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(ps, "prompt_rows", broken)
    view = pt.check(studio, None, embed)
    assert "unexpected" in view.error and "boom" not in view.error


def test_tab_builds(studio: Studio) -> None:
    with gr.Blocks() as app:
        pt.build(studio, app)
    assert any(getattr(b, "elem_id", None) == "prompts-generate" for b in app.blocks.values())
