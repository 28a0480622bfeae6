"""The tiny backbone: packing, the edit interface, the frozen text cache."""

from __future__ import annotations

import torch

from distill.backbones.tiny import TinyConfig, TinyEditor, pack, unpack


def _editor() -> TinyEditor:
    e = TinyEditor.random(TinyConfig(num_layers=1, num_heads=2, head_dim=16, text_dim=32, text_layers=1))
    e.freeze()
    return e


def test_pack_unpack_round_trip() -> None:
    x = torch.randn(2, 3, 32, 32)
    tokens = pack(x, 4)
    assert tokens.shape == (2, 64, 48)
    torch.testing.assert_close(unpack(tokens, 32, 32, 4), x)


def test_velocity_depends_on_source_and_prompt() -> None:
    e = _editor()
    src = torch.rand(2, 3, 32, 32) * 2 - 1
    x = torch.randn(2, 3, 32, 32)
    s = torch.full((2,), 0.5)
    with torch.no_grad():
        v = e.predict_velocity(x, s, e.encode_prompt(["Make it red.", "Flip it."], src))
        v_src = e.predict_velocity(x, s, e.encode_prompt(["Make it red.", "Flip it."], -src))
        v_txt = e.predict_velocity(x, s, e.encode_prompt(["Make it blue.", "Flip it."], src))
    assert v.shape == x.shape
    assert not torch.allclose(v, v_src)
    assert not torch.allclose(v[0], v_txt[0]) and torch.allclose(v[1], v_txt[1], atol=1e-5)


def test_frozen_text_cache_equals_direct_encoding() -> None:
    e = _editor()
    prompts = ["<fx_Ab3> tint red", "", "a much longer instruction " * 3, "<fx_Ab3> tint red"]
    cached, mask = e.encode_text(prompts)
    e.text_encoder.train()  # not frozen: the direct path
    tok = e.tokenize(prompts)
    with torch.no_grad():
        direct = e.text_encoder(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
        ).last_hidden_state
    torch.testing.assert_close(mask, tok["attention_mask"])
    torch.testing.assert_close(cached * mask[..., None], direct * mask[..., None], atol=1e-5, rtol=1e-5)
    assert len(e._text_cache) == 3


def test_padded_text_changes_no_prediction_and_compiled_calls_pad_to_buckets() -> None:
    from distill.backbones.base import TEXT_BUCKET

    bb = TinyEditor.random(TinyConfig(num_layers=1, num_heads=2, head_dim=16, text_dim=32, text_layers=1))
    bb.freeze()
    src = torch.rand(2, 3, 32, 32) * 2 - 1
    cond = bb.encode_prompt(["Sepia.", "Make it a pop-art grid of four copies."], src)
    x, s = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        a = bb.predict_velocity(x, s, cond)
        b = bb.predict_velocity(x, s, cond.padded(cond.embeds.shape[1] + 21))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert bb._text_for_call(cond) is cond  # eager calls keep the text as it is
    bb._use_compiled = True
    assert bb._text_for_call(cond).embeds.shape[1] % TEXT_BUCKET == 0
