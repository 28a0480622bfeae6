"""Offline metrics on EffectBench-mini, where the true effect output is known exactly.

- fidelity: PSNR and SSIM of an output against the requested effect's ground truth;
- effect accuracy / bad case: an output is a bad case when the requested effect's ground truth is not
  its nearest among every candidate (all effects of the collection, plus the untouched source), or
  when its fidelity falls below a floor (the analogue of the paper's MLLM-judged Bad Case Rate);
- subject consistency: SSIM of the colour-normalised luminance (structure, not palette) of output
  and ground truth: high when shapes and layout survive, whatever the colours.
Images are numpy arrays H x W x 3 in [0, 1] at one resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.metrics import structural_similarity

BAD_CASE_PSNR_FLOOR = 14.0  # dB: below this an output is a failed edit whatever it is nearest to


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse < 1e-10 else 10.0 * np.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b, channel_axis=2, data_range=1.0, win_size=7))


def _structure(x: np.ndarray) -> np.ndarray:
    lum = x @ np.array([0.299, 0.587, 0.114])
    return (lum - lum.mean()) / (lum.std() + 1e-3)


def subject_consistency(output: np.ndarray, truth: np.ndarray) -> float:
    a, b = _structure(output), _structure(truth)
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    return float(structural_similarity(a, b, data_range=max(hi - lo, 1e-6), win_size=7))


@dataclass
class ImageScore:
    psnr: float
    ssim: float
    consistency: float
    nearest: str  # the candidate whose ground truth is closest
    bad_case: bool


def score(
    output: np.ndarray, requested: str, candidates: dict[str, np.ndarray], floor: float = BAD_CASE_PSNR_FLOOR
) -> ImageScore:
    """Score one output; ``candidates`` maps effect names (and "source") to their ground truths."""
    truth = candidates[requested]
    dists = {k: float(np.mean((output - v) ** 2)) for k, v in candidates.items()}
    nearest = min(dists, key=dists.get)
    p = psnr(output, truth)
    return ImageScore(
        p, ssim(output, truth), subject_consistency(output, truth), nearest, nearest != requested or p < floor
    )


@dataclass
class Summary:
    n: int
    psnr: float
    ssim: float
    consistency: float
    accuracy: float
    bad_case_rate: float

    def as_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "psnr": self.psnr,
            "ssim": self.ssim,
            "consistency": self.consistency,
            "accuracy": self.accuracy,
            "bcr": self.bad_case_rate,
        }


def summarize(scores: list[ImageScore], requested: list[str]) -> Summary:
    if not scores:
        return Summary(0, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"))
    acc = np.mean([s.nearest == r for s, r in zip(scores, requested, strict=True)])
    return Summary(
        len(scores),
        float(np.mean([s.psnr for s in scores])),
        float(np.mean([s.ssim for s in scores])),
        float(np.mean([s.consistency for s in scores])),
        float(acc),
        float(np.mean([s.bad_case for s in scores])),
    )


@dataclass(frozen=True)
class PairedGap:
    """Mean per-image difference of two systems on the same sources and noise, with a bootstrap interval."""

    mean: float
    low: float
    high: float
    level: float
    n: int


def paired_gap(
    a: list[float],
    b: list[float],
    groups: list[str],
    draws: int = 5000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedGap:
    """``mean(a - b)`` over paired images and its bootstrap interval. Images are resampled within their
    group (effect), so each effect keeps the weight it has in the headline mean and the interval reflects
    the test images, not which effects the bench holds."""
    if not (len(a) == len(b) == len(groups)) or not a:
        raise ValueError(f"paired_gap needs equal, non-empty lists (got {len(a)}, {len(b)}, {len(groups)})")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    g = np.asarray(groups)
    strata = [d[g == k] for k in dict.fromkeys(groups)]
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    for i in range(draws):
        means[i] = sum(s[rng.integers(0, len(s), len(s))].sum() for s in strata) / len(d)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedGap(float(d.mean()), float(low), float(high), level, len(d))
