"""The offline describer on synthetic pairs whose transformation is known."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from distill.prompts import (
    LocalTransformersVLM,
    OfflineDescriber,
    OpenAICompatibleVLM,
    PromptWriter,
    PromptWriterConfig,
    VLMConfig,
    VLMError,
    make_writer,
)
from distill.prompts.describer import describe_effect, describe_instruction

SIZE = 48


def scene(seed: int, size: int = SIZE) -> tuple[Image.Image, np.ndarray]:
    """A vertical-gradient background with an off-centre elliptic "animal" (with an eye), light
    noise; returns the image and the subject mask."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, size)[:, None, None]
    img = np.broadcast_to(
        (1 - t) * rng.uniform(0.2, 0.9, 3) + t * rng.uniform(0.1, 0.8, 3), (size, size, 3)
    ).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.35, 0.65) * size, rng.uniform(0.3, 0.45) * size
    ry, rx = rng.uniform(0.15, 0.25) * size, rng.uniform(0.12, 0.2) * size
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    img[body] = rng.uniform(0, 1, 3)
    img[((yy - (cy - ry / 3)) ** 2 + (xx - (cx + rx / 3)) ** 2) < (0.2 * rx) ** 2] = 0.05
    img += rng.normal(0, 0.02, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)), body


def as_image(a: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8))


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=float) / 255


def red_frame(im: Image.Image) -> Image.Image:
    im = im.copy()
    draw = ImageDraw.Draw(im)
    for i in range(3):
        draw.rectangle([i, i, im.width - 1 - i, im.height - 1 - i], outline=(220, 20, 20))
    return im


def tile2(im: Image.Image) -> Image.Image:
    half = im.resize((im.width // 2, im.height // 2))
    out = Image.new("RGB", im.size)
    for x in (0, im.width // 2):
        for y in (0, im.height // 2):
            out.paste(half, (x, y))
    return out


def shrink(im: Image.Image) -> Image.Image:
    small = im.resize((round(im.width * 0.6), round(im.height * 0.6)))
    out = Image.new("RGB", im.size, tuple(int(v) for v in np.median(np.asarray(im)[0], axis=0)))
    out.paste(small, ((im.width - small.width) // 2, (im.height - small.height) // 2))
    return out


def sepia(im: Image.Image) -> Image.Image:
    g = arr(ImageOps.grayscale(im))
    return as_image(np.stack([g * 1.07 + 0.05, g * 0.87 + 0.03, g * 0.62], -1))


def pixelate(im: Image.Image) -> Image.Image:
    return im.resize((im.width // 4, im.height // 4), Image.Resampling.BOX).resize(
        im.size, Image.Resampling.NEAREST
    )


def vignette(im: Image.Image) -> Image.Image:
    a = arr(im)
    h, w = a.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - (h - 1) / 2) / (h / 2), (xx - (w - 1) / 2) / (w / 2)) / np.sqrt(2)
    return as_image(a * (1 - 0.8 * np.clip((r - 0.3) / 0.7, 0, 1)[..., None] ** 1.5))


EFFECTS = {
    "grayscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
    "flip_h": ImageOps.mirror,
    "flip_v": ImageOps.flip,
    "rot90": lambda im: im.rotate(90),
    "red_frame": red_frame,
    "tile2": tile2,
    "shrink": shrink,
    "warm": lambda im: as_image(arr(im) + np.array([0.12, 0.04, -0.08])),
    "cool": lambda im: as_image(arr(im) + np.array([-0.08, 0.0, 0.12])),
    "brighter": lambda im: ImageEnhance.Brightness(im).enhance(1.35),
    "sepia": sepia,
    "invert": ImageOps.invert,
    "blur": lambda im: im.filter(ImageFilter.GaussianBlur(1.5)),
    "pixelate": pixelate,
    "vignette": vignette,
}

# What each finding is called in the prompt. A prompt must contain its own and none of the others.
KEYWORDS = {
    "grayscale": "black and white",
    "flip_h": "mirror the image horizontally",
    "flip_v": "upside down",
    "rot90": "90 degrees counter-clockwise",
    "red_frame": "red frame",
    "tile2": "2x2 grid",
    "shrink": "shrink the subject",
    "warm": "warm orange colour grade",
    "cool": "cool blue colour grade",
    "brighter": "brighten",
    "sepia": "sepia",
    "invert": "invert",
    "blur": "blur",
    "pixelate": "pixelate",
    "vignette": "vignette",
    "background": "background",
}


def pairs_for(effect, seeds=range(4)):
    return [(src, effect(src)) for src, _ in (scene(s) for s in seeds)]


@pytest.mark.parametrize("name", list(EFFECTS))
def test_prompt_names_the_effect_and_nothing_else(name):
    prompt = describe_effect(pairs_for(EFFECTS[name]), "")
    text = prompt.text.lower()
    assert prompt.source == "offline-describer"
    assert KEYWORDS[name] in text, text
    wrong = [k for other, k in KEYWORDS.items() if other != name and k in text]
    assert not wrong, f"{name}: {text!r} also mentions {wrong}"


def test_background_replacement():
    pairs = []
    for seed in range(4):
        src, body = scene(seed)
        tgt = arr(src).copy()
        tgt[~body] = (0.1, 0.2, 0.85)
        pairs.append((src, as_image(tgt)))
    text = describe_effect(pairs, "").text.lower()
    assert "background with a plain blue" in text
    assert "keep the subject itself unchanged" in text
    for other in ("frame", "black and white", "mirror", "colour grade", "shrink"):
        assert other not in text


def test_teacher_prompt_leads_and_identity_adds_nothing():
    text = describe_effect(pairs_for(EFFECTS["grayscale"]), "Make it look old.").text
    assert text.startswith("Make it look old: convert the image to black and white")
    same = describe_effect(pairs_for(lambda im: im.copy()), "Do the thing.").text
    assert same == "Do the thing; keep the subject recognizable."


def test_only_findings_shared_by_half_the_pairs_count():
    gray = EFFECTS["grayscale"]
    one_of_four = [(s, gray(s)) for s, _ in (scene(0),)] + pairs_for(lambda im: im.copy(), seeds=range(1, 4))
    assert "black and white" not in describe_effect(one_of_four, "").text
    two_of_four = pairs_for(gray, seeds=range(2)) + pairs_for(lambda im: im.copy(), seeds=range(2, 4))
    assert "black and white" in describe_effect(two_of_four, "").text


def test_target_of_another_size_and_small_images():
    pairs = [(src, ImageOps.mirror(src).resize((64, 64))) for src, _ in (scene(s, 32) for s in range(3))]
    assert "mirror the image horizontally" in describe_effect(pairs, "").text.lower()


def test_describe_instruction():
    dark = Image.new("RGB", (32, 32), (50, 20, 10))
    assert describe_instruction(dark).startswith("Brighten")
    gray = ImageOps.grayscale(scene(0)[0]).convert("RGB")
    assert describe_instruction(gray).startswith("Colorize")
    img = ImageEnhance.Contrast(scene(3)[0]).enhance(2.0)  # nothing to fix: a general edit is drawn
    assert describe_instruction(img) == describe_instruction(img)  # stable per image
    assert len({describe_instruction(img, seed=s) for s in range(20)}) > 1


def test_make_writer(tmp_path):
    offline = make_writer()
    assert isinstance(offline, OfflineDescriber) and isinstance(offline, PromptWriter)
    prompt = offline.refine_student_prompt(pairs_for(EFFECTS["invert"], seeds=range(2)), "Invert it.")
    assert prompt.text.startswith("Invert it: invert all colours")
    vlm = make_writer(PromptWriterConfig(vlm=VLMConfig(base_url="http://127.0.0.1:9/v1", model="m")))
    assert isinstance(vlm, OpenAICompatibleVLM) and vlm.source == "vlm:m"
    with pytest.raises(VLMError, match="does not exist"):
        make_writer(PromptWriterConfig(local_vlm_dir=tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")
    local = make_writer(PromptWriterConfig(local_vlm_dir=tmp_path))
    assert isinstance(local, LocalTransformersVLM) and local.source == f"local-vlm:{tmp_path.name}"
    with pytest.raises(VLMError, match="Could not load"):
        local.write_instruction(scene(0)[0])
