"""The studio's handles on its state: database sessions and the blob store, opened once."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage import BlobStore, database_url, init_db, session_factory, session_scope
from storage.blobs import DISK_FULL_ERRNOS

from .config import StudioConfig


class DataDirError(OSError):
    """The studio's data folder cannot be created or written; the message says what to do.

    An OSError, so the CLI, app.py and the worker report it as a message, not a traceback."""


def check_data_dir(data_dir: Path) -> None:
    """Create ``data_dir`` if needed and prove it writable, before the database or a blob is touched.

    The probe is an empty file: a full disk still opens (the curator may need the studio to delete old
    runs); the writes that do not fit say so themselves."""
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".write-check-{os.getpid()}"
        probe.open("wb").close()
        probe.unlink()
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            return
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            why = "part of that path is a file, not a folder; choose another path or"
        else:
            why = f"it is not writable ({e.strerror}); fix its permissions, or"
        raise DataDirError(
            f"The studio cannot use its data folder {data_dir}: {why} point the studio at a folder you can "
            "write to (--data-dir or STUDIO_DATA_DIR)."
        ) from e


@dataclass
class Studio:
    config: StudioConfig
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore

    @classmethod
    def open(cls, config: StudioConfig) -> Studio:
        check_data_dir(config.data_dir)
        engine = init_db(database_url(config.data_dir, config.db_url))
        return cls(config, engine, session_factory(engine), BlobStore(config.blob_dir))

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.sessions) as s:
            yield s
