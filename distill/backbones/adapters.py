"""Named LoRA adapters on the ONE frozen transformer: teachers, ``student``, ``fake``, ``lightning``.

Every adapter is a PEFT LoRA injected into the same ``QwenImageTransformer2DModel`` through diffusers'
``PeftAdapterMixin`` (``add_adapter``, ``load_lora_adapter``, ``delete_adapters``, ``fuse_lora``);
the distillation loop switches adapters before every forward with ``activate``.

Why ``activate`` does not call PEFT's ``set_adapter``: PEFT makes the adapters it activates trainable
and freezes the rest, and it touches every adapter of every layer to do so (with 50 teachers on a
60-block model that is tens of thousands of ``requires_grad_`` calls per switch). Here trainability is
set once by ``set_trainable`` and a switch only writes each LoRA layer's active list, its enabled flag
and, where a weight changed, its scale: the same fields PEFT's ``set_adapter``/``enable_adapters``/
``set_scale`` write, minus the gradient flags.

File reading/writing lives here too (``save_lora``/``load_lora``); the key layouts are in
``lora_formats``.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .lora_formats import PREFIX, LoraFormatError, detect_format, to_diffusers, to_kohya

# Attention projections (image and text streams) and the image/text MLPs of every block: what
# Lightning and most effect LoRAs for Qwen-Image-Edit target.
DEFAULT_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoraConfig in a file
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_RESERVED_METADATA = {
    "format",
    LORA_ADAPTER_METADATA_KEY,
    "lora_rank",
    "lora_alpha",
    "ss_network_dim",
    "ss_network_alpha",
}

Names = str | Sequence[str] | None


@dataclass(frozen=True)
class LoraSpec:
    """Shape of a new LoRA adapter. The effect of a layer is ``alpha / rank * B @ A``."""

    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    init_lora_weights: bool | str = True  # True: B = 0, so a new adapter starts as the base model

    def to_peft(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            init_lora_weights=self.init_lora_weights,
        )


@dataclass(frozen=True)
class LoadReport:
    name: str
    format_detected: str
    n_tensors: int  # tensors in the file
    rank: int  # the most common rank (a few layers may differ)
    alpha: float  # the most common alpha
    matched_modules: int  # layers of the backbone that received the LoRA
    metadata: dict[str, str] = field(default_factory=dict)  # the file's safetensors metadata
    ignored_keys: tuple[str, ...] = ()  # tensors that were not used (warned about)


@dataclass
class _State:
    """Bookkeeping kept on the transformer (as ``_adapter_state``)."""

    layers: tuple[BaseTunerLayer, ...] | None = None  # cached LoRA layers
    layers_key: tuple[str, ...] = ()  # the adapter names they were cached for
    trainable: frozenset[str] = frozenset()
    weights: dict[str, float] = field(default_factory=dict)  # scale last written per adapter (default 1)
    scales: dict[str, list[tuple[dict, float]]] = field(
        default_factory=dict
    )  # name -> (layer.scaling, alpha/r)
    fused: tuple[tuple[str, ...], tuple[float, ...]] | None = None
    # ``offload``: adapters kept in CPU memory while not in use, at most ``keep`` of them on ``home``
    offloaded: set[str] = field(default_factory=set)
    resident: list[str] = field(default_factory=list)  # offloaded ones now on ``home``, oldest first
    keep: int = 1
    home: torch.device | None = None
    stored: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # their CPU copies


# -- bookkeeping -----------------------------------------------------------------------------------
def _state(transformer: nn.Module) -> _State:
    state = transformer.__dict__.get("_adapter_state")
    if state is None:
        state = _State()
        transformer.__dict__["_adapter_state"] = state
    return state


def _configs(transformer: nn.Module) -> dict:
    return getattr(transformer, "peft_config", None) or {}


def _layers(transformer: nn.Module) -> tuple[BaseTunerLayer, ...]:
    state = _state(transformer)
    key = tuple(_configs(transformer))
    if state.layers is None or state.layers_key != key:
        layers = tuple(m for m in transformer.modules() if isinstance(m, BaseTunerLayer))
        if any(not {"_active_adapter", "_disable_adapters"} <= layer.__dict__.keys() for layer in layers):
            raise RuntimeError(
                "This peft version stores active adapters differently; update adapters.activate."
            )
        state.layers, state.layers_key = layers, key
        state.scales.clear()
    return state.layers


def _as_names(names: Names) -> list[str]:
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def _check_known(transformer: nn.Module, names: Iterable[str]) -> None:
    known = _configs(transformer)
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(
            f"No adapter named {', '.join(map(repr, missing))}; loaded adapters: {list(known) or 'none'}"
        )


def _check_new_name(transformer: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"Adapter names must be non-empty and contain no '.', got {name!r}")
    if name in _configs(transformer):
        raise ValueError(f"An adapter named {name!r} already exists on this transformer; delete it first.")


def _refuse_if_fused(transformer: nn.Module, action: str) -> None:
    if _state(transformer).fused is not None:
        raise RuntimeError(
            f"Cannot {action} while adapters are fused into the base weights; call unfuse() first."
        )


def _apply_trainable(transformer: nn.Module) -> None:
    """Base frozen; exactly the adapters in the recorded trainable set require grad."""
    trainable = _state(transformer).trainable
    transformer.requires_grad_(False)
    for layer in _layers(transformer):
        for attr in layer.adapter_layer_names:
            for name, sub in getattr(layer, attr).items():
                if name in trainable:
                    sub.requires_grad_(True)


@contextmanager
def _keeping_state(transformer: nn.Module, drop: str | None = None) -> Iterator[None]:
    """Around PEFT calls that change the active set and grad flags: put both back afterwards."""
    names, weights = active(transformer)
    try:
        yield
    finally:
        _state(transformer).layers = None
        kept = [(n, w) for n, w in zip(names, weights) if n != drop and n in _configs(transformer)]
        _apply_trainable(transformer)
        activate(transformer, [n for n, _ in kept], [w for _, w in kept])


# -- adapters --------------------------------------------------------------------------------------
def adapter_names(transformer: nn.Module) -> list[str]:
    return list(_configs(transformer))


def add_lora(transformer: nn.Module, name: str, spec: LoraSpec | None = None) -> list[nn.Parameter]:
    """Add a fresh LoRA adapter and return its parameters (trainable; other flags and the active set
    are left as they were, so the new adapter is not active until ``activate``)."""
    _check_new_name(transformer, name)
    _refuse_if_fused(transformer, "add an adapter")
    spec = spec or LoraSpec()
    state = _state(transformer)
    with _keeping_state(transformer):
        with warnings.catch_warnings():  # many adapters on one model is the design, not a mistake
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(spec.to_peft(), adapter_name=name)
        state.trainable = state.trainable | {name}
    return lora_parameters(transformer, name)


def lora_parameters(transformer: nn.Module, name: str) -> list[nn.Parameter]:
    _check_known(transformer, [name])
    params: list[nn.Parameter] = []
    for layer in _layers(transformer):
        for attr in layer.adapter_layer_names:
            holder = getattr(layer, attr)
            if name in holder:
                item = holder[name]
                params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
    return params


def set_trainable(transformer: nn.Module, names: Iterable[str]) -> None:
    """Exactly these adapters' parameters require grad; the base and all other adapters are frozen."""
    names = _as_names(names) if isinstance(names, str) else list(names)
    _check_known(transformer, names)
    offloaded = sorted(set(names) & _state(transformer).offloaded)
    if offloaded:
        raise ValueError(f"Offloaded adapters cannot be trained: {offloaded}")
    _state(transformer).trainable = frozenset(names)
    _apply_trainable(transformer)


def activate(transformer: nn.Module, names: Names, weights: Sequence[float] | None = None) -> None:
    """Make ``names`` the active adapters (with per-adapter weights, default 1); None or [] runs the
    base model. Never changes ``requires_grad``. Cheap: called before every forward."""
    names = _as_names(names)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapters but {len(weights)} weights")
    state = _state(transformer)
    if state.fused is not None and (tuple(names), tuple(weights)) != state.fused:
        _refuse_if_fused(transformer, "switch adapters")
    _check_known(transformer, names)
    if state.offloaded:
        _bring_home(transformer, state, names)
    changed = [(n, w) for n, w in zip(names, weights) if state.weights.get(n, 1.0) != w]
    disable = not names
    for layer in _layers(transformer):
        # Plain attributes: write the instance dict (nn.Module.__setattr__ costs ~3x more per layer).
        attrs = layer.__dict__
        attrs["_disable_adapters"] = disable
        if not disable:
            attrs["_active_adapter"] = names
    for n, w in changed:
        for scaling, unit in _unit_scales(transformer, n):
            scaling[n] = w * unit
        state.weights[n] = w


def _unit_scales(transformer: nn.Module, name: str) -> list[tuple[dict, float]]:
    """Each layer's ``scaling`` dict with the adapter's scale at weight 1 (alpha / r, as PEFT computes it)."""
    state = _state(transformer)
    layers = _layers(transformer)
    if name not in state.scales:
        pairs = []
        for layer in layers:
            if name in getattr(layer, "scaling", {}):
                layer.set_scale(name, 1.0)
                pairs.append((layer.scaling, layer.scaling[name]))
        state.scales[name] = pairs
    return state.scales[name]


def active(transformer: nn.Module) -> tuple[list[str], list[float]]:
    """The active adapters and their weights; ([], []) when the base model runs."""
    layers = _layers(transformer)
    if not layers or layers[0].disable_adapters:
        return [], []
    names = [n for n in layers[0].active_adapters if n in _configs(transformer)]
    weights = _state(transformer).weights
    return names, [weights.get(n, 1.0) for n in names]


@contextmanager
def using(transformer: nn.Module, names: Names, weights: Sequence[float] | None = None) -> Iterator[None]:
    """Run a block with these adapters active, then restore the previous active set and weights."""
    previous = active(transformer)
    activate(transformer, names, weights)
    try:
        yield
    finally:
        activate(transformer, *previous)


def delete(transformer: nn.Module, name: str) -> None:
    """Remove an adapter; it leaves the active set (other active adapters stay active)."""
    _check_known(transformer, [name])
    _refuse_if_fused(transformer, "delete an adapter")
    state = _state(transformer)
    with _keeping_state(transformer, drop=name), warnings.catch_warnings():
        # PEFT picks another adapter to activate and says so; _keeping_state sets the active set anyway.
        warnings.filterwarnings("ignore", message=f"Adapter {name} was active which is now deleted")
        transformer.delete_adapters(name)
        state.trainable = state.trainable - {name}
        state.weights.pop(name, None)
        state.offloaded.discard(name)
        state.resident = [n for n in state.resident if n != name]
        state.stored.pop(name, None)


def _move(transformer: nn.Module, name: str, device: torch.device) -> None:
    """One offloaded adapter's weights to ``device``, the same Parameter objects. Its CPU copy is made
    once (pinned when the base is on a GPU, for fast copies) and kept: the adapter is frozen, so sending it back to
    CPU only drops the device copy, and bringing it home is one host-to-device copy."""
    state = _state(transformer)
    params = lora_parameters(transformer, name)
    if name not in state.stored:
        pin = state.home is not None and state.home.type == "cuda"
        state.stored[name] = [
            (q.data.to("cpu", copy=True).pin_memory() if pin else q.data.to("cpu", copy=True)) for q in params
        ]
    for param, cpu in zip(params, state.stored[name], strict=True):
        param.data = cpu if device.type == "cpu" else cpu.to(device, non_blocking=True)


def _bring_home(transformer: nn.Module, state: _State, names: list[str]) -> None:
    """Offloaded adapters about to run go to the base's device; the least recently used others that
    exceed ``keep`` go back to CPU memory."""
    for n in names:
        if n in state.offloaded:
            if n in state.resident:
                state.resident.remove(n)
            else:
                _move(transformer, n, state.home)
            state.resident.append(n)
    while len(state.resident) > max(state.keep, len(names)):
        victim = next(n for n in state.resident if n not in names)
        state.resident.remove(victim)
        _move(transformer, victim, torch.device("cpu"))


def offload(transformer: nn.Module, names: Names, keep: int = 1) -> None:
    """Keep these frozen adapters (e.g. 50 teachers) in CPU memory and move one to the base's device
    only when ``activate`` runs it, holding at most ``keep`` there at once: on a GPU the teachers of a
    large collection need not fit beside the base (50 rank-64 Qwen-Image LoRAs are ~40 GB).
    Idempotent; call it after each ``load_lora`` so that loading never holds them all on the GPU."""
    names = _as_names(names)
    _check_known(transformer, names)
    state = _state(transformer)
    busy = sorted(set(names) & state.trainable)
    if busy:
        raise ValueError(f"Trainable adapters cannot be offloaded (their optimiser lives on the GPU): {busy}")
    if keep < 1:
        raise ValueError("keep must be >= 1")
    state.keep = keep
    base = next(p for n, p in transformer.named_parameters() if ".lora_" not in n)
    state.home = base.device
    running = set(active(transformer)[0])
    for n in names:
        if n not in state.offloaded:
            state.offloaded.add(n)
            if n in running:
                state.resident.append(n)
            else:
                _move(transformer, n, torch.device("cpu"))


def offloaded_devices(transformer: nn.Module) -> dict[str, torch.device]:
    """Where each offloaded adapter's weights are now (for reports and tests)."""
    state = _state(transformer)
    out = {}
    for n in state.offloaded:
        params = lora_parameters(transformer, n)
        out[n] = params[0].device if params else torch.device("cpu")
    return out


def fuse(transformer: nn.Module, names: Names, weights: Sequence[float] | None = None) -> None:
    """Merge adapters (with weights) into the base weights, e.g. for deployment timing; ``unfuse`` undoes
    it. While fused, switching adapters is refused (PEFT would silently unmerge)."""
    _refuse_if_fused(transformer, "fuse again")
    names = _as_names(names)
    activate(transformer, names, weights)
    transformer.fuse_lora(adapter_names=names)
    _state(transformer).fused = (tuple(names), tuple(active(transformer)[1]))


def unfuse(transformer: nn.Module) -> None:
    state = _state(transformer)
    if state.fused is not None:
        transformer.unfuse_lora()
        state.fused = None


# -- state dicts and files -------------------------------------------------------------------------
def lora_state_dict(transformer: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors in diffusers layout (``transformer.<module>.lora_A.weight``), cloned, on CPU."""
    _check_known(transformer, [name])
    sd = get_peft_model_state_dict(transformer, adapter_name=name)
    return {PREFIX + k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def _ranks_alphas(transformer: nn.Module, name: str) -> tuple[dict[str, int], dict[str, float]]:
    ranks, alphas = {}, {}
    for path, module in transformer.named_modules():
        if isinstance(module, BaseTunerLayer) and name in getattr(module, "r", {}):
            ranks[path], alphas[path] = module.r[name], float(module.lora_alpha[name])
    return ranks, alphas


def _most_common(values: Iterable) -> object:
    return Counter(values).most_common(1)[0][0]


def save_lora(
    transformer: nn.Module,
    name: str,
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    fmt: Literal["diffusers", "kohya"] = "diffusers",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write one adapter as a .safetensors file, atomically. ``diffusers`` layout keeps the LoraConfig in
    ``lora_adapter_metadata`` (as diffusers does); ``kohya`` layout (what ComfyUI reads) has ``.alpha``
    tensors. Both carry ``lora_rank``/``lora_alpha`` and the caller's metadata."""
    if fmt not in ("diffusers", "kohya"):
        raise ValueError(f"fmt must be 'diffusers' or 'kohya', got {fmt!r}")
    metadata = dict(metadata or {})
    clash = _RESERVED_METADATA & set(metadata)
    if clash:
        raise ValueError(f"Metadata keys {sorted(clash)} are written by save_lora itself")
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"Metadata must map str to str (safetensors); not: {bad[:3]}")

    sd = lora_state_dict(transformer, name)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    ranks, alphas = _ranks_alphas(transformer, name)
    rank, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    file_meta = {"format": "pt", "lora_rank": str(rank), "lora_alpha": f"{alpha:g}"}
    if fmt == "diffusers":
        config = transformer.peft_config[name].to_dict()
        config = {PREFIX + k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        file_meta[LORA_ADAPTER_METADATA_KEY] = json.dumps(config, sort_keys=True, default=str)
    else:
        sd = to_kohya(sd, alphas)
        file_meta.update(ss_network_dim=str(rank), ss_network_alpha=f"{alpha:g}")
    file_meta.update(metadata)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=file_meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors LoRA; refuses pickles, explains unreadable files."""
    path = Path(path)
    refused = f"{path.name}: LoRA files must be .safetensors; pickled files can run code and are refused."
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFormatError(refused)
    if not path.is_file():
        raise LoraFormatError(f"LoRA file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        # Only a file safetensors cannot read is checked for pickle signatures: a valid header
        # length can start with the same bytes as a torch.save zip ("PK") or a pickle (0x80).
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head == b"PK" or head[:1] == b"\x80":
            raise LoraFormatError(refused) from e
        raise LoraFormatError(
            f"{path.name} is not a readable .safetensors file; it may be truncated (an interrupted download "
            f"or copy) or not a safetensors file at all. Details: {e}"
        ) from e
    return tensors, metadata


def _file_alphas(metadata: dict[str, str], ranks: dict[str, int]) -> dict[str, float]:
    """Per-module alpha from diffusers' ``lora_adapter_metadata`` (a LoraConfig), if the file has one;
    rsLoRA alphas (scale alpha / sqrt(r)) are turned into plain ones (scale alpha / r)."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = {k.removeprefix(PREFIX): v for k, v in json.loads(raw).items()}
        base = float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
    patterns = config.get("alpha_pattern") or {}
    out = {}
    for module, rank in ranks.items():
        match = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), None)
        out[module] = float(patterns[match]) if match else base
        if config.get("use_rslora"):
            out[module] *= math.sqrt(rank)
    return out


def _base_linear(modules: dict[str, nn.Module], path: str) -> nn.Linear | None:
    module = modules.get(path)
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module if isinstance(module, nn.Linear) else None


def _few(items: Sequence[str], n: int = 5) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_lora(
    transformer: nn.Module,
    path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor],
    name: str,
    *,
    alpha: float | None = None,
) -> LoadReport:
    """Load a LoRA file (or state dict) of any known layout as adapter ``name`` (frozen, not active).

    Rank is read from the tensor shapes; alpha from the file (``.alpha`` tensors or diffusers metadata),
    else ``alpha`` if given, else alpha = rank (the diffusers convention: scale 1).
    """
    _check_new_name(transformer, name)
    _refuse_if_fused(transformer, "load an adapter")
    if isinstance(path_or_state_dict, dict):
        tensors, file_meta, source = dict(path_or_state_dict), {}, "the state dict"
    else:
        tensors, file_meta = read_lora_file(path_or_state_dict)
        source = Path(path_or_state_dict).name
    no_match = (
        f"None of the {len(tensors)} tensors in {source} match this backbone's layers; is it a LoRA for "
        "another model (e.g. Flux/SDXL)?"
    )
    fmt = detect_format(tensors)
    if fmt == "unknown":
        raise LoraFormatError(no_match)
    lora = to_diffusers(tensors, fmt)

    modules = dict(transformer.named_modules())
    targets = {m: _base_linear(modules, m) for m in lora.modules()}
    matched = [m for m, layer in targets.items() if layer is not None]
    if not matched:
        raise LoraFormatError(no_match)
    unmatched = [m for m, layer in targets.items() if layer is None]

    ranks: dict[str, int] = {}
    problems = []
    for m in matched:
        a, b = lora.state_dict[f"{PREFIX}{m}.lora_A.weight"], lora.state_dict[f"{PREFIX}{m}.lora_B.weight"]
        w = targets[m].weight
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[0] != b.shape[1]
            or (a.shape[1], b.shape[0]) != (w.shape[1], w.shape[0])
        ):
            problems.append(
                f"layer {m}: the LoRA has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, the backbone's "
                f"weight is {tuple(w.shape)} (out, in)"
            )
        ranks[m] = a.shape[0]
    if problems:
        raise LoraFormatError(
            f"{source} does not fit this backbone: {_few(problems, 3)}. Is it a LoRA for a different model "
            "or model size?"
        )

    from_meta = _file_alphas(file_meta, ranks)
    alphas = {
        m: lora.alphas.get(m, from_meta.get(m, alpha if alpha is not None else ranks[m])) for m in matched
    }
    ignored = lora.ignored + [k for m in unmatched for k in lora.sources[m]]
    if ignored:
        warnings.warn(
            f"{source}: {len(ignored)} tensors do not belong to this backbone's LoRA layers and were "
            f"skipped: {_few(sorted(ignored))}",
            stacklevel=2,
        )

    rank, common_alpha = int(_most_common(ranks.values())), float(_most_common(alphas.values()))
    config = LoraConfig(
        r=rank,
        lora_alpha=common_alpha,
        target_modules=sorted(matched),
        rank_pattern={"^" + re.escape(m): r for m, r in ranks.items() if r != rank},
        alpha_pattern={"^" + re.escape(m): a for m, a in alphas.items() if a != common_alpha},
        init_lora_weights=False,
    ).to_dict()
    config = {PREFIX + k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    sd = {}
    for m in matched:
        w = targets[m].weight
        for part in ("lora_A", "lora_B"):
            key = f"{PREFIX}{m}.{part}.weight"
            sd[key] = lora.state_dict[key].to(device=w.device, dtype=w.dtype)

    with _keeping_state(transformer), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.load_lora_adapter(
            sd, prefix="transformer", adapter_name=name, metadata=config, low_cpu_mem_usage=True
        )
    return LoadReport(
        name=name,
        format_detected=fmt,
        n_tensors=len(tensors),
        rank=rank,
        alpha=common_alpha,
        matched_modules=len(matched),
        metadata=file_meta,
        ignored_keys=tuple(sorted(ignored)),
    )
