"""The deployable CollectionLoRA: ONE safetensors LoRA that carries its own effect catalog.

The file is an ordinary LoRA (diffusers layout, which ``QwenImageEditPlusPipeline.load_lora_weights``
reads, or kohya layout, which ComfyUI reads) whose safetensors metadata also says how to use it:

- ``collectionlora.catalog``: JSON list of ``{name, trigger, student_prompt, teacher_prompt}``;
  the instruction for an effect is its trigger + student prompt (the AOP condition, eq. 5);
- ``collectionlora.composition_template``: the zero-shot composition instruction of Fig. 7, with
  ``{A}`` and ``{B}`` standing for two effect descriptors;
- ``collectionlora.backbone``, ``.rank``, ``.alpha``, ``.student_steps`` (8 NFE, no CFG) and
  ``.format_version``.

Safetensors metadata is str -> str, so each value is a string (the catalog a JSON string).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .backbones import adapters
from .backbones.lora_formats import detect_format, to_diffusers, to_kohya

FORMAT_VERSION = 1
NS = "collectionlora."
CATALOG_KEY = NS + "catalog"
TEMPLATE_KEY = NS + "composition_template"
BACKBONE_KEY = NS + "backbone"
RANK_KEY = NS + "rank"
ALPHA_KEY = NS + "alpha"
STEPS_KEY = NS + "student_steps"
VERSION_KEY = NS + "format_version"
PAD_KEY = NS + "pad"
COMPOSITION_TEMPLATE = "Please apply {A} to the input image, and then apply {B}."
STUDENT_STEPS = 8
Format = Literal["diffusers", "kohya"]
FORMATS: tuple[str, ...] = ("diffusers", "kohya")


class CatalogError(ValueError):
    """A CollectionLoRA file or catalog that cannot be used; the message says why."""


@dataclass(frozen=True)
class CatalogEntry:
    """One effect of the collection."""

    name: str
    trigger: str
    student_prompt: str
    teacher_prompt: str = ""

    @property
    def prompt(self) -> str:
        """The instruction that applies this effect: trigger + student prompt (eq. 5)."""
        return f"{self.trigger.strip()} {self.student_prompt.strip()}".strip()


@dataclass
class Catalog:
    """What a CollectionLoRA file says about itself."""

    entries: list[CatalogEntry]
    composition_template: str = COMPOSITION_TEMPLATE
    backbone: str = ""
    rank: int = 0
    alpha: float = 0.0
    student_steps: int = STUDENT_STEPS
    format_version: int = FORMAT_VERSION
    extra: dict[str, str] = field(default_factory=dict)  # other metadata of the file

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def get(self, name: str) -> CatalogEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise CatalogError(
            f"This CollectionLoRA has no effect '{name}'. It holds: {', '.join(self.names())}."
        )

    def to_json(self) -> str:
        return json.dumps([asdict(e) for e in self.entries], ensure_ascii=False)


def effect_prompt(catalog: Catalog, name: str) -> str:
    """The instruction for one effect: its trigger + student prompt."""
    return catalog.get(name).prompt


def compose_prompt(catalog: Catalog, a: str, b: str) -> str:
    """The zero-shot composition instruction for effect ``a`` then effect ``b`` (Fig. 7).

    Each descriptor is the effect's trigger + student prompt; a trailing full stop is dropped because
    the descriptor sits mid-sentence."""
    desc = {"A": catalog.get(a).prompt.rstrip(". "), "B": catalog.get(b).prompt.rstrip(". ")}
    # One pass, so a descriptor that happens to contain "{B}" is not substituted again.
    return re.sub(r"\{([AB])\}", lambda m: desc[m.group(1)], catalog.composition_template)


def check_entries(entries: list[CatalogEntry]) -> None:
    """Names and triggers unique, every effect with a trigger and a student prompt."""
    if not entries:
        raise CatalogError("The catalog is empty: a CollectionLoRA holds at least one effect.")
    problems = []
    for what, values in (("name", [e.name for e in entries]), ("trigger", [e.trigger for e in entries])):
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            problems.append(f"{what}s used twice: {', '.join(dup)}")
    for e in entries:
        if not e.trigger.strip() or not e.student_prompt.strip():
            problems.append(f"effect '{e.name}' has no trigger or no student prompt")
    if problems:
        raise CatalogError("The effect catalog is not usable: " + "; ".join(problems) + ".")


def _adapter_rank_alpha(transformer: nn.Module, adapter: str) -> tuple[int, float]:
    config = transformer.peft_config[adapter]
    return int(config.r), float(config.lora_alpha)


def catalog_metadata(
    entries: list[CatalogEntry],
    *,
    backbone: str,
    rank: int,
    alpha: float,
    student_steps: int = STUDENT_STEPS,
    template: str = COMPOSITION_TEMPLATE,
) -> dict[str, str]:
    check_entries(entries)
    return {
        CATALOG_KEY: Catalog(entries).to_json(),
        TEMPLATE_KEY: template,
        BACKBONE_KEY: backbone,
        RANK_KEY: str(rank),
        ALPHA_KEY: f"{alpha:g}",
        STEPS_KEY: str(student_steps),
        VERSION_KEY: str(FORMAT_VERSION),
    }


def export_collection_lora(
    transformer: nn.Module,
    path: str | os.PathLike,
    catalog: list[CatalogEntry],
    *,
    adapter: str = "student",
    fmt: Format = "diffusers",
    backbone: str = "",
    student_steps: int = STUDENT_STEPS,
    extra_meta: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``adapter`` of ``transformer`` as one CollectionLoRA file (written atomically)."""
    if fmt not in FORMATS:
        raise CatalogError(f"Unknown LoRA format '{fmt}': choose one of {', '.join(FORMATS)}.")
    rank, alpha = _adapter_rank_alpha(transformer, adapter)
    meta = dict(extra_meta or {})
    meta.update(
        catalog_metadata(catalog, backbone=backbone, rank=rank, alpha=alpha, student_steps=student_steps)
    )
    path = adapters.save_lora(transformer, adapter, path, metadata=meta, fmt=fmt, dtype=dtype)
    if _mistaken_for_pickle(path):
        meta[PAD_KEY] = "-"
        path = adapters.save_lora(transformer, adapter, path, metadata=meta, fmt=fmt, dtype=dtype)
    return path


def _mistaken_for_pickle(path: Path) -> bool:
    """Would ``adapters.read_lora_file``'s pickle sniffing refuse this file? A safetensors file starts
    with its header length (u64, little endian): a length of 0x..80 or 0x..4B50 reads as a pickle or
    zip magic. One padding metadata entry changes the length (until the sniffing looks further)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _read_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CatalogError(f"No file at {path}.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CatalogError(f"{path.name} is not a readable .safetensors file ({e}).") from e


def read_catalog(path: str | os.PathLike) -> Catalog:
    """The catalog of a CollectionLoRA file (only the header is read, not the weights)."""
    path = Path(path)
    meta = _read_metadata(path)
    raw = meta.get(CATALOG_KEY)
    if raw is None:
        raise CatalogError(
            f"{path.name} has no effect catalog in its metadata: it is not a CollectionLoRA export "
            "(a plain LoRA, or a file whose metadata was stripped by a converter)."
        )
    try:
        entries = [CatalogEntry(**e) for e in json.loads(raw)]
        version = int(meta.get(VERSION_KEY, FORMAT_VERSION))
    except (ValueError, TypeError) as e:
        raise CatalogError(f"{path.name} has a damaged effect catalog ({e}).") from e
    if version > FORMAT_VERSION:
        raise CatalogError(
            f"{path.name} was written by a newer studio (catalog format {version}, this one reads "
            f"{FORMAT_VERSION}); update the studio."
        )
    return Catalog(
        entries=entries,
        composition_template=meta.get(TEMPLATE_KEY, COMPOSITION_TEMPLATE),
        backbone=meta.get(BACKBONE_KEY, ""),
        rank=int(meta.get(RANK_KEY, 0) or 0),
        alpha=float(meta.get(ALPHA_KEY, 0) or 0),
        student_steps=int(meta.get(STEPS_KEY, STUDENT_STEPS)),
        format_version=version,
        extra={k: v for k, v in meta.items() if not k.startswith(NS)},
    )


def convert_collection_lora(src: str | os.PathLike, dst: str | os.PathLike, fmt: Format) -> Path:
    """Re-write a CollectionLoRA file in another key layout, catalog kept; no model is loaded.

    The same layout is a byte copy; diffusers -> kohya renames the keys and adds ``.alpha`` tensors. The
    student's rank and alpha are the same on every layer (one ``LoraSpec``), so the catalog's alpha is
    every layer's alpha."""
    if fmt not in FORMATS:
        raise CatalogError(f"Unknown LoRA format '{fmt}': choose one of {', '.join(FORMATS)}.")
    src, dst = Path(src), Path(dst)
    catalog = read_catalog(src)
    tensors, meta = adapters.read_lora_file(src)
    current = detect_format(tensors)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if current == fmt:
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        return dst
    if (current, fmt) != ("diffusers", "kohya"):
        raise CatalogError(
            f"{src.name} is in {current} layout; only diffusers -> kohya conversion is supported."
        )
    if not catalog.alpha:
        raise CatalogError(f"{src.name} does not record its LoRA alpha; cannot convert it.")
    out = to_kohya(to_diffusers(tensors).state_dict, catalog.alpha)
    meta.pop(adapters.LORA_ADAPTER_METADATA_KEY, None)
    meta.update(ss_network_dim=str(catalog.rank), ss_network_alpha=f"{catalog.alpha:g}")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp), metadata=meta)
        if _mistaken_for_pickle(tmp):
            meta[PAD_KEY] = meta.get(PAD_KEY, "") + "-"
            save_file({k: v.contiguous() for k, v in out.items()}, str(tmp), metadata=meta)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def student_init(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A saved student LoRA as ``CollectionDistiller(init_student=...)`` takes it: keys are the module
    path + ``.lora_A`` / ``.lora_B`` (``trainer.adapter_params`` names), any known file layout."""
    tensors, _ = adapters.read_lora_file(path)
    lora = to_diffusers(tensors)
    out = {}
    for key, t in lora.state_dict.items():
        stem = key.removeprefix("transformer.").removesuffix(".weight")
        out[stem] = t
    return out
