"""Named LoRA adapters on the one transformer: switching, weights, trainability, fuse, delete."""

from __future__ import annotations

import pytest
import torch
from studio_fixtures import frozen_tiny, randomize_lora, velocity_inputs

from distill.backbones import adapters as A
from distill.backbones.base import Condition
from distill.backbones.tiny import TinyEditor


@pytest.fixture()
def editor() -> TinyEditor:
    return frozen_tiny()


@pytest.fixture()
def inputs() -> tuple[torch.Tensor, torch.Tensor, Condition]:
    return velocity_inputs()


def run(editor: TinyEditor, inputs) -> torch.Tensor:
    with torch.no_grad():
        return editor.predict_velocity(*inputs)


def test_adapter_changes_output_only_when_active(editor, inputs):
    tr = editor.transformer
    base = run(editor, inputs)
    params = A.add_lora(tr, "student", A.LoraSpec(rank=4, alpha=4))
    assert params and all(p.requires_grad for p in params)
    assert A.adapter_names(tr) == ["student"]
    assert A.active(tr) == ([], [])  # adding does not activate
    A.activate(tr, "student")
    assert torch.equal(run(editor, inputs), base)  # B = 0 at init: same as the base
    randomize_lora(tr, "student", 0)
    with_lora = run(editor, inputs)
    assert (with_lora - base).abs().max() > 1e-3
    assert A.active(tr) == (["student"], [1.0])
    A.activate(tr, None)
    assert A.active(tr) == ([], [])
    assert torch.equal(run(editor, inputs), base)
    A.activate(tr, [])
    assert torch.equal(run(editor, inputs), base)
    A.activate(tr, ["student"])
    assert torch.equal(run(editor, inputs), with_lora)


def test_names_are_checked(editor):
    tr = editor.transformer
    A.add_lora(tr, "student", A.LoraSpec(rank=2))
    with pytest.raises(ValueError, match="already exists"):
        A.add_lora(tr, "student")
    with pytest.raises(ValueError, match="contain no '.'"):
        A.add_lora(tr, "a.b")
    with pytest.raises(KeyError, match="teacher_9.*loaded adapters: \\['student'\\]"):
        A.activate(tr, "teacher_9")
    with pytest.raises(ValueError, match="1 adapters but 2 weights"):
        A.activate(tr, "student", [1.0, 2.0])


def test_using_restores_previous_set_and_weights(editor, inputs):
    tr = editor.transformer
    for i, name in enumerate(["student", "teacher_0"]):
        A.add_lora(tr, name, A.LoraSpec(rank=4))
        randomize_lora(tr, name, i)
    A.activate(tr, ["student"], [0.5])
    before = run(editor, inputs)
    with A.using(tr, "teacher_0"):
        assert A.active(tr) == (["teacher_0"], [1.0])
        teacher = run(editor, inputs)
        with A.using(tr, None):
            assert A.active(tr) == ([], [])
        assert A.active(tr) == (["teacher_0"], [1.0])
    assert not torch.equal(teacher, before)
    assert A.active(tr) == (["student"], [0.5])
    assert torch.equal(run(editor, inputs), before)
    with pytest.raises(RuntimeError, match="boom"), A.using(tr, "teacher_0"):
        raise RuntimeError("boom")
    assert A.active(tr) == (["student"], [0.5])


def grad_flags(transformer) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in transformer.named_parameters()}


def test_activate_never_changes_trainability(editor, inputs):
    tr = editor.transformer
    for i, name in enumerate(["student", "fake", "teacher_0"]):
        A.add_lora(tr, name, A.LoraSpec(rank=4))
        randomize_lora(tr, name, i)
    A.set_trainable(tr, ["student"])
    flags = grad_flags(tr)
    trainable = {n for n, f in flags.items() if f}
    assert trainable and all(".student." in n for n in trainable)
    assert len(trainable) == len(A.lora_parameters(tr, "student"))

    # PEFT's own switch would make the teacher trainable: the reason activate exists.
    tr.set_adapters("teacher_0")
    assert all(p.requires_grad for p in A.lora_parameters(tr, "teacher_0"))
    A.set_trainable(tr, ["student"])

    for names in (["teacher_0"], None, ["student", "fake"], ["fake"], ["student"]):
        A.activate(tr, names)
        assert grad_flags(tr) == flags
    with A.using(tr, ["teacher_0"], [0.7]):
        assert grad_flags(tr) == flags
        loss = editor.predict_velocity(*inputs).square().mean()
    assert loss.requires_grad is False  # only teacher (frozen) and base ran

    A.activate(tr, ["student", "teacher_0"])
    editor.predict_velocity(*inputs).square().mean().backward()
    # (the last block's text-stream outputs are discarded, so only block 0 has grads everywhere)
    block0 = [
        p for n, p in tr.named_parameters() if n.startswith("transformer_blocks.0.") and ".student." in n
    ]
    assert block0 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in block0)
    assert all(p.grad is None for p in A.lora_parameters(tr, "teacher_0"))
    assert all(p.grad is None for p in A.lora_parameters(tr, "fake"))

    A.set_trainable(tr, ["fake", "student"])
    assert all(p.requires_grad for p in A.lora_parameters(tr, "fake"))
    A.activate(tr, "teacher_0")
    assert all(p.requires_grad for p in A.lora_parameters(tr, "fake"))
    A.set_trainable(tr, [])
    assert not any(grad_flags(tr).values())


def test_add_and_delete_keep_other_flags_and_active_set(editor, inputs):
    tr = editor.transformer
    A.add_lora(tr, "teacher_0", A.LoraSpec(rank=4))
    randomize_lora(tr, "teacher_0", 0)
    A.set_trainable(tr, [])
    A.activate(tr, "teacher_0", [0.8])
    teacher = run(editor, inputs)
    A.add_lora(tr, "student", A.LoraSpec(rank=4))
    assert A.active(tr) == (["teacher_0"], [0.8])
    assert not any(p.requires_grad for p in A.lora_parameters(tr, "teacher_0"))
    assert torch.equal(run(editor, inputs), teacher)

    A.activate(tr, ["teacher_0", "student"], [0.8, 1.0])
    A.delete(tr, "student")
    assert A.adapter_names(tr) == ["teacher_0"]
    assert A.active(tr) == (["teacher_0"], [0.8])
    with pytest.raises(KeyError):
        A.lora_parameters(tr, "student")
    A.delete(tr, "teacher_0")
    assert A.adapter_names(tr) == [] and A.active(tr) == ([], [])
    base = run(editor, inputs)
    A.add_lora(tr, "teacher_0", A.LoraSpec(rank=2))  # the name is free again
    assert torch.equal(run(editor, inputs), base)


def test_two_weighted_adapters_equal_their_summed_delta(editor, inputs):
    """A rank-(4+4) adapter holding [wa*Ba, wb*Bb] @ [Aa; Ab] is the weighted sum of two adapters."""
    tr = editor.transformer
    spec = A.LoraSpec(rank=4, alpha=4, target_modules=("to_q", "to_v", "img_mlp.net.2"))
    A.add_lora(tr, "a", spec)
    A.add_lora(tr, "b", spec)
    A.add_lora(tr, "ab", A.LoraSpec(rank=8, alpha=8, target_modules=spec.target_modules))
    randomize_lora(tr, "a", 1, std=0.1)
    randomize_lora(tr, "b", 2, std=0.1)
    wa, wb = 0.5, -1.5
    with torch.no_grad():
        for layer in tr.modules():
            if hasattr(layer, "lora_A") and "ab" in layer.lora_A:
                layer.lora_A["ab"].weight.copy_(
                    torch.cat([layer.lora_A["a"].weight, layer.lora_A["b"].weight])
                )
                layer.lora_B["ab"].weight.copy_(
                    torch.cat([wa * layer.lora_B["a"].weight, wb * layer.lora_B["b"].weight], dim=1)
                )
    A.activate(tr, ["a", "b"], [wa, wb])
    mixed = run(editor, inputs)
    A.activate(tr, "ab")
    summed = run(editor, inputs)
    A.activate(tr, "a")
    only_a = run(editor, inputs)
    assert (mixed - only_a).abs().max() > 1e-3
    torch.testing.assert_close(mixed, summed, atol=1e-5, rtol=1e-5)
    # weights are per activation: activating without weights is back to 1.0 each
    A.activate(tr, ["a", "b"])
    plain = run(editor, inputs)
    A.activate(tr, ["a", "b"], [wa, wb])
    torch.testing.assert_close(run(editor, inputs), mixed, atol=0, rtol=0)
    assert (plain - mixed).abs().max() > 1e-3


def test_fuse_matches_unfused_and_unfuse_restores(editor, inputs):
    tr = editor.transformer
    base = run(editor, inputs)
    for i, name in enumerate(["student", "teacher_0"]):
        A.add_lora(tr, name, A.LoraSpec(rank=4, alpha=8))
        randomize_lora(tr, name, i)
    base_weights = {k: v.clone() for k, v in tr.state_dict().items() if "lora_" not in k}
    A.activate(tr, ["student", "teacher_0"], [1.0, 0.5])
    unfused = run(editor, inputs)
    A.fuse(tr, ["student", "teacher_0"], [1.0, 0.5])
    fused = run(editor, inputs)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=0)
    changed = [
        k for k, v in tr.state_dict().items() if k in base_weights and not torch.equal(v, base_weights[k])
    ]
    assert len(changed) == 2 * 12  # the LoRA went into every targeted base weight
    with pytest.raises(RuntimeError, match="unfuse"):
        A.activate(tr, None)
    with pytest.raises(RuntimeError, match="unfuse"):
        A.add_lora(tr, "fake")
    A.unfuse(tr)
    for k, v in tr.state_dict().items():
        if k in base_weights:
            torch.testing.assert_close(v, base_weights[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(editor, inputs), unfused, atol=1e-5, rtol=0)
    A.activate(tr, None)
    torch.testing.assert_close(run(editor, inputs), base, atol=1e-5, rtol=0)


def test_lora_state_dict_is_diffusers_layout_cloned_on_cpu(editor):
    tr = editor.transformer
    A.add_lora(tr, "student", A.LoraSpec(rank=4, target_modules=("to_q", "txt_mlp.net.2")))
    randomize_lora(tr, "student", 0)
    sd = A.lora_state_dict(tr, "student")
    assert sorted(sd) == sorted(
        f"transformer.transformer_blocks.{i}.{m}.lora_{ab}.weight"
        for i in range(2)
        for m in ("attn.to_q", "txt_mlp.net.2")
        for ab in "AB"
    )
    assert sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, 128)
    assert all(v.device.type == "cpu" for v in sd.values())
    key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    sd[key].zero_()
    assert A.lora_state_dict(tr, "student")[key].abs().sum() > 0


def _frozen_teachers(tr, names, seed=0):
    for i, n in enumerate(names):
        A.add_lora(tr, n, A.LoraSpec(rank=4, alpha=4))
        randomize_lora(tr, n, seed + i)
    A.set_trainable(tr, [])


def test_offload_moves_only_the_adapters_in_use_and_keeps_outputs(editor, inputs, monkeypatch):
    tr = editor.transformer
    _frozen_teachers(tr, ["t0", "t1", "t2"])
    expected = {}
    for n in ("t0", "t1", "t2"):
        A.activate(tr, n)
        expected[n] = run(editor, inputs)
    A.activate(tr, None)
    moves: list[tuple[str, str]] = []
    real_move = A._move
    monkeypatch.setattr(A, "_move", lambda t, n, d: (moves.append((n, d.type)), real_move(t, n, d)))
    A.offload(tr, ["t0", "t1", "t2"], keep=1)
    assert sorted(moves) == [("t0", "cpu"), ("t1", "cpu"), ("t2", "cpu")]
    home = next(p for n, p in tr.named_parameters() if ".lora_" not in n).device.type

    def step(names):
        moves.clear()
        A.activate(tr, names)
        return list(moves)

    assert step("t0") == [("t0", home)]
    assert torch.equal(run(editor, inputs), expected["t0"])
    assert step("t0") == []  # already there: a switch to the same teacher copies nothing
    assert step("t1") == [("t1", home), ("t0", "cpu")]  # keep=1: the other goes back
    assert torch.equal(run(editor, inputs), expected["t1"])
    assert sorted(step(["t0", "t2"])) == sorted([("t0", home), ("t2", home), ("t1", "cpu")])
    assert step(None) == [("t0", "cpu")]  # back to keep=1 resident, the least recently used out
    assert step(None) == []  # the base alone moves nothing
    assert A._state(tr).resident == ["t2"]
    A.offload(tr, ["t0"], keep=1)  # idempotent
    assert A._state(tr).offloaded == {"t0", "t1", "t2"}
    A.delete(tr, "t2")
    assert set(A.offloaded_devices(tr)) == {"t0", "t1"}


def test_offload_refuses_trainable_adapters_and_bad_keep(editor):
    tr = editor.transformer
    A.add_lora(tr, "student", A.LoraSpec(rank=4, alpha=4))
    with pytest.raises(ValueError, match="Trainable adapters cannot be offloaded"):
        A.offload(tr, "student")
    _frozen_teachers(tr, ["t0"])
    with pytest.raises(ValueError, match="keep"):
        A.offload(tr, "t0", keep=0)
    A.offload(tr, "t0")
    with pytest.raises(ValueError, match="Offloaded adapters cannot be trained"):
        A.set_trainable(tr, ["t0"])
    with pytest.raises(KeyError):
        A.offload(tr, "nope")
