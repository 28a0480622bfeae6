"""Serving API (CollectionEditor, LoraBankEditor, InstructionRouter) and the edit/effects CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from studio_fixtures import SMALL, frozen_tiny, randomize_lora

from distill.backbones import adapters
from distill.backbones.tiny import TinyEditor
from distill.export import CatalogEntry, compose_prompt, export_collection_lora
from distill.images import to_pil, to_tensor
from distill.sampling import euler_sample
from distill.serving import (
    TEACHER_PROMPT_KEY,
    CollectionEditor,
    InstructionRouter,
    LoraBankEditor,
    ServingError,
    UnknownEffectError,
    read_bank,
)

CATALOG = [
    CatalogEntry("warm-film", "<warm_Xk41>", "Give the photo a warm orange film grade.", "Warm film look."),
    CatalogEntry("pixel", "<pixel_Qa07>", "Turn the image into blocky pixel art.", "Pixel art style."),
    CatalogEntry("sepia", "<sepia_Lm22>", "Tone the photo in brown sepia.", "Old sepia photograph."),
]


def tiny(seed: int = 0) -> TinyEditor:
    return frozen_tiny(SMALL, seed)


def make_collection(path: Path, entries=CATALOG, seed: int = 0) -> Path:
    """A CollectionLoRA export of a random-weight student on the (seed-fixed) tiny backbone."""
    bb = tiny(seed)
    adapters.add_lora(bb.transformer, "student", adapters.LoraSpec(rank=4, alpha=4.0))
    randomize_lora(bb.transformer, "student", seed=1, std=0.2)
    return export_collection_lora(bb.transformer, path, list(entries), backbone="tiny")


def make_teacher(path: Path, prompt: str, seed: int) -> Path:
    bb = tiny()
    adapters.add_lora(bb.transformer, "t", adapters.LoraSpec(rank=4, alpha=4.0))
    randomize_lora(bb.transformer, "t", seed=seed, std=0.2)
    return adapters.save_lora(bb.transformer, "t", path, metadata={TEACHER_PROMPT_KEY: prompt})


def images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def reference(
    prompt: str, ims: list[Image.Image], seeds: list[int], path: Path, steps: int = 8
) -> np.ndarray:
    """What the student should give: unfused LoRA on a fresh backbone, sampled image by image."""
    bb = tiny()
    adapters.load_lora(bb.transformer, path, "student")
    outs = []
    with adapters.using(bb.transformer, ["student"]):
        for im, s in zip(ims, seeds):
            cond = bb.encode_prompt([prompt], bb.prepare_images(to_tensor([im])))
            outs.append(np.asarray(to_pil(euler_sample(bb, cond, steps=steps, seed=s).images)[0]))
    return np.stack(outs).astype(np.int16)


def arr(ims: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i) for i in ims]).astype(np.int16)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return make_collection(tmp_path_factory.mktemp("lora") / "collection.safetensors")


@pytest.fixture(scope="module")
def editor(lora: Path) -> CollectionEditor:
    return CollectionEditor.load(lora, backbone=tiny())


def test_effects_come_from_the_file(editor: CollectionEditor) -> None:
    fx = editor.effects()
    assert [e.name for e in fx] == ["warm-film", "pixel", "sepia"]
    assert (
        fx[1].trigger == "<pixel_Qa07>"
        and fx[1].prompt == "<pixel_Qa07> Turn the image into blocky pixel art."
    )
    assert editor.fused


def test_edit_effect_matches_the_student_with_its_catalog_prompt(
    editor: CollectionEditor, lora: Path
) -> None:
    ims = images(3)
    res = editor.edit(ims, effect="pixel", seed=5, batch_size=2)
    assert res.nfe == 8 and res.seconds > 0 and len(res.images) == 3
    assert res.prompt == "<pixel_Qa07> Turn the image into blocky pixel art."
    assert res.images[0].size == (32, 32)
    # fused and batched == unfused, one image at a time, seeds seed+i (up to uint8 rounding)
    want = reference(res.prompt, ims, [5, 6, 7], lora)
    assert np.abs(arr(res.images) - want).max() <= 1
    # the prompt reaches the model: another effect gives other images, farther from the reference
    other = editor.edit(ims, effect="sepia", seed=5)
    assert np.abs(arr(other.images) - want).sum() > 3 * np.abs(arr(res.images) - want).sum()


def test_compose_and_instruction(editor: CollectionEditor) -> None:
    ims = images(1, size=48)  # resized to the working resolution
    res = editor.edit(ims[0], compose=["warm-film", "sepia"])
    assert res.prompt == compose_prompt(editor.catalog, "warm-film", "sepia")
    assert res.prompt.startswith("Please apply <warm_Xk41> Give the photo a warm orange film grade to the")
    assert res.images[0].size == (32, 32)
    free = editor.edit(ims, instruction="  make it blue ", steps=2)
    assert free.prompt == "make it blue" and free.nfe == 2


def test_same_seed_same_output_and_batching_does_not_change_it(editor: CollectionEditor) -> None:
    ims = images(4, seed=3)
    whole = editor.edit(ims, effect="warm-film", seed=11, batch_size=4)
    parts = editor.edit(ims, effect="warm-film", seed=11, batch_size=1)
    assert np.abs(arr(whole.images) - arr(parts.images)).max() <= 1
    # rows with different prompts in one batch give what each gives alone (the server relies on it)
    mixed = editor.run(ims[:2], [editor.plan("pixel").prompt, editor.plan("sepia").prompt], [1, 2], 8)
    alone = editor.run(ims[1:2], [editor.plan("sepia").prompt], [2], 8)
    assert np.abs(arr(mixed.images[1:]) - arr(alone.images)).max() <= 1


def test_errors_say_what_to_change(editor: CollectionEditor, tmp_path: Path) -> None:
    im = images(1)
    with pytest.raises(
        UnknownEffectError, match="no effect 'pixl'. Did you mean 'pixel'.*warm-film, pixel, sepia"
    ):
        editor.edit(im, effect="pixl")
    with pytest.raises(UnknownEffectError, match="'nope'"):
        editor.edit(im, compose=["pixel", "nope"])
    with pytest.raises(ServingError, match="exactly one of"):
        editor.edit(im, effect="pixel", instruction="x")
    with pytest.raises(ServingError, match="exactly one of"):
        editor.edit(im)
    with pytest.raises(ServingError, match="two effect names"):
        editor.edit(im, compose=["pixel"])
    with pytest.raises(ServingError, match="steps"):
        editor.edit(im, effect="pixel", steps=0)
    with pytest.raises(ServingError, match="PIL images"):
        editor.edit(["not an image"], effect="pixel")
    with pytest.raises(ServingError, match="No input image"):
        editor.edit([], effect="pixel")
    plain = tmp_path / "plain.safetensors"
    make_teacher(plain, "p", seed=3)
    with pytest.raises(ServingError, match="no effect catalog"):
        CollectionEditor.load(plain, backbone=tiny())


def test_lora_bank_loads_switches_and_routes(tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    for k, e in enumerate(CATALOG):
        make_teacher(bank / f"teacher_{e.name}.safetensors", e.teacher_prompt, seed=10 + k)
    light = make_teacher(tmp_path / "lightning.safetensors", "", seed=99)
    assert [b.name for b in read_bank(bank)] == ["pixel", "sepia", "warm-film"]
    ed = LoraBankEditor.load(bank, light, backbone=tiny())
    im = images(2)
    r1 = ed.edit(im, effect="pixel")
    assert (r1.switches, ed.switches, r1.prompt) == (1, 1, "Pixel art style.")
    assert r1.load_seconds > 0
    r2 = ed.edit(im, effect="pixel")
    assert (r2.switches, r2.load_seconds, ed.switches) == (0, 0.0, 1)
    r3 = ed.edit(im, effect="sepia")
    assert r3.switches == 1 and ed.switches == 2
    assert np.abs(arr(r3.images) - arr(r1.images)).mean() > 1.0  # another teacher LoRA, other images
    assert sorted(adapters.active(ed.backbone.transformer)[0]) == ["bank_0", "lightning"]
    r4 = ed.edit(im, instruction="an old photograph look in sepia tones")
    assert r4.routed == "sepia" and r4.switches == 0
    r5 = ed.edit(im, compose=["warm-film", "pixel"])
    assert r5.switches == 1 and sorted(adapters.active(ed.backbone.transformer)[0]) == [
        "bank_0",
        "bank_1",
        "lightning",
    ]
    with pytest.raises(UnknownEffectError, match="LoRA bank has no effect 'x'"):
        ed.edit(im, effect="x")
    # a bank file without a prompt is refused with the fix
    bad = tmp_path / "bad"
    bad.mkdir()
    make_teacher(bad / "a.safetensors", "", seed=1)
    with pytest.raises(ServingError, match="bank.json"):
        read_bank(bad)


def test_keyword_router() -> None:
    router = InstructionRouter({e.name: e.teacher_prompt for e in CATALOG})
    assert router.mode == "keyword"
    assert router.route("pixelated please") == "pixel"
    assert router.route("make it warmer like film") == "warm-film"
    assert router.route("brown old style") in {"sepia", "warm-film", "pixel"}  # total: always answers
    emb = InstructionRouter(
        {"a": "x", "b": "y"},
        embed=lambda t: torch.tensor([[1.0, 0.0] if "x" in s else [0.0, 1.0] for s in t]),
    )
    assert emb.mode == "embedding" and emb.route("y y") == "b"


# -- CLI -------------------------------------------------------------------------------------------
@pytest.fixture()
def cli(monkeypatch):
    from studio import cli as studio_cli

    if "serve" not in studio_cli.COMMAND_MODULES:
        monkeypatch.setattr(studio_cli, "COMMAND_MODULES", [*studio_cli.COMMAND_MODULES, "serve"])
    return studio_cli.main


def test_cli_edit_over_a_folder_and_effects_catalog(
    cli, lora: Path, tmp_path: Path, data_dir, capsys
) -> None:
    model = tmp_path / "model"
    tiny().save_pretrained(model)  # the CLI loads the backbone from a folder, as a deployer would
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    ims = images(3, seed=7)
    ims[0].save(inputs / "a.png")
    ims[1].save(inputs / "sub" / "b.png")
    ims[2].save(tmp_path / "c.png")
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rc = cli(
        ["edit", "--lora", str(lora), "--effect", "pixel", str(inputs), str(tmp_path / "c.png"),
         "--out", str(out), "--model-path", str(model), "--seed", "3", "--batch-size", "2"]
    )  # fmt: skip
    assert rc == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a.pixel.png", "b.pixel.png", "c.pixel.png"]
    got = arr([Image.open(out / n).convert("RGB") for n in written])
    want = reference("<pixel_Qa07> Turn the image into blocky pixel art.", ims, [3, 4, 5], lora)
    assert np.abs(got - want).max() <= 1

    rc = cli(["edit", "--lora", str(lora), "--effect", "pixle", str(inputs), "--out", str(out),
              "--model-path", str(model)])  # fmt: skip
    assert rc == 2 and "Did you mean 'pixel'" in capsys.readouterr().err

    capsys.readouterr()
    assert cli(["effects", "--lora", str(lora)]) == 0
    text = capsys.readouterr().out
    assert "3 effects" in text and "pixel\t<pixel_Qa07>\tTurn the image into blocky pixel art." in text
    assert cli(["effects", "catalog", "--lora", str(lora), "--json"]) == 0
    cat = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in cat["effects"]] == ["warm-film", "pixel", "sepia"]
    assert cli(["effects", "list"]) == 0  # the library's actions still work
