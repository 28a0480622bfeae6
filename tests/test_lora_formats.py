"""LoRA files: save/load round trips, foreign key layouts, diffusers interop, and the errors curators see."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import QwenImagePipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from studio_fixtures import frozen_tiny, randomize_lora, velocity_inputs

from distill.backbones import adapters as A
from distill.backbones.base import Condition
from distill.backbones.lora_formats import LoraFormatError, detect_format, to_diffusers, to_kohya
from distill.backbones.tiny import TinyConfig, TinyEditor


@pytest.fixture()
def inputs() -> tuple[torch.Tensor, torch.Tensor, Condition]:
    return velocity_inputs()


def run(editor: TinyEditor, inputs, names=None) -> torch.Tensor:
    A.activate(editor.transformer, names)
    with torch.no_grad():
        return editor.predict_velocity(*inputs)


def trained(
    rank: int = 4, alpha: float = 8.0, config: TinyConfig | None = None, name: str = "student"
) -> TinyEditor:
    """An editor with one adapter whose A and B are random (as if trained)."""
    ed = frozen_tiny(config)
    A.add_lora(ed.transformer, name, A.LoraSpec(rank=rank, alpha=alpha))
    randomize_lora(ed.transformer, name, seed=3, std=0.05)
    return ed


@pytest.fixture(scope="module")
def source() -> TinyEditor:
    return trained()


def load_and_run(sd_or_path, inputs, **kw) -> tuple[A.LoadReport, torch.Tensor]:
    ed = frozen_tiny()
    report = A.load_lora(ed.transformer, sd_or_path, "loaded", **kw)
    assert A.active(ed.transformer) == ([], [])  # loading does not activate
    assert not any(p.requires_grad for p in ed.transformer.parameters())  # loaded adapters are frozen
    return report, run(ed, inputs, "loaded")


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_round_trip_reproduces_outputs_exactly(source, inputs, tmp_path, fmt):
    expected = run(source, inputs, "student")
    assert (expected - run(source, inputs)).abs().max() > 1e-3
    path = A.save_lora(
        source.transformer, "student", tmp_path / "fx.safetensors", {"effect": "sepia"}, fmt=fmt
    )
    assert [p.name for p in tmp_path.iterdir()] == ["fx.safetensors"]  # no temp file left behind
    report, out = load_and_run(path, inputs)
    assert torch.equal(out, expected)  # alpha 8 / rank 4 restored: a scale of 1 would differ
    assert (report.format_detected, report.rank, report.alpha, report.matched_modules) == (fmt, 4, 8.0, 24)
    assert report.n_tensors == (48 if fmt == "diffusers" else 72)
    assert report.metadata["effect"] == "sepia" and report.metadata["lora_rank"] == "4"
    assert report.ignored_keys == ()
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    if fmt == "kohya":
        stem = "lora_unet_transformer_blocks_1_attn_to_out_0"
        assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= keys
        assert A.read_lora_file(path)[0][f"{stem}.alpha"].item() == 8.0
    else:
        assert "transformer.transformer_blocks.1.img_mlp.net.0.proj.lora_B.weight" in keys


def test_save_overwrites_atomically_in_bf16_and_guards_metadata(source, inputs, tmp_path):
    path = tmp_path / "out" / "fx.safetensors"
    A.save_lora(source.transformer, "student", path)
    A.save_lora(source.transformer, "student", path, dtype=torch.bfloat16)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fx.safetensors"]
    tensors, _ = A.read_lora_file(path)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    _, out = load_and_run(path, inputs)
    torch.testing.assert_close(out, run(source, inputs, "student"), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="written by save_lora"):
        A.save_lora(source.transformer, "student", path, {"lora_alpha": "1"})
    with pytest.raises(TypeError, match="str to str"):
        A.save_lora(source.transformer, "student", path, {"steps": 5})


def test_diffusers_pipeline_files_load_both_ways(source, inputs, tmp_path):
    tr = source.transformer
    expected = run(source, inputs, "student")
    # a LoRA written by diffusers itself loads here ...
    QwenImagePipeline.save_lora_weights(
        tmp_path / "hf",
        transformer_lora_layers=get_peft_model_state_dict(tr, adapter_name="student"),
        transformer_lora_adapter_metadata=tr.peft_config["student"].to_dict(),
    )
    report, out = load_and_run(tmp_path / "hf" / "pytorch_lora_weights.safetensors", inputs)
    assert report.format_detected == "diffusers" and (report.rank, report.alpha) == (4, 8.0)
    assert torch.equal(out, expected)

    # ... and our files load in diffusers (its LoRA loader, the key converter it applies to kohya files)
    for fmt, exact in (("diffusers", True), ("kohya", False)):
        A.save_lora(tr, "student", tmp_path / "ours" / f"{fmt}.safetensors", fmt=fmt)
        sd, meta = QwenImagePipeline.lora_state_dict(
            str(tmp_path / "ours"), weight_name=f"{fmt}.safetensors", return_lora_metadata=True
        )
        ed = frozen_tiny()
        ed.transformer.load_lora_adapter(sd, prefix="transformer", adapter_name="hf", metadata=meta)
        ed.transformer.set_adapters("hf")
        with torch.no_grad():
            out = ed.predict_velocity(*inputs)
        if exact:  # alpha from our metadata
            assert torch.equal(out, expected)
        else:  # diffusers bakes alpha / rank into the weights
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_rslora_metadata_is_converted_to_plain_alpha(source, inputs, tmp_path):
    """rsLoRA scales by alpha / sqrt(r): alpha 4 at rank 4 is the plain alpha 8 of ``source``."""
    config = {"transformer.r": 4, "transformer.lora_alpha": 4, "transformer.use_rslora": True}
    save_file(
        A.lora_state_dict(source.transformer, "student"),
        tmp_path / "rs.safetensors",
        metadata={"lora_adapter_metadata": json.dumps(config)},
    )
    report, out = load_and_run(tmp_path / "rs.safetensors", inputs)
    assert report.alpha == 8.0
    assert torch.equal(out, run(source, inputs, "student"))


def test_ai_toolkit_layout_loads(inputs):
    source = trained(rank=4, alpha=4.0)  # ai-toolkit files carry no alpha: alpha = rank
    sd = {
        k.replace("transformer.", "diffusion_model.", 1): v
        for k, v in A.lora_state_dict(source.transformer, "student").items()
    }
    assert detect_format(sd) == "ai-toolkit"
    report, out = load_and_run(sd, inputs)
    assert (report.format_detected, report.rank, report.alpha, report.n_tensors) == ("ai-toolkit", 4, 4.0, 48)
    assert torch.equal(out, run(source, inputs, "student"))


@pytest.mark.parametrize("prefix", ["diffusion_model.", ""])
def test_lightx2v_layout_loads(source, inputs, tmp_path, prefix):
    """Lightning-style files: ``lora_down``/``lora_up`` with an ``alpha`` per layer (bf16 scalars)."""
    sd = {}
    for k, v in A.lora_state_dict(source.transformer, "student").items():
        module = k.removeprefix("transformer.").rsplit(".", 2)[0]
        part = "lora_down" if ".lora_A." in k else "lora_up"
        sd[f"{prefix}{module}.{part}.weight"] = v
        sd[f"{prefix}{module}.alpha"] = torch.tensor(8.0, dtype=torch.bfloat16)
    save_file(sd, tmp_path / "lightning.safetensors")
    report, out = load_and_run(tmp_path / "lightning.safetensors", inputs)
    assert (report.format_detected, report.rank, report.alpha, report.n_tensors) == ("lightx2v", 4, 8.0, 72)
    assert torch.equal(out, run(source, inputs, "student"))


def test_peft_default_keys_and_mixed_ranks_load(inputs, tmp_path):
    source = trained(rank=4, alpha=8.0)
    plain = A.lora_state_dict(source.transformer, "student")
    # one layer with another rank, as a hand-made or pruned LoRA might have
    layer = "transformer_blocks.0.attn.to_k"
    g = torch.Generator().manual_seed(5)
    a2, b2 = torch.randn(2, 128, generator=g) * 0.05, torch.randn(128, 2, generator=g) * 0.05
    mixed = {**plain, f"transformer.{layer}.lora_A.weight": a2, f"transformer.{layer}.lora_B.weight": b2}
    peft_style = {
        "base_model.model." + k.removeprefix("transformer.").replace(".weight", ".default.weight"): v
        for k, v in mixed.items()
    }
    assert detect_format(peft_style) == "peft"
    ed = frozen_tiny()
    report = A.load_lora(ed.transformer, peft_style, "mixed", alpha=8.0)
    assert (report.format_detected, report.rank, report.alpha, report.matched_modules) == ("peft", 4, 8.0, 24)
    target = ed.transformer.get_submodule(layer)
    assert (target.r["mixed"], target.scaling["mixed"]) == (2, 4.0)  # alpha 8 over rank 2
    out = run(ed, inputs, "mixed")

    # the same delta at rank 4 (zero-padded, B doubled for the halved scale) gives the same output
    padded = {
        **plain,
        f"transformer.{layer}.lora_A.weight": torch.cat([a2, torch.zeros(2, 128)]),
        f"transformer.{layer}.lora_B.weight": torch.cat([2 * b2, torch.zeros(128, 2)], dim=1),
    }
    _, out_padded = load_and_run(padded, inputs, alpha=8.0)
    torch.testing.assert_close(out, out_padded, atol=1e-6, rtol=0)
    assert (out - run(source, inputs, "student")).abs().max() > 1e-4

    # per-layer rank and alpha survive a save and reload in both layouts
    for fmt in ("diffusers", "kohya"):
        path = A.save_lora(ed.transformer, "mixed", tmp_path / f"mixed_{fmt}.safetensors", fmt=fmt)
        _, again = load_and_run(path, inputs)
        assert torch.equal(again, out)


def test_detect_format_and_key_conversion():
    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    m = "transformer_blocks.0.attn.add_q_proj"
    assert detect_format([f"transformer.{m}.lora_A.weight"]) == "diffusers"
    assert detect_format([f"{m}.lora_A.weight"]) == "diffusers"
    assert detect_format([f"{m}.lora_A.default.weight"]) == "peft"
    assert detect_format([f"diffusion_model.{m}.lora_A.weight"]) == "ai-toolkit"
    assert detect_format([f"diffusion_model.{m}.lora_down.weight"]) == "lightx2v"
    assert detect_format(["lora_unet_transformer_blocks_0_attn_add_q_proj.lora_down.weight"]) == "kohya"
    assert detect_format(["img_in.weight", "x.alpha"]) == "unknown"

    diffusers = {
        f"transformer.transformer_blocks.3.{m}.lora_{ab}.weight": t
        for m in ("attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1")
        for ab, t in (("A", a), ("B", b))
    }
    kohya = to_kohya(diffusers, {k.split(".", 1)[1].rsplit(".", 2)[0]: 2.0 for k in diffusers})
    assert "lora_unet_transformer_blocks_3_img_mlp_net_0_proj.lora_down.weight" in kohya
    back = to_diffusers(kohya, "kohya")
    assert sorted(back.state_dict) == sorted(diffusers)
    assert all(back.state_dict[k] is v for k, v in diffusers.items())  # tensors pass through untouched
    assert back.alphas == {k.split(".", 1)[1].rsplit(".", 2)[0]: 2.0 for k in diffusers}
    with pytest.raises(LoraFormatError, match="Expected a kohya LoRA"):
        to_diffusers(diffusers, "kohya")


def test_refuses_pickles(source, tmp_path):
    sd = A.lora_state_dict(source.transformer, "student")
    for name in ("fx.pt", "fx.bin", "fx.ckpt", "fx.safetensors"):
        torch.save(sd, tmp_path / name)  # the last one: a pickle under a safetensors name
        with pytest.raises(
            LoraFormatError, match="must be .safetensors; pickled files can run code and are refused"
        ):
            A.load_lora(frozen_tiny().transformer, tmp_path / name, "x")


def test_truncated_and_garbage_files(source, tmp_path):
    path = A.save_lora(source.transformer, "student", tmp_path / "fx.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    tr = frozen_tiny().transformer
    with pytest.raises(LoraFormatError, match="not a readable .safetensors file; it may be truncated"):
        A.load_lora(tr, path, "x")
    path.write_bytes(b"this is a text file, not weights" * 10)
    with pytest.raises(LoraFormatError, match="not a readable .safetensors file"):
        A.load_lora(tr, path, "x")
    with pytest.raises(LoraFormatError, match="not found"):
        A.load_lora(tr, tmp_path / "missing.safetensors", "x")
    assert A.adapter_names(tr) == []  # nothing half-loaded


def test_lora_for_another_model_is_named_as_such(tmp_path):
    flux = {
        f"transformer.single_transformer_blocks.{i}.attn.to_{p}.lora_{ab}.weight": torch.zeros(4, 4)
        for i in range(20)
        for p in "qkv"
        for ab in "AB"
    }
    save_file(flux, tmp_path / "flux_style.safetensors")
    sdxl = {
        f"lora_unet_down_blocks_{i}_attentions_0_transformer_blocks_0_attn1_to_q.{p}": torch.ones(4, 4)
        for i in range(3)
        for p in ("lora_down.weight", "lora_up.weight")
    }
    tr = frozen_tiny().transformer
    with pytest.raises(LoraFormatError) as err:
        A.load_lora(tr, tmp_path / "flux_style.safetensors", "x")
    assert str(err.value) == (
        "None of the 120 tensors in flux_style.safetensors match this backbone's layers; is it a LoRA for "
        "another model (e.g. Flux/SDXL)?"
    )
    with pytest.raises(LoraFormatError, match="None of the 6 tensors in the state dict match"):
        A.load_lora(tr, sdxl, "x")
    with pytest.raises(LoraFormatError, match="None of the 2 tensors"):
        A.load_lora(tr, {"img_in.weight": torch.zeros(1), "proj_out.bias": torch.zeros(1)}, "x")
    assert A.adapter_names(tr) == []


def test_wrong_shapes_name_the_layer_and_both_shapes(tmp_path):
    big = trained(config=TinyConfig(num_layers=2, head_dim=64))  # a 256-wide model's LoRA
    path = A.save_lora(big.transformer, "student", tmp_path / "big.safetensors")
    tr = frozen_tiny().transformer
    with pytest.raises(LoraFormatError) as err:
        A.load_lora(tr, path, "x")
    msg = str(err.value)
    assert msg.startswith("big.safetensors does not fit this backbone: layer transformer_blocks.0.")
    assert "lora_A (4, 256)" in msg and "weight is (128, 128)" in msg
    assert "different model or model size" in msg
    assert A.adapter_names(tr) == []


def test_extra_and_unpaired_keys(source, inputs):
    sd = A.lora_state_dict(source.transformer, "student")
    deeper = {
        "transformer.transformer_blocks.5.attn.to_q.lora_A.weight": torch.zeros(4, 128),
        "transformer.transformer_blocks.5.attn.to_q.lora_B.weight": torch.zeros(128, 4),
    }
    extra = {
        "transformer.transformer_blocks.0.attn.norm_q.diff": torch.zeros(32),
        "training_step": torch.tensor(9),
    }
    with pytest.warns(UserWarning, match="4 tensors do not belong to this backbone's LoRA layers") as rec:
        report, out = load_and_run({**sd, **deeper, **extra}, inputs, alpha=8.0)
    assert "training_step" in str(rec[0].message)
    assert set(report.ignored_keys) == set(deeper) | set(extra)
    assert torch.equal(out, run(source, inputs, "student"))

    del sd["transformer.transformer_blocks.1.attn.to_k.lora_B.weight"]
    with pytest.raises(LoraFormatError, match="transformer_blocks.1.attn.to_k has a down .* but no up"):
        A.load_lora(frozen_tiny().transformer, sd, "x")


def test_load_refuses_taken_name_and_keeps_state(source, inputs):
    ed = frozen_tiny()
    sd = A.lora_state_dict(source.transformer, "student")
    A.load_lora(ed.transformer, sd, "teacher_0")
    A.add_lora(ed.transformer, "student")
    A.set_trainable(ed.transformer, ["student"])
    A.activate(ed.transformer, "teacher_0", [0.5])
    A.load_lora(ed.transformer, sd, "teacher_1")
    assert A.active(ed.transformer) == (["teacher_0"], [0.5])
    trainable = {n.split(".")[-2] for n, p in ed.transformer.named_parameters() if p.requires_grad}
    assert trainable == {"student"}
    with pytest.raises(ValueError, match="already exists"):
        A.load_lora(ed.transformer, sd, "teacher_0")


def test_valid_file_whose_header_length_looks_like_a_pickle_loads(tmp_path) -> None:
    """A safetensors file starts with its header length: a length ending in 0x80 (or "PK") is valid."""
    import struct

    from safetensors.torch import save_file

    from distill.backbones.adapters import read_lora_file

    t = {"transformer.x.lora_A.weight": torch.zeros(2, 4)}
    for pad in range(0, 400):
        f = tmp_path / "probe.safetensors"
        save_file(t, str(f), metadata={"pad": "x" * pad})
        if f.read_bytes()[:1] == b"\x80":
            break
    else:
        raise AssertionError("no padding gave a 0x80 first byte")
    assert struct.unpack("<Q", f.read_bytes()[:8])[0] % 256 == 0x80
    tensors, meta = read_lora_file(f)
    assert set(tensors) == set(t) and meta["pad"] == "x" * pad
