"""Procedural scenes: a subject ("animal" or "portrait") on a varied background, and general scenes.

Everything is drawn with PIL at 4x supersampling and downsampled, so edges are smooth at 32-64 px.
Each scene comes with the subject mask, which compositional effects (background replacement,
shrinking the subject, outlines) need for exact ground truth. Deterministic by seed.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Category = Literal["animal", "portrait"]
CATEGORIES: tuple[Category, ...] = ("animal", "portrait")
SUPERSAMPLE = 4


@dataclass
class Scene:
    image: np.ndarray  # H x W x 3 float32 in [0, 1]
    mask: np.ndarray  # H x W float32 in [0, 1], 1 on the subject
    category: str

    def to_pil(self) -> Image.Image:
        return to_pil(self.image)


def to_pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


def from_pil(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Gradient skies, ground lines, stripes or blobs, in random palettes."""
    big = size * SUPERSAMPLE
    h0 = rng.random()
    c0 = np.array(_rgb(h0, rng.uniform(0.2, 0.8), rng.uniform(0.45, 1.0)), dtype=np.float32)
    c1 = np.array(
        _rgb(h0 + rng.uniform(-0.3, 0.3), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.95)), dtype=np.float32
    )
    t = np.linspace(0.0, 1.0, big, dtype=np.float32)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    g = np.clip(np.cos(angle) * yy + np.sin(angle) * xx, 0, None)
    g = g / max(g.max(), 1e-6)
    arr = c0[None, None] * (1 - g[..., None]) + c1[None, None] * g[..., None]
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    kind = rng.integers(0, 4)
    if kind == 1:  # ground / horizon
        y = int(big * rng.uniform(0.55, 0.8))
        draw.rectangle(
            [0, y, big, big], fill=_rgb(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.8))
        )
    elif kind == 2:  # soft stripes
        col = _rgb(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.6, 1.0))
        step = int(big * rng.uniform(0.12, 0.3))
        for x in range(0, big, 2 * step):
            draw.rectangle([x, 0, x + step // 2, big], fill=col)
    elif kind == 3:  # blobs (clouds, bushes)
        for _ in range(rng.integers(2, 5)):
            r = big * rng.uniform(0.08, 0.2)
            cx, cy = rng.uniform(0, big, 2)
            draw.ellipse(
                [cx - r, cy - r, cx + r, cy + r],
                fill=_rgb(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.5, 1.0)),
            )
    return img


def _draw_animal(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, cy: float, r: float, fill_mask: bool
) -> None:
    fur = (255, 255, 255) if fill_mask else _rgb(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.35, 0.95))
    dark = (255, 255, 255) if fill_mask else _rgb(rng.random(), 0.3, 0.15)
    # body below, head above, two ears, a tail
    draw.ellipse([cx - 1.1 * r, cy - 0.1 * r, cx + 1.1 * r, cy + 1.0 * r], fill=fur)
    draw.ellipse([cx - 0.7 * r, cy - 1.0 * r, cx + 0.7 * r, cy + 0.25 * r], fill=fur)
    draw.polygon(
        [(cx - 0.65 * r, cy - 0.55 * r), (cx - 0.5 * r, cy - 1.35 * r), (cx - 0.1 * r, cy - 0.85 * r)],
        fill=fur,
    )
    draw.polygon(
        [(cx + 0.65 * r, cy - 0.55 * r), (cx + 0.5 * r, cy - 1.35 * r), (cx + 0.1 * r, cy - 0.85 * r)],
        fill=fur,
    )
    draw.line(
        [(cx + 1.0 * r, cy + 0.6 * r), (cx + 1.5 * r, cy - 0.1 * r)], fill=fur, width=max(1, int(0.18 * r))
    )
    if not fill_mask:
        e = 0.12 * r
        for sx in (-0.28, 0.28):
            draw.ellipse([cx + sx * r - e, cy - 0.45 * r - e, cx + sx * r + e, cy - 0.45 * r + e], fill=dark)
        draw.ellipse([cx - 0.1 * r, cy - 0.2 * r, cx + 0.1 * r, cy - 0.08 * r], fill=dark)


def _draw_portrait(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, cy: float, r: float, fill_mask: bool
) -> None:
    w = (255, 255, 255)
    skin = w if fill_mask else _rgb(rng.uniform(0.03, 0.1), rng.uniform(0.25, 0.6), rng.uniform(0.45, 0.95))
    hair = w if fill_mask else _rgb(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.6))
    shirt = w if fill_mask else _rgb(rng.random(), rng.uniform(0.4, 0.95), rng.uniform(0.35, 0.95))
    draw.ellipse([cx - 1.3 * r, cy + 0.55 * r, cx + 1.3 * r, cy + 2.2 * r], fill=shirt)  # shoulders
    draw.ellipse([cx - 0.78 * r, cy - 1.05 * r, cx + 0.78 * r, cy + 0.5 * r], fill=hair)  # hair behind head
    draw.ellipse([cx - 0.6 * r, cy - 0.75 * r, cx + 0.6 * r, cy + 0.7 * r], fill=skin)  # face
    if not fill_mask:
        dark = _rgb(0.6, 0.3, 0.15)
        e = 0.09 * r
        for sx in (-0.25, 0.25):
            draw.ellipse([cx + sx * r - e, cy - 0.15 * r - e, cx + sx * r + e, cy - 0.15 * r + e], fill=dark)
        draw.arc(
            [cx - 0.25 * r, cy + 0.05 * r, cx + 0.25 * r, cy + 0.4 * r],
            20,
            160,
            fill=_rgb(0.98, 0.6, 0.6),
            width=max(1, int(0.08 * r)),
        )


_DRAW = {"animal": _draw_animal, "portrait": _draw_portrait}


def make_scene(category: Category, seed: int, size: int = 64) -> Scene:
    """A subject of ``category`` at a random position, scale and colour on a random background."""
    if category not in _DRAW:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    rng = np.random.default_rng(seed)
    big = size * SUPERSAMPLE
    img = _background(rng, size)
    r = big * rng.uniform(0.16, 0.26)
    cx = big * rng.uniform(0.32, 0.68)
    cy = big * rng.uniform(0.4, 0.6)
    state = rng.bit_generator.state
    _DRAW[category](ImageDraw.Draw(img), rng, cx, cy, r, fill_mask=False)
    mask = Image.new("RGB", (big, big), (0, 0, 0))
    rng.bit_generator.state = state  # the mask is the same geometry
    _DRAW[category](ImageDraw.Draw(mask), rng, cx, cy, r, fill_mask=True)
    image = from_pil(img.resize((size, size), Image.Resampling.BOX))
    m = from_pil(mask.resize((size, size), Image.Resampling.BOX))[..., 0]
    return Scene(image=image, mask=m, category=category)


def make_general_scene(seed: int, size: int = 64) -> Scene:
    """General-domain images: random shapes, sometimes with a subject, on a random background."""
    rng = np.random.default_rng(seed)
    if rng.random() < 0.35:
        scene = make_scene(CATEGORIES[int(rng.integers(0, 2))], int(rng.integers(0, 2**31)), size)
        scene.category = "general"
        return scene
    big = size * SUPERSAMPLE
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        col = _rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
        cx, cy = rng.uniform(0.15, 0.85, 2) * big
        r = big * rng.uniform(0.08, 0.25)
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif kind == 1:
            draw.rectangle([cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r], fill=col)
        elif kind == 2:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
        else:
            draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=col, width=int(0.2 * r) + 1)
    image = from_pil(img.resize((size, size), Image.Resampling.BOX))
    return Scene(image=image, mask=np.zeros((size, size), np.float32), category="general")
