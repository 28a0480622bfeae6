"""The studio's handles on its state: database sessions and the blob store, opened once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage import BlobStore, database_url, init_db, session_factory, session_scope

from .config import StudioConfig


@dataclass
class Studio:
    config: StudioConfig
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore

    @classmethod
    def open(cls, config: StudioConfig) -> Studio:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        engine = init_db(database_url(config.data_dir, config.db_url))
        return cls(config, engine, session_factory(engine), BlobStore(config.blob_dir))

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.sessions) as s:
            yield s
