"""Serving: one CollectionLoRA answers every effect; a LoRA bank is the conventional baseline.

``CollectionEditor`` loads a backbone and ONE exported CollectionLoRA (fused into the base weights for
speed); the effect catalog comes from the file's own metadata, so an effect is applied by its trigger
+ student prompt (eq. 5), a composition by the paper's template (Fig. 7), and any free instruction
passes straight through. Every request runs the same fused weights, so requests for different effects
can share one batch.

``LoraBankEditor`` is the deployment the paper replaces (§4.1, Tab. 2): one teacher LoRA file per
effect plus a Lightning LoRA. Each request is routed to its teacher file, which is read from disk and
swapped in unless it is already loaded (a *switch*), and stacked with Lightning for 8-step sampling.
Load/switch time is reported apart from sampling time.

Both run the same sampler (``euler_sample``, no CFG). Noise is drawn per image from that image's seed,
so an image's output does not depend on what else shares its batch.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open

from .backbones import adapters
from .backbones.base import Backbone
from .export import Catalog, CatalogError, compose_prompt, read_catalog
from .images import to_pil, to_tensor
from .sampling import euler_sample

DEFAULT_STEPS = 8
MAX_STEPS = 100
STUDENT_ADAPTER = "student"
LIGHTNING_ADAPTER = "lightning"
BANK_PREFIX = "bank_"  # adapter names of the bank's currently loaded teacher LoRA(s)
BANK_INDEX = "bank.json"  # optional index of a bank folder: {name: {"file": ..., "teacher_prompt": ...}}
TEACHER_PROMPT_KEY = "teacher_prompt"  # where a teacher LoRA file may carry its prompt


class ServingError(ValueError):
    """A request or a file the editor cannot serve; the message says what to change."""


class UnknownEffectError(ServingError):
    """An effect name the loaded LoRA(s) do not hold."""

    def __init__(self, name: str, known: Sequence[str], where: str = "this CollectionLoRA") -> None:
        self.name, self.known = name, list(known)
        close = difflib.get_close_matches(name, self.known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"{where} has no effect '{name}'.{hint} It holds: {', '.join(self.known)}.")


@dataclass(frozen=True)
class EffectInfo:
    """What an editor can do, one effect at a time."""

    name: str
    prompt: str  # the instruction this editor runs for the effect
    trigger: str = ""
    student_prompt: str = ""
    teacher_prompt: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """A resolved request: the instruction to run and the LoRA(s) it needs loaded (bank only)."""

    prompt: str
    label: str  # the effect name, "A+B", or "instruction"
    loras: tuple[str, ...] = ()  # bank: effects whose teacher LoRAs must be active; () otherwise
    routed: str | None = None  # bank: the effect an instruction was routed to


@dataclass
class EditResult:
    images: list[Image.Image]
    nfe: int  # network evaluations per image
    seconds: float  # wall time, LoRA loading included
    prompt: str
    load_seconds: float = 0.0  # of ``seconds``: reading and swapping LoRA files (bank only)
    switches: int = 0  # LoRA switches this call caused (bank only)
    routed: str | None = None


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ServingError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}.")
    return steps


def _as_images(images: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
    items = [images] if isinstance(images, Image.Image) else list(images)
    if not items:
        raise ServingError("No input image given.")
    bad = [type(x).__name__ for x in items if not isinstance(x, Image.Image)]
    if bad:
        raise ServingError(f"Inputs must be PIL images; got {', '.join(sorted(set(bad)))}.")
    return items


class _Editor:
    """The part both deployments share: resolve a request to a Plan, then sample it in batches."""

    backbone: Backbone
    where: str = "this editor"

    # to be provided by the deployments -----------------------------------------------------------
    def effects(self) -> list[EffectInfo]:
        raise NotImplementedError

    def _effect_prompt(self, name: str) -> str:
        raise NotImplementedError

    def _compose(self, a: str, b: str) -> Plan:
        raise NotImplementedError

    def _instruction(self, text: str) -> Plan:
        raise NotImplementedError

    def prepare(self, loras: tuple[str, ...]) -> tuple[float, int]:
        """Make ``loras`` active; returns (seconds spent loading, switches)."""
        return 0.0, 0

    # shared ----------------------------------------------------------------------------------------
    def effect_names(self) -> list[str]:
        return [e.name for e in self.effects()]

    def _known(self, name: str) -> str:
        if not isinstance(name, str) or name not in self.effect_names():
            raise UnknownEffectError(str(name), self.effect_names(), self.where)
        return name

    def plan(
        self,
        effect: str | None = None,
        compose: Sequence[str] | None = None,
        instruction: str | None = None,
    ) -> Plan:
        """Resolve exactly one of: an effect name, two effect names to compose, or a free instruction."""
        given = [k for k, v in (("effect", effect), ("compose", compose), ("instruction", instruction)) if v]
        if len(given) != 1:
            raise ServingError(
                "Give exactly one of effect=NAME, compose=[A, B] or instruction=TEXT"
                + (f" (got {' and '.join(given)})." if given else ".")
            )
        if effect:
            return Plan(self._effect_prompt(self._known(effect)), effect, self._loras_for([effect]))
        if compose:
            if isinstance(compose, str) or len(compose) != 2:
                raise ServingError(f"compose takes two effect names [A, B], got {compose!r}.")
            a, b = (self._known(n) for n in compose)
            return self._compose(a, b)
        if not isinstance(instruction, str) or not instruction.strip():
            raise ServingError("The instruction is empty.")
        return self._instruction(instruction.strip())

    def _loras_for(self, names: list[str]) -> tuple[str, ...]:
        return ()

    def run(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int,
        loras: tuple[str, ...] = (),
    ) -> EditResult:
        """One batch: image i gets prompt i and noise from seed i. All rows share ``plan_loras``."""
        check_steps(steps)
        if not (len(images) == len(prompts) == len(seeds)):
            raise ValueError("images, prompts and seeds must have the same length")
        t0 = time.perf_counter()
        load_seconds, switches = self.prepare(tuple(loras))
        bb = self.backbone
        src = torch.cat([bb.prepare_images(to_tensor([im.convert("RGB")])) for im in images])
        with torch.no_grad():
            cond = bb.encode_prompt(list(prompts), src.to(bb.device, bb.dtype))
        shape = tuple(cond.source_latents.shape[1:])
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        ).to(bb.device, bb.dtype)
        res = euler_sample(bb, cond, steps=steps, noise=noise)
        return EditResult(
            images=to_pil(res.images),
            nfe=res.nfe,
            seconds=time.perf_counter() - t0,
            prompt=prompts[0] if len(set(prompts)) == 1 else "",
            load_seconds=load_seconds,
            switches=switches,
        )

    def edit(
        self,
        images: Image.Image | Sequence[Image.Image],
        effect: str | None = None,
        compose: Sequence[str] | None = None,
        instruction: str | None = None,
        steps: int = DEFAULT_STEPS,
        seed: int = 0,
        batch_size: int = 8,
    ) -> EditResult:
        """Apply one effect, a composition of two, or a free instruction to every image.

        Image i is sampled from seed ``seed + i``; outputs are at the backbone's working resolution."""
        items = _as_images(images)
        check_steps(steps)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ServingError(f"batch_size must be a positive whole number, got {batch_size!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ServingError(f"seed must be a whole number, got {seed!r}.")
        plan = self.plan(effect, compose, instruction)
        t0 = time.perf_counter()
        out: list[Image.Image] = []
        nfe, load_seconds, switches = 0, 0.0, 0
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            seeds = [seed + i + k for k in range(len(chunk))]
            r = self.run(chunk, [plan.prompt] * len(chunk), seeds, steps, plan.loras)
            out += r.images
            nfe, load_seconds, switches = r.nfe, load_seconds + r.load_seconds, switches + r.switches
        return EditResult(
            out, nfe, time.perf_counter() - t0, plan.prompt, load_seconds, switches, plan.routed
        )


# -- the CollectionLoRA -------------------------------------------------------------------------------
def _load_backbone(name: str, model_path: str | os.PathLike | None, device: str | None) -> Backbone:
    from .backbones.registry import load_backbone

    return load_backbone(name, str(model_path) if model_path else None, device=device)


class CollectionEditor(_Editor):
    """A backbone with one CollectionLoRA on it; every effect of its catalog, 8 NFE, no routing."""

    where = "This CollectionLoRA"

    def __init__(self, backbone: Backbone, catalog: Catalog, fused: bool, path: Path | None = None) -> None:
        self.backbone, self.catalog, self.fused, self.path = backbone, catalog, fused, path

    @classmethod
    def load(
        cls,
        lora_path: str | os.PathLike,
        backbone: str | Backbone | None = None,
        model_path: str | os.PathLike | None = None,
        fuse: bool = True,
        device: str | None = None,
    ) -> CollectionEditor:
        """Load ``backbone`` (a name: ``tiny`` / ``qwen-image-edit``, default the one the file names;
        or a Backbone object, which this editor then owns) and the CollectionLoRA at ``lora_path``."""
        path = Path(lora_path)
        try:
            catalog = read_catalog(path)
        except CatalogError as e:
            raise ServingError(str(e)) from e
        if not isinstance(backbone, Backbone):
            backbone = _load_backbone(backbone or catalog.backbone or "tiny", model_path, device)
        if catalog.backbone and catalog.backbone != backbone.name:
            raise ServingError(
                f"{path.name} was distilled for the '{catalog.backbone}' backbone, not '{backbone.name}'."
            )
        if STUDENT_ADAPTER in adapters.adapter_names(backbone.transformer):
            raise ServingError("This backbone already carries a 'student' adapter; load a fresh backbone.")
        try:
            adapters.load_lora(backbone.transformer, path, STUDENT_ADAPTER)
        except ValueError as e:  # LoraFormatError: does not fit the backbone
            raise ServingError(str(e)) from e
        if fuse:
            adapters.fuse(backbone.transformer, [STUDENT_ADAPTER])
        else:
            adapters.activate(backbone.transformer, [STUDENT_ADAPTER])
        return cls(backbone, catalog, fuse, path)

    def effects(self) -> list[EffectInfo]:
        return [
            EffectInfo(e.name, e.prompt, e.trigger, e.student_prompt, e.teacher_prompt)
            for e in self.catalog.entries
        ]

    def effect_names(self) -> list[str]:
        return self.catalog.names()

    def _effect_prompt(self, name: str) -> str:
        return self.catalog.get(name).prompt

    def _compose(self, a: str, b: str) -> Plan:
        return Plan(compose_prompt(self.catalog, a, b), f"{a}+{b}")

    def _instruction(self, text: str) -> Plan:
        return Plan(text, "instruction")


# -- the conventional LoRA bank -----------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an the to of and or in on with it its this that image photo picture please make give apply turn "
    "into as is be by for from all so".split()
)


def _features(text: str) -> Counter:
    """Words (minus filler) and 4-character pieces of words (so 'warmer' still meets 'warm')."""
    words = [w for w in _WORD.findall(text.lower().replace("-", " ").replace("_", " ")) if w not in _STOP]
    feats: Counter = Counter(words)
    for w in words:
        padded = f" {w} "
        feats.update(f"#{padded[i : i + 4]}" for i in range(max(1, len(padded) - 3)))
    return feats


class InstructionRouter:
    """Pick the effect an instruction asks for by similarity to the effects' descriptions.

    ``keyword``: TF-IDF cosine over words and word pieces (no model). ``embedding``: cosine of
    ``embed(texts) -> (N, D)`` vectors (e.g. a text encoder). The conventional bank needs this step;
    a CollectionLoRA does not (a trigger names its effect exactly)."""

    def __init__(
        self, descriptions: dict[str, str], embed: Callable[[list[str]], torch.Tensor] | None = None
    ) -> None:
        if not descriptions:
            raise ServingError("The router needs at least one effect.")
        self.names = list(descriptions)
        self.embed = embed
        docs = [f"{n} {d}" for n, d in descriptions.items()]
        if embed is not None:
            self._vecs = torch.nn.functional.normalize(embed(docs).float(), dim=-1)
        else:
            feats = [_features(d) for d in docs]
            df = Counter(f for fs in feats for f in fs)
            self._idf = {f: math.log((1 + len(docs)) / (1 + c)) + 1.0 for f, c in df.items()}
            self._docs = [self._weigh(fs) for fs in feats]

    @property
    def mode(self) -> str:
        return "embedding" if self.embed is not None else "keyword"

    def _weigh(self, feats: Counter) -> dict[str, float]:
        v = {f: c * self._idf.get(f, 0.0) for f, c in feats.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {f: x / norm for f, x in v.items()}

    def scores(self, instruction: str) -> list[float]:
        if self.embed is not None:
            q = torch.nn.functional.normalize(self.embed([instruction]).float(), dim=-1)
            return (self._vecs @ q[0]).tolist()
        q = self._weigh(_features(instruction))
        return [sum(x * d.get(f, 0.0) for f, x in q.items()) for d in self._docs]

    def route(self, instruction: str) -> str:
        s = self.scores(instruction)
        return self.names[max(range(len(s)), key=s.__getitem__)]


@dataclass(frozen=True)
class BankEntry:
    name: str
    path: Path
    teacher_prompt: str


def read_bank(folder: str | os.PathLike) -> list[BankEntry]:
    """The teacher LoRAs of a bank folder: ``bank.json`` ({name: {file, teacher_prompt}}) when present,
    else every ``*.safetensors`` (name = file stem without ``teacher_``; prompt from the file's
    ``teacher_prompt`` metadata)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ServingError(f"The LoRA bank folder {folder} does not exist.")
    index = folder / BANK_INDEX
    if index.is_file():
        try:
            raw = json.loads(index.read_text())
            entries = [BankEntry(n, folder / v["file"], str(v["teacher_prompt"])) for n, v in raw.items()]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ServingError(f"{index} is not a valid bank index ({e}).") from e
    else:
        entries = []
        for f in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(f, framework="pt", device="cpu") as h:
                    prompt = (h.metadata() or {}).get(TEACHER_PROMPT_KEY, "")
            except (SafetensorError, OSError) as e:
                raise ServingError(f"{f.name} is not a readable .safetensors file ({e}).") from e
            if not prompt:
                raise ServingError(
                    f"{f.name} does not say its teacher prompt; add it to {BANK_INDEX} in {folder} as "
                    '{"<name>": {"file": "<file>", "teacher_prompt": "<prompt>"}}.'
                )
            entries.append(BankEntry(f.stem.removeprefix("teacher_"), f, prompt))
    missing = [e.path.name for e in entries if not e.path.is_file()]
    if missing:
        raise ServingError(f"The bank lists files that are not there: {', '.join(missing)}.")
    if not entries:
        raise ServingError(f"The LoRA bank folder {folder} holds no teacher LoRAs.")
    return entries


class LoraBankEditor(_Editor):
    """The conventional deployment: per request, route to the effect's teacher LoRA file, load it from
    disk unless it is the one loaded, stack Lightning, sample 8 steps."""

    where = "This LoRA bank"

    def __init__(
        self,
        backbone: Backbone,
        bank: list[BankEntry],
        lightning: str | os.PathLike | None,
        router: InstructionRouter | None = None,
    ) -> None:
        self.backbone = backbone
        self.bank = {e.name: e for e in bank}
        self.router = router or InstructionRouter({e.name: e.teacher_prompt for e in bank})
        self.loaded: tuple[str, ...] = ()
        self.switches = 0  # LoRA swaps since start
        self.load_seconds = 0.0  # time spent on them
        self.has_lightning = lightning is not None
        if lightning is not None:
            adapters.load_lora(backbone.transformer, lightning, LIGHTNING_ADAPTER)

    @classmethod
    def load(
        cls,
        bank: str | os.PathLike | list[BankEntry],
        lightning: str | os.PathLike | None,
        backbone: str | Backbone = "tiny",
        model_path: str | os.PathLike | None = None,
        device: str | None = None,
    ) -> LoraBankEditor:
        entries = bank if isinstance(bank, list) else read_bank(bank)
        if not isinstance(backbone, Backbone):
            backbone = _load_backbone(backbone, model_path, device)
        try:
            return cls(backbone, entries, lightning)
        except ValueError as e:
            raise ServingError(str(e)) from e

    def effects(self) -> list[EffectInfo]:
        return [
            EffectInfo(e.name, e.teacher_prompt, teacher_prompt=e.teacher_prompt) for e in self.bank.values()
        ]

    def effect_names(self) -> list[str]:
        return list(self.bank)

    def _effect_prompt(self, name: str) -> str:
        return self.bank[name].teacher_prompt

    def _loras_for(self, names: list[str]) -> tuple[str, ...]:
        return tuple(names)

    def _compose(self, a: str, b: str) -> Plan:
        # Stack both teachers (+ Lightning) under the same composition template, with teacher prompts.
        from .export import COMPOSITION_TEMPLATE

        desc = {"A": self.bank[a].teacher_prompt.rstrip(". "), "B": self.bank[b].teacher_prompt.rstrip(". ")}
        prompt = re.sub(r"\{([AB])\}", lambda m: desc[m.group(1)], COMPOSITION_TEMPLATE)
        return Plan(prompt, f"{a}+{b}", (a, b))

    def _instruction(self, text: str) -> Plan:
        name = self.router.route(text)
        return Plan(self.bank[name].teacher_prompt, "instruction", (name,), routed=name)

    def prepare(self, loras: tuple[str, ...]) -> tuple[float, int]:
        if not loras:
            raise ServingError("A LoRA bank request needs an effect (or an instruction to route).")
        tr = self.backbone.transformer
        accel = [LIGHTNING_ADAPTER] if self.has_lightning else []
        if loras == self.loaded:
            adapters.activate(tr, [f"{BANK_PREFIX}{i}" for i in range(len(loras))] + accel)
            return 0.0, 0
        t0 = time.perf_counter()
        adapters.activate(tr, None)
        for name in adapters.adapter_names(tr):
            if name.startswith(BANK_PREFIX):
                adapters.delete(tr, name)
        self.loaded = ()
        for i, name in enumerate(loras):
            adapters.load_lora(tr, self.bank[name].path, f"{BANK_PREFIX}{i}")
        adapters.activate(tr, [f"{BANK_PREFIX}{i}" for i in range(len(loras))] + accel)
        self.loaded = loras
        seconds = time.perf_counter() - t0
        self.switches += 1
        self.load_seconds += seconds
        return seconds, 1
