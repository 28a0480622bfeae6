"""The deployable CollectionLoRA file: catalog metadata, prompts, both key layouts, plain diffusers loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline
from PIL import Image
from qwen_tiny import IMAGE_SIZE, tiny_image_sizes, tiny_qwen_components
from studio_fixtures import SMALL, frozen_tiny, randomize_lora

from distill.backbones import adapters
from distill.backbones.tiny import TinyEditor
from distill.export import (
    CatalogEntry,
    CatalogError,
    compose_prompt,
    convert_collection_lora,
    effect_prompt,
    export_collection_lora,
    read_catalog,
    student_init,
)
from distill.trainer import adapter_params

CATALOG = [
    CatalogEntry("warm-film", "<warm_Xk41>", "Give the photo a warm orange film grade.", "Warm film look."),
    CatalogEntry("pixel", "<pixel_Qa07>", "Turn the image into blocky pixel art.", "Pixel art."),
]


def _velocity(bb: TinyEditor, names: list[str] | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    src = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad(), adapters.using(bb.transformer, names):
        cond = bb.encode_prompt(["<warm_Xk41> warm it", "<pixel_Qa07> pixels"], src)
        return bb.predict_velocity(x, torch.tensor([0.7, 0.3]), cond)


def test_catalog_round_trip_and_prompts(tmp_path: Path) -> None:
    bb = frozen_tiny(SMALL)
    adapters.add_lora(bb.transformer, "student", adapters.LoraSpec(rank=4, alpha=2.0))
    path = export_collection_lora(
        bb.transformer, tmp_path / "c.safetensors", CATALOG, backbone="tiny", extra_meta={"run": "7"}
    )
    cat = read_catalog(path)
    assert cat.entries == CATALOG
    assert (cat.backbone, cat.rank, cat.alpha, cat.student_steps, cat.format_version) == (
        "tiny",
        4,
        2.0,
        8,
        1,
    )
    assert cat.extra["run"] == "7" and cat.extra["lora_rank"] == "4"
    assert effect_prompt(cat, "pixel") == "<pixel_Qa07> Turn the image into blocky pixel art."
    assert compose_prompt(cat, "warm-film", "pixel") == (
        "Please apply <warm_Xk41> Give the photo a warm orange film grade to the input image, "
        "and then apply <pixel_Qa07> Turn the image into blocky pixel art."
    )
    with pytest.raises(CatalogError, match="no effect 'sepia'.*warm-film, pixel"):
        effect_prompt(cat, "sepia")

    # a plain LoRA has no catalog; a bad catalog is refused before anything is written
    plain = adapters.save_lora(bb.transformer, "student", tmp_path / "plain.safetensors")
    with pytest.raises(CatalogError, match="no effect catalog"):
        read_catalog(plain)
    with pytest.raises(CatalogError, match="not a readable"):
        (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
        read_catalog(tmp_path / "junk.safetensors")
    dup = [*CATALOG, CatalogEntry("other", "<pixel_Qa07>", "x", "y")]
    with pytest.raises(CatalogError, match="triggers used twice: <pixel_Qa07>"):
        export_collection_lora(bb.transformer, tmp_path / "d.safetensors", dup)
    with pytest.raises(CatalogError, match="'nope' has no trigger"):
        export_collection_lora(bb.transformer, tmp_path / "d.safetensors", [CatalogEntry("nope", "", "p")])
    assert not (tmp_path / "d.safetensors").exists()


def test_both_layouts_load_back_to_identical_outputs(tmp_path: Path) -> None:
    bb = frozen_tiny(SMALL)
    adapters.add_lora(bb.transformer, "student", adapters.LoraSpec(rank=4, alpha=2.0))
    randomize_lora(bb.transformer, "student", seed=1, std=0.2)
    want, base = _velocity(bb, ["student"]), _velocity(bb, None)
    assert not torch.allclose(want, base, atol=1e-3)  # the LoRA matters

    diffusers_file = export_collection_lora(bb.transformer, tmp_path / "d.safetensors", CATALOG)
    kohya_file = export_collection_lora(bb.transformer, tmp_path / "k.safetensors", CATALOG, fmt="kohya")
    converted = convert_collection_lora(diffusers_file, tmp_path / "conv.safetensors", "kohya")
    for path, fmt in ((diffusers_file, "diffusers"), (kohya_file, "kohya"), (converted, "kohya")):
        fresh = frozen_tiny(SMALL)
        report = adapters.load_lora(fresh.transformer, path, "loaded")
        assert (report.format_detected, report.rank, report.alpha) == (fmt, 4, 2.0)
        torch.testing.assert_close(_velocity(fresh, ["loaded"]), want, rtol=0, atol=1e-6)
        assert read_catalog(path).entries == CATALOG
    assert read_catalog(converted).extra["ss_network_alpha"] == "2"
    # same layout: a byte copy
    copy = convert_collection_lora(diffusers_file, tmp_path / "copy.safetensors", "diffusers")
    assert copy.read_bytes() == diffusers_file.read_bytes()

    # the file as distillation init: every student parameter, exact values
    init = student_init(kohya_file)
    own = adapter_params(bb.transformer, "student")
    assert set(init) == set(own)
    assert all(torch.equal(init[k], own[k].detach()) for k in own)


def test_plain_diffusers_pipeline_loads_the_export(tmp_path: Path) -> None:
    """A user's QwenImageEditPlusPipeline takes the file with load_lora_weights, alpha included."""
    trained = tiny_qwen_components()["transformer"]  # the same random base as the pipelines below
    adapters.add_lora(trained, "student", adapters.LoraSpec(rank=4, alpha=2.0))
    randomize_lora(trained, "student", seed=1, std=0.3)
    path = export_collection_lora(trained, tmp_path / "collection.safetensors", CATALOG, backbone="qwen")
    prompt = effect_prompt(read_catalog(path), "pixel")
    image = Image.fromarray(
        (np.random.default_rng(0).random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype(np.uint8)
    )

    def run(pipe: QwenImageEditPlusPipeline) -> torch.Tensor:
        with tiny_image_sizes(), torch.no_grad():
            out = pipe(
                image=image,
                prompt=prompt,
                num_inference_steps=2,
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
            )
        return out.images

    pipe = QwenImageEditPlusPipeline(**tiny_qwen_components())
    pipe.set_progress_bar_config(disable=True)
    without = run(pipe)
    pipe.load_lora_weights(str(path), adapter_name="collection")
    with_lora = run(pipe)
    gap = (with_lora - without).abs().max().item()
    assert gap > 1e-3

    # the same file through our own loader on a fresh pipeline gives the same images (alpha read alike)
    ours = QwenImageEditPlusPipeline(**tiny_qwen_components())
    ours.set_progress_bar_config(disable=True)
    adapters.load_lora(ours.transformer, path, "collection")
    adapters.activate(ours.transformer, ["collection"])
    assert (run(ours) - with_lora).abs().max().item() < 0.01 * gap
