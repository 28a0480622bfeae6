"""LoRA file key layouts for the Qwen-Image transformer, and conversion to and from diffusers' layout.

The layouts met in the wild (all describe the same thing: per linear layer a down matrix A (r, in),
an up matrix B (out, r) and optionally an alpha, the effect being ``alpha / r * B @ A``):

- ``diffusers``: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` (or bare ``<module>...``);
  alpha lives in the file's ``lora_adapter_metadata`` (a PEFT ``LoraConfig``), if anywhere.
- ``peft``: the same with the adapter name left in (``lora_A.default.weight``) or a
  ``base_model.model.`` prefix.
- ``ai-toolkit``: ``diffusion_model.<module>.lora_A.weight`` (also what ComfyUI writes).
- ``kohya``: ``lora_unet_<module path with _>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``
  (what ComfyUI reads for Qwen-Image).
- ``lightx2v``: ``<module>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha`` with
  ``diffusion_model.`` or bare ``transformer_blocks.`` names.

Module names are mapped with diffusers' own Qwen converter; alphas are kept aside (not baked into the
weights as diffusers does) so a loaded LoRA keeps its rank/alpha and saves back unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

FORMATS = ("diffusers", "peft", "ai-toolkit", "kohya", "lightx2v")
PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet_"

# suffix -> which LoRA matrix it holds
_DOWN = (".lora_A.weight", ".lora_down.weight", ".lora_A.default.weight")
_UP = (".lora_B.weight", ".lora_up.weight", ".lora_B.default.weight")
_ALPHA = ".alpha"
# prefixes that diffusers' converter does not know and that only wrap the module path
_WRAPPERS = ("base_model.model.", PREFIX)


class LoraFormatError(ValueError):
    """A LoRA file or state dict that cannot be used; the message says why in curator's words."""


@dataclass
class DiffusersLora:
    """A LoRA in diffusers layout: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` tensors."""

    state_dict: dict[str, torch.Tensor]
    alphas: dict[str, float] = field(default_factory=dict)  # module path -> alpha, where the file had one
    ignored: list[str] = field(default_factory=list)  # keys that are not LoRA A/B/alpha tensors
    sources: dict[str, list[str]] = field(default_factory=dict)  # module path -> its keys in the input

    def modules(self) -> list[str]:
        return sorted({module_of(k) for k in self.state_dict})


def _suffix(key: str) -> str | None:
    for s in (*_DOWN, *_UP):
        if key.endswith(s):
            return s
    return _ALPHA if key.endswith(_ALPHA) else None


def is_lora_key(key: str) -> bool:
    return _suffix(key) is not None


def module_of(key: str) -> str:
    """``transformer.a.b.lora_A.weight`` -> ``a.b`` (any known suffix, any known prefix)."""
    suffix = _suffix(key)
    stem = key[: -len(suffix)] if suffix else key
    return _strip_wrappers(stem)


def _strip_wrappers(key: str) -> str:
    for p in _WRAPPERS:
        key = key.removeprefix(p)
    return key


def detect_format(keys: Iterable[str]) -> str:
    """Name the key layout (one of ``FORMATS``), or ``"unknown"`` when no key looks like a LoRA tensor."""
    lora = [k for k in keys if is_lora_key(k)]
    if not any(_suffix(k) != _ALPHA for k in lora):
        return "unknown"
    if any(k.startswith(KOHYA_PREFIX) for k in lora):
        return "kohya"
    if any(".lora_down." in k or ".lora_up." in k for k in lora):
        return "lightx2v"
    if any(k.startswith("diffusion_model.") for k in lora):
        return "ai-toolkit"
    if any(".default." in k or k.startswith("base_model.model.") for k in lora):
        return "peft"
    return "diffusers"


def to_diffusers(state_dict: Mapping[str, torch.Tensor], fmt: str | None = None) -> DiffusersLora:
    """Convert any known layout to diffusers keys; the tensors themselves are passed through untouched.

    ``fmt`` is only checked (``detect_format`` decides); raises ``LoraFormatError`` for unpaired matrices.
    """
    detected = detect_format(state_dict)
    if fmt is not None and fmt != detected:
        raise LoraFormatError(f"Expected a {fmt} LoRA but the keys look like {detected}.")
    ignored = [k for k in state_dict if not is_lora_key(k)]
    # Strip the wrappers diffusers' converter does not know (it would re-add ``transformer.``).
    stripped = {_strip_wrappers(k): k for k in state_dict if is_lora_key(k)}
    matrices = [k for k in stripped if not k.endswith(_ALPHA)]

    # Let diffusers map the names, one layer at a time: feed it scalar placeholders that carry each
    # key's index (no alpha keys, so its alpha scale is exactly 1) and read back where each landed.
    groups: dict[str, list[str]] = {}
    for k in matrices:
        groups.setdefault(k[: -len(_suffix(k))], []).append(k)
    out_key: dict[str, str] = {}  # input key (stripped) -> diffusers key
    claimed: dict[str, list[str]] = {}  # diffusers module path -> input stems mapped onto it
    for stem, keys in groups.items():
        kinds = {"down" if _suffix(k) in _DOWN else "up" for k in keys}
        if len(keys) > 2:
            raise LoraFormatError(f"The LoRA has layer {stem} twice: {', '.join(stripped[k] for k in keys)}.")
        if kinds != {"down", "up"}:
            have = "down (lora_A/lora_down)" if "down" in kinds else "up (lora_B/lora_up)"
            lack = "up (lora_B/lora_up)" if "down" in kinds else "down (lora_A/lora_down)"
            raise LoraFormatError(
                f"The LoRA is incomplete: layer {stem} has a {have} matrix but no {lack} matrix."
            )
        placeholders = {k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
        try:
            converted = _convert_non_diffusers_qwen_lora_to_diffusers(placeholders)
        except (KeyError, ValueError, IndexError) as e:
            raise LoraFormatError(f"Cannot read the LoRA layer {stem}: {e}") from e
        for k, v in converted.items():
            out_key[keys[int(v.item())]] = k
        claimed.setdefault(module_of(next(iter(converted))), []).append(stem)
    # Names diffusers cannot map (another model's kohya keys) can collapse onto one module: drop those.
    for stems in claimed.values():
        if len(stems) > 1:
            for stem in stems:
                for k in groups[stem]:
                    ignored.append(stripped[k])
                    del out_key[k]
    matrices = [k for k in matrices if k in out_key]

    weights = {out_key[k]: state_dict[stripped[k]] for k in matrices}
    sources: dict[str, list[str]] = {}
    for k in matrices:
        sources.setdefault(module_of(out_key[k]), []).append(stripped[k])
    alphas: dict[str, float] = {}
    for k in stripped:
        if not k.endswith(_ALPHA):
            continue
        stem = k[: -len(_ALPHA)]
        down = next((stem + s for s in _DOWN if stem + s in out_key), None)
        if down is None:
            ignored.append(stripped[k])
            continue
        module = module_of(out_key[down])
        alphas[module] = float(state_dict[stripped[k]].float().reshape(-1)[0])
        sources[module].append(stripped[k])
    return DiffusersLora(weights, alphas, ignored, sources)


def to_kohya(
    state_dict: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Diffusers layout -> kohya/ComfyUI layout (``lora_unet_<path_with_underscores>.lora_down.weight``,
    ``.lora_up.weight``, ``.alpha``). ``alpha`` is one value or one per module path."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        suffix = _suffix(key)
        if suffix is None or suffix == _ALPHA:
            raise LoraFormatError(f"Not a diffusers LoRA key: {key}")
        module = module_of(key)
        stem = KOHYA_PREFIX + module.replace(".", "_")
        out[stem + (".lora_down.weight" if suffix in _DOWN else ".lora_up.weight")] = tensor
        if suffix in _DOWN:
            a = alpha if isinstance(alpha, int | float) else alpha[module]
            out[stem + _ALPHA] = torch.tensor(float(a), dtype=torch.float32)
    return out
