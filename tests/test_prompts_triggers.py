"""Trigger words: format, uniqueness, determinism, and the centred-cosine orthogonality check."""

from __future__ import annotations

import hashlib
import random
import re

import pytest
import torch

from distill.prompts import student_condition
from distill.prompts.triggers import (
    assign_triggers,
    check_triggers,
    cosine_matrix,
    make_trigger,
    slugify,
)

DIM = 64
NAMES = ["grayscale", "sepia", "warm grade", "red frame", "tile 2x2", "shrink", "blur", "invert"]


def text_vector(text: str, salt: str = "") -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256((salt + text).encode()).digest()[:8], "little")
    return torch.randn(DIM, generator=torch.Generator().manual_seed(seed))


def random_embed(texts: list[str]) -> torch.Tensor:
    """Every text its own random direction: nearly orthogonal in 64 dims."""
    return torch.stack([text_vector(t) for t in texts])


def suffix(trigger: str) -> str:
    return trigger[1:-1].rsplit("_", 1)[1]


COLLIDE = text_vector("the shared direction", salt="collide")


def slug_of(text: str) -> str:
    return text[1:-1].rsplit("_", 1)[0] if text.startswith("<") else ""


OUR_SLUGS = {slugify(n) for n in NAMES} | {"old_a", "old_b"}  # not the reference words' slugs


def colliding_embed(texts: list[str]) -> torch.Tensor:
    """Our effects' triggers whose suffix starts with an upper-case letter all point the same way
    (plus a little noise); everything else is random. A redraw can fix a collision by drawing
    another suffix. The reference words the check centres on are unaffected."""
    rows = []
    for t in texts:
        if slug_of(t) in OUR_SLUGS and suffix(t)[0].isupper():
            rows.append(5 * COLLIDE + 0.3 * text_vector(t))
        else:
            rows.append(text_vector(t))
    return torch.stack(rows)


def test_make_trigger_format():
    rng = random.Random(0)
    trig = make_trigger("Warm Grade (v2)", rng)
    assert re.fullmatch(r"<warm_grade_v2_[A-Za-z0-9]{7}>", trig)
    suf = suffix(trig)
    assert any(c.isupper() for c in suf) and any(c.islower() for c in suf) and any(c.isdigit() for c in suf)
    assert slugify("1117_3dshatanpangchongwu") == "1117_3dshatanpangchongwu"  # Table 6 keeps the name
    assert slugify("Café Noir") == "cafe_noir"
    assert slugify("水彩") == "effect"
    assert student_condition(trig, "Apply a warm grade.") == f"{trig} Apply a warm grade."


def test_assignment_is_unique_and_deterministic():
    names = [f"grade {i}" for i in range(40)] + ["Grade 1!", "grade-1"]  # same slug for several
    a = assign_triggers(names, random_embed, seed=7)
    b = assign_triggers(names, random_embed, seed=7)
    c = assign_triggers(names, random_embed, seed=8)
    assert a.triggers == b.triggers
    assert a.triggers != c.triggers
    assert len(set(a.triggers.values())) == len(names)
    assert list(a.triggers) == names
    assert a.cosine.shape == (len(names), len(names))
    assert torch.allclose(a.cosine, b.cosine)


def test_cosine_matrix():
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    c = cosine_matrix(v)
    expected = torch.tensor([[1, 0, 2**-0.5], [0, 1, 2**-0.5], [2**-0.5, 2**-0.5, 1]])
    assert torch.allclose(c, expected, atol=1e-6)


def first_seed_with_collision(names, threshold=0.5):
    for seed in range(50):
        if (
            assign_triggers(names, colliding_embed, threshold=threshold, seed=seed, max_redraws=0).max_offdiag
            > threshold
        ):
            return seed
    raise AssertionError("the colliding embedding never collided")


def test_redraw_lowers_max_cosine():
    seed = first_seed_with_collision(NAMES)
    before = assign_triggers(NAMES, colliding_embed, threshold=0.5, seed=seed, max_redraws=0)
    after = assign_triggers(NAMES, colliding_embed, threshold=0.5, seed=seed, max_redraws=50)
    assert not before.ok and before.failing_pairs
    assert after.ok, after.report()
    assert 0 < after.redraws <= 50
    assert after.max_offdiag < before.max_offdiag
    assert after.max_offdiag <= 0.5
    # At most one trigger may still sit in the shared direction: any two there would collide.
    assert sum(suffix(t)[0].isupper() for t in after.triggers.values()) <= 1
    assert "distinct enough" in after.report()


def test_existing_triggers_are_kept_and_reported():
    rng = random.Random(1)
    # Two given triggers that collide in the embedding (upper-case first suffix letter).
    existing = {"old a": "<old_a_Qx12abc>", "old b": "<old_b_Zy34def>"}
    result = assign_triggers(
        NAMES[:4], colliding_embed, threshold=0.5, existing=existing, seed=3, max_redraws=30
    )
    assert result.names == NAMES[:4] + ["old a", "old b"]
    assert result.triggers["old a"] == existing["old a"] and result.triggers["old b"] == existing["old b"]
    assert not result.ok
    assert [(a, b) for a, b, _ in result.failing_pairs] == [("old a", "old b")]
    report = result.report()
    assert "<old_a_Qx12abc> (old a) and <old_b_Zy34def> (old b)" in report
    assert "both kept as given" in report
    # The new triggers were redrawn away from the shared direction, the old ones were not touched.
    assert not any(suffix(result.triggers[n])[0].isupper() for n in NAMES[:4])
    # An existing trigger in use is never handed to a new effect.
    new = assign_triggers(["x"], random_embed, existing={"y": make_trigger("x", rng)}, seed=0)
    assert new.triggers["x"] != new.triggers["y"]


def test_gives_up_after_max_redraws_and_names_the_pairs():
    def hopeless(texts):  # every trigger of ours points the same way, whatever its suffix
        return torch.stack(
            [COLLIDE + 0.01 * text_vector(t) if slug_of(t) in OUR_SLUGS else text_vector(t) for t in texts]
        )

    result = assign_triggers(NAMES[:3], hopeless, threshold=0.5, seed=0, max_redraws=5)
    assert result.redraws == 5
    assert not result.ok
    assert len(result.failing_pairs) == 3
    report = result.report()
    assert "3 pair(s) of trigger words are too similar" in report
    for name in NAMES[:3]:
        assert f"({name})" in report


def test_check_is_relative_to_the_encoder_common_direction():
    """An encoder that puts everything in one narrow cone (raw cosines ~0.98) still passes when the
    triggers are unrelated: the check centres on the reference words' mean first."""
    common = text_vector("cone")

    def coned(texts):
        return torch.stack([8 * common + text_vector(t) for t in texts])

    triggers = assign_triggers(NAMES, random_embed, seed=0, max_redraws=0).triggers
    raw = cosine_matrix(coned(list(triggers.values())))
    assert raw[~torch.eye(len(NAMES), dtype=torch.bool)].min() > 0.9
    check = check_triggers(triggers, coned)
    assert check.ok, check.report()
    assert check.max_offdiag < 0.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="unique"):
        assign_triggers(["a", "a"], random_embed)
    with pytest.raises(ValueError, match="same trigger"):
        check_triggers({"a": "<x_Ab1cdef>", "b": "<x_Ab1cdef>"}, random_embed)
    with pytest.raises(ValueError, match="one vector per text"):
        assign_triggers(["a", "b"], lambda texts: torch.zeros(1, 4))


def test_with_a_tiny_real_text_encoder():
    """The tiny backbone's kind of text encoder (ByT5 bytes into a small random T5), mean-pooled."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    model = T5EncoderModel(
        T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    ).eval()

    def embed(texts):
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch.attention_mask.unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    names = NAMES + ["vignette", "pixelate", "posterize", "sharpen"]
    first = assign_triggers(names, embed, seed=0, max_redraws=0)
    result = assign_triggers(names, embed, seed=0, max_redraws=40)
    assert len(set(result.triggers.values())) == len(names)
    assert result.redraws <= 40
    assert result.max_offdiag <= first.max_offdiag  # a redraw is kept only when it helps
    assert result.ok == (result.max_offdiag <= result.threshold)
