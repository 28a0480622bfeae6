"""storage.db and storage.models: URL resolution, SQLite pragmas, migrations, constraints."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from storage import (
    Base,
    Category,
    Checkpoint,
    DatabaseError,
    Effect,
    Evaluation,
    LoraFile,
    LoraKind,
    Pair,
    Prompt,
    Run,
    RunKind,
    RunMetric,
    RunStatus,
    Study,
    StudyItem,
    Vote,
    VoteQuestion,
    Voter,
    database_url,
    hash_token,
    init_db,
    make_engine,
    session_factory,
    session_scope,
)

REPO = Path(__file__).resolve().parents[1]
SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture()
def engine(data_dir, monkeypatch):
    monkeypatch.delenv("STUDIO_DB_URL", raising=False)
    eng = init_db(database_url(data_dir))
    yield eng
    eng.dispose()


@pytest.fixture()
def factory(engine) -> sessionmaker[Session]:
    return session_factory(engine)


def _effect(session: Session, name: str = "pixel-art") -> Effect:
    eff = Effect(name=name, display_name=name.title(), category=Category.ANIMAL, description="d")
    session.add(eff)
    session.flush()
    return eff


# -- URL resolution -----------------------------------------------------------------------------
def test_database_url_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("STUDIO_DB_URL", raising=False)
    assert database_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/studio.db"
    monkeypatch.setenv("STUDIO_DB_URL", "postgresql+psycopg://u:p@db/studio")
    assert database_url(tmp_path) == "postgresql+psycopg://u:p@db/studio"
    # An explicit URL beats the environment.
    assert database_url(tmp_path, "sqlite:////x/y.db") == "sqlite:////x/y.db"
    monkeypatch.setenv("STUDIO_DB_URL", "  ")  # blank means unset
    assert database_url(tmp_path).endswith("/studio.db")


def test_default_url_creates_db_file_in_data_dir(engine, data_dir):
    assert (data_dir / "studio.db").is_file()


def test_bad_url_and_unwritable_folder_give_clear_errors(tmp_path):
    with pytest.raises(DatabaseError, match="not valid"):
        make_engine("this is not a url")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DatabaseError, match="Cannot create the folder"):
        init_db(f"sqlite:///{blocker}/sub/studio.db")


# -- SQLite pragmas ----------------------------------------------------------------------------
def test_sqlite_wal_foreign_keys_busy_timeout_on_every_connection(engine):
    conns = [engine.connect() for _ in range(2)]  # two pooled connections, both configured
    try:
        for c in conns:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    finally:
        for c in conns:
            c.close()


def test_foreign_keys_enforced(factory):
    with pytest.raises(IntegrityError):
        with session_scope(factory) as s:
            s.add(Pair(effect_id=12345, source_sha=SHA_A, target_sha=SHA_B, width=8, height=8))


# -- migrations --------------------------------------------------------------------------------
def _diffs(engine: sa.Engine, metadata: sa.MetaData) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, metadata)


def test_migration_matches_models(engine):
    assert _diffs(engine, Base.metadata) == []
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == ["0001"]
    # The comparison is not vacuous: a model change the migration lacks shows up.
    changed = sa.MetaData(naming_convention=Base.metadata.naming_convention)
    for t in Base.metadata.sorted_tables:
        t.to_metadata(changed)
    changed.tables["effects"].append_column(sa.Column("colour", sa.String(10)))
    assert [d[0] for d in _diffs(engine, changed)] == ["add_column"]


def test_init_db_is_idempotent_and_works_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # migrations are found by package path, not cwd
    url = f"sqlite:///{tmp_path}/x/studio.db"
    for _ in range(2):
        eng = init_db(url)
        assert _diffs(eng, Base.metadata) == []
        eng.dispose()


def test_concurrent_first_start_migrates_once(tmp_path):
    """Several threads of one process open a new database at once (the UI at startup)."""
    url = f"sqlite:///{tmp_path}/studio.db"
    errors: list[BaseException] = []

    def start() -> None:
        try:
            init_db(url).dispose()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    eng = make_engine(url)
    assert _diffs(eng, Base.metadata) == []
    eng.dispose()


def test_concurrent_processes_first_start(tmp_path):
    """The UI and run workers are separate processes that may all start on a fresh database."""
    url = f"sqlite:///{tmp_path}/studio.db"
    go = tmp_path / "go"
    script = (
        "import sys, time, pathlib\n"
        "from storage.db import init_db\n"
        "go = pathlib.Path(sys.argv[2])\n"
        "while not go.exists(): time.sleep(0.005)\n"
        "init_db(sys.argv[1]).dispose()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, url, str(go)], env=env, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    time.sleep(1.5)  # let them all import and wait at the start line
    go.touch()
    results = [(p.wait(timeout=60), p.stderr.read().decode()) for p in procs]
    assert [r for r, _ in results] == [0, 0, 0], "\n".join(e for _, e in results)
    eng = make_engine(url)
    assert _diffs(eng, Base.metadata) == []
    eng.dispose()


def test_alembic_ini_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STUDIO_DB_URL", f"sqlite:///{tmp_path}/cli.db")
    command.upgrade(Config(str(REPO / "alembic.ini")), "head")
    eng = make_engine(f"sqlite:///{tmp_path}/cli.db")
    assert _diffs(eng, Base.metadata) == []
    command.downgrade(Config(str(REPO / "alembic.ini")), "base")
    assert sa.inspect(eng).get_table_names() == ["alembic_version"]
    eng.dispose()


# -- models ------------------------------------------------------------------------------------
def test_models_round_trip(factory):
    t0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    with session_scope(factory) as s:
        eff = _effect(s)
        s.add(
            Pair(effect=eff, source_sha=SHA_A, target_sha=SHA_B, width=64, height=48, original_name="1.png")
        )
        s.add(
            Prompt(
                effect=eff,
                teacher_prompt="make it pixel art",
                trigger="<pxa>",
                student_prompt="<pxa> a cat",
                student_source="offline-describer",
                student_updated_at=t0,
            )
        )
        run = Run(kind=RunKind.DISTILL, name="d1", config={"lr": 1e-4, "effects": [1]}, effect=eff)
        s.add(run)
        s.flush()
        run.metrics = {"loss": 0.5}
        s.add_all(
            [
                RunMetric(run=run, step=1, name="loss", value=0.5),
                Checkpoint(run=run, step=10, path="ck/10.safetensors", sha256=SHA_C, bytes=10),
                LoraFile(kind=LoraKind.STUDENT, run=run, path="ab/cd/x.safetensors", sha256=SHA_C, rank=4),
                Evaluation(run=run, system="student", effect=eff, metric="psnr", value=21.5, n=8),
            ]
        )
        ids = eff.id, run.id

    with session_scope(factory) as s:
        eff = s.get(Effect, ids[0])
        assert eff.category is Category.ANIMAL and eff.description == "d"
        assert [p.original_name for p in eff.pairs] == ["1.png"]
        assert eff.pairs[0].excluded is False and eff.pairs[0].thumb_target_sha is None
        assert eff.prompt.trigger == "<pxa>" and eff.prompt.teacher_source == "curator"
        assert eff.prompt.student_updated_at == t0  # same instant ...
        assert eff.prompt.student_updated_at.tzinfo is UTC  # ... returned in UTC
        assert eff.created_at.tzinfo is UTC
        assert abs(datetime.now(UTC) - eff.created_at) < timedelta(minutes=1)
        run = s.get(Run, ids[1])
        assert run.status is RunStatus.QUEUED and not run.status.finished
        assert run.config == {"lr": 1e-4, "effects": [1]} and run.metrics == {"loss": 0.5}
        assert [(m.step, m.value) for m in run.metric_rows] == [(1, 0.5)]
        assert run.checkpoints[0].path == "ck/10.safetensors"
        lora = s.scalars(sa.select(LoraFile)).one()
        assert lora.kind is LoraKind.STUDENT and lora.meta == {} and lora.run_id == run.id
        assert s.scalars(sa.select(Evaluation.value)).one() == 21.5


def test_naive_datetime_refused(factory):
    with pytest.raises(StatementError, match="naive datetime"):
        with session_scope(factory) as s:
            s.add(Run(kind=RunKind.EVAL, started_at=datetime(2026, 1, 1)))


def test_unknown_enum_value_refused(factory):
    with pytest.raises(StatementError):
        with session_scope(factory) as s:
            s.add(Run(kind="not-a-kind"))


def test_deleting_effect_cascades_in_the_database(factory, engine):
    with session_scope(factory) as s:
        eff = _effect(s)
        s.add(Pair(effect=eff, source_sha=SHA_A, target_sha=SHA_B, width=8, height=8))
        s.add(Prompt(effect=eff, teacher_prompt="p"))
        s.add(Run(kind=RunKind.TEACHER, effect=eff))
        s.add(LoraFile(kind=LoraKind.TEACHER, effect=eff, path="p", sha256=SHA_C))
        eff_id = eff.id
    # Plain SQL, no ORM cascade: the FK rules themselves must do the work.
    with engine.begin() as conn:
        conn.execute(sa.delete(Effect).where(Effect.id == eff_id))
    with session_scope(factory) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Pair)) == 0
        assert s.scalar(sa.select(sa.func.count()).select_from(Prompt)) == 0
        assert s.scalars(sa.select(Run.effect_id)).one() is None  # runs are kept, unlinked
        assert s.scalars(sa.select(LoraFile.effect_id)).one() is None


def test_orm_delete_of_effect_and_run(factory):
    with session_scope(factory) as s:
        eff = _effect(s)
        s.add(Pair(effect=eff, source_sha=SHA_A, target_sha=SHA_B, width=8, height=8))
        run = Run(kind=RunKind.DISTILL)
        s.add(run)
        s.add(RunMetric(run=run, step=0, name="loss", value=1.0))
        s.add(Checkpoint(run=run, step=0, path="c"))
    with session_scope(factory) as s:
        s.delete(s.scalars(sa.select(Effect)).one())
        s.delete(s.scalars(sa.select(Run)).one())
    with session_scope(factory) as s:
        for model in (Pair, RunMetric, Checkpoint):
            assert s.scalar(sa.select(sa.func.count()).select_from(model)) == 0


def test_pair_unique_per_effect(factory):
    with session_scope(factory) as s:
        eff = _effect(s)
        other = _effect(s, "other")
        s.add(Pair(effect=eff, source_sha=SHA_A, target_sha=SHA_B, width=8, height=8))
        s.add(Pair(effect=other, source_sha=SHA_A, target_sha=SHA_B, width=8, height=8))  # fine
    with pytest.raises(IntegrityError):
        with session_scope(factory) as s:
            eff = s.scalars(sa.select(Effect).where(Effect.name == "pixel-art")).one()
            s.add(Pair(effect=eff, source_sha=SHA_A, target_sha=SHA_B, width=8, height=8))


def test_one_prompt_per_effect_and_unique_triggers(factory):
    with session_scope(factory) as s:
        a, b, c = _effect(s, "a"), _effect(s, "b"), _effect(s, "c")
        s.add_all([Prompt(effect=a, trigger="<a>"), Prompt(effect=b), Prompt(effect=c)])  # NULLs ok
    with pytest.raises(IntegrityError):
        with session_scope(factory) as s:
            s.add(Prompt(effect_id=s.scalars(sa.select(Effect.id).where(Effect.name == "a")).one()))
    with pytest.raises(IntegrityError):
        with session_scope(factory) as s:
            p = s.scalars(sa.select(Prompt).join(Effect).where(Effect.name == "b")).one()
            p.trigger = "<a>"


def test_one_vote_per_voter_item_question(factory):
    token = "secret-link-token"
    with session_scope(factory) as s:
        study = Study(name="s1")
        item = StudyItem(
            study=study,
            source_sha=SHA_A,
            candidates={"A": {"system": "student", "sha": SHA_B}, "B": {"system": "teacher", "sha": SHA_C}},
        )
        voter = Voter(study=study, token_hash=hash_token(token))
        s.add_all([study, item, voter])
        s.flush()
        s.add(Vote(voter=voter, item=item, question=VoteQuestion.QUALITY, choice="A"))
        s.add(Vote(voter=voter, item=item, question=VoteQuestion.STYLE, choice="B"))
        ids = voter.id, item.id
    with pytest.raises(IntegrityError):
        with session_scope(factory) as s:
            s.add(Vote(voter_id=ids[0], item_id=ids[1], question="quality", choice="B"))
    with session_scope(factory) as s:
        voter = s.scalars(sa.select(Voter).where(Voter.token_hash == hash_token(token))).one()
        assert token not in voter.token_hash and len(voter.token_hash) == 64
        assert sorted((v.question, v.choice) for v in voter.votes) == [("quality", "A"), ("style", "B")]
        assert s.get(StudyItem, ids[1]).candidates["B"]["system"] == "teacher"
        s.delete(voter.study)  # a study takes its items, voters and votes with it
    with session_scope(factory) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Vote)) == 0


def test_session_scope_rolls_back_on_error(factory):
    with pytest.raises(RuntimeError):
        with session_scope(factory) as s:
            _effect(s)
            raise RuntimeError("boom")
    with session_scope(factory) as s:
        assert s.scalars(sa.select(Effect)).all() == []


def test_updated_at_moves_on_update(factory):
    with session_scope(factory) as s:
        eff = _effect(s)
        first = eff.updated_at
    with session_scope(factory) as s:
        eff = s.scalars(sa.select(Effect)).one()
        eff.display_name = "Renamed"
    with session_scope(factory) as s:
        assert s.scalars(sa.select(Effect)).one().updated_at > first
