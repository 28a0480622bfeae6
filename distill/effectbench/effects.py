"""EffectBench-mini's effect library: procedural effects with exact ground truth.

Each effect maps ``(image, mask) -> image`` (H x W x 3 float32 in [0, 1]; mask H x W, 1 on the
subject). Effects are deterministic: the few that need texture (film grain, glitch bands, snow,
stained-glass cells) draw it from a constant seed, so the ground truth is a function of the input
alone and a model can learn it exactly. Sizes are fractions of the image side, so an effect looks
the same at 32 and 64 px; every effect is built to stay recognisable after a 64 -> 32 px area
downsampling (the tiny backbone's working size): no pattern finer than 4 px at 64 px.

The first 50 effects are the main bench (``MAIN_BENCH``); the rest (``EXTENSION``) are held back
for incremental extension of a trained CollectionLoRA (paper Tab. 5). The library is kept apart
from ``general.py``'s edits (flips, rotations, tone, blur, crops): the base model must not know
these effects before distillation, and a test checks that each one differs clearly from every
general edit and from every other effect.

Where the subject is after an effect (``Effect.mask_after``): colour, style and filter effects
leave the subject in place; geometric and layout effects (tiling, warps, shrinking, polaroid)
move the mask with the pixels; frames and crops cut the mask where they cover the subject.
``compose(a, b)`` uses it: B sees A's output and the subject mask as it is after A.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage, sparse
from skimage.color import hsv2rgb, rgb2hsv

Array = np.ndarray
Kind = Literal["colour", "style", "filter", "geometric", "compositional", "composite"]
KINDS: tuple[Kind, ...] = ("colour", "style", "filter", "geometric", "compositional")
MAIN_BENCH_SIZE = 50


@dataclass(frozen=True)
class Effect:
    """One procedural effect. ``fn`` always returns H x W x 3 float32 in [0, 1]."""

    name: str  # slug, also the pair-set folder name
    display_name: str
    teacher_prompt: str  # as a curator would write it for the teacher LoRA
    kind: Kind
    fn: Callable[[Array, Array], Array]
    # Where the subject is after the effect; None: unchanged (the effect moves no pixels).
    mask_fn: Callable[[Array], Array] | None = None

    def __call__(self, image: Array, mask: Array) -> Array:
        return self.fn(image, mask)

    def mask_after(self, mask: Array) -> Array:
        if self.mask_fn is None:
            return mask.astype(np.float32, copy=True)
        return np.clip(self.mask_fn(mask.astype(np.float32)), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Helpers (all on float arrays; sizes scale with the image side, 1.0 at 64 px)


def _s(x: Array) -> float:
    return x.shape[0] / 64.0


def _luma(x: Array) -> Array:
    return x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _gray3(lum: Array) -> Array:
    return np.repeat(lum[..., None], 3, axis=2)


def _rgb(c: tuple[float, float, float]) -> Array:
    return np.asarray(c, dtype=np.float32)


def _gradient_map(t: Array, stops: list[tuple[float, tuple[float, float, float]]]) -> Array:
    """Map a scalar field in [0, 1] through a piecewise-linear colour ramp."""
    pos = np.array([p for p, _ in stops], dtype=np.float32)
    cols = np.array([c for _, c in stops], dtype=np.float32)
    return np.stack([np.interp(t, pos, cols[:, k]) for k in range(3)], axis=-1).astype(np.float32)


def _blur(x: Array, sigma: float) -> Array:
    sig = (sigma, sigma, 0) if x.ndim == 3 else sigma
    return ndimage.gaussian_filter(x, sigma=sig, mode="nearest")


def _masked_blur(x: Array, weight: Array, sigma: float) -> Array:
    """Normalised convolution: blur ``x`` using only pixels where ``weight`` is high (no halo).

    Where no weighted pixel is near, falls back to the weighted mean colour."""
    w = weight[..., None]
    num = _blur(x * w, sigma)
    den = _blur(np.repeat(w, 3, axis=2), sigma)
    total = float(weight.sum())
    fallback = (x * w).sum((0, 1)) / total if total > 1e-6 else x.mean((0, 1))
    fill = np.where(den > 1e-4, num / np.maximum(den, 1e-4), fallback)
    blend = np.clip(den / 0.05, 0.0, 1.0)  # fade to the mean where the weights are scarce
    return fill * blend + fallback * (1 - blend)


def _over(fg: Array, bg: Array, alpha: Array) -> Array:
    a = alpha[..., None]
    return fg * a + bg * (1 - a)


def _screen(a: Array, b: Array) -> Array:
    return 1 - (1 - a) * (1 - b)


def _coords(h: int, w: int, ss: int = 1) -> tuple[Array, Array]:
    """Pixel-centre coordinates (pixel i spans [i, i+1]); with ``ss`` > 1, an ss x ss sub-grid
    per pixel, shaped (ss*ss, h, w) for averaging."""
    off = (np.arange(ss, dtype=np.float32) + 0.5) / ss
    ys = np.arange(h, dtype=np.float32)[None, :, None] + off[:, None, None]
    xs = np.arange(w, dtype=np.float32)[None, None, :] + off[:, None, None]
    yy = np.broadcast_to(ys[:, None], (ss, ss, h, w)).reshape(ss * ss, h, w)
    xx = np.broadcast_to(xs[None, :], (ss, ss, h, w)).reshape(ss * ss, h, w)
    return yy, xx


def _coverage(h: int, w: int, inside: Callable[[Array, Array], Array], ss: int = 4) -> Array:
    """Anti-aliased coverage (H x W in [0, 1]) of the region where ``inside(y, x)`` holds."""
    yy, xx = _coords(h, w, ss)
    return inside(yy, xx).astype(np.float32).mean(0)


def _sample(x: Array, sy: Array, sx: Array, outside: str) -> Array:
    """Bilinear sampling of x (h, w, c) at continuous coordinates (ss*ss, h, w), averaged over the
    sub-samples. ``outside``: "clamp" or "zero"."""
    h, w = x.shape[:2]
    u, v = sy - 0.5, sx - 0.5
    y0, x0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fy, fx = (u - y0)[..., None], (v - x0)[..., None]
    out = np.zeros(sy.shape + (x.shape[2],), np.float32)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = y0 + dy, x0 + dx
            wt = wy * wx
            if outside == "zero":
                wt = wt * ((yi >= 0) & (yi < h) & (xi >= 0) & (xi < w))[..., None]
            out += wt * x[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
    return out.mean(0)


def _warp_matrix(sy: Array, sx: Array, h: int, w: int, outside: str) -> sparse.csr_matrix:
    """Bilinear sampling at continuous source coordinates (ss*ss, h, w), averaged over the
    sub-samples, as a sparse (h*w out, h*w in) matrix. ``outside``: "clamp" or "zero"."""
    n_sub = sy.shape[0]
    u, v = sy - 0.5, sx - 0.5
    y0, x0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fy, fx = u - y0, v - x0
    rows = np.broadcast_to(np.arange(h * w).reshape(1, h, w), sy.shape)
    r_all, c_all, w_all = [], [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = y0 + dy, x0 + dx
            wt = wy * wx / n_sub
            if outside == "zero":
                wt = wt * ((yi >= 0) & (yi < h) & (xi >= 0) & (xi < w))
            r_all.append(rows.ravel())
            c_all.append((np.clip(yi, 0, h - 1) * w + np.clip(xi, 0, w - 1)).ravel())
            w_all.append(wt.ravel())
    data = np.concatenate(w_all).astype(np.float32)
    idx = (np.concatenate(r_all), np.concatenate(c_all))
    return sparse.csr_matrix((data, idx), shape=(h * w, h * w))


Warp = Callable[[Array, Array, int, int], tuple[Array, Array]]


def _warp(x: Array, where: Warp, outside: str = "clamp", ss: int = 3, fixed: bool = False) -> Array:
    """Inverse warp: each output point (y, x) takes the input at ``where(y, x, h, w)``;
    supersampled so shrinking warps average like an area resize. ``fixed``: ``where`` depends on
    nothing but the size, so its sampling matrix is cached."""
    squeeze = x.ndim == 2
    img = x[..., None] if squeeze else x
    h, w, c = img.shape
    if fixed:  # a cached sparse sampling matrix: one mat-vec per image
        mat = _fixed_warp_matrix(where, h, w, ss, outside)
        out = np.asarray(mat @ img.reshape(h * w, c), dtype=np.float32).reshape(h, w, c)
    else:
        yy, xx = _coords(h, w, ss)
        out = _sample(img, *where(yy, xx, h, w), outside)
    return out[..., 0] if squeeze else out


def _resize(x: Array, h: int, w: int, resample: Image.Resampling = Image.Resampling.BOX) -> Array:
    chans = x[..., None] if x.ndim == 2 else x
    out = np.stack(
        [
            np.asarray(Image.fromarray(chans[..., k].astype(np.float32), "F").resize((w, h), resample))
            for k in range(chans.shape[2])
        ],
        axis=-1,
    )
    return out[..., 0] if x.ndim == 2 else out


def _blocks(x: Array, n: int) -> Array:
    """Average over an n x n grid of blocks, shown at full size (hard block edges)."""
    h, w = x.shape[:2]
    small = _resize(x, n, n)
    iy = np.minimum((np.arange(h) * n) // h, n - 1)
    ix = np.minimum((np.arange(w) * n) // w, n - 1)
    return small[iy][:, ix]


def _shift(x: Array, dy: int, dx: int) -> Array:
    """Translate with edge clamping (content moves by +dy, +dx)."""
    h, w = x.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return x[ys][:, xs]


def _hsv(x: Array) -> Array:
    return rgb2hsv(np.clip(x, 0, 1)).astype(np.float32)


def _from_hsv(hsv: Array) -> Array:
    return hsv2rgb(np.clip(hsv, 0, 1)).astype(np.float32)


def _edges(x: Array, sigma: float) -> Array:
    """Edge strength in [0, ~1] from the blurred image (max over colour channels)."""
    b = _blur(x, sigma)
    g = np.zeros(x.shape[:2], np.float32)
    for k in range(3):
        g = np.maximum(g, np.hypot(ndimage.sobel(b[..., k], 0), ndimage.sobel(b[..., k], 1)))
    return np.clip(g * 1.5, 0, 1)


def _disk(r: float) -> Array:
    k = int(np.ceil(r))
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    return (yy**2 + xx**2) <= r * r + 0.25


def _dilate(m: Array, r: float) -> Array:
    return ndimage.grey_dilation(m, footprint=_disk(r), mode="nearest")


def _subject_box(m: Array) -> tuple[float, float, float, float] | None:
    """(cy, cx, half-height, half-width) of the subject's bounding box, or None if no subject."""
    ys, xs = np.nonzero(m > 0.5)
    if len(ys) == 0:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2


@cache
def _fixed_rng_values(seed: int, n: int) -> Array:
    """A constant table of uniform numbers: texture that is the same for every image."""
    return np.random.default_rng(seed).random(n).astype(np.float32)


def _pattern(fn: Callable[..., Array]) -> Callable[..., Array]:
    """Cache a fixed pattern by its arguments (image size, ...); the result is read-only."""

    @cache
    def cached(*args: object) -> Array:
        out = np.ascontiguousarray(fn(*args), dtype=np.float32)
        out.flags.writeable = False
        return out

    return cached


@cache
def _fixed_warp_matrix(where: Warp, h: int, w: int, ss: int, outside: str) -> sparse.csr_matrix:
    yy, xx = _coords(h, w, ss)
    return _warp_matrix(*where(yy, xx, h, w), h, w, outside)


# ----------------------------------------------------------------------------------------------
# Colour grades


def _sepia(x: Array, m: Array) -> Array:
    stops = [(0.0, (0.16, 0.09, 0.04)), (0.5, (0.62, 0.45, 0.28)), (1.0, (1.0, 0.93, 0.78))]
    return _gradient_map(_luma(x), stops)


def _warm(x: Array, m: Array) -> Array:
    return x * _rgb((1.12, 0.97, 0.62)) + _rgb((0.09, 0.04, 0.0))


def _cool(x: Array, m: Array) -> Array:
    return x * _rgb((0.62, 0.9, 1.1)) + _rgb((0.0, 0.04, 0.12))


def _teal_orange(x: Array, m: Array) -> Array:
    tone = _gradient_map(
        _luma(x), [(0.0, (0.0, 0.2, 0.28)), (0.5, (0.35, 0.5, 0.5)), (1.0, (1.0, 0.65, 0.3))]
    )
    return 0.35 * x + 0.65 * tone


def _duotone_purple_gold(x: Array, m: Array) -> Array:
    return _gradient_map(_luma(x), [(0.0, (0.22, 0.02, 0.38)), (1.0, (1.0, 0.86, 0.2))])


def _duotone_blue_pink(x: Array, m: Array) -> Array:
    return _gradient_map(_luma(x), [(0.0, (0.03, 0.08, 0.45)), (1.0, (1.0, 0.55, 0.78))])


def _split_tone(x: Array, m: Array) -> Array:
    tone = _gradient_map(_luma(x), [(0.0, (0.3, 0.0, 0.55)), (1.0, (0.8, 1.0, 0.3))])
    return 0.3 * x + 0.7 * tone


def _night_vision(x: Array, m: Array) -> Array:
    g = np.clip(_luma(x) * 1.5 + 0.05, 0, 1) ** 0.9
    h, w = g.shape
    yy, xx = _coords(h, w)
    r = np.hypot(yy[0] - h / 2, xx[0] - w / 2) / (0.5 * h)
    goggles = np.clip(1.25 - 0.6 * r**2, 0, 1)  # round eyepiece falloff
    return np.stack([0.12 * g, g, 0.18 * g], -1) * goggles[..., None]


def _thermal(x: Array, m: Array) -> Array:
    heat = 0.35 * _luma(x) + 0.65 * _blur(m, 1.5 * _s(x))  # the subject is warm
    stops = [
        (0.0, (0.02, 0.0, 0.15)),
        (0.25, (0.3, 0.0, 0.6)),
        (0.5, (0.85, 0.1, 0.45)),
        (0.7, (1.0, 0.5, 0.0)),
        (0.88, (1.0, 0.9, 0.1)),
        (1.0, (1.0, 1.0, 0.85)),
    ]
    return _gradient_map(np.clip(heat, 0, 1), stops)


def _negative(x: Array, m: Array) -> Array:
    return 1.0 - x


def _pastel(x: Array, m: Array) -> Array:
    hsv = _hsv(x)
    hsv[..., 1] *= 0.4
    hsv[..., 2] = 0.72 + 0.28 * hsv[..., 2]
    return 0.85 * _from_hsv(hsv) + 0.15 * _rgb((1.0, 0.8, 0.9))


def _cyanotype(x: Array, m: Array) -> Array:
    stops = [(0.0, (0.04, 0.16, 0.4)), (0.55, (0.3, 0.5, 0.75)), (1.0, (0.92, 0.96, 1.0))]
    return _gradient_map(_luma(x), stops)


def _hue_rotate(x: Array, m: Array) -> Array:
    hsv = _hsv(x)
    hsv[..., 0] = (hsv[..., 0] + 0.5) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.3, 0, 1)
    return _from_hsv(hsv)


# ----------------------------------------------------------------------------------------------
# Stylisations


def _posterize(x: Array, m: Array) -> Array:
    return np.round(x * 2.0) / 2.0


def _pixelate(x: Array, m: Array) -> Array:
    hsv = _hsv(_blocks(x, 8))
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.25, 0, 1)
    return np.round(_from_hsv(hsv) * 4.0) / 4.0  # big blocks in a small retro palette


def _halftone(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    n = 8
    cells = _resize(x, n, n)
    dark = 1.0 - _luma(cells)
    ink = np.clip(cells * 0.8, 0, 1)
    paper = _rgb((0.98, 0.96, 0.9))
    yy, xx = _coords(h, w, 4)
    cy, cx = np.minimum((yy * n / h).astype(int), n - 1), np.minimum((xx * n / w).astype(int), n - 1)
    dy, dx = (yy * n / h) - cy - 0.5, (xx * n / w) - cx - 0.5
    radius = 0.18 + 0.5 * np.sqrt(dark[cy, cx])
    dot = ((dy**2 + dx**2) <= radius**2).astype(np.float32)  # (16, h, w)
    cover = dot.mean(0)
    # the dot colour of the cell each pixel centre lies in
    py = np.minimum((np.arange(h) * n) // h, n - 1)
    px = np.minimum((np.arange(w) * n) // w, n - 1)
    return _over(ink[py][:, px], np.broadcast_to(paper, x.shape), cover)


def _scanlines(x: Array, m: Array) -> Array:
    h = x.shape[0]
    p = max(2, round(4 * _s(x)))
    dark = (np.arange(h) % p) >= p // 2
    gain = np.where(dark, 0.3, 1.15).astype(np.float32)
    return x * gain[:, None, None]


def _pencil_sketch(x: Array, m: Array) -> Array:
    s = _s(x)
    e = _dilate(_edges(x, 0.8 * s), 0.7 * s)
    lum = _luma(x)
    h, w = lum.shape
    yy, xx = np.mgrid[0:h, 0:w]
    hatch = (((yy + xx) % max(3, round(4 * s))) == 0) & (lum < 0.45)
    paper = _rgb((0.96, 0.95, 0.92))
    shade = (0.82 + 0.18 * lum) * (1 - 0.45 * hatch)
    graphite = np.clip(shade * (1 - 0.85 * e), 0, 1)
    return paper * graphite[..., None]


def _emboss(x: Array, m: Array) -> Array:
    s = _s(x)
    lum = _blur(_luma(x), 0.7 * s)
    k = max(1, round(1.5 * s))
    relief = _shift(lum, k, k) - _shift(lum, -k, -k)
    g = np.clip(0.5 + 2.2 * relief, 0, 1)
    return _gray3(g) * _rgb((1.0, 0.98, 0.94))


def _comic(x: Array, m: Array) -> Array:
    s = _s(x)
    hsv = _hsv(_blur(x, 0.5 * s))
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.6, 0, 1)
    hsv[..., 2] = np.ceil(hsv[..., 2] * 3.0) / 3.0
    flat = _from_hsv(hsv)
    lines = np.clip(_edges(x, 0.8 * s) * 2.0, 0, 1)
    lines = np.maximum(lines, np.clip(_dilate(m, 1.2 * s) - m, 0, 1) * 1.5)
    lines = _dilate(np.clip(lines - 0.25, 0, 1) * 1.4, 0.6 * s)
    return flat * (1 - np.clip(lines, 0, 1)[..., None])


@_pattern
def _grout(h: int, w: int, n: int) -> Array:
    g = 0.22  # grout: a fifth of each tile's side

    def inside(yy: Array, xx: Array) -> Array:
        return ((yy * n / h) % 1.0 < g) | ((xx * n / w) % 1.0 < g)

    return _coverage(h, w, inside)


def _mosaic_tiles(x: Array, m: Array) -> Array:
    n = 8
    hsv = _hsv(_blocks(x, n))
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.3, 0, 1)
    cover = _grout(x.shape[0], x.shape[1], n)
    return _over(np.broadcast_to(_rgb((0.9, 0.88, 0.82)), x.shape), _from_hsv(hsv), cover)


def _kuwahara(x: Array, r: int) -> Array:
    """Kuwahara filter: each pixel takes the mean of its flattest quadrant (painterly)."""
    k = r + 1
    lum = _luma(x)
    mean = ndimage.uniform_filter(x, size=(k, k, 1), mode="nearest")
    lmean = ndimage.uniform_filter(lum, size=k, mode="nearest")
    lvar = ndimage.uniform_filter(lum * lum, size=k, mode="nearest") - lmean**2
    half = r // 2 + (r % 2)
    best_var = np.full(lum.shape, np.inf, np.float32)
    out = np.zeros_like(x)
    for dy in (-half, half):
        for dx in (-half, half):
            v = _shift(lvar, -dy, -dx)
            better = v < best_var
            best_var = np.where(better, v, best_var)
            out = np.where(better[..., None], _shift(mean, -dy, -dx), out)
    return out


def _oil_paint(x: Array, m: Array) -> Array:
    s = _s(x)
    p = _kuwahara(x, max(2, round(2 * s)))
    hsv = _hsv(p)
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.7, 0, 1)
    hsv[..., 2] = np.clip((hsv[..., 2] - 0.5) * 1.25 + 0.55, 0, 1)
    p = _from_hsv(hsv)
    h, w = x.shape[:2]
    # fixed brush-stroke relief: streaky noise, lit from the top left
    noise = _fixed_rng_values(101, h * w).reshape(h, w)
    strokes = ndimage.gaussian_filter(noise, sigma=(0.8 * s, 3.0 * s), mode="wrap")
    relief = strokes - np.roll(strokes, (1, 1), (0, 1))
    return p * (1 + 1.2 * relief[..., None])


_POP_PALETTES = (
    ((0.1, 0.1, 0.5), (1.0, 0.2, 0.6), (1.0, 0.95, 0.2)),
    ((0.45, 0.0, 0.3), (0.1, 0.8, 0.85), (1.0, 0.6, 0.1)),
    ((0.05, 0.3, 0.1), (1.0, 0.3, 0.1), (0.65, 1.0, 0.3)),
    ((0.3, 0.0, 0.4), (0.2, 0.5, 1.0), (1.0, 0.85, 0.92)),
)


def _tile_where(n: int) -> Warp:
    def where(yy: Array, xx: Array, h: int, w: int) -> tuple[Array, Array]:
        return (yy % (h / n)) * n, (xx % (w / n)) * n

    return where


_TILE2 = _tile_where(2)


def _pop_art(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    lum = _warp(_luma(x), _TILE2, fixed=True)
    lo, hi = np.percentile(_luma(x), [35, 70])  # content-adaptive bands: all three tints appear
    band = (lum > lo).astype(int) + (lum > hi).astype(int)
    quad = (np.arange(h)[:, None] >= h // 2).astype(int) * 2 + (np.arange(w)[None, :] >= w // 2)
    pal = np.array(_POP_PALETTES, dtype=np.float32)  # (4 quadrants, 3 bands, rgb)
    return pal[quad, band]


def _neon_edges(x: Array, m: Array) -> Array:
    s = _s(x)
    e = _edges(x, 0.7 * s)
    e = np.maximum(e, np.clip(_dilate(m, 1.0 * s) - m, 0, 1))
    hsv = _hsv(_blur(x, 1.5 * s))
    hsv[..., 1] = 1.0
    hsv[..., 2] = 1.0
    neon = _from_hsv(hsv) * np.clip(e * 1.6, 0, 1)[..., None]
    return np.clip(neon + 1.3 * _blur(neon, 2.0 * s), 0, 1)


def _stained_glass(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    n = 6
    jit = _fixed_rng_values(202, 2 * n * n).reshape(n * n, 2)
    gy, gx = np.mgrid[0:n, 0:n]
    centres = (np.stack([gy.ravel(), gx.ravel()], 1) + 0.15 + 0.7 * jit) / n * np.array([h, w])
    yy, xx = _coords(h, w)
    d = np.hypot(yy[0][..., None] - centres[:, 0], xx[0][..., None] - centres[:, 1])  # (h, w, n*n)
    order = np.argsort(d, axis=-1)
    nearest = order[..., 0]
    d1 = np.take_along_axis(d, order[..., :1], -1)[..., 0]
    d2 = np.take_along_axis(d, order[..., 1:2], -1)[..., 0]
    counts = np.bincount(nearest.ravel(), minlength=n * n).astype(np.float32)
    cols = (
        np.stack([np.bincount(nearest.ravel(), x[..., k].ravel(), minlength=n * n) for k in range(3)], 1)
        / np.maximum(counts, 1)[:, None]
    )
    hsv = _hsv(cols[None].astype(np.float32))[0]
    hsv[:, 1] = np.clip(hsv[:, 1] * 1.6 + 0.15, 0, 1)
    hsv[:, 2] = np.clip(hsv[:, 2] * 1.1 + 0.1, 0, 1)
    glass = _from_hsv(hsv[None])[0][nearest]
    lead = np.clip((2.2 * _s(x) - (d2 - d1)) / 1.0, 0, 1)
    return _over(np.broadcast_to(_rgb((0.08, 0.07, 0.06)), x.shape), glass, lead)


# ----------------------------------------------------------------------------------------------
# Filters


def _vignette(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    yy, xx = _coords(h, w)
    r = np.hypot(yy[0] - h / 2, xx[0] - w / 2) / (0.5 * np.hypot(h, w))
    return x * np.clip(1 - 0.95 * r**2.2, 0, 1)[..., None]


def _film_grain(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    gh, gw = (h + 1) // 2, (w + 1) // 2  # 2 x 2 px grains survive a 2x downsampling
    g = _fixed_rng_values(303, gh * gw).reshape(gh, gw)
    grain = (np.repeat(np.repeat(g, 2, 0), 2, 1)[:h, :w] - 0.5) * 0.32
    lum = _luma(x)
    faded = 0.7 * x + 0.3 * _gray3(lum)
    return faded * 0.9 + 0.05 + grain[..., None]


def _chromatic_aberration(x: Array, m: Array) -> Array:
    k = max(1, round(4 * _s(x)))  # red up-left, blue down-right
    return np.stack([_shift(x[..., 0], -k, -k), x[..., 1], _shift(x[..., 2], k, k)], -1)


def _glitch(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    s = _s(x)
    out = x.copy()
    vals = _fixed_rng_values(404, 64)
    band_h = max(2, round(5 * s))
    for i, y0 in enumerate(range(0, h, band_h)):
        r = vals[i % 64]
        y1 = min(h, y0 + band_h)
        if r < 0.55:
            dx = int(round((r / 0.55 - 0.5) * 24 * s))
            out[y0:y1] = np.roll(x[y0:y1], dx, axis=1)
            if r < 0.2:  # colour-split bands
                out[y0:y1, :, 0] = np.roll(x[y0:y1, :, 0], dx + round(4 * s), axis=1)
                out[y0:y1, :, 2] = np.roll(x[y0:y1, :, 2], dx - round(4 * s), axis=1)
            elif r < 0.3:  # inverted band
                out[y0:y1] = 1 - out[y0:y1]
    return out * _rgb((1.0, 0.92, 1.05))


def _spotlight(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    box = _subject_box(m)
    cy, cx, ry, rx = box if box else (h / 2, w / 2, h / 4, w / 4)
    radius = max(ry, rx) * 1.1 + 0.06 * h
    yy, xx = _coords(h, w)
    d = np.hypot(yy[0] - cy, xx[0] - cx)
    beam = np.clip((radius - d) / (0.12 * h) + 0.5, 0, 1)
    beam = beam * beam * (3 - 2 * beam)
    lit = x * _rgb((1.12, 1.05, 0.9))
    dark = x * _rgb((0.12, 0.14, 0.22))
    return _over(lit, dark, beam)


def _bloom(x: Array, m: Array) -> Array:
    s = _s(x)
    glow = _blur(np.clip(x - 0.35, 0, 1) ** 1.2 * 1.6, 3.5 * s)
    soft = 0.6 * x + 0.4 * _blur(x, 1.5 * s)
    return _screen(soft, np.clip(glow, 0, 1) * _rgb((1.0, 0.9, 1.0))) * _rgb((1.0, 0.95, 1.0))


def _light_leak(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    yy, xx = _coords(h, w)
    y, xc = yy[0] / h, xx[0] / w
    orange = np.exp(-((y**2 + xc**2) / 0.28))[..., None] * _rgb((1.0, 0.5, 0.1))
    red = np.exp(-(((y - 0.75) ** 2) / 0.08 + ((xc - 1.0) ** 2) / 0.05))[..., None] * _rgb((1.0, 0.1, 0.35))
    return _screen(_screen(x, orange), red)


@_pattern
def _snowflakes(h: int, w: int) -> Array:
    s = h / 64
    n = 55
    v = _fixed_rng_values(505, 3 * n).reshape(n, 3)
    fy, fx, fr = v[:, 0] * h, v[:, 1] * w, (1.1 + 1.2 * v[:, 2]) * s

    def inside(yy: Array, xx: Array) -> Array:
        d2 = (yy[..., None] - fy) ** 2 + (xx[..., None] - fx) ** 2
        return (d2 <= fr**2).any(-1)

    return _coverage(h, w, inside)


def _snow(x: Array, m: Array) -> Array:
    flakes = _snowflakes(*x.shape[:2])
    wintry = x * 0.8 + 0.15 * _rgb((0.85, 0.92, 1.0))
    return _over(np.broadcast_to(_rgb((1.0, 1.0, 1.0)), x.shape), wintry, flakes * 0.95)


# ----------------------------------------------------------------------------------------------
# Geometric (each warp applies to the mask too)


def _mirror_left(x: Array) -> Array:
    out = x.copy()
    w = x.shape[1]
    half = w // 2
    out[:, w - half :] = x[:, :half][:, ::-1]
    return out


def _mirror_top(x: Array) -> Array:
    out = x.copy()
    h = x.shape[0]
    half = h // 2
    out[h - half :] = x[:half][::-1]
    return out


def _kaleidoscope(x: Array, m: Array) -> Array:
    """Six mirrored copies of a 30-degree wedge over the subject's head, around the image centre."""
    h, w = x.shape[:2]
    box = _subject_box(m)
    sy, sx = (box[0], box[1]) if box else (h / 2, w / 2)

    def where(yy: Array, xx: Array, h: int, w: int) -> tuple[Array, Array]:
        dy, dx = yy - h / 2, xx - w / 2
        r = np.hypot(dy, dx) * 0.8
        sector = 2 * np.pi / 6
        a = np.mod(np.arctan2(dy, dx), sector)
        a = np.minimum(a, sector - a)  # mirror every other wedge
        theta = -np.pi / 2 - sector / 4 + a  # the wedge points up from the subject's centre
        return sy + r * np.sin(theta), sx + r * np.cos(theta)

    return where


def _fisheye_where(yy: Array, xx: Array, h: int, w: int) -> tuple[Array, Array]:
    cy, cx, rad = h / 2, w / 2, 0.5 * min(h, w)
    dy, dx = (yy - cy) / rad, (xx - cx) / rad
    r = np.hypot(dy, dx)
    scale = np.where(r < 1, np.power(np.maximum(r, 1e-6), 0.8), 1.0)  # r_src = r^1.8 inside
    return cy + dy * scale * rad, cx + dx * scale * rad


def _wave_where(yy: Array, xx: Array, h: int, w: int) -> tuple[Array, Array]:
    amp, lam = 4.0 * h / 64, h / 2.5
    return yy + amp * np.sin(2 * np.pi * xx / lam), xx + amp * np.sin(2 * np.pi * yy / lam)


def _swirl_where(yy: Array, xx: Array, h: int, w: int) -> tuple[Array, Array]:
    cy, cx, rad = h / 2, w / 2, 0.6 * min(h, w)
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx)
    turn = 3.0 * np.clip(1 - r / rad, 0, 1) ** 2
    c, s = np.cos(turn), np.sin(turn)
    return cy + dy * c - dx * s, cx + dy * s + dx * c


def _little_planet_where(yy: Array, xx: Array, h: int, w: int) -> tuple[Array, Array]:
    cy, cx = h / 2, w / 2
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx) / (0.5 * min(h, w))
    theta = np.arctan2(dx, -dy)  # 0 points up
    return h * (1 - np.clip(r, 0, 1)), ((theta / (2 * np.pi)) % 1.0) * w


def _warp_effect(where: Warp) -> tuple[Callable[[Array, Array], Array], Callable[[Array], Array]]:
    return (lambda x, m: _warp(x, where, fixed=True)), (lambda m: _warp(m, where, fixed=True))


def _array_effect(
    op: Callable[[Array], Array],
) -> tuple[Callable[[Array, Array], Array], Callable[[Array], Array]]:
    return (lambda x, m: op(x)), op


# ----------------------------------------------------------------------------------------------
# Compositional (use the subject mask)


def _bg_fill(color: tuple[float, float, float]) -> Callable[[Array, Array], Array]:
    def fn(x: Array, m: Array) -> Array:
        return _over(x, np.broadcast_to(_rgb(color), x.shape), m)

    return fn


@_pattern
def _sky(h: int, w: int) -> Array:
    t = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None, None]
    sky = _rgb((0.15, 0.4, 0.85)) * (1 - t) + _rgb((0.7, 0.85, 1.0)) * t
    sky = np.broadcast_to(sky, (h, w, 3))
    clouds = np.zeros((h, w), np.float32)
    for cy, cx, ry, rx in ((0.2, 0.22, 0.07, 0.16), (0.14, 0.75, 0.06, 0.13), (0.42, 0.85, 0.05, 0.1)):
        clouds = np.maximum(
            clouds,
            _coverage(
                h,
                w,
                lambda yy, xx, a=(cy, cx, ry, rx): (
                    ((yy / h - a[0]) / a[2]) ** 2 + ((xx / w - a[1]) / a[3]) ** 2 <= 1
                ),
            ),
        )
    return _over(np.broadcast_to(_rgb((1.0, 1.0, 1.0)), (h, w, 3)), sky, clouds * 0.9)


def _bg_sky(x: Array, m: Array) -> Array:
    return _over(x, _sky(*x.shape[:2]), m)


@_pattern
def _checker(h: int, w: int) -> Array:
    n = 8
    cover = _coverage(h, w, lambda yy, xx: ((np.floor(yy * n / h) + np.floor(xx * n / w)) % 2) == 0)
    return _over(np.broadcast_to(_rgb((0.95, 0.95, 0.95)), (h, w, 3)), _rgb((0.08, 0.08, 0.1)), cover)


def _bg_checker(x: Array, m: Array) -> Array:
    return _over(x, _checker(*x.shape[:2]), m)


@_pattern
def _stripes(h: int, w: int) -> Array:
    period = h / 5
    cover = _coverage(h, w, lambda yy, xx: ((yy + xx) / period) % 1.0 < 0.5)
    return _over(np.broadcast_to(_rgb((1.0, 0.85, 0.2)), (h, w, 3)), _rgb((0.1, 0.55, 0.6)), cover)


def _bg_stripes(x: Array, m: Array) -> Array:
    return _over(x, _stripes(*x.shape[:2]), m)


@_pattern
def _beach(h: int, w: int) -> Array:
    t = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None, None]
    sky = _rgb((0.4, 0.7, 1.0)) * (1 - t / 0.45) + _rgb((0.78, 0.92, 1.0)) * (t / 0.45)
    sea = _rgb((0.0, 0.45, 0.65)) * (1 - (t - 0.45) / 0.17) + _rgb((0.1, 0.7, 0.75)) * ((t - 0.45) / 0.17)
    sand = np.broadcast_to(_rgb((0.93, 0.82, 0.58)), (h, 1, 3))
    band = np.where(t < 0.45, sky, np.where(t < 0.62, sea, sand))
    img = np.broadcast_to(band, (h, w, 3))
    sun = _coverage(h, w, lambda yy, xx: (yy / h - 0.17) ** 2 + (xx / w - 0.8) ** 2 <= 0.085**2)
    return _over(np.broadcast_to(_rgb((1.0, 0.93, 0.4)), (h, w, 3)), img, sun)


def _bg_beach(x: Array, m: Array) -> Array:
    return _over(x, _beach(*x.shape[:2]), m)


_SHRINK = 0.55


def _shrink_where(m: Array) -> Warp | None:
    box = _subject_box(m)
    if box is None:
        return None
    cy, cx = box[0], box[1]

    def where(yy: Array, xx: Array, h: int, w: int) -> tuple[Array, Array]:
        return cy + (yy - h / 2) / _SHRINK, cx + (xx - w / 2) / _SHRINK

    return where


def _inpaint_rows(x: Array, hole: Array) -> Array:
    """Fill ``hole`` (bool H x W) row by row, interpolating between the background on its left and
    right; keeps horizons and gradients, then softens the streaks vertically."""
    h, w = hole.shape
    out = x.copy()
    cols = np.arange(w)
    for y in range(h):
        known = ~hole[y]
        if known.all():
            continue
        if not known.any():  # a full-width hole: take the rows above/below later
            out[y] = np.nan
            continue
        for k in range(3):
            out[y, :, k] = np.interp(cols, cols[known], x[y, known, k])
    bad = np.isnan(out[..., 0])
    if bad.any():
        rows = np.arange(h)
        good_rows = ~bad[:, 0]
        for k in range(3):
            for c in range(w):
                out[bad[:, c], c, k] = np.interp(rows[bad[:, c]], rows[good_rows], out[good_rows, c, k])
    soft = ndimage.gaussian_filter(out, sigma=(1.5 * _s(x), 0.5 * _s(x), 0), mode="nearest")
    return np.where(hole[..., None], soft, out)


def _shrink_center(x: Array, m: Array) -> Array:
    where = _shrink_where(m)
    if where is None:
        return x.copy()
    hole = _dilate(m, 1.5 * _s(x)) > 0.02
    clean = _inpaint_rows(x, hole)  # the background without the subject
    alpha = _warp(m, where, outside="zero")
    return _over(_warp(x, where), clean, alpha)


def _shrink_mask(m: Array) -> Array:
    where = _shrink_where(m)
    return m.copy() if where is None else _warp(m, where, outside="zero")


def _subject_outline(x: Array, m: Array) -> Array:
    ring = np.clip(_dilate(m, 3.5 * _s(x)) - m, 0, 1)
    return _over(np.broadcast_to(_rgb((1.0, 1.0, 1.0)), x.shape), x, ring)


def _silhouette(x: Array, m: Array) -> Array:
    return _over(np.broadcast_to(_rgb((0.04, 0.04, 0.06)), x.shape), x, m)


def _colour_splash(x: Array, m: Array) -> Array:
    hsv = _hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.3, 0, 1)
    return _over(_from_hsv(hsv), 0.8 * _gray3(_luma(x)), m)  # vivid subject, darker grey world


def _background_blur(x: Array, m: Array) -> Array:
    s = _s(x)
    bg = _masked_blur(x, 1 - m, 6 * s)
    return _over(x, bg * 0.7 + 0.3 * _rgb((1.0, 0.97, 0.94)), m)  # soft, hazy, out of focus


@_pattern
def _border(h: int, w: int, width: float, inset: float = 0.0) -> Array:
    """Coverage of a band ``width`` px wide starting ``inset`` px from the image edge."""

    def inside(yy: Array, xx: Array) -> Array:
        d = np.minimum(np.minimum(yy, h - yy), np.minimum(xx, w - xx))
        return (d >= inset) & (d < inset + width)

    return _coverage(h, w, inside)


def _frame_red(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    return _over(np.broadcast_to(_rgb((0.78, 0.06, 0.1)), x.shape), x, _border(h, w, 6 * _s(x)))


def _frame_red_mask(m: Array) -> Array:
    return m * (1 - _border(*m.shape, 6 * _s(m)))


def _frame_gold(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    s = _s(x)
    width = 6 * s
    yy, xx = _coords(h, w)
    d = np.minimum(np.minimum(yy[0], h - yy[0]), np.minimum(xx[0], w - xx[0]))
    t = np.clip(d / width, 0, 1)[..., None]  # bevel: light outside, dark inside
    gold = _rgb((1.0, 0.88, 0.45)) * (1 - t) + _rgb((0.62, 0.42, 0.08)) * t
    out = _over(gold, x, _border(h, w, width))
    return _over(np.broadcast_to(_rgb((0.3, 0.2, 0.04)), x.shape), out, _border(h, w, 1.2 * s, width))


def _frame_gold_mask(m: Array) -> Array:
    return m * (1 - _border(*m.shape, 7.2 * _s(m)))


def _polaroid_where(yy: Array, xx: Array, h: int, w: int) -> tuple[Array, Array]:
    top, bottom = 0.09 * h, 0.22 * h
    size = h - top - bottom
    left = (w - size * w / h) / 2
    return (yy - top) * h / size, (xx - left) * h / size


@_pattern
def _polaroid_photo(h: int, w: int) -> Array:
    top, bottom = 0.09 * h, 0.22 * h
    size = h - top - bottom
    left = (w - size * w / h) / 2
    return _coverage(h, w, lambda yy, xx: (yy >= top) & (yy < h - bottom) & (xx >= left) & (xx < w - left))


def _frame_polaroid(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    photo = _warp(x, _polaroid_where, fixed=True)
    return _over(photo, np.broadcast_to(_rgb((0.97, 0.96, 0.92)), x.shape), _polaroid_photo(h, w))


def _frame_polaroid_mask(m: Array) -> Array:
    return _warp(m, _polaroid_where, outside="zero", fixed=True) * _polaroid_photo(*m.shape)


@_pattern
def _circle(h: int, w: int) -> Array:
    r = 0.46 * min(h, w)
    return _coverage(h, w, lambda yy, xx: (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= r * r)


def _circle_crop(x: Array, m: Array) -> Array:
    return _over(x, np.broadcast_to(_rgb((0.97, 0.97, 0.97)), x.shape), _circle(*x.shape[:2]))


def _frame_double_bands(h: int, w: int, s: float) -> tuple[Array, Array]:
    outer = _border(h, w, 4 * s)
    gap = _border(h, w, 2 * s, 4 * s)
    inner = _border(h, w, 2 * s, 6 * s)
    return outer + inner, gap


def _frame_double(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    navy, gap = _frame_double_bands(h, w, _s(x))
    out = _over(np.broadcast_to(_rgb((0.1, 0.15, 0.38)), x.shape), x, navy)
    return _over(np.broadcast_to(_rgb((0.96, 0.94, 0.88)), x.shape), out, gap)


def _frame_double_mask(m: Array) -> Array:
    return m * (1 - _border(*m.shape, 8 * _s(m)))


@_pattern
def _rounded(h: int, w: int, s: float) -> Array:
    inset, rad = 3 * s, 14 * s

    def inside(yy: Array, xx: Array) -> Array:
        qy = np.maximum(np.abs(yy - h / 2) - (h / 2 - inset - rad), 0)
        qx = np.maximum(np.abs(xx - w / 2) - (w / 2 - inset - rad), 0)
        return qy**2 + qx**2 <= rad**2

    return _coverage(h, w, inside)


def _frame_rounded(x: Array, m: Array) -> Array:
    h, w = x.shape[:2]
    inner = _rounded(h, w, _s(x))
    line = np.clip(_dilate(1 - inner, 1.5 * _s(x)) - (1 - inner), 0, 1)  # thin white rim
    out = _over(x, np.broadcast_to(_rgb((0.12, 0.12, 0.14)), x.shape), inner)
    return _over(np.broadcast_to(_rgb((1.0, 1.0, 1.0)), x.shape), out, line)


def _frame_rounded_mask(m: Array) -> Array:
    inner = _rounded(*m.shape, _s(m))
    return m * np.clip(inner - (_dilate(1 - inner, 1.5 * _s(m)) - (1 - inner)), 0, 1)


@_pattern
def _bars(h: int, w: int) -> Array:
    bar = 0.14 * h
    return _coverage(h, w, lambda yy, xx: (yy < bar) | (yy >= h - bar))


def _letterbox(x: Array, m: Array) -> Array:
    return x * (1 - _bars(*x.shape[:2]))[..., None]


@_pattern
def _stars(h: int, w: int) -> Array:
    s = h / 64
    n = 16
    v = _fixed_rng_values(606, 3 * n).reshape(n, 3)
    sy, sx, size = (0.05 + 0.9 * v[:, 0]) * h, (0.05 + 0.9 * v[:, 1]) * w, (3.5 + 4.0 * v[:, 2]) * s

    def inside(yy: Array, xx: Array) -> Array:
        dy = np.abs(yy[..., None] - sy) / size
        dx = np.abs(xx[..., None] - sx) / size
        return (np.sqrt(dy) + np.sqrt(dx) <= 1.0).any(-1)  # four-pointed astroid star

    return _coverage(h, w, inside)


def _sparkles(x: Array, m: Array) -> Array:
    s = _s(x)
    stars = _stars(*x.shape[:2]) * (1 - m)  # only on the background
    glow = np.clip(_blur(stars, 1.2 * s) * 1.5, 0, 1) * (1 - m)
    out = _screen(x, glow[..., None] * _rgb((0.6, 0.55, 0.2)))
    return _over(np.broadcast_to(_rgb((1.0, 0.97, 0.7)), x.shape), out, stars)


# ----------------------------------------------------------------------------------------------
# The library. Order matters: the first MAIN_BENCH_SIZE effects are the main bench.

_mirror_left_fn, _mirror_left_mask = _array_effect(_mirror_left)
_mirror_top_fn, _mirror_top_mask = _array_effect(_mirror_top)
_tile2_fn, _tile2_mask = _warp_effect(_TILE2)
_tile3_fn, _tile3_mask = _warp_effect(_tile_where(3))
_fisheye_fn, _fisheye_mask = _warp_effect(_fisheye_where)
_wave_fn, _wave_mask = _warp_effect(_wave_where)
_swirl_fn, _swirl_mask = _warp_effect(_swirl_where)
_planet_fn, _planet_mask = _warp_effect(_little_planet_where)


def _clipped(fn: Callable[[Array, Array], Array]) -> Callable[[Array, Array], Array]:
    def run(image: Array, mask: Array) -> Array:
        x = np.asarray(image, dtype=np.float32)
        m = np.asarray(mask, dtype=np.float32)
        return np.clip(fn(x, m), 0.0, 1.0).astype(np.float32)

    run.__name__ = getattr(fn, "__name__", "effect")
    return run


def _e(
    name: str,
    display: str,
    prompt: str,
    kind: Kind,
    fn: Callable[[Array, Array], Array],
    mask_fn: Callable[[Array], Array] | None = None,
) -> Effect:
    return Effect(name, display, prompt, kind, _clipped(fn), mask_fn)


EFFECTS: tuple[Effect, ...] = (
    # --- main bench (50) ---
    _e("sepia", "Sepia print", "Turn the photo into a warm vintage sepia print.", "colour", _sepia),
    _e("warm_golden", "Golden warmth", "Give the photo a warm golden-hour colour grade.", "colour", _warm),
    _e("cool_blue", "Cool blue grade", "Give the photo a cold, icy blue colour grade.", "colour", _cool),
    _e(
        "teal_orange",
        "Teal and orange",
        "Apply a cinematic teal-and-orange grade: teal shadows, orange highlights.",
        "colour",
        _teal_orange,
    ),
    _e(
        "duotone_purple_gold",
        "Purple-gold duotone",
        "Render the photo as a duotone in deep purple and gold.",
        "colour",
        _duotone_purple_gold,
    ),
    _e(
        "duotone_blue_pink",
        "Blue-pink duotone",
        "Render the photo as a duotone in navy blue and candy pink.",
        "colour",
        _duotone_blue_pink,
    ),
    _e(
        "split_tone",
        "Purple-lime split tone",
        "Split-tone the photo: purple in the shadows, lime green in the highlights.",
        "colour",
        _split_tone,
    ),
    _e(
        "night_vision",
        "Night vision",
        "Make it look like a view through green night-vision goggles.",
        "colour",
        _night_vision,
    ),
    _e(
        "thermal",
        "Thermal camera",
        "Turn the photo into a thermal camera image where the subject glows hot.",
        "colour",
        _thermal,
    ),
    _e("negative", "Colour negative", "Invert the photo into a colour negative.", "colour", _negative),
    _e("pastel", "Soft pastel", "Wash the photo out into soft pastel colours.", "colour", _pastel),
    _e("posterize", "Posterize", "Posterize the photo into a few flat, bold colours.", "style", _posterize),
    _e(
        "pixelate",
        "Pixel art",
        "Pixelate the photo into big square blocks with a small retro palette.",
        "style",
        _pixelate,
    ),
    _e(
        "halftone",
        "Halftone dots",
        "Print the photo as big halftone dots on cream paper.",
        "style",
        _halftone,
    ),
    _e("scanlines", "Scanlines", "Add thick dark horizontal scanlines like an old CRT.", "style", _scanlines),
    _e(
        "pencil_sketch",
        "Pencil sketch",
        "Turn the photo into a graphite pencil sketch on white paper.",
        "style",
        _pencil_sketch,
    ),
    _e("emboss", "Embossed relief", "Emboss the photo into a grey raised relief.", "style", _emboss),
    _e(
        "comic",
        "Comic book",
        "Make it look like a comic book panel with flat colours and black ink outlines.",
        "style",
        _comic,
    ),
    _e(
        "mosaic_tiles",
        "Tile mosaic",
        "Rebuild the photo as a mosaic of square tiles with light grout.",
        "style",
        _mosaic_tiles,
    ),
    _e(
        "oil_paint",
        "Oil painting",
        "Repaint the photo as a saturated oil painting with visible brush strokes.",
        "style",
        _oil_paint,
    ),
    _e(
        "pop_art_2x2",
        "Pop-art grid",
        "Make a 2x2 pop-art grid of the photo, each copy in different bold colours.",
        "style",
        _pop_art,
        _tile2_mask,
    ),
    _e(
        "neon_edges",
        "Neon edges",
        "Trace the edges in glowing neon light on a black background.",
        "style",
        _neon_edges,
    ),
    _e("vignette", "Dark vignette", "Add a strong dark vignette around the edges.", "filter", _vignette),
    _e("film_grain", "Film grain", "Add heavy, faded film grain.", "filter", _film_grain),
    _e(
        "chromatic_aberration",
        "Chromatic aberration",
        "Add strong chromatic aberration: split the red and blue channels diagonally.",
        "filter",
        _chromatic_aberration,
    ),
    _e(
        "glitch",
        "Digital glitch",
        "Glitch the photo with shifted horizontal bands and colour splits.",
        "filter",
        _glitch,
    ),
    _e(
        "spotlight",
        "Spotlight",
        "Put the subject in a warm spotlight and plunge the rest into darkness.",
        "filter",
        _spotlight,
    ),
    _e("bloom", "Dreamy bloom", "Add a soft, dreamy glow that blooms from the highlights.", "filter", _bloom),
    _e(
        "light_leak",
        "Light leak",
        "Add orange and red film light leaks from the corners.",
        "filter",
        _light_leak,
    ),
    _e(
        "mirror_left",
        "Mirror symmetry",
        "Mirror the left half of the photo onto the right half.",
        "geometric",
        _mirror_left_fn,
        _mirror_left_mask,
    ),
    _e(
        "kaleidoscope",
        "Kaleidoscope",
        "Turn the photo into a six-fold kaleidoscope.",
        "geometric",
        lambda x, m: _warp(x, _kaleidoscope(x, m)),
        lambda m: _warp(m, _kaleidoscope(m, m)),
    ),
    _e("tile_2x2", "Tiled 2x2", "Repeat the photo in a 2x2 grid.", "geometric", _tile2_fn, _tile2_mask),
    _e("tile_3x3", "Tiled 3x3", "Repeat the photo in a 3x3 grid.", "geometric", _tile3_fn, _tile3_mask),
    _e(
        "fisheye",
        "Fisheye bulge",
        "Bulge the centre of the photo like a fisheye lens.",
        "geometric",
        _fisheye_fn,
        _fisheye_mask,
    ),
    _e(
        "wave", "Wavy distortion", "Distort the photo with rippling waves.", "geometric", _wave_fn, _wave_mask
    ),
    _e(
        "swirl",
        "Swirl",
        "Twist the middle of the photo into a swirl.",
        "geometric",
        _swirl_fn,
        _swirl_mask,
    ),
    _e(
        "bg_white",
        "White studio background",
        "Replace the background with a clean white studio backdrop.",
        "compositional",
        _bg_fill((0.97, 0.97, 0.97)),
    ),
    _e(
        "bg_sky",
        "Blue sky background",
        "Replace the background with a blue sky with white clouds.",
        "compositional",
        _bg_sky,
    ),
    _e(
        "bg_checker",
        "Checkerboard background",
        "Replace the background with a black-and-white checkerboard.",
        "compositional",
        _bg_checker,
    ),
    _e(
        "bg_stripes",
        "Striped background",
        "Replace the background with diagonal yellow and teal stripes.",
        "compositional",
        _bg_stripes,
    ),
    _e(
        "bg_beach",
        "Beach background",
        "Put the subject on a sunny beach with sea and sand behind it.",
        "compositional",
        _bg_beach,
    ),
    _e(
        "shrink_center",
        "Small and centred",
        "Make the subject much smaller and place it in the centre of the picture.",
        "compositional",
        _shrink_center,
        _shrink_mask,
    ),
    _e(
        "subject_outline",
        "White outline",
        "Draw a thick white outline around the subject.",
        "compositional",
        _subject_outline,
    ),
    _e(
        "silhouette",
        "Silhouette",
        "Turn the subject into a solid black silhouette, keeping the background.",
        "compositional",
        _silhouette,
    ),
    _e(
        "colour_splash",
        "Colour splash",
        "Keep the subject in vivid colour and make the background a darker black and white.",
        "compositional",
        _colour_splash,
    ),
    _e(
        "background_blur",
        "Portrait blur",
        "Blur the background strongly like a portrait lens, keeping the subject sharp.",
        "compositional",
        _background_blur,
    ),
    _e(
        "frame_red",
        "Thick red frame",
        "Add a thick red frame around the photo.",
        "compositional",
        _frame_red,
        _frame_red_mask,
    ),
    _e(
        "frame_gold",
        "Gold frame",
        "Put the photo in an ornate gold frame.",
        "compositional",
        _frame_gold,
        _frame_gold_mask,
    ),
    _e(
        "frame_polaroid",
        "Polaroid",
        "Make it a polaroid print with a white border and a wide bottom margin.",
        "compositional",
        _frame_polaroid,
        _frame_polaroid_mask,
    ),
    _e(
        "circle_crop",
        "Circle crop",
        "Crop the photo to a circle on a white background.",
        "compositional",
        _circle_crop,
        lambda m: m * _circle(*m.shape),
    ),
    # --- extension ---
    _e(
        "cyanotype", "Cyanotype", "Turn the photo into a Prussian-blue cyanotype print.", "colour", _cyanotype
    ),
    _e(
        "stained_glass",
        "Stained glass",
        "Turn the photo into a stained-glass window with dark lead lines.",
        "style",
        _stained_glass,
    ),
    _e("snow", "Snowfall", "Add falling snowflakes over a wintry photo.", "filter", _snow),
    _e(
        "mirror_top",
        "Mirror top to bottom",
        "Mirror the top half of the photo onto the bottom half.",
        "geometric",
        _mirror_top_fn,
        _mirror_top_mask,
    ),
    _e(
        "frame_double",
        "Double frame",
        "Add a double navy frame with a cream gap between the lines.",
        "compositional",
        _frame_double,
        _frame_double_mask,
    ),
    _e(
        "frame_rounded",
        "Rounded frame",
        "Round the corners of the photo on a dark mat with a thin white rim.",
        "compositional",
        _frame_rounded,
        _frame_rounded_mask,
    ),
    _e(
        "letterbox",
        "Letterbox",
        "Add black cinematic letterbox bars at the top and bottom.",
        "compositional",
        _letterbox,
        lambda m: m * (1 - _bars(*m.shape)),
    ),
    _e(
        "sparkles",
        "Sparkles",
        "Scatter twinkling star sparkles over the background, not on the subject.",
        "compositional",
        _sparkles,
    ),
    _e(
        "hue_rotate",
        "Complementary hues",
        "Swap every colour for its complementary hue.",
        "colour",
        _hue_rotate,
    ),
    _e(
        "little_planet",
        "Little planet",
        "Wrap the photo into a tiny round planet.",
        "geometric",
        _planet_fn,
        _planet_mask,
    ),
)

_BY_NAME = {e.name: e for e in EFFECTS}
assert len(_BY_NAME) == len(EFFECTS), "effect names must be unique"
EFFECT_NAMES: tuple[str, ...] = tuple(_BY_NAME)
MAIN_BENCH: tuple[Effect, ...] = EFFECTS[:MAIN_BENCH_SIZE]
EXTENSION: tuple[Effect, ...] = EFFECTS[MAIN_BENCH_SIZE:]


def get_effect(name: str) -> Effect:
    """The library effect called ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"There is no bench effect called {name!r}. Known effects: {', '.join(EFFECT_NAMES)}"
        ) from None


def split_of(effect: Effect | str) -> Literal["main", "extension"]:
    name = effect if isinstance(effect, str) else effect.name
    return "main" if EFFECT_NAMES.index(get_effect(name).name) < MAIN_BENCH_SIZE else "extension"


def compose(a: Effect | str, b: Effect | str) -> Effect:
    """Ground truth for "apply A, then B": ``B(A(image, mask), A.mask_after(mask))``.

    The mask B sees is where the subject is after A (moved by geometric effects, cut by frames),
    so e.g. "tile 2x2, then white background" whitens the background of all four copies."""
    ea = get_effect(a) if isinstance(a, str) else a
    eb = get_effect(b) if isinstance(b, str) else b

    def fn(image: Array, mask: Array) -> Array:
        return eb.fn(ea.fn(image, mask), ea.mask_after(mask))

    def mask_fn(mask: Array) -> Array:
        return eb.mask_after(ea.mask_after(mask))

    return Effect(
        name=f"{ea.name}+{eb.name}",
        display_name=f"{ea.display_name}, then {eb.display_name}",
        teacher_prompt=f"Please apply {ea.display_name} to the input image, and then apply {eb.display_name}.",
        kind="composite",
        fn=fn,
        mask_fn=mask_fn,
    )
