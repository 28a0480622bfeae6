"""Start CollectionLoRA Studio in the browser: `python app.py` (tiny backbone, SQLite in ./studio-data).

Bound to 127.0.0.1 it needs no login. Bound to any other address it refuses to start without
authentication: --auth USER:PASSWORD (repeatable), --auth-file FILE, --token TOKEN, or the
environment variables STUDIO_AUTH=user:pass / STUDIO_TOKEN.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from studio.cli import add_common, config_from_args  # stdlib-only imports: --help stays instant

BACKBONES = ("tiny", "qwen-image-edit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python app.py", description="CollectionLoRA Studio (Gradio UI)")
    p.add_argument(
        "--backbone", choices=BACKBONES, default="tiny", help="model family (default: tiny, embedded)"
    )
    p.add_argument("--model-path", default=None, help="local folder or hub id of the backbone's weights")
    add_common(p)  # --data-dir, --db-url: as `python -m studio` has them
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need auth)"
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", action="append", default=None, metavar="USER:PASS", help="a login (repeatable)")
    p.add_argument("--auth-file", type=Path, default=None, help="a file of USER:PASS lines")
    p.add_argument("--token", default=None, help="an access token (Authorization: Bearer, or ?token= once)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "alembic"):  # per-request and per-migration chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Imported after parsing so that --help is instant and needs no Gradio.
    from studio.ui.access import AccessError, resolve_access

    try:
        access = resolve_access(args.host, args.auth, args.auth_file, args.token)
    except AccessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = config_from_args(args)
    from studio.ui.app import launch

    try:
        launch(config, args.host, args.port, access)
    except (ValueError, OSError) as e:  # curator-facing: bad data dir, DB URL, busy port
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
