"""Database connection: URL resolution, engines, schema upgrades (Alembic), sessions.

SQLite (a file in the data dir) is the default; any SQLAlchemy URL works. SQLite engines run
in WAL mode with foreign keys enforced and a 30 s busy timeout, because the UI and the run
workers are separate processes writing to the same file.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

try:  # POSIX only; elsewhere concurrent first starts are simply not serialised.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

DB_URL_ENV = "STUDIO_DB_URL"
DB_FILENAME = "studio.db"
SQLITE_BUSY_TIMEOUT_S = 30.0
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Alembic keeps its migration context in module globals: one upgrade at a time per process.
_UPGRADE_LOCK = threading.Lock()


class DatabaseError(RuntimeError):
    """The database cannot be opened or upgraded; the message says what to do."""


def database_url(data_dir: Path, db_url: str | None = None) -> str:
    """The database URL: `db_url`, else $STUDIO_DB_URL, else `sqlite:///<data_dir>/studio.db`."""
    if db_url:
        return db_url
    env_url = os.environ.get(DB_URL_ENV, "").strip()
    if env_url:
        return env_url
    return f"sqlite:///{Path(data_dir).expanduser().resolve() / DB_FILENAME}"


def _parse(url: str | URL) -> URL:
    try:
        return make_url(url)
    except ArgumentError as e:
        raise DatabaseError(
            f"The database address {str(url)!r} is not valid. Use e.g. sqlite:////path/to/studio.db "
            f"or postgresql+psycopg://user:pass@host/db (set {DB_URL_ENV} or leave it unset)."
        ) from e


def _sqlite_file(url: URL) -> Path | None:
    """The file behind a SQLite URL, or None for in-memory databases."""
    if url.get_backend_name() != "sqlite":
        return None
    db = url.database or ""
    if db in ("", ":memory:") or db.startswith("file:") or url.query.get("mode") == "memory":
        return None
    return Path(db)


def _on_sqlite_connect(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        # WAL lets the UI read while a worker writes; a no-op ("memory") for in-memory DBs.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # durable enough with WAL, much faster commits
    finally:
        cur.close()


def make_engine(url: str | URL) -> Engine:
    """An Engine for `url`; SQLite gets WAL, foreign keys, a busy timeout and cross-thread use."""
    parsed = _parse(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    path = _sqlite_file(parsed)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatabaseError(
                f"Cannot create the folder for the studio database ({path.parent}): {e.strerror}. "
                "Choose a data folder you can write to, or set STUDIO_DB_URL."
            ) from e
    engine = create_engine(
        parsed,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
    )
    event.listen(engine, "connect", _on_sqlite_connect)
    return engine


def alembic_config(url: str | URL) -> Config:
    """An Alembic config for our migrations that works from any working directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates '%', which URL-encoded passwords contain.
    url_str = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", url_str.replace("%", "%%"))
    return cfg


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialise schema upgrades of one SQLite file across processes (UI and workers start together)."""
    path = _sqlite_file(engine.url)
    if path is None or fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".migrate.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema of `engine`'s database to `revision` (Alembic upgrade)."""
    cfg = alembic_config(engine.url)
    with _UPGRADE_LOCK, _migration_lock(engine), engine.begin() as conn:
        cfg.attributes["connection"] = conn  # env.py migrates on this connection
        command.upgrade(cfg, revision)


def init_db(url: str | URL) -> Engine:
    """Open the database at `url`, create or upgrade its schema, and return the Engine."""
    engine = make_engine(url)
    try:
        upgrade(engine)
    except DatabaseError:
        raise
    except Exception as e:
        engine.dispose()
        raise DatabaseError(
            f"Could not prepare the studio database at {engine.url.render_as_string(hide_password=True)}: "
            f"{e}. If the file was made by a newer studio version, use that version; otherwise restore "
            "a backup or point STUDIO_DB_URL at a new database."
        ) from e
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to `engine`. Objects stay readable after commit (handy for the UI)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextlib.contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: commit when the block ends, roll back if it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
