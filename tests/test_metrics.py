"""Offline bench metrics: fidelity, nearest-effect accuracy, bad cases, structure consistency."""

from __future__ import annotations

import numpy as np
import pytest

from distill.metrics import paired_gap, psnr, score, subject_consistency, summarize


def _img(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((32, 32, 3)).astype(np.float32)


def test_psnr_and_identity() -> None:
    a = _img(0)
    assert psnr(a, a) == 100.0
    assert abs(psnr(a, np.clip(a + 0.1, 0, 1)) - 20.0) < 1.5


def test_nearest_effect_decides_the_bad_case() -> None:
    src = _img(1)
    cands = {"source": src, "invert": 1 - src, "dark": src * 0.3}
    good = score(np.clip(1 - src + 0.01, 0, 1), "invert", cands)
    assert good.nearest == "invert" and not good.bad_case and good.psnr > 30
    bleed = score(src * 0.32, "invert", cands)  # the wrong effect applied
    assert bleed.nearest == "dark" and bleed.bad_case
    nothing = score(src, "invert", cands)  # the effect not applied at all
    assert nothing.nearest == "source" and nothing.bad_case
    s = summarize([good, bleed, nothing], ["invert"] * 3)
    assert abs(s.accuracy - 1 / 3) < 1e-9 and abs(s.bad_case_rate - 2 / 3) < 1e-9


def test_floor_makes_a_far_output_a_bad_case_even_if_nearest() -> None:
    src = _img(2)
    cands = {"source": src, "invert": 1 - src}
    far = score(np.full_like(src, 0.5), "invert", {"invert": 1 - src})
    assert far.bad_case and far.nearest == "invert"
    assert score(1 - src, "invert", cands, floor=10).bad_case is False


def test_consistency_ignores_palette_but_not_structure() -> None:
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    shape = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1).astype(np.float32)
    a = np.stack([shape, shape * 0.5, 1 - shape], axis=2)
    recoloured = np.stack([shape * 0.2, shape, shape * 0.9], axis=2)
    other = np.roll(a, 9, axis=1)
    assert subject_consistency(recoloured, a) > 0.9
    assert subject_consistency(other, a) < 0.6


def test_paired_gap_interval_covers_a_true_shift_and_excludes_zero_only_when_it_should() -> None:
    rng = np.random.default_rng(1)
    groups = [g for g in ("sepia", "glitch", "swirl") for _ in range(40)]
    # per-effect levels far apart (what an unpaired comparison would drown in), paired noise small
    base = [{"sepia": 35.0, "glitch": 22.0, "swirl": 15.0}[g] + rng.normal(0, 3) for g in groups]
    shifted = [b - 0.5 + rng.normal(0, 0.3) for b in base]
    g = paired_gap(shifted, base, groups)
    assert g.n == 120 and g.level == 0.95
    assert g.mean == pytest.approx(np.mean(np.subtract(shifted, base)))
    assert g.low < -0.5 < g.high and g.high < 0  # the true shift inside, zero outside
    same = [b + rng.normal(0, 0.3) for b in base]
    h = paired_gap(same, base, groups)
    assert h.low < 0 < h.high
    assert paired_gap(shifted, base, groups) == g  # seeded: the same interval every run


def test_paired_gap_resamples_within_effects() -> None:
    # one effect 10 dB worse on every image, the other equal: each draw keeps both effects' images in
    # proportion, so the interval has no width; resampling across effects would give it some
    groups = ["a"] * 10 + ["b"] * 10
    base = [20.0] * 20
    other = [10.0] * 10 + [20.0] * 10
    g = paired_gap(other, base, groups, draws=200)
    assert g.mean == g.low == g.high == -5.0


def test_paired_gap_rejects_unpaired_lists() -> None:
    with pytest.raises(ValueError, match="equal"):
        paired_gap([1.0, 2.0], [1.0], ["a", "a"])
    with pytest.raises(ValueError, match="non-empty"):
        paired_gap([], [], [])
