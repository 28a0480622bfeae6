"""Model-based metrics of the paper's Table 1, each run only where its weights or endpoint are set up.

- CLIP-I: cosine of CLIP image embeddings, output vs ground truth (the paper's "CLIP for style
  alignment"; its 0.7 scale is an image-image cosine). CLIP-T: output vs the teacher prompt.
- DINO: cosine of the output's and the *source's* embeddings (subject consistency, as in the paper).
- DreamSim: perceptual distance output vs ground truth (lower is better).
- EditReward: always unavailable here (see ``EDITREWARD_REASON``).
- BCR and VSA: the MLLM judge with the appendix prompts (``distill.mllm_judge``).

Nothing is downloaded: models load from local folders named by environment variables
(``JudgesConfig.from_env``). A metric that cannot run returns ``Unavailable(metric, reason)``,
never a number.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .mllm_judge import DEFAULT_CRITERIA, ImageLike, JudgeCase, MLLMJudge, as_pil
from .prompts.vlm import VLMConfig

ENV_CLIP = "STUDIO_CLIP_MODEL"  # a transformers CLIPModel + CLIPProcessor folder
ENV_DINO = "STUDIO_DINO_MODEL"  # a transformers AutoModel + AutoImageProcessor folder (e.g. dinov2)
ENV_DREAMSIM = "STUDIO_DREAMSIM_DIR"  # the dreamsim package's cache_dir, with its weights in it
ENV_EDITREWARD = "STUDIO_EDITREWARD_MODEL"
ENV_JUDGE_BASE_URL = "STUDIO_JUDGE_BASE_URL"  # an OpenAI-compatible endpoint, e.g. http://host:8000/v1
ENV_JUDGE_MODEL = "STUDIO_JUDGE_MODEL"  # e.g. qwen-vl-max-latest (the paper's judge)
ENV_JUDGE_API_KEY = "STUDIO_JUDGE_API_KEY"  # read by the client at request time, never stored

# The files dreamsim(pretrained=True) needs in its cache_dir; without them it would download them.
DREAMSIM_FILES = (
    "dino_vitb16_pretrain.pth",
    "open_clip_vitb16_pretrain.pth.tar",
    "clip_vitb16_pretrain.pth.tar",
    "dino_vitb16_lora",
    "open_clip_vitb16_lora",
    "clip_vitb16_lora",
)
EDITREWARD_REASON = (
    "not supported offline: EditReward scores with its authors' reward head on Qwen2.5-VL-7B, and its "
    "inference code is not a PyPI package"
)

METRICS = {  # key -> table label (arrow: which way is better)
    "clip_image": "CLIP-I ↑",
    "clip_text": "CLIP-T ↑",
    "dino": "DINO ↑",
    "dreamsim": "DreamSim ↓",
    "editreward": "EditReward ↑",
    "bcr": "BCR (MLLM) ↓",
    "vsa": "VSA (MLLM) ↑",
}


@dataclass(frozen=True)
class Unavailable:
    metric: str
    reason: str

    def __str__(self) -> str:
        return f"{self.metric}: unavailable ({self.reason})"


@dataclass(frozen=True)
class MetricMean:
    value: float
    n: int  # records that got a number
    skipped: int = 0  # records that did not (unparsable answers, failed requests)
    note: str = ""  # the first reason a record was skipped


MetricResult = MetricMean | Unavailable


@dataclass(frozen=True)
class JudgesConfig:
    """Where each model-based metric comes from; None: not configured."""

    clip_model: str | None = None
    dino_model: str | None = None
    dreamsim_dir: str | None = None
    editreward_model: str | None = None
    judge: VLMConfig | None = None
    judge_problem: str | None = None  # why the judge endpoint settings are unusable, if they are
    device: str | None = None  # None: cuda when available
    batch_size: int = 16

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JudgesConfig:
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            return env.get(name, "").strip() or None

        base, model = get(ENV_JUDGE_BASE_URL), get(ENV_JUDGE_MODEL)
        judge, problem = None, None
        if base and model:
            if base.startswith(("http://", "https://")):
                judge = VLMConfig(base_url=base, model=model, api_key_env=ENV_JUDGE_API_KEY, temperature=0.0)
            else:
                problem = f"{ENV_JUDGE_BASE_URL} must be an http(s) address such as http://localhost:8000/v1"
        elif base or model:
            problem = (
                f"{ENV_JUDGE_MODEL if base else ENV_JUDGE_BASE_URL} is not set, only half of the endpoint is"
            )
        else:
            problem = f"{ENV_JUDGE_BASE_URL} and {ENV_JUDGE_MODEL} not set"
        return cls(get(ENV_CLIP), get(ENV_DINO), get(ENV_DREAMSIM), get(ENV_EDITREWARD), judge, problem)


@dataclass
class JudgeRecord:
    """One output to score. Images: PIL or numpy H x W x 3 in [0, 1]."""

    output: ImageLike
    source: ImageLike
    truth: ImageLike
    effect: str
    teacher_prompt: str
    template: tuple[ImageLike, ImageLike] | None = None  # Fig. 11's reference pair; None: (source, truth)
    criteria: str = DEFAULT_CRITERIA


# --- Loading the embedding models ------------------------------------------------------------


def _device(config: JudgesConfig) -> str:
    import torch

    return config.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _folder(metric: str, env_name: str, value: str | None) -> Path | Unavailable:
    if not value:
        return Unavailable(metric, f"{env_name} not set")
    path = Path(value).expanduser()
    if not path.is_dir():
        return Unavailable(metric, f"folder not found: {path} (from {env_name})")
    return path


def _l2(x: Any) -> np.ndarray:
    x = x.detach().float().cpu().numpy()
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _pooled(out: Any) -> Any:
    """transformers 5 returns model outputs from get_*_features; older versions a tensor."""
    return out if hasattr(out, "detach") else out.pooler_output


class ClipScorer:
    def __init__(self, folder: Path, device: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.device = device

    def image_embeddings(self, images: Sequence[ImageLike]) -> np.ndarray:
        import torch

        px = self.processor(images=[as_pil(im) for im in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            return _l2(_pooled(self.model.get_image_features(pixel_values=px.to(self.device))))

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        # long prompts are cut at the model's context (77 tokens for OpenAI's CLIPs)
        limit = min(
            self.processor.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings
        )
        tok = self.processor(
            text=list(texts), return_tensors="pt", padding=True, truncation=True, max_length=limit
        )
        with torch.inference_mode():
            feats = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
            )
        return _l2(_pooled(feats))


class DinoScorer:
    def __init__(self, folder: Path, device: str) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.device = device

    def image_embeddings(self, images: Sequence[ImageLike]) -> np.ndarray:
        """The CLS token (after the final layer norm where the model has a pooler), L2-normalised."""
        import torch

        px = self.processor(images=[as_pil(im) for im in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.model(pixel_values=px.to(self.device))
        pooled = getattr(out, "pooler_output", None)
        return _l2(pooled if pooled is not None else out.last_hidden_state[:, 0])


class DreamSimScorer:
    def __init__(self, folder: Path, device: str) -> None:
        from dreamsim import dreamsim  # an optional package: checked before this is built

        self.model, self.preprocess = dreamsim(pretrained=True, device=device, cache_dir=str(folder))
        self.device = device

    def distances(self, a: Sequence[ImageLike], b: Sequence[ImageLike]) -> np.ndarray:
        import torch

        def batch(images: Sequence[ImageLike]) -> Any:
            return torch.cat([self.preprocess(as_pil(im)) for im in images]).to(self.device)

        with torch.inference_mode():
            return self.model(batch(a), batch(b)).reshape(-1).float().cpu().numpy()


def _has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _load(metric: str, folder: Path, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except Exception as e:  # any failure means the same to a curator: these weights did not load
        return Unavailable(metric, f"failed to load from {folder}: {type(e).__name__}: {e}")


def load_clip(config: JudgesConfig) -> ClipScorer | Unavailable:
    folder = _folder("CLIP", ENV_CLIP, config.clip_model)
    if isinstance(folder, Unavailable):
        return folder
    return _load("CLIP", folder, lambda: ClipScorer(folder, _device(config)))


def load_dino(config: JudgesConfig) -> DinoScorer | Unavailable:
    folder = _folder("DINO", ENV_DINO, config.dino_model)
    if isinstance(folder, Unavailable):
        return folder
    return _load("DINO", folder, lambda: DinoScorer(folder, _device(config)))


def load_dreamsim(config: JudgesConfig) -> DreamSimScorer | Unavailable:
    folder = _folder("DreamSim", ENV_DREAMSIM, config.dreamsim_dir)
    if isinstance(folder, Unavailable):
        return folder
    if not _has_package("dreamsim"):
        return Unavailable("DreamSim", "the dreamsim package is not installed (pip install dreamsim)")
    missing = [f for f in DREAMSIM_FILES if not (folder / f).exists()]
    if missing:  # dreamsim() would try to download them
        return Unavailable("DreamSim", f"{folder} lacks its weights: {', '.join(missing)}")
    return _load("DreamSim", folder, lambda: DreamSimScorer(folder, _device(config)))


def editreward_unavailable(config: JudgesConfig) -> Unavailable:
    if not config.editreward_model:
        return Unavailable("EditReward", f"{ENV_EDITREWARD} not set; and {EDITREWARD_REASON}")
    return Unavailable("EditReward", f"{EDITREWARD_REASON}; {config.editreward_model} is not used")


# --- Scoring ----------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> MetricMean:
    return MetricMean(float(np.mean(values)), len(values))


def summarize_judged(cases: Sequence[JudgeCase], judge_name: str = "MLLM judge") -> dict[str, MetricResult]:
    """BCR = share of bad cases; VSA = mean of (0 if bad else consistency), each over the cases that
    got a verdict; unavailable when none did."""
    out: dict[str, MetricResult] = {}
    for key, values in (
        ("bcr", [float(c.bad_case) for c in cases if c.bad_case is not None]),
        ("vsa", [c.vsa for c in cases if c.vsa is not None]),
    ):
        label = f"{judge_name} ({key.upper()})"
        missing = [
            c.problem or "no verdict" for c in cases if (c.bad_case if key == "bcr" else c.vsa) is None
        ]
        if not values:
            out[key] = Unavailable(label, f"no verdicts: {missing[0] if missing else 'nothing to judge'}")
        else:
            out[key] = MetricMean(
                float(np.mean(values)), len(values), len(missing), missing[0] if missing else ""
            )
    return out


class ModelJudges:
    """Loads each configured model once; ``score(records)`` per system."""

    def __init__(self, config: JudgesConfig | None = None, judge: MLLMJudge | None = None) -> None:
        self.config = config or JudgesConfig.from_env()
        self.clip = load_clip(self.config)
        self.dino = load_dino(self.config)
        self.dreamsim = load_dreamsim(self.config)
        self.judge = judge or (MLLMJudge(self.config.judge) if self.config.judge else None)

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()

    def score(self, records: Sequence[JudgeRecord | tuple]) -> dict[str, MetricResult]:
        """The mean of each metric over ``records`` (or why it is unavailable), keyed as ``METRICS``.
        A metric that fails while scoring becomes Unavailable too: one bad model spoils no table."""
        recs = [r if isinstance(r, JudgeRecord) else JudgeRecord(*r) for r in records]
        if not recs:
            return {k: Unavailable(label, "no outputs to score") for k, label in METRICS.items()}
        out: dict[str, MetricResult] = {}
        for keys, scorer, run in (
            (("clip_image", "clip_text"), self.clip, self._clip),
            (("dino",), self.dino, self._dino),
            (("dreamsim",), self.dreamsim, self._dreamsim),
        ):
            if isinstance(scorer, Unavailable):
                out.update(dict.fromkeys(keys, scorer))
                continue
            try:
                out.update(run(recs))
            except Exception as e:  # reported in the table instead of ending a long bench run
                name = {"clip_image": "CLIP", "dino": "DINO", "dreamsim": "DreamSim"}[keys[0]]
                out.update(
                    dict.fromkeys(keys, Unavailable(name, f"failed while scoring: {type(e).__name__}: {e}"))
                )
        out["editreward"] = editreward_unavailable(self.config)
        out.update(self._judged(recs))
        return out

    def _embed(self, fn: Callable[[list], np.ndarray], items: list) -> np.ndarray:
        size = self.config.batch_size
        return np.concatenate([fn(items[i : i + size]) for i in range(0, len(items), size)])

    def _clip(self, recs: list[JudgeRecord]) -> dict[str, MetricResult]:
        o = self._embed(self.clip.image_embeddings, [r.output for r in recs])
        t = self._embed(self.clip.image_embeddings, [r.truth for r in recs])
        p = self._embed(self.clip.text_embeddings, [r.teacher_prompt for r in recs])
        return {"clip_image": _mean((o * t).sum(-1)), "clip_text": _mean((o * p).sum(-1))}

    def _dino(self, recs: list[JudgeRecord]) -> dict[str, MetricResult]:
        o = self._embed(self.dino.image_embeddings, [r.output for r in recs])
        s = self._embed(self.dino.image_embeddings, [r.source for r in recs])
        return {"dino": _mean((o * s).sum(-1))}

    def _dreamsim(self, recs: list[JudgeRecord]) -> dict[str, MetricResult]:
        pairs = [(r.output, r.truth) for r in recs]
        return {"dreamsim": _mean(self._embed(lambda ps: self.dreamsim.distances(*zip(*ps)), pairs))}

    def _judged(self, recs: list[JudgeRecord]) -> dict[str, MetricResult]:
        if self.judge is None:
            why = self.config.judge_problem or f"{ENV_JUDGE_BASE_URL} and {ENV_JUDGE_MODEL} not set"
            return {"bcr": Unavailable("MLLM judge (BCR)", why), "vsa": Unavailable("MLLM judge (VSA)", why)}
        cases = [
            (r.output, r.source, r.template or (r.source, r.truth), r.teacher_prompt, r.criteria)
            for r in recs
        ]
        return summarize_judged(self.judge.judge_all(cases), f"MLLM judge {self.judge.vlm.config.model}")


def model_metrics(
    records: Sequence[JudgeRecord | tuple], config: JudgesConfig | None = None
) -> dict[str, MetricResult]:
    """One-off: load what ``config`` (default: the environment) names and score ``records``."""
    judges = ModelJudges(config)
    try:
        return judges.score(records)
    finally:
        judges.close()


def judges_table(rows: Sequence[tuple[str, Mapping[str, MetricResult]]], title: str) -> str:
    """Markdown: one row per system, then every distinct reason a metric is unavailable or partial."""
    lines = [f"### {title}", "", "| System | " + " | ".join(METRICS.values()) + " |"]
    lines.append("|---" * (len(METRICS) + 1) + "|")
    notes: list[str] = []
    for system, res in rows:
        cells = []
        for key in METRICS:
            m = res.get(key, Unavailable(METRICS[key], "not computed"))
            if isinstance(m, Unavailable):
                cells.append("n/a")
                notes.append(f"- {m}")
            else:
                cells.append(f"{m.value:.3f}" + (f" ({m.n}/{m.n + m.skipped})" if m.skipped else ""))
                if m.skipped:
                    notes.append(f"- {system}, {METRICS[key]}: {m.skipped} without a number, e.g. {m.note}")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + list(dict.fromkeys(notes))) + "\n"
