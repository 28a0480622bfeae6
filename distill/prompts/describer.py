"""An offline student-prompt writer that needs no model: it measures what changed between the source
and target images of an effect's training pairs and says it in words.

It is the fallback when no VLM is configured. Each detector is a plain image statistic on small RGB
images (32-64 px): colour shifts, tone, saturation, grayscale/sepia, detail (blur, sharpen, edges,
posterize, pixelate, grain), geometry (flips, rotations), frames, background swaps, subject scale and
tiling. A finding goes into the prompt only if it holds in at least half of the pairs, the same rule
Fig. 15 gives the VLM for perspective changes ("only if it is consistently applied across all pairs").
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from .base import ImagePair, StudentPrompt

SOURCE = "offline-describer"

# Thresholds on [0, 1] images. They are deliberately coarse: a clause must be visible at a glance.
BRIGHTNESS_STEP = 0.06  # mean luminance change
CONTRAST_RATIO = 1.2  # luminance std ratio (and 1/1.2 for lowering)
SATURATION_RATIO = 1.3  # mean chroma ratio (and 1/1.3 for muting)
TINT_STEP = 0.035  # size of the chromatic part of the mean colour shift
GRAY_CHROMA = 0.03  # mean chroma under which an image is grayscale
CHANGED = 0.12  # per-pixel max channel difference that counts as "changed"
STRUCTURE_MATCH = 0.8  # |correlation| for "the target is this transform of the source"
STRUCTURE_MARGIN = 0.15  # ... and (over 5) by how much it must beat the untransformed source


# --- Small image helpers -----------------------------------------------------------------------


def to_array(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB float array in [0, 1], shape (H, W, 3); resized to ``size`` (W, H) if given."""
    image = image.convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float64) / 255.0


def luminance(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114])


def chroma(x: np.ndarray) -> np.ndarray:
    return x.max(axis=-1) - x.min(axis=-1)


def hue_deg(x: np.ndarray) -> np.ndarray:
    """Hue angle in degrees of RGB values (last axis), 0 = red, 120 = green, 240 = blue."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return np.degrees(np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360


def corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays; 0 when either is flat."""
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 1e-9 else 0.0


def resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    img = Image.fromarray(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))
    return to_array(img, (w, h))


def edge_magnitude(lum: np.ndarray) -> np.ndarray:
    return np.hypot(ndimage.sobel(lum, axis=0), ndimage.sobel(lum, axis=1))


def hue_name(h: float) -> str:
    names = [(15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (200, "teal"), (255, "blue")]
    names += [(290, "purple"), (340, "magenta"), (360, "red")]
    return next(name for upper, name in names if h < upper)


def colour_name(rgb: np.ndarray) -> str:
    """A plain-language name for one RGB colour in [0, 1]."""
    lum, c = float(luminance(rgb)), float(chroma(rgb))
    if c < 0.12:
        return "black" if lum < 0.2 else "white" if lum > 0.8 else "gray"
    name = hue_name(float(hue_deg(rgb)))
    if name == "orange" and lum < 0.4:
        return "brown"
    if name == "red" and lum > 0.7:
        return "pink"
    return name


def circular_std_deg(h: np.ndarray) -> float:
    if h.size == 0:
        return 180.0
    rad = np.radians(h)
    r = math.hypot(float(np.cos(rad).mean()), float(np.sin(rad).mean()))
    return math.degrees(math.sqrt(-2 * math.log(max(r, 1e-12))))


def circular_mean_deg(h: np.ndarray) -> float:
    rad = np.radians(h)
    return math.degrees(math.atan2(float(np.sin(rad).mean()), float(np.cos(rad).mean()))) % 360


# --- What one pair shows ----------------------------------------------------------------------

GEOMETRY_PHRASES = {
    "flip_h": "mirror the image horizontally (left and right swapped)",
    "flip_v": "flip the image upside down (vertical mirror)",
    "rot90": "rotate the image 90 degrees counter-clockwise",
    "rot270": "rotate the image 90 degrees clockwise",
    "rot180": "rotate the image 180 degrees",
}


def geometric_candidates(src: np.ndarray) -> dict[str, np.ndarray]:
    out = {"identity": src, "flip_h": src[:, ::-1], "flip_v": src[::-1], "rot180": src[::-1, ::-1]}
    if src.shape[0] == src.shape[1]:
        out["rot90"] = np.rot90(src, 1)
        out["rot270"] = np.rot90(src, -1)
    return out


def detect_geometry(src: np.ndarray, tgt: np.ndarray) -> tuple[str, np.ndarray]:
    """The flip/rotation that best explains the target's layout, and the source aligned by it."""
    lt = luminance(tgt)
    scores = {k: abs(corr(luminance(v), lt)) for k, v in geometric_candidates(src).items()}
    best = max(scores, key=scores.get)
    if best != "identity" and clearly_better(scores[best], scores["identity"]):
        return best, geometric_candidates(src)[best]
    return "identity", src


def clearly_better(score: float, baseline: float) -> bool:
    """A transform explains the target: it matches well, and leaves at most a third of the mismatch
    the untransformed source leaves (so symmetric scenes, where both match, do not count)."""
    return (
        score > STRUCTURE_MATCH
        and (1 - score) * 3 < (1 - baseline)
        and score - baseline > STRUCTURE_MARGIN / 5
    )


def detect_frame(src: np.ndarray, tgt: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(width, colour) of a band along all four edges that changed while the inside did not."""
    h, w = src.shape[:2]
    diff = np.abs(tgt - src).max(axis=-1)
    changed = diff > CHANGED
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx))  # rings from the edge
    for width in range(1, max(2, min(h, w) // 4) + 1):
        band, inner, next_ring = dist < width, dist >= width + 1, dist == width
        colour = np.median(tgt[band], axis=0)
        uniform = float(np.abs(tgt[band] - colour).max(axis=-1).mean()) < 0.1
        sharp = diff[next_ring].mean() < 0.3 * diff[band].mean()  # a vignette fades in, a frame does not
        if changed[band].mean() >= 0.75 and changed[inner].mean() < 0.08 and sharp and uniform:
            return width, colour
    return None


def periodicity(img: np.ndarray) -> tuple[int, float]:
    """(k, score): the largest k in 2..4 whose 1/k-image shifts map the image onto itself."""
    lum = luminance(img)
    h, w = lum.shape
    best_k, best = 0, 0.0
    for k in (2, 3, 4):
        score = min(
            corr(lum, np.roll(lum, round(h / k), axis=0)), corr(lum, np.roll(lum, round(w / k), axis=1))
        )
        if score > 0.85:
            best_k, best = k, score  # a k-grid is also periodic at coarser shifts, so keep the largest
        elif best_k == 0:
            best = max(best, score)
    return best_k, best


def detect_scale(src: np.ndarray, tgt: np.ndarray) -> tuple[str, float] | None:
    """("shrink" | "enlarge", factor) when the target is the whole source rescaled about its centre.
    (Estimating the subject's own size from a background model misfired on textured scenes.)"""
    h, w = src.shape[:2]
    lt = luminance(tgt)
    for kind in ("shrink", "enlarge"):
        best, best_f = 0.0, 0.0
        for f in (0.5, 0.6, 0.7, 0.8):
            ch, cw = max(4, round(h * f)), max(4, round(w * f))
            y0, x0 = (h - ch) // 2, (w - cw) // 2
            if kind == "shrink":  # target centre = whole source, smaller
                a, b = luminance(resize(src, ch, cw)), lt[y0 : y0 + ch, x0 : x0 + cw]
                base = abs(corr(luminance(src)[y0 : y0 + ch, x0 : x0 + cw], b))
            else:  # whole target = source centre, larger
                a, b = luminance(resize(src[y0 : y0 + ch, x0 : x0 + cw], h, w)), lt
                base = abs(corr(luminance(src), lt))
            score = abs(corr(a, b))
            if clearly_better(score, base) and score > best:
                best, best_f = score, f
        if best_f:
            return kind, best_f if kind == "shrink" else 1 / best_f
    return None


@dataclass
class PairFindings:
    """What changed in one pair; names map to a parameter (colour, factor, ...) or None."""

    found: dict[str, object] = field(default_factory=dict)


def analyse_pair(source: Image.Image, target: Image.Image) -> PairFindings:
    src = to_array(source)
    tgt = to_array(target, (src.shape[1], src.shape[0]))
    out: dict[str, object] = {}

    geometry, aligned = detect_geometry(src, tgt)
    if geometry != "identity":
        out["geometry"] = geometry

    # Layout changes that make pixel-wise comparisons meaningless: tiling, then (no frame) scale.
    k, _ = periodicity(tgt)
    if k and periodicity(src)[0] == 0 and luminance(tgt).std() > 0.03:
        out["tiling"] = k
        return PairFindings(out)
    frame = detect_frame(aligned, tgt)
    if frame is None and geometry == "identity":
        scale = detect_scale(src, tgt)
        if scale is not None:
            out["scale"] = scale
            return PairFindings(out)

    # Where did it change? A frame along the edges, or the background around a kept subject.
    region = np.ones(src.shape[:2], bool)  # where colour and detail statistics are measured
    if frame is not None:
        width, colour = frame
        out["frame"] = colour_name(colour)
        region[:width], region[-width:], region[:, :width], region[:, -width:] = False, False, False, False
    elif vignette := _vignette(aligned, tgt):
        out.update(vignette)
        h, w = region.shape
        yy, xx = np.mgrid[0:h, 0:w]
        region = np.hypot((yy - (h - 1) / 2) / h, (xx - (w - 1) / 2) / w) < 0.25  # the untouched centre
    else:
        # The kept part is the subject when it is a compact inner region and everything around it,
        # border included, changed in a way no single colour mapping explains.
        changed = np.abs(tgt - aligned).max(axis=-1) > CHANGED
        subject = ~changed
        edge = np.zeros_like(changed)
        edge[:2], edge[-2:], edge[:, :2], edge[:, -2:] = True, True, True, True
        if (
            0.05 <= subject.mean() <= 0.7
            and changed[edge].mean() > 0.8
            and not _global_colour_map(aligned, tgt, subject)
        ):
            new_bg = tgt[changed]
            uniform = float(np.abs(new_bg - np.median(new_bg, axis=0)).max(axis=-1).mean()) < 0.08
            out["background"] = colour_name(np.median(new_bg, axis=0)) if uniform else None
            region = subject

    out.update(_colour_findings(aligned, tgt, region))
    if frame is None and "background" not in out and "vignette" not in out:
        detail = _detail_findings(aligned, tgt)
        if "edges" in detail:  # a line drawing replaces the tones; tone clauses would only confuse
            out = {k: v for k, v in out.items() if k in ("geometry", "grayscale")}
        out.update(detail)
    return PairFindings(out)


def _global_colour_map(src: np.ndarray, tgt: np.ndarray, subject: np.ndarray) -> bool:
    """Whether one colour mapping (affine in RGB), fitted on the background, also predicts the
    subject: then a global colour change merely left a neutral subject alone, nothing was replaced."""
    bg_s, bg_t = src[~subject], tgt[~subject]
    design = np.concatenate([bg_s, np.ones((len(bg_s), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, bg_t, rcond=None)
    fg_s = np.concatenate([src[subject], np.ones((int(subject.sum()), 1))], axis=1)
    return float(np.abs(fg_s @ coef - tgt[subject]).mean()) < 0.06


def tone_fit(ls: np.ndarray, lt: np.ndarray) -> tuple[float, float]:
    """Least-squares ``lt ~ a * ls + b`` over pixels: the global tone curve, as a line. Fit it on
    smoothed luminance where blur or grain may differ: they change the fine detail, not the tones."""
    var = float(ls.var())
    if var < 1e-8:
        return 1.0, float(lt.mean() - ls.mean())
    a = float(((ls - ls.mean()) * (lt - lt.mean())).mean()) / var
    return a, float(lt.mean() - a * ls.mean())


def _colour_findings(src: np.ndarray, tgt: np.ndarray, region: np.ndarray) -> dict[str, object]:
    """Colour and tone changes inside ``region`` (H, W) of the (aligned) source and the target."""
    out: dict[str, object] = {}
    s, t = src[region], tgt[region]  # (N, 3) pixels
    if s.shape[0] < 8:
        return out
    if np.abs(t - (1 - s)).mean() < 0.08 and np.abs(t - s).mean() > 0.2:
        return {"invert": None}
    cs, ct = chroma(s), chroma(t)
    ls, lt = luminance(s), luminance(t)
    coloured_s, coloured_t = cs > 0.05, ct > 0.02
    spread_s = circular_std_deg(hue_deg(s[coloured_s])) if coloured_s.mean() > 0.1 else 0.0
    spread_t = circular_std_deg(hue_deg(t[coloured_t]))
    monochrome = False
    if ct.mean() < GRAY_CHROMA and cs.mean() > 2 * GRAY_CHROMA:
        out["grayscale"] = None
        monochrome = True
    elif coloured_t.mean() > 0.5 and spread_t < 20 and spread_s > 2 * spread_t + 15:
        mean_hue = circular_mean_deg(hue_deg(t[coloured_t]))
        if 15 <= mean_hue <= 50 and ct.mean() < 0.35:
            out["sepia"] = None
        else:
            out["monotone"] = hue_name(mean_hue)
        monochrome = True
    if not monochrome:
        # Chromaticity (colour relative to brightness) fitted as t = k * s + v: k is the saturation
        # change, v a colour cast; a plain brightness gain changes neither.
        ns = s / (ls[:, None] + 0.05) - 1
        nt = t / (lt[:, None] + 0.05) - 1
        ns_c, nt_c = ns - ns.mean(axis=0), nt - nt.mean(axis=0)
        k = float((ns_c * nt_c).sum() / max(float((ns_c**2).sum()), 1e-9))
        v = nt.mean(axis=0) - k * ns.mean(axis=0)
        cast = (t.mean(axis=0) - s.mean(axis=0)) - (t.mean() - s.mean())  # in RGB units, for its size
        if np.abs(cast).max() > TINT_STEP and np.abs(v - v.mean()).max() > TINT_STEP:
            out["tint"] = hue_name(float(hue_deg(v - v.mean())))
        if float((ns_c**2).mean()) > 1e-4:
            if k > SATURATION_RATIO:
                out["saturation"] = "up"
            elif k < 1 / SATURATION_RATIO:
                out["saturation"] = "down"
    d_lum = float(lt.mean() - ls.mean())
    if abs(d_lum) > BRIGHTNESS_STEP:
        out["brightness"] = "up" if d_lum > 0 else "down"
    smooth_s, smooth_t = (
        ndimage.gaussian_filter(luminance(src), 2.0),
        ndimage.gaussian_filter(luminance(tgt), 2.0),
    )
    core = ndimage.binary_erosion(region, iterations=3)  # keep the smoothing away from changed borders
    core = core if core.sum() >= 16 else region
    a, b = tone_fit(smooth_s[core], smooth_t[core])
    pivot = b / (1 - a) if abs(1 - a) > 1e-6 else 0.0
    # A gain about black (pivot near 0) is a brightness change; about a mid tone it is contrast.
    if (a > CONTRAST_RATIO or a < 1 / CONTRAST_RATIO) and pivot > 0.15:
        out["contrast"] = "up" if a > 1 else "down"
    return out


def _is_line_drawing(ls: np.ndarray, tgt: np.ndarray) -> bool:
    """A plain light (or dark) sheet with sparse strokes where the source has edges."""
    lt = luminance(tgt)
    paper = float(np.median(lt))
    strokes = np.abs(lt - paper) > 0.15
    if not (paper > 0.75 or paper < 0.25) or not 0.02 < strokes.mean() < 0.45 or chroma(tgt).mean() > 0.1:
        return False
    edges = ndimage.gaussian_filter(edge_magnitude(ls), 1.0)
    return float(edges[strokes].mean()) > 1.2 * float(edges[~strokes].mean())


def _pixel_block(lum: np.ndarray) -> int:
    """The block size b when the image is flat inside b x b blocks with steps between them, else 0."""
    h, w = lum.shape
    dx, dy = np.abs(np.diff(lum, axis=1)), np.abs(np.diff(lum, axis=0))
    for b in (8, 6, 4, 3, 2):
        if h % b or w % b:
            continue
        edge_x, edge_y = (np.arange(w - 1) + 1) % b == 0, (np.arange(h - 1) + 1) % b == 0
        within = (dx[:, ~edge_x].mean() + dy[~edge_y].mean()) / 2
        between = (dx[:, edge_x].mean() + dy[edge_y].mean()) / 2
        if within < 0.003 and between > 4 * within + 0.01:
            return b
    return 0


def _detail_findings(src: np.ndarray, tgt: np.ndarray) -> dict[str, object]:
    ls, lt = luminance(src), luminance(tgt)
    if lt.std() < 0.02 or ls.std() < 0.02:
        return {}
    b = _pixel_block(lt)
    if b and not _pixel_block(ls):
        return {"pixelate": b}
    levels_s = len(np.unique(np.round(ls * 255)))
    levels_t = len(np.unique(np.round(lt * 255)))
    if levels_t <= 12 and levels_s >= 3 * levels_t:
        return {"posterize": levels_t}
    a, b0 = tone_fit(ls, lt)
    toned = a * ls + b0  # the source with the target's global tone curve: detail is judged against it
    es, et = edge_magnitude(toned), edge_magnitude(lt)
    same_layout = abs(corr(ls, lt))
    if same_layout < 0.4 and _is_line_drawing(ls, tgt):
        return {"edges": None}
    res_s = toned - ndimage.gaussian_filter(toned, 1.0)
    res_t = lt - ndimage.gaussian_filter(lt, 1.0)
    extra = res_t - res_s
    if extra.std() > 0.025 and abs(corr(extra, res_s)) < 0.3:
        return {"grain": None}
    ratio = (et.mean() + 1e-4) / (es.mean() + 1e-4)
    if same_layout > STRUCTURE_MATCH:
        if ratio < 0.75:
            return {"blur": None}
        if ratio > 1.3:
            return {"sharpen": None}
    return {}


def _vignette(src: np.ndarray, tgt: np.ndarray) -> dict[str, object]:
    h, w = src.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - (h - 1) / 2) / (h / 2), (xx - (w - 1) / 2) / (w / 2)) / math.sqrt(2)
    d = luminance(tgt) - luminance(src)
    edge, centre = d[r > 0.75].mean(), d[r < 0.3].mean()
    if abs(centre) > 0.05 or abs(edge - centre) < 0.1 or abs(corr(d, r)) < 0.7:  # smooth and radial
        return {}
    return {"vignette": "dark" if edge < centre else "light"}


# --- From findings to words -------------------------------------------------------------------


def aggregate(findings: list[PairFindings]) -> dict[str, object]:
    """Findings present in at least half of the pairs, with their most common parameter."""
    need = math.ceil(len(findings) / 2)
    keys: Counter[str] = Counter(k for f in findings for k in f.found)
    out: dict[str, object] = {}
    for key, count in keys.items():
        if count >= need:
            values = Counter(repr(f.found[key]) for f in findings if key in f.found)
            top = values.most_common(1)[0][0]
            out[key] = next(f.found[key] for f in findings if key in f.found and repr(f.found[key]) == top)
    return out


def _clauses(found: dict[str, object]) -> list[str]:
    c: list[str] = []
    if "geometry" in found:
        c.append(GEOMETRY_PHRASES[str(found["geometry"])])
    if "tiling" in found:
        k = found["tiling"]
        c.append(f"repeat the whole image as a {k}x{k} grid of tiles")
    if "scale" in found:
        kind, _ = found["scale"]
        c.append(
            "shrink the subject and show it smaller in the frame"
            if kind == "shrink"
            else "zoom in so the subject fills more of the frame"
        )
    if "frame" in found:
        c.append(f"add a solid {found['frame']} frame around the image border")
    if "background" in found:
        colour = found["background"]
        c.append(
            f"replace the background with a plain {colour} backdrop" if colour else "replace the background"
        )
    if "invert" in found:
        c.append("invert all colours like a photographic negative")
    if "grayscale" in found:
        c.append("convert the image to black and white (grayscale)")
    if "sepia" in found:
        c.append("give the image a brownish sepia tone like an old photograph")
    if "monotone" in found:
        c.append(f"tint the whole image in a single {found['monotone']} tone")
    if "tint" in found:
        hue = str(found["tint"])
        temp = "warm " if hue in ("red", "orange", "yellow") else "cool " if hue in ("teal", "blue") else ""
        c.append(f"apply a {temp}{hue} colour grade to the whole image")
    if "saturation" in found:
        c.append(
            "make the colours more saturated and vivid" if found["saturation"] == "up" else "mute the colours"
        )
    if "brightness" in found:
        c.append("brighten the image" if found["brightness"] == "up" else "darken the image")
    if "contrast" in found:
        c.append("raise contrast" if found["contrast"] == "up" else "lower contrast for a flat, faded look")
    detail = {
        "blur": "blur the whole image softly",
        "sharpen": "sharpen edges and fine details",
        "edges": "turn the image into a line drawing of its edges",
        "grain": "add fine film grain noise",
    }
    c += [phrase for key, phrase in detail.items() if key in found]
    if "posterize" in found:
        c.append("posterize it into a few flat colour bands")
    if "pixelate" in found:
        c.append("pixelate it into large square blocks")
    if "vignette" in found:
        c.append(
            "darken the corners with a vignette"
            if found["vignette"] == "dark"
            else "fade the corners to white"
        )
    return c


def _keep_clause(found: dict[str, object]) -> str:
    if {"geometry", "tiling", "scale"} & found.keys():
        return "keep the subject recognizable"
    if {"frame", "background"} & found.keys():
        return "keep the subject itself unchanged"
    return "keep the subject and composition unchanged"


def compose_prompt(found: dict[str, object], teacher_prompt: str = "") -> str:
    clauses = _clauses(found)
    teacher = " ".join(teacher_prompt.split()).rstrip(" .;:")
    if not clauses:
        body = "keep the subject recognizable"
        return (
            f"{teacher}; {body}."
            if teacher
            else "Apply the effect shown in the examples; keep the subject recognizable."
        )
    body = ", ".join(clauses + [_keep_clause(found)])
    if teacher:
        return f"{teacher}: {body}."
    return body[0].upper() + body[1:] + "."


def describe_effect(pairs: list[ImagePair], teacher_prompt: str = "") -> StudentPrompt:
    """A descriptive student prompt from what the pairs show, refining the teacher's rough prompt."""
    if not pairs:
        raise ValueError("Describing an effect needs at least one training pair.")
    found = aggregate([analyse_pair(src, tgt) for src, tgt in pairs])
    return StudentPrompt(text=compose_prompt(found, teacher_prompt), source=SOURCE)


# --- The general stream's fallback instruction --------------------------------------------------


def describe_instruction(image: Image.Image, seed: int | None = None) -> str:
    """One plausible edit instruction for an unlabelled image, chosen from its statistics: fix what
    looks off (dark, flat, dull), otherwise a general edit picked by ``seed`` (or the image itself)."""
    x = to_array(image)
    lum, c = luminance(x), chroma(x)
    if c.mean() < GRAY_CHROMA:
        return "Colorize the black and white image with natural colors."
    if lum.mean() < 0.3:
        return "Brighten the image while keeping the subject unchanged."
    if lum.mean() > 0.8:
        return "Darken the image slightly to recover detail in the bright areas."
    if lum.std() < 0.08:
        return "Increase the contrast of the image while keeping the subject unchanged."
    warm = float((x[..., 0] - x[..., 2]).mean()) > 0.05
    options = [
        "Convert the image to black and white.",
        "Make the colors more vivid.",
        "Mirror the image horizontally.",
        "Add a thin white frame around the image.",
        "Apply a cool blue color grade." if warm else "Apply a warm orange color grade.",
        "Blur the image slightly.",
        "Invert the colors of the image.",
        "Rotate the image 180 degrees.",
    ]
    if seed is None:  # stable per image: the same unlabelled image always gets the same instruction
        seed = int(np.round(x.mean(axis=(0, 1)) * 1000).astype(np.int64) @ np.array([1, 1009, 1009**2]))
    return options[np.random.default_rng(seed).integers(len(options))]
