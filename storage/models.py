"""The studio's database tables, as SQLAlchemy 2 typed declarative models.

Images and LoRA weights are not stored here: rows hold the sha256 of a blob (see
`storage.blobs`) or a path relative to the blob root. Every timestamp is timezone-aware UTC.
Enumerated columns are stored as plain strings (no native DB enum) so adding a value never
needs an ALTER TYPE on PostgreSQL; SQLAlchemy still validates them on the way in.
"""

from __future__ import annotations

import enum
import hashlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints: SQLite ALTERs run as Alembic "batch" table copies, which need names.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def hash_token(token: str) -> str:
    """The stored form of a voter link token (tokens are random, so a plain sha256 suffices)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    SQLite has no time zones, so values are stored as naive UTC there and get their tzinfo back
    on load; PostgreSQL stores `timestamptz`. Naive datetimes are refused: their zone is unknown.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one (UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _str_enum(cls: type[enum.Enum], name: str) -> Enum:
    """A string column holding the enum's values (not its member names)."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=False,
        length=32,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Category(enum.StrEnum):
    ANIMAL = "animal"
    PORTRAIT = "portrait"
    MIXED = "mixed"


class TeacherSource(enum.StrEnum):
    CURATOR = "curator"
    BENCH = "bench"
    IMPORT = "import"


class LoraKind(enum.StrEnum):
    TEACHER = "teacher"
    STUDENT = "student"
    FAKE = "fake"
    IMPORTED = "imported"
    BASELINE = "baseline"
    LIGHTNING = "lightning"


class RunKind(enum.StrEnum):
    TEACHER = "teacher"
    DISTILL = "distill"
    EXTEND = "extend"
    EVAL = "eval"
    STUDY_GEN = "study_gen"
    BENCH = "bench"


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.STOPPED, RunStatus.SUCCEEDED, RunStatus.FAILED)


class StudyStatus(enum.StrEnum):
    DRAFT = "draft"
    OPEN = "open"
    CLOSED = "closed"


class VoteQuestion(enum.StrEnum):
    QUALITY = "quality"
    CONSISTENCY = "consistency"
    STYLE = "style"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


# Column helpers: one place for the timestamp and JSON defaults.
def _created() -> Any:
    return mapped_column(UTCDateTime(), default=utcnow)


def _json() -> Any:
    return mapped_column(JSON(), default=dict)


class Effect(Base):
    __tablename__ = "effects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)  # slug, e.g. "pixel-art"
    display_name: Mapped[str] = mapped_column(String(200))
    category: Mapped[Category | None] = mapped_column(_str_enum(Category, "category"))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    pairs: Mapped[list[Pair]] = relationship(
        back_populates="effect", cascade="all, delete-orphan", passive_deletes=True, order_by="Pair.id"
    )
    # One prompt row per effect (effect_id is unique), hence a scalar relationship.
    prompt: Mapped[Prompt | None] = relationship(
        back_populates="effect", cascade="all, delete-orphan", passive_deletes=True
    )

    def __repr__(self) -> str:
        return f"Effect(id={self.id!r}, name={self.name!r})"


class Pair(Base):
    """One training pair (source -> target image) of an effect; images are blob shas."""

    __tablename__ = "pairs"
    __table_args__ = (UniqueConstraint("effect_id", "source_sha", "target_sha"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    effect_id: Mapped[int] = mapped_column(ForeignKey("effects.id", ondelete="CASCADE"), index=True)
    source_sha: Mapped[str] = mapped_column(String(64))
    target_sha: Mapped[str] = mapped_column(String(64))
    thumb_source_sha: Mapped[str | None] = mapped_column(String(64))
    thumb_target_sha: Mapped[str | None] = mapped_column(String(64))
    caption: Mapped[str | None] = mapped_column(Text)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    original_name: Mapped[str] = mapped_column(String(500), default="")
    excluded: Mapped[bool] = mapped_column(Boolean, default=False)  # dropped by the curator
    created_at: Mapped[datetime] = _created()

    effect: Mapped[Effect] = relationship(back_populates="pairs")


class Prompt(Base):
    """Teacher prompt, AOP trigger and student prompt of one effect."""

    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(primary_key=True)
    effect_id: Mapped[int] = mapped_column(ForeignKey("effects.id", ondelete="CASCADE"), unique=True)
    teacher_prompt: Mapped[str] = mapped_column(Text, default="")
    teacher_source: Mapped[TeacherSource] = mapped_column(
        _str_enum(TeacherSource, "teacher_source"), default=TeacherSource.CURATOR
    )
    trigger: Mapped[str | None] = mapped_column(String(64), unique=True)
    trigger_source: Mapped[str | None] = mapped_column(String(64))
    student_prompt: Mapped[str | None] = mapped_column(Text)
    # Who wrote the student prompt: "vlm:qwen-vl-max", "offline-describer", "curator", ...
    student_source: Mapped[str | None] = mapped_column(String(100))
    student_edited_by_curator: Mapped[bool] = mapped_column(Boolean, default=False)
    student_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    effect: Mapped[Effect] = relationship(back_populates="prompt")


class Run(Base):
    """A background job (training, distillation, evaluation, ...) and its live state."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[RunKind] = mapped_column(_str_enum(RunKind, "run_kind"))
    name: Mapped[str] = mapped_column(String(200), default="")
    config: Mapped[dict[str, Any]] = _json()
    status: Mapped[RunStatus] = mapped_column(
        _str_enum(RunStatus, "run_status"), default=RunStatus.QUEUED, index=True
    )
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    # Latest metric values; assign a new dict to update (plain JSON does not track mutation).
    metrics: Mapped[dict[str, Any]] = _json()
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    pid: Mapped[int | None] = mapped_column(Integer)
    host: Mapped[str | None] = mapped_column(String(255))
    effect_id: Mapped[int | None] = mapped_column(ForeignKey("effects.id", ondelete="SET NULL"))
    parent_run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))

    effect: Mapped[Effect | None] = relationship()
    parent: Mapped[Run | None] = relationship(remote_side=[id])
    metric_rows: Mapped[list[RunMetric]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True
    )
    checkpoints: Mapped[list[Checkpoint]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True, order_by="Checkpoint.step"
    )

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, kind={self.kind!r}, status={self.status!r})"


class LoraFile(Base):
    """A LoRA weight file (safetensors) in the blob store."""

    __tablename__ = "lora_files"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[LoraKind] = mapped_column(_str_enum(LoraKind, "lora_kind"))
    effect_id: Mapped[int | None] = mapped_column(ForeignKey("effects.id", ondelete="SET NULL"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), index=True)
    path: Mapped[str] = mapped_column(String(500))  # relative to the blob root
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    rank: Mapped[int | None] = mapped_column(Integer)
    alpha: Mapped[float | None] = mapped_column(Float)
    bytes: Mapped[int] = mapped_column(Integer, default=0)
    format: Mapped[str] = mapped_column(String(32), default="peft")  # peft|kohya|ai-toolkit|lightx2v
    backbone: Mapped[str] = mapped_column(String(100), default="")
    meta: Mapped[dict[str, Any]] = _json()
    created_at: Mapped[datetime] = _created()

    effect: Mapped[Effect | None] = relationship()
    run: Mapped[Run | None] = relationship()


class RunMetric(Base):
    """One point of a run's curves (loss, grad norm, ...)."""

    __tablename__ = "run_metrics"
    __table_args__ = (Index("ix_run_metrics_run_id_step", "run_id", "step"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = _created()

    run: Mapped[Run] = relationship(back_populates="metric_rows")


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_run_id_step", "run_id", "step"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(500))  # relative to the blob root (or the run dir)
    sha256: Mapped[str | None] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = _created()

    run: Mapped[Run] = relationship(back_populates="checkpoints")


class Evaluation(Base):
    """One measured number: `metric` of `system` (student, teacher, baseline, ...) on an effect."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), index=True)
    system: Mapped[str] = mapped_column(String(100))
    effect_id: Mapped[int | None] = mapped_column(ForeignKey("effects.id", ondelete="SET NULL"), index=True)
    metric: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer, default=0)
    details: Mapped[dict[str, Any]] = _json()
    created_at: Mapped[datetime] = _created()

    run: Mapped[Run | None] = relationship()
    effect: Mapped[Effect | None] = relationship()


class Study(Base):
    """A blind side-by-side user study."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[StudyStatus] = mapped_column(
        _str_enum(StudyStatus, "study_status"), default=StudyStatus.DRAFT
    )
    config: Mapped[dict[str, Any]] = _json()
    created_at: Mapped[datetime] = _created()

    items: Mapped[list[StudyItem]] = relationship(
        back_populates="study",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="StudyItem.position",
    )
    voters: Mapped[list[Voter]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True
    )


class StudyItem(Base):
    """One question page: a source image and blinded candidates.

    `candidates` maps an opaque key shown to voters (e.g. "A", "B") to {"system": ..., "sha": ...};
    votes store the key, so which system won is only known after unblinding.
    """

    __tablename__ = "study_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    source_sha: Mapped[str] = mapped_column(String(64))
    effect_id: Mapped[int | None] = mapped_column(ForeignKey("effects.id", ondelete="SET NULL"))
    instruction: Mapped[str] = mapped_column(Text, default="")
    position: Mapped[int] = mapped_column(Integer, default=0)
    candidates: Mapped[dict[str, Any]] = _json()

    study: Mapped[Study] = relationship(back_populates="items")
    effect: Mapped[Effect | None] = relationship()
    votes: Mapped[list[Vote]] = relationship(
        back_populates="item", cascade="all, delete-orphan", passive_deletes=True
    )


class Voter(Base):
    """A voter link. Only the sha256 of its token is stored (see `hash_token`)."""

    __tablename__ = "voters"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = _created()

    study: Mapped[Study] = relationship(back_populates="voters")
    votes: Mapped[list[Vote]] = relationship(
        back_populates="voter", cascade="all, delete-orphan", passive_deletes=True
    )


class Vote(Base):
    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("voter_id", "item_id", "question"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    voter_id: Mapped[int] = mapped_column(ForeignKey("voters.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("study_items.id", ondelete="CASCADE"), index=True)
    question: Mapped[VoteQuestion] = mapped_column(_str_enum(VoteQuestion, "vote_question"))
    choice: Mapped[str] = mapped_column(String(32))  # an opaque candidate key of the item
    created_at: Mapped[datetime] = _created()

    voter: Mapped[Voter] = relationship(back_populates="votes")
    item: Mapped[StudyItem] = relationship(back_populates="votes")
