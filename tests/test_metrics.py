"""Offline bench metrics: fidelity, nearest-effect accuracy, bad cases, structure consistency."""

from __future__ import annotations

import numpy as np

from distill.metrics import psnr, score, subject_consistency, summarize


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
