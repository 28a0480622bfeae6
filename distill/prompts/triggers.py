"""Unique trigger words per effect, kept near-orthogonal in the backbone's text encoder (AOP, §4.3).

A trigger looks like Table 6 of the paper: ``<slug_Xy5995>``, a slug of the effect name plus a random
mixed-case alphanumeric suffix that does not occur in natural text.

How "orthogonal" is measured. Raw cosines between pooled text embeddings say little: untrained or
small encoders put every text in one narrow cone (raw cosines of 0.6-0.99 between unrelated words),
and every trigger shares the ``<..._...>`` syntax. So we centre the embeddings before taking cosines:
we subtract the mean embedding of a fixed reference set of everyday words written in trigger form
(``<river_k3Xq9Pa>``). That mean carries the encoder's common direction and the trigger syntax; what
remains is what tells triggers apart. On this scale 0 means "as related as two unrelated everyday
words in trigger form" and 1 means "the same direction".
"""

from __future__ import annotations

import random
import re
import string
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

EmbedFn = Callable[[list[str]], torch.Tensor]  # texts -> (N, D) pooled embeddings

# Measured on a randomly initialised 2-layer T5 over ByT5 bytes (the tiny backbone's text encoder
# before pretraining), centred as above: unrelated everyday-word triggers sit at 0.0 +- 0.2 (95% below
# 0.32), two triggers that share a slug at ~0.67. A pair above 0.5 is closer than nearly every pair of
# unrelated words and approaches "same name, different suffix", so 0.5 is the default line.
DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX_REDRAWS = 100
CANDIDATES_PER_REDRAW = 8  # suffixes tried (one embed call) per redraw of a trigger

SUFFIX_LENGTH = 7
SLUG_MAX_LENGTH = 40

# Everyday words that name no image effect; their trigger forms set the centre (see module doc).
REFERENCE_WORDS = (
    "apple river chair music window mountain bread doctor train letter garden cloud pencil ocean "
    "market candle bridge forest coffee engine basket number castle ticket planet kitchen violin "
    "ladder island blanket wallet thunder"
).split()
REFERENCE_SEED = 20240917  # fixed: the reference set must not change with the caller's seed


def slugify(effect_name: str) -> str:
    """Lowercase ASCII letters and digits joined by ``_``; ``effect`` when nothing is left."""
    ascii_name = unicodedata.normalize("NFKD", effect_name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^0-9a-z]+", "_", ascii_name.lower()).strip("_")[:SLUG_MAX_LENGTH].strip("_")
    return slug or "effect"


def random_suffix(rng: random.Random, length: int = SUFFIX_LENGTH) -> str:
    """Mixed case letters and digits with at least one of each, e.g. ``RN8pcKD``."""
    chars = [
        rng.choice(string.ascii_uppercase),
        rng.choice(string.ascii_lowercase),
        rng.choice(string.digits),
    ]
    chars += [rng.choice(string.ascii_letters + string.digits) for _ in range(length - 3)]
    rng.shuffle(chars)
    return "".join(chars)


def make_trigger(effect_name: str, rng: random.Random) -> str:
    """A trigger word for one effect, e.g. ``make_trigger("Warm Grade", rng) -> "<warm_grade_Xy59Q9a>"``."""
    return f"<{slugify(effect_name)}_{random_suffix(rng)}>"


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of ``vectors`` (N, D) -> (N, N), in float32."""
    v = torch.nn.functional.normalize(vectors.detach().float().reshape(vectors.shape[0], -1), dim=-1)
    return v @ v.T


def reference_triggers() -> list[str]:
    rng = random.Random(REFERENCE_SEED)
    return [make_trigger(word, rng) for word in REFERENCE_WORDS]


def _embed(embed: EmbedFn, texts: list[str]) -> torch.Tensor:
    vectors = embed(texts)
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or vectors.shape[0] != len(texts):
        shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise ValueError(f"embed must return one vector per text, shape ({len(texts)}, D); got {shape}")
    return vectors.detach().float().cpu()


def reference_centre(embed: EmbedFn) -> torch.Tensor:
    """Mean embedding of the reference triggers (D,): subtracted before every cosine."""
    return _embed(embed, reference_triggers()).mean(dim=0)


@dataclass
class TriggerCheck:
    """Centred pairwise cosines of a set of triggers and the pairs above the threshold."""

    names: list[str]
    triggers: dict[str, str]
    cosine: torch.Tensor  # (N, N) centred cosines, rows/cols in ``names`` order
    threshold: float
    fixed: set[str] = field(default_factory=set)  # names whose triggers were given (not drawn here)

    @property
    def max_offdiag(self) -> float:
        return _max_offdiag(self.cosine)

    @property
    def failing_pairs(self) -> list[tuple[str, str, float]]:
        """(name_a, name_b, cosine) for every pair above the threshold, most similar first."""
        n = len(self.names)
        pairs = [
            (self.names[i], self.names[j], float(self.cosine[i, j]))
            for i in range(n)
            for j in range(i + 1, n)
            if float(self.cosine[i, j]) > self.threshold
        ]
        return sorted(pairs, key=lambda p: -p[2])

    @property
    def ok(self) -> bool:
        return not self.failing_pairs

    def report(self) -> str:
        """One paragraph a curator can read."""
        if self.ok:
            return (
                f"All {len(self.names)} trigger words are distinct enough in the text encoder "
                f"(highest similarity {self.max_offdiag:.2f}, limit {self.threshold:.2f})."
            )
        lines = [
            f"{len(self.failing_pairs)} pair(s) of trigger words are too similar in the text encoder "
            f"(limit {self.threshold:.2f}); the student may mix these effects up:"
        ]
        for a, b, c in self.failing_pairs[:10]:
            note = " (both kept as given)" if a in self.fixed and b in self.fixed else ""
            lines.append(f"  {self.triggers[a]} ({a}) and {self.triggers[b]} ({b}): {c:.2f}{note}")
        if len(self.failing_pairs) > 10:
            lines.append(f"  ... and {len(self.failing_pairs) - 10} more")
        return "\n".join(lines)


@dataclass
class TriggerAssignment(TriggerCheck):
    """Triggers drawn for new effects (existing ones kept), and how many redraws it took."""

    redraws: int = 0


def _max_offdiag(cosine: torch.Tensor) -> float:
    n = cosine.shape[0]
    if n < 2:
        return float("-inf")
    off = cosine.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    return float(off.max())


def check_triggers(
    triggers: Mapping[str, str],
    embed: EmbedFn,
    threshold: float = DEFAULT_THRESHOLD,
    fixed: set[str] | None = None,
) -> TriggerCheck:
    """Check given triggers (e.g. after a curator edited them) without changing any."""
    _check_unique(triggers)
    names = list(triggers)
    centre = reference_centre(embed)
    vectors = _embed(embed, [triggers[n] for n in names]) - centre if names else torch.zeros(0, 1)
    return TriggerCheck(names, dict(triggers), cosine_matrix(vectors), threshold, set(fixed or ()))


def _check_unique(triggers: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    for name, trig in triggers.items():
        if not trig.strip():
            raise ValueError(f"The trigger word of effect '{name}' is empty.")
        if trig in seen:
            raise ValueError(f"Effects '{seen[trig]}' and '{name}' have the same trigger word {trig}.")
        seen[trig] = name


def assign_triggers(
    names: Sequence[str],
    embed: EmbedFn,
    threshold: float = DEFAULT_THRESHOLD,
    existing: Mapping[str, str] | None = None,
    seed: int = 0,
    max_redraws: int = DEFAULT_MAX_REDRAWS,
) -> TriggerAssignment:
    """Draw a unique trigger for each new effect and redraw the worst offenders until every pair of
    triggers (new and existing) is at most ``threshold`` apart in centred cosine, or ``max_redraws``
    redraws were spent. Existing triggers never change. The result lists ``names`` first, then the
    existing effects not in ``names``; when it is not ``ok``, ``report()`` names the failing pairs.
    """
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if list(names).count(n) > 1})
        raise ValueError(f"Effect names must be unique; repeated: {', '.join(dupes)}")
    existing = dict(existing or {})
    _check_unique(existing)
    all_names = list(names) + [n for n in existing if n not in names]
    fixed = [n in existing for n in all_names]
    rng = random.Random(seed)
    used = set(existing.values())

    def draw(name: str) -> str:
        for _ in range(1000):  # collisions are astronomically rare; the bound keeps the loop finite
            trig = make_trigger(name, rng)
            if trig not in used:
                return trig
        raise RuntimeError("could not draw a unique trigger")  # pragma: no cover

    triggers: dict[str, str] = {}
    for name in all_names:
        triggers[name] = existing[name] if name in existing else draw(name)
        used.add(triggers[name])

    centre = reference_centre(embed)
    vectors = _embed(embed, [triggers[n] for n in all_names]) - centre if all_names else torch.zeros(0, 1)
    cosine = cosine_matrix(vectors)
    n = len(all_names)
    movable = torch.tensor(fixed, dtype=torch.bool).logical_not()
    eye = torch.eye(n, dtype=torch.bool)
    redraws = 0
    while redraws < max_redraws and n > 1:
        off = cosine.masked_fill(eye, float("-inf"))
        # Only pairs with at least one drawn trigger can be helped by a redraw.
        fixable = (movable[:, None] | movable[None, :]) & (off > threshold)
        if not bool(fixable.any()):
            break
        i, j = divmod(int(off.masked_fill(~fixable, float("-inf")).argmax()), n)
        row_max = off.max(dim=1).values
        k = max((m for m in (i, j) if movable[m]), key=lambda m: float(row_max[m]))
        candidates = [draw(all_names[k]) for _ in range(CANDIDATES_PER_REDRAW)]
        cand_vectors = _embed(embed, candidates) - centre
        cand = torch.nn.functional.normalize(cand_vectors, dim=-1)
        others = torch.nn.functional.normalize(vectors, dim=-1)
        sims = cand @ others.T  # (C, N)
        sims[:, k] = float("-inf")
        best = int(sims.max(dim=1).values.argmin())
        redraws += 1
        if float(sims[best].max()) < float(row_max[k]):  # accept only improvements: max never rises
            used.discard(triggers[all_names[k]])
            triggers[all_names[k]] = candidates[best]
            used.add(candidates[best])
            vectors[k] = cand_vectors[best]
            cosine = cosine_matrix(vectors)

    return TriggerAssignment(
        names=all_names,
        triggers=triggers,
        cosine=cosine,
        threshold=threshold,
        fixed={nm for nm, f in zip(all_names, fixed) if f},
        redraws=redraws,
    )
