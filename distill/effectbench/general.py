"""General-domain edits with varied instructions.

These pretrain the tiny backbone as a general instruction editor and feed the general stream of
PDSR. They are deliberately plain edits (identity, flips, rotations, shifts, tone, blur, crops) and are kept
apart from the bench's effects (``effects.py``), which the base model must NOT know beforehand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .scenes import from_pil, make_general_scene, to_pil

Array = np.ndarray


def _luma(x: Array) -> Array:
    return x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _blur(x: Array) -> Array:
    return from_pil(to_pil(x).filter(ImageFilter.GaussianBlur(radius=x.shape[0] / 40)))


def _zoom(x: Array) -> Array:
    h, w = x.shape[:2]
    crop = to_pil(x).crop((w // 4, h // 4, w - w // 4, h - h // 4))
    return from_pil(crop.resize((w, h), Image.Resampling.BICUBIC))


def _shift(x: Array, dx: int) -> Array:
    return np.roll(x, dx, axis=1)


def _zoom_corner(x: Array) -> Array:
    h, w = x.shape[:2]
    return from_pil(to_pil(x).crop((0, 0, w // 2, h // 2)).resize((w, h), Image.Resampling.BICUBIC))


def _rotate(x: Array, degrees: float) -> Array:
    return from_pil(to_pil(x).rotate(degrees, Image.Resampling.BICUBIC, fillcolor=(0, 0, 0)))


def _sharpen(x: Array) -> Array:
    return from_pil(
        to_pil(x).filter(ImageFilter.UnsharpMask(radius=x.shape[0] / 32, percent=200, threshold=0))
    )


def _saturate(x: Array) -> Array:
    grey = _luma(x)[..., None]
    return np.clip(grey + (x - grey) * 1.8, 0, 1)


@dataclass(frozen=True)
class GeneralEdit:
    name: str
    fn: Callable[[Array], Array]
    phrasings: tuple[str, ...]


GENERAL_EDITS: tuple[GeneralEdit, ...] = (
    GeneralEdit(
        "identity",
        lambda x: x.copy(),
        (
            "Keep the image unchanged.",
            "Do not change anything.",
            "Return the same picture.",
            "Leave the photo exactly as it is.",
            "No edit, keep it identical.",
        ),
    ),
    GeneralEdit(
        "flip_horizontal",
        lambda x: x[:, ::-1].copy(),
        ("Flip the image horizontally.", "Mirror the picture left to right.", "Flip it left-right."),
    ),
    GeneralEdit(
        "flip_vertical",
        lambda x: x[::-1].copy(),
        (
            "Flip the image vertically.",
            "Turn the picture upside down by flipping it top to bottom.",
            "Flip it top-bottom.",
        ),
    ),
    GeneralEdit(
        "rotate_90",
        lambda x: np.rot90(x, 1).copy(),
        ("Rotate the image 90 degrees counterclockwise.", "Turn the picture a quarter turn to the left."),
    ),
    GeneralEdit(
        "rotate_180",
        lambda x: np.rot90(x, 2).copy(),
        ("Rotate the image by 180 degrees.", "Turn the picture half a turn."),
    ),
    GeneralEdit(
        "grayscale",
        lambda x: np.repeat(_luma(x)[..., None], 3, axis=2),
        ("Make the image black and white.", "Convert the photo to grayscale.", "Remove all colour."),
    ),
    GeneralEdit(
        "brighter",
        lambda x: np.clip(x * 1.35 + 0.08, 0, 1),
        ("Make the image brighter.", "Increase the brightness.", "Brighten the photo."),
    ),
    GeneralEdit(
        "darker",
        lambda x: np.clip(x * 0.6, 0, 1),
        ("Make the image darker.", "Decrease the brightness.", "Darken the photo."),
    ),
    GeneralEdit(
        "more_contrast",
        lambda x: np.clip((x - 0.5) * 1.6 + 0.5, 0, 1),
        ("Increase the contrast.", "Make the image punchier with more contrast."),
    ),
    GeneralEdit(
        "less_contrast",
        lambda x: (x - 0.5) * 0.5 + 0.5,
        ("Reduce the contrast.", "Make the image flat and low-contrast."),
    ),
    GeneralEdit(
        "blur", _blur, ("Blur the image.", "Make the picture soft and blurry.", "Apply a gentle blur.")
    ),
    GeneralEdit("zoom_in", _zoom, ("Zoom in on the centre.", "Crop to the middle and enlarge it.")),
    GeneralEdit(
        "shift_right",
        lambda x: _shift(x, x.shape[1] // 4),
        ("Shift the image to the right, wrapping around.", "Move everything a quarter to the right."),
    ),
    GeneralEdit(
        "swap_red_blue",
        lambda x: x[..., ::-1].copy(),
        ("Swap the red and blue channels.", "Exchange red and blue colours."),
    ),
    # Session 6: more ways of moving pixels and of changing tone, so that the pretrained editor
    # already knows how to rearrange and re-quantise an image (what the geometric and stylised
    # effects' LoRAs build on) without knowing any bench effect.
    GeneralEdit(
        "rotate_270",
        lambda x: np.rot90(x, -1).copy(),
        ("Rotate the image 90 degrees clockwise.", "Turn the picture a quarter turn to the right."),
    ),
    GeneralEdit(
        "transpose",
        lambda x: x.transpose(1, 0, 2).copy(),
        ("Transpose the image, swapping rows and columns.", "Reflect the picture across its diagonal."),
    ),
    GeneralEdit(
        "shift_down",
        lambda x: np.roll(x, x.shape[0] // 4, axis=0),
        ("Shift the image down, wrapping around.", "Move everything a quarter of the way down."),
    ),
    GeneralEdit(
        "zoom_top_left",
        _zoom_corner,
        ("Zoom in on the top-left corner.", "Crop the upper left quarter and enlarge it."),
    ),
    GeneralEdit(
        "rotate_small",
        lambda x: _rotate(x, 20.0),
        ("Rotate the image slightly counterclockwise.", "Tilt the picture by 20 degrees to the left."),
    ),
    GeneralEdit(
        "threshold",
        lambda x: np.repeat((_luma(x) > 0.5).astype(np.float32)[..., None], 3, axis=2),
        ("Threshold the image to pure black and white.", "Make it two-tone black and white, no greys."),
    ),
    GeneralEdit("sharpen", _sharpen, ("Sharpen the image.", "Make the picture crisper.")),
    GeneralEdit(
        "saturate",
        _saturate,
        ("Make the colours more vivid.", "Increase the saturation.", "Boost the colours."),
    ),
)

GENERAL_EDIT_NAMES = tuple(e.name for e in GENERAL_EDITS)


@dataclass
class GeneralSample:
    source: Array
    target: Array
    instruction: str
    edit: str


def general_sample(
    seed: int, size: int = 64, edits: tuple[GeneralEdit, ...] = GENERAL_EDITS
) -> GeneralSample:
    """One general scene with a random general edit and phrasing; deterministic by seed."""
    rng = np.random.default_rng(seed)
    edit = edits[int(rng.integers(0, len(edits)))]
    scene = make_general_scene(int(rng.integers(0, 2**31)), size)
    phrase = edit.phrasings[int(rng.integers(0, len(edit.phrasings)))]
    return GeneralSample(scene.image, edit.fn(scene.image).astype(np.float32), phrase, edit.name)


def general_images(n: int, seed: int, size: int = 64) -> list[Array]:
    """Unlabelled general-domain source images for the general stream (no targets needed)."""
    rng = np.random.default_rng(seed)
    return [make_general_scene(int(rng.integers(0, 2**31)), size).image for _ in range(n)]
