"""Initial schema: effects, pairs, prompts, LoRA files, runs, metrics, checkpoints,
evaluations, studies, voters and votes.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "effects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=False),
        sa.Column(
            "category",
            sa.Enum("animal", "portrait", "mixed", name="category", native_enum=False, length=32),
            nullable=True,
        ),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_effects")),
        sa.UniqueConstraint("name", name=op.f("uq_effects_name")),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column(
            "status",
            sa.Enum("draft", "open", "closed", name="study_status", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
    )
    op.create_table(
        "pairs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("effect_id", sa.Integer(), nullable=False),
        sa.Column("source_sha", sa.String(length=64), nullable=False),
        sa.Column("target_sha", sa.String(length=64), nullable=False),
        sa.Column("thumb_source_sha", sa.String(length=64), nullable=True),
        sa.Column("thumb_target_sha", sa.String(length=64), nullable=True),
        sa.Column("caption", sa.Text(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("original_name", sa.String(length=500), nullable=False),
        sa.Column("excluded", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["effect_id"], ["effects.id"], name=op.f("fk_pairs_effect_id_effects"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairs")),
        sa.UniqueConstraint(
            "effect_id", "source_sha", "target_sha", name=op.f("uq_pairs_effect_id_source_sha_target_sha")
        ),
    )
    op.create_index(op.f("ix_pairs_effect_id"), "pairs", ["effect_id"])

    op.create_table(
        "prompts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("effect_id", sa.Integer(), nullable=False),
        sa.Column("teacher_prompt", sa.Text(), nullable=False),
        sa.Column(
            "teacher_source",
            sa.Enum("curator", "bench", "import", name="teacher_source", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("trigger", sa.String(length=64), nullable=True),
        sa.Column("trigger_source", sa.String(length=64), nullable=True),
        sa.Column("student_prompt", sa.Text(), nullable=True),
        sa.Column("student_source", sa.String(length=100), nullable=True),
        sa.Column("student_edited_by_curator", sa.Boolean(), nullable=False),
        sa.Column("student_updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["effect_id"], ["effects.id"], name=op.f("fk_prompts_effect_id_effects"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompts")),
        sa.UniqueConstraint("effect_id", name=op.f("uq_prompts_effect_id")),
        sa.UniqueConstraint("trigger", name=op.f("uq_prompts_trigger")),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "teacher",
                "distill",
                "extend",
                "eval",
                "study_gen",
                "bench",
                name="run_kind",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "running",
                "stopping",
                "stopped",
                "succeeded",
                "failed",
                name="run_status",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("effect_id", sa.Integer(), nullable=True),
        sa.Column("parent_run_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["effect_id"], ["effects.id"], name=op.f("fk_runs_effect_id_effects"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["parent_run_id"], ["runs.id"], name=op.f("fk_runs_parent_run_id_runs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_status"), "runs", ["status"])

    op.create_table(
        "study_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("source_sha", sa.String(length=64), nullable=False),
        sa.Column("effect_id", sa.Integer(), nullable=True),
        sa.Column("instruction", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("candidates", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["effect_id"], ["effects.id"], name=op.f("fk_study_items_effect_id_effects"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_study_items_study_id_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_items")),
    )
    op.create_index(op.f("ix_study_items_study_id"), "study_items", ["study_id"])

    op.create_table(
        "voters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_voters_study_id_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_voters")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_voters_token_hash")),
    )
    op.create_index(op.f("ix_voters_study_id"), "voters", ["study_id"])

    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=500), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_checkpoints_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
    )
    op.create_index("ix_checkpoints_run_id_step", "checkpoints", ["run_id", "step"])

    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("system", sa.String(length=100), nullable=False),
        sa.Column("effect_id", sa.Integer(), nullable=True),
        sa.Column("metric", sa.String(length=100), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["effect_id"], ["effects.id"], name=op.f("fk_evaluations_effect_id_effects"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_evaluations_run_id_runs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
    )
    op.create_index(op.f("ix_evaluations_effect_id"), "evaluations", ["effect_id"])
    op.create_index(op.f("ix_evaluations_run_id"), "evaluations", ["run_id"])

    op.create_table(
        "lora_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "teacher",
                "student",
                "fake",
                "imported",
                "baseline",
                "lightning",
                name="lora_kind",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("effect_id", sa.Integer(), nullable=True),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("path", sa.String(length=500), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.Column("alpha", sa.Float(), nullable=True),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("backbone", sa.String(length=100), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["effect_id"], ["effects.id"], name=op.f("fk_lora_files_effect_id_effects"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_lora_files_run_id_runs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lora_files")),
    )
    op.create_index(op.f("ix_lora_files_effect_id"), "lora_files", ["effect_id"])
    op.create_index(op.f("ix_lora_files_run_id"), "lora_files", ["run_id"])
    op.create_index(op.f("ix_lora_files_sha256"), "lora_files", ["sha256"])

    op.create_table(
        "run_metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_metrics_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_metrics")),
    )
    op.create_index("ix_run_metrics_run_id_step", "run_metrics", ["run_id", "step"])

    op.create_table(
        "votes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("voter_id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column(
            "question",
            sa.Enum("quality", "consistency", "style", name="vote_question", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("choice", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"], ["study_items.id"], name=op.f("fk_votes_item_id_study_items"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["voter_id"], ["voters.id"], name=op.f("fk_votes_voter_id_voters"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_votes")),
        sa.UniqueConstraint(
            "voter_id", "item_id", "question", name=op.f("uq_votes_voter_id_item_id_question")
        ),
    )
    op.create_index(op.f("ix_votes_item_id"), "votes", ["item_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_votes_item_id"), table_name="votes")

    op.drop_table("votes")
    op.drop_index("ix_run_metrics_run_id_step", table_name="run_metrics")

    op.drop_table("run_metrics")
    op.drop_index(op.f("ix_lora_files_sha256"), table_name="lora_files")
    op.drop_index(op.f("ix_lora_files_run_id"), table_name="lora_files")
    op.drop_index(op.f("ix_lora_files_effect_id"), table_name="lora_files")

    op.drop_table("lora_files")
    op.drop_index(op.f("ix_evaluations_run_id"), table_name="evaluations")
    op.drop_index(op.f("ix_evaluations_effect_id"), table_name="evaluations")

    op.drop_table("evaluations")
    op.drop_index("ix_checkpoints_run_id_step", table_name="checkpoints")

    op.drop_table("checkpoints")
    op.drop_index(op.f("ix_voters_study_id"), table_name="voters")

    op.drop_table("voters")
    op.drop_index(op.f("ix_study_items_study_id"), table_name="study_items")

    op.drop_table("study_items")
    op.drop_index(op.f("ix_runs_status"), table_name="runs")

    op.drop_table("runs")
    op.drop_table("prompts")
    op.drop_index(op.f("ix_pairs_effect_id"), table_name="pairs")

    op.drop_table("pairs")
    op.drop_table("studies")
    op.drop_table("effects")
