"""Model-based metrics: tiny random CLIP / DINO folders loaded through the environment variables, the
MLLM judge against a real OpenAI-format server in this process, and every "unavailable" path."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from fake_vlm_server import ScriptedChatServer
from PIL import Image

from distill import judges
from distill.judges import (
    DREAMSIM_FILES,
    METRICS,
    JudgeRecord,
    JudgesConfig,
    MetricMean,
    ModelJudges,
    Unavailable,
    judges_table,
    load_clip,
    load_dino,
    load_dreamsim,
    model_metrics,
)
from distill.mllm_judge import DEFAULT_CRITERIA, MLLMJudge
from distill.prompts.template import fill_bcr_template, fill_vsa_template
from distill.prompts.vlm import VLMConfig

ENV_VARS = [
    judges.ENV_CLIP,
    judges.ENV_DINO,
    judges.ENV_DREAMSIM,
    judges.ENV_EDITREWARD,
    judges.ENV_JUDGE_BASE_URL,
    judges.ENV_JUDGE_MODEL,
    judges.ENV_JUDGE_API_KEY,
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random one-layer CLIP with a character-level BPE vocabulary (no merges)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz .,":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), unk_token="<|endoftext|>")
    text = dict(
        vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1
    )
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={**text, **small},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(d)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    d = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    Dinov2Model(cfg).save_pretrained(d)
    BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(d)
    return d


def rand_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((32, 32, 3), dtype=np.float32) for _ in range(n)]


def solid(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.float32) / 255, (32, 32, 3)).copy()


# --- Configuration and the unavailable paths -------------------------------------------------


def test_config_from_env_names_each_source():
    env = {
        judges.ENV_CLIP: "/m/clip",
        judges.ENV_DINO: " /m/dino ",
        judges.ENV_JUDGE_BASE_URL: "http://h:8000/v1",
        judges.ENV_JUDGE_MODEL: "qwen-vl-max-latest",
    }
    cfg = JudgesConfig.from_env(env)
    assert (cfg.clip_model, cfg.dino_model, cfg.dreamsim_dir, cfg.editreward_model) == (
        "/m/clip",
        "/m/dino",
        None,
        None,
    )
    assert cfg.judge.base_url == "http://h:8000/v1" and cfg.judge.model == "qwen-vl-max-latest"
    assert cfg.judge.api_key_env == judges.ENV_JUDGE_API_KEY and cfg.judge_problem is None
    half = JudgesConfig.from_env({judges.ENV_JUDGE_BASE_URL: "http://h/v1"})
    assert half.judge is None and judges.ENV_JUDGE_MODEL in half.judge_problem
    bad = JudgesConfig.from_env({judges.ENV_JUDGE_BASE_URL: "h:8000", judges.ENV_JUDGE_MODEL: "m"})
    assert bad.judge is None and "http(s)" in bad.judge_problem


def test_nothing_configured_every_metric_says_why():
    out = model_metrics([tuple(rand_images(3, 0)) + ("warm", "make it warm")], JudgesConfig.from_env({}))
    assert set(out) == set(METRICS)
    assert all(isinstance(m, Unavailable) for m in out.values())
    assert str(out["clip_image"]) == "CLIP: unavailable (STUDIO_CLIP_MODEL not set)"
    assert "STUDIO_DINO_MODEL not set" in str(out["dino"])
    assert "STUDIO_DREAMSIM_DIR not set" in str(out["dreamsim"])
    assert "not supported offline" in str(out["editreward"])
    assert "STUDIO_JUDGE_BASE_URL and STUDIO_JUDGE_MODEL not set" in str(out["bcr"])
    assert str(out["vsa"]).startswith("MLLM judge (VSA): unavailable")
    assert all("no outputs" in str(m) for m in model_metrics([], JudgesConfig()).values())


def test_missing_and_broken_folders(tmp_path):
    missing = load_clip(JudgesConfig(clip_model=str(tmp_path / "nope")))
    assert (
        isinstance(missing, Unavailable) and "folder not found" in missing.reason and "nope" in missing.reason
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for loaded in (
        load_clip(JudgesConfig(clip_model=str(broken))),
        load_dino(JudgesConfig(dino_model=str(broken))),
    ):
        assert isinstance(loaded, Unavailable)
        assert loaded.reason.startswith(f"failed to load from {broken}")


def test_dreamsim_needs_package_and_its_weights(tmp_path, monkeypatch):
    if not judges._has_package("dreamsim"):
        got = load_dreamsim(JudgesConfig(dreamsim_dir=str(tmp_path)))
        assert isinstance(got, Unavailable) and "pip install dreamsim" in got.reason
    monkeypatch.setattr(judges, "_has_package", lambda name: True)
    (tmp_path / DREAMSIM_FILES[0]).write_bytes(b"")
    got = load_dreamsim(JudgesConfig(dreamsim_dir=str(tmp_path)))
    assert isinstance(got, Unavailable) and "lacks its weights" in got.reason
    assert DREAMSIM_FILES[1] in got.reason and DREAMSIM_FILES[0] not in got.reason


def test_editreward_is_unavailable_even_when_configured(tmp_path):
    got = judges.editreward_unavailable(JudgesConfig(editreward_model=str(tmp_path)))
    assert "not supported offline" in got.reason and str(tmp_path) in got.reason


# --- CLIP and DINO from local folders ---------------------------------------------------------


def test_clip_and_dino_load_through_the_environment(monkeypatch, clip_dir, dino_dir):
    monkeypatch.setenv(judges.ENV_CLIP, str(clip_dir))
    monkeypatch.setenv(judges.ENV_DINO, str(dino_dir))
    mj = ModelJudges(replace(JudgesConfig.from_env(), batch_size=2))  # batches of 2: exercise batching
    assert not isinstance(mj.clip, Unavailable) and not isinstance(mj.dino, Unavailable)
    imgs = rand_images(3, 1)
    for emb in (mj.clip.image_embeddings(imgs), mj.dino.image_embeddings(imgs)):
        assert emb.shape[0] == 3 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert mj.clip.text_embeddings(["make it warm", "add a frame"]).shape == (2, 16)

    src, other = rand_images(3, 2), rand_images(3, 3)
    prompts = ["make it warm", "add a red frame", "turn it into a sketch"]
    same = [JudgeRecord(s, s, s, "e", p) for s, p in zip(src, prompts)]  # output == truth == source
    diff = [JudgeRecord(o, s, s, "e", p) for o, s, p in zip(other, src, prompts)]
    a, b = mj.score(same), mj.score(diff)
    assert a["clip_image"].value == pytest.approx(1.0, abs=1e-5) and a["clip_image"].n == 3
    assert a["dino"].value == pytest.approx(1.0, abs=1e-5)
    assert b["clip_image"].value < a["clip_image"].value - 1e-4
    assert b["dino"].value < a["dino"].value - 1e-4

    # CLIP-T pairs each output with its own prompt: the model's own forward pass agrees
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    pil = [Image.fromarray((o * 255 + 0.5).astype(np.uint8)) for o in other]
    with torch.no_grad():
        fw = model(**proc(images=pil, text=prompts, return_tensors="pt", padding=True))
    expected = (fw.image_embeds * fw.text_embeds).sum(-1).mean().item()
    assert b["clip_text"].value == pytest.approx(expected, abs=1e-4)

    # a prompt longer than the text model's context is cut, not an error
    long = mj.score([JudgeRecord(src[0], src[0], src[0], "e", "make it warm " * 20)])
    assert isinstance(long["clip_text"], MetricMean)

    # a model that fails while scoring is reported, and the other metrics still come back
    def boom(images):
        raise RuntimeError("out of memory")

    mj.dino.image_embeddings = boom
    out = mj.score(same)
    assert str(out["dino"]) == "DINO: unavailable (failed while scoring: RuntimeError: out of memory)"
    assert out["clip_image"].value == pytest.approx(1.0, abs=1e-5)


# --- The MLLM judge ----------------------------------------------------------------------------


@pytest.fixture()
def server():
    s = ScriptedChatServer()
    yield s
    s.close()


def judge_for(server, **kw) -> MLLMJudge:
    cfg = VLMConfig(base_url=server.base_url, model="judge-vl", timeout_s=2.0, max_retries=0, backoff_s=0.01)
    return MLLMJudge(cfg, **kw)


def sent(body: dict) -> tuple[str, list[np.ndarray]]:
    parts = body["messages"][0]["content"]
    prefix = "data:image/png;base64,"
    images = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"][len(prefix) :]))))
        for p in parts
        if p["type"] == "image_url"
    ]
    return next(p["text"] for p in parts if p["type"] == "text"), images


def bcr(bad: bool) -> tuple[str, str]:
    return ("ok", json.dumps({"brief_reasoning": "x", "is_bad_case": bad}))


def test_judge_sends_the_appendix_prompts_with_images_in_order(server):
    colours = {"tsrc": (200, 0, 0), "tout": (0, 200, 0), "src": (0, 0, 200), "out": (200, 200, 0)}
    c = {k: solid(v) for k, v in colours.items()}
    good = JudgeRecord(c["out"], c["src"], c["out"], "warm", "make it warm", template=(c["tsrc"], c["tout"]))
    bad = JudgeRecord(c["src"], c["src"], c["out"], "warm", "make it warm", criteria="Warm tones everywhere.")
    server.script = [
        bcr(False),
        ("ok", '```json\n{"brief_reasoning": "same dog", "scores": 4}\n```'),
        bcr(True),
    ]
    out = ModelJudges(JudgesConfig(), judge=judge_for(server)).score([good, bad])
    assert out["bcr"] == MetricMean(0.5, 2) and out["vsa"] == MetricMean(2.0, 2)  # (4 + 0) / 2
    assert len(server.requests) == 3  # no consistency question for the bad case
    text, imgs = sent(server.bodies[0])
    assert text == fill_bcr_template("make it warm", DEFAULT_CRITERIA)
    assert [tuple(im[0, 0]) for im in imgs] == [colours[k] for k in ("tsrc", "tout", "src", "out")]
    assert all(min(im.shape[:2]) >= 256 for im in imgs)  # small bench images are enlarged
    text, imgs = sent(server.bodies[1])
    assert text == fill_vsa_template("make it warm")
    assert [tuple(im[0, 0]) for im in imgs] == [colours["src"], colours["out"]]
    text, imgs = sent(server.bodies[2])  # no template: the source and its ground truth stand in
    assert text == fill_bcr_template("make it warm", "Warm tones everywhere.")
    assert [tuple(im[0, 0]) for im in imgs] == [colours[k] for k in ("src", "out", "src", "src")]


def test_unparsable_answers_are_counted_not_guessed(server):
    recs = [JudgeRecord(*rand_images(3, i), "warm", "make it warm") for i in range(3)]
    server.script = [("ok", "Looks fine to me."), bcr(False), ("ok", '{"scores": 9}'), bcr(True)]
    out = ModelJudges(JudgesConfig(), judge=judge_for(server)).score(recs)
    assert out["bcr"].value == 0.5 and out["bcr"].n == 2 and out["bcr"].skipped == 1
    assert "unparsable bad-case answer" in out["bcr"].note
    assert out["vsa"].value == 0.0 and out["vsa"].n == 1 and out["vsa"].skipped == 2
    server.script = [("ok", "I cannot judge this.")]
    out = ModelJudges(JudgesConfig(), judge=judge_for(server)).score(recs[:2])
    assert isinstance(out["bcr"], Unavailable) and "no verdicts: unparsable" in out["bcr"].reason


def test_http_errors_make_the_judge_unavailable_and_stop_asking(server):
    recs = [JudgeRecord(*rand_images(3, i), "warm", "make it warm") for i in range(6)]
    server.script = [("status", 500, '{"error": "overloaded"}')]
    out = ModelJudges(JudgesConfig(), judge=judge_for(server, max_failures_in_a_row=2)).score(recs)
    assert len(server.requests) == 2
    assert isinstance(out["bcr"], Unavailable) and "HTTP 500" in out["bcr"].reason
    assert isinstance(out["vsa"], Unavailable)
    # one failure among answers: the mean is over the judged cases and says how many were not
    server.requests.clear()
    server.script = [bcr(True), ("status", 401, "no key"), bcr(True)]
    out = ModelJudges(JudgesConfig(), judge=judge_for(server)).score(recs[:3])
    assert out["bcr"].value == 1.0 and out["bcr"].n == 2 and out["bcr"].skipped == 1
    assert "HTTP 401" in out["bcr"].note


def test_judge_from_environment_sends_key_and_model(server, monkeypatch):
    monkeypatch.setenv(judges.ENV_JUDGE_BASE_URL, server.base_url)
    monkeypatch.setenv(judges.ENV_JUDGE_MODEL, "qwen-vl-max-latest")
    monkeypatch.setenv(judges.ENV_JUDGE_API_KEY, "sekrit")
    server.script = [bcr(True)]
    out = model_metrics([JudgeRecord(*rand_images(3, 0), "warm", "make it warm")])
    assert out["bcr"] == MetricMean(1.0, 1) and out["vsa"] == MetricMean(0.0, 1)
    assert server.bodies[0]["model"] == "qwen-vl-max-latest" and server.bodies[0]["temperature"] == 0.0
    assert server.headers[0]["Authorization"] == "Bearer sekrit"


def test_table_shows_numbers_and_reasons():
    res = {k: Unavailable(METRICS[k], "X not set") for k in METRICS}
    res["clip_image"] = MetricMean(0.7312, 20)
    res["bcr"] = MetricMean(0.25, 18, 2, "unparsable bad-case answer: ...")
    md = judges_table([("Ours", res), ("Base", res)], "Model-based metrics")
    row = next(line for line in md.splitlines() if line.startswith("| Ours"))
    assert "0.731" in row and "0.250 (18/20)" in row and row.count("n/a") == len(METRICS) - 2
    assert md.count("DINO ↑: unavailable (X not set)") == 1  # each reason once
    assert "Ours, BCR (MLLM) ↓: 2 without a number" in md
