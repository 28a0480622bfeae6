"""`python -m studio ...`: the same functions the UI calls, from a terminal.

Each command group lives in ``studio/commands/<group>.py`` with ``register(subparsers)``; its handler
gets the parsed args and an opened ``Studio``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .config import StudioConfig, default_data_dir

COMMAND_MODULES = ["library", "bench", "runs", "teacher", "prompts", "distill", "serve", "study"]


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="studio data folder (default: $STUDIO_DATA_DIR or ./studio-data)",
    )
    p.add_argument(
        "--db-url", default=None, help="SQLAlchemy URL (default: $STUDIO_DB_URL or SQLite under the data dir)"
    )


def config_from_args(args: argparse.Namespace) -> StudioConfig:
    return StudioConfig(
        data_dir=args.data_dir or default_data_dir(),
        db_url=args.db_url,
        backbone=getattr(args, "backbone", None) or "tiny",
        model_path=getattr(args, "model_path", None),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m studio", description="CollectionLoRA Studio command line"
    )
    add_common(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"studio.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    from .context import Studio  # opened only once a command really runs

    try:
        studio = Studio.open(config_from_args(args))
        return int(args.handler(args, studio) or 0)
    except (ValueError, OSError, RuntimeError) as e:  # curator-facing errors: message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
