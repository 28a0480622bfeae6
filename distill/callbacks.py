"""How a long job in ``distill`` reports to whoever runs it (CLI, studio worker, tests).

``distill`` knows neither the UI nor the database: trainers take a ``Reporter`` and call it; the
studio's run worker implements it with DB rows, the CLI with tqdm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from PIL import Image


class Reporter(Protocol):
    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        """Called every step (implementations throttle writes themselves)."""

    def checkpoint(self, step: int, path: Path) -> None:
        """A complete checkpoint was written atomically at ``path``."""

    def samples(self, step: int, grid: Image.Image) -> None:
        """A preview grid of current outputs."""

    def should_stop(self) -> bool:
        """True when the user asked the job to stop (it then checkpoints and returns)."""


class NullReporter:
    """Reports nowhere; stops never."""

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        pass

    def checkpoint(self, step: int, path: Path) -> None:
        pass

    def samples(self, step: int, grid: Image.Image) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class TqdmReporter(NullReporter):
    """CLI progress: a tqdm bar with the latest losses."""

    def __init__(self, desc: str):
        from tqdm import tqdm

        self._bar = tqdm(desc=desc, mininterval=2)

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        self._bar.total = total
        self._bar.n = step
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:4]}, refresh=False)
        self._bar.refresh()

    def checkpoint(self, step: int, path: Path) -> None:
        self._bar.write(f"checkpoint at step {step}: {path}")

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> TqdmReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
