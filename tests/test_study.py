"""User study service: creation checks, the study_gen job on a tiny setup, blinding, votes, results.

The generation test uses a random 2-layer tiny backbone (saved as the studio's tiny weights folder),
two effects with toy teacher LoRAs, toy Lightning / FM all-in-1 LoRA files and a toy CollectionLoRA
student with a catalog. The vote and result tests use hand-made studies (solid-colour images).
"""

from __future__ import annotations

import csv
import io
import json
import secrets
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select
from studio_fixtures import add_toy_effect, scene_pairs, small_studio, toy_lora_file

from distill.export import CatalogEntry
from storage import Study, StudyItem, StudyStatus, Vote, Voter
from studio import cli, jobs_study, library, runs
from studio import study_service as ss
from studio.config import StudioConfig
from studio.context import Studio

SYSTEMS = ["Alpha", "Bravo", "Charlie", "Delta"]  # hand-made studies' system labels
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (90, 90, 90)]


# ------------------------------------------------------------------------------------------------
# helpers (test_study_http imports these)


def png_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def handmade_study(studio: Studio, n_items: int = 3, systems: list[str] = SYSTEMS, name: str = "hand") -> int:
    """An open study whose candidates are solid-colour images, one colour per system."""
    shas = [studio.blobs.put_bytes(png_bytes(c), "png").sha256 for c in COLOURS]
    with studio.session() as s:
        study = Study(name=name, status=StudyStatus.OPEN, config={"systems": [{"label": x} for x in systems]})
        s.add(study)
        s.flush()
        for pos in range(n_items):
            slots = list(range(len(systems)))
            np.random.default_rng(pos).shuffle(slots)
            cands = {
                secrets.token_hex(8): {"system": x, "sha": shas[i], "slot": int(slots[i])}
                for i, x in enumerate(systems)
            }
            s.add(
                StudyItem(
                    study_id=study.id,
                    source_sha=shas[-1],
                    instruction=f"Make it look painted ({pos})",
                    position=pos,
                    candidates=cands,
                )
            )
        return study.id


def key_of(studio: Studio, item_id: int, system: str) -> str:
    with studio.session() as s:
        item = s.get(StudyItem, item_id)
        return next(k for k, c in item.candidates.items() if c["system"] == system)


def item_ids(studio: Studio, study_id: int) -> list[int]:
    with studio.session() as s:
        return list(
            s.scalars(select(StudyItem.id).where(StudyItem.study_id == study_id).order_by(StudyItem.position))
        )


def run_cli(monkeypatch, *argv: str) -> tuple[int, str]:
    if "study" not in cli.COMMAND_MODULES:  # until the CLI registry lists it
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "study"])
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


@pytest.fixture()
def plain(data_dir: Path) -> Studio:
    return Studio.open(StudioConfig(data_dir=data_dir))


# ------------------------------------------------------------------------------------------------
# statistics and results


def test_wilson_interval_matches_published_values() -> None:
    # Wilson 95 % intervals as tabulated (e.g. Newcombe 1998, Table I; Brown, Cai & DasGupta 2001).
    lo, hi = ss.wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = ss.wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    lo, hi = ss.wilson_interval(10, 10)
    assert round(lo, 4) == 0.7225 and hi == 1.0
    lo, hi = ss.wilson_interval(81, 263)  # Newcombe's example: 0.2553 to 0.3662
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert ss.wilson_interval(0, 0) == (0.0, 1.0)


def test_results_on_a_hand_made_vote_set(plain: Studio, tmp_path: Path, monkeypatch) -> None:
    studio = plain
    sid = handmade_study(studio, n_items=3, systems=["Alpha", "Bravo", "Charlie"])
    voters = ss.add_voters(studio, sid, ["v1", "v2"])
    items = item_ids(studio, sid)
    # quality: Alpha 4, Bravo 2, Charlie 0; consistency: Charlie 6; style: Alpha 3, Bravo 3
    picks = {
        "quality": ["Alpha", "Alpha", "Bravo", "Alpha", "Alpha", "Bravo"],
        "consistency": ["Charlie"] * 6,
        "style": ["Alpha", "Bravo", "Alpha", "Bravo", "Alpha", "Bravo"],
    }
    k = 0
    for _, token in voters:
        for item in items:
            ss.record_votes(studio, token, item, {q: key_of(studio, item, picks[q][k]) for q in picks})
            k += 1
    res = ss.results(studio, sid)
    assert res.voters == 2 and res.items == 3 and res.systems == ["Alpha", "Bravo", "Charlie"]
    q = res.row("quality", "Alpha")
    assert (q.votes, q.total) == (4, 6) and q.share == pytest.approx(4 / 6)
    # hand-computed Wilson interval of 4/6: centre 0.6016, half-width 0.3016
    assert q.ci_low == pytest.approx(0.3000, abs=2e-4) and q.ci_high == pytest.approx(0.9032, abs=2e-4)
    assert res.row("quality", "Charlie").votes == 0 and res.row("quality", "Charlie").ci_low == 0.0
    assert res.row("consistency", "Charlie").share == 1.0
    assert res.row("style", "Bravo").share == pytest.approx(0.5)
    assert sum(r.share for r in res.rows if r.criterion == "style") == pytest.approx(1.0)

    rows = list(csv.DictReader(io.StringIO(ss.results_csv(studio, sid))))
    assert len(rows) == 9 and set(rows[0]) == set(ss.CSV_HEADER)
    a = next(r for r in rows if r["criterion"] == "quality" and r["system"] == "Alpha")
    assert (a["votes"], a["total"], a["share"]) == ("4", "6", "0.6667")

    chart = Image.open(io.BytesIO(ss.results_chart_png(studio, sid))).convert("RGB")
    assert chart.size == (960, 520)
    px = np.asarray(chart).reshape(-1, 3)
    for i in range(3):  # every system's bar colour is drawn
        assert (px == np.array(ss.PALETTE[i])).all(1).sum() > 50

    # progress: both voters finished all three items
    prog = ss.voter_progress(studio, sid)
    assert [(p.name, p.answered, p.items, p.votes) for p in prog] == [("v1", 3, 3, 9), ("v2", 3, 3, 9)]

    # the CLI writes the same table and a chart
    csv_path, chart_path = str(tmp_path / "r.csv"), str(tmp_path / "r.png")
    code, out = run_cli(monkeypatch, "study", "results", str(sid), "--csv", csv_path, "--chart", chart_path)
    assert code == 0 and "Alpha" in out and "66.7%" in out
    assert (tmp_path / "r.csv").read_text() == ss.results_csv(studio, sid)
    assert Image.open(tmp_path / "r.png").size == (960, 520)


# ------------------------------------------------------------------------------------------------
# votes


def test_vote_rules(plain: Studio) -> None:
    studio = plain
    sid = handmade_study(studio, n_items=2)
    other = handmade_study(studio, n_items=1, name="other")
    (_, token), (_, token2) = ss.add_voters(studio, sid, ["ann", "ben"])
    items, other_item = item_ids(studio, sid), item_ids(studio, other)[0]
    good = key_of(studio, items[0], "Alpha")

    with studio.session() as s:  # only the hash of the token is stored
        hashes = set(s.scalars(select(Voter.token_hash)))
    assert token not in hashes and len(token) >= 32

    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    for bad_token in (tampered, "x" * 32, "", "../../etc"):
        with pytest.raises(ss.UnknownVoter):
            ss.record_vote(studio, bad_token, items[0], "quality", good)
    with pytest.raises(ss.UnknownItem):  # an item of another study
        ss.record_vote(studio, token, other_item, "quality", key_of(studio, other_item, "Alpha"))
    with pytest.raises(ss.UnknownItem):
        ss.record_vote(studio, token, 10_000, "quality", good)
    with pytest.raises(ss.BadChoice):  # a key of another item is not a candidate of this one
        ss.record_vote(studio, token, items[0], "quality", key_of(studio, items[1], "Alpha"))
    with pytest.raises(ss.BadChoice):
        ss.record_vote(studio, token, items[0], "quality", "Alpha")  # a system name is not a choice
    with pytest.raises(ss.BadChoice):
        ss.record_vote(studio, token, items[0], "beauty", good)

    ss.record_vote(studio, token, items[0], "quality", good)
    with pytest.raises(ss.AlreadyVoted) as err:  # a second vote is refused, not a replacement
        ss.record_vote(studio, token, items[0], "quality", key_of(studio, items[0], "Bravo"))
    assert err.value.status == 409
    with pytest.raises(ss.AlreadyVoted):  # all or nothing: consistency is not stored either
        ss.record_votes(studio, token, items[0], {"quality": good, "consistency": good})
    ss.record_vote(studio, token2, items[0], "quality", good)  # another voter may vote the same
    with studio.session() as s:
        votes = s.execute(select(Vote.question, Vote.choice)).all()
    assert sorted((q.value, c) for q, c in votes) == [("quality", good), ("quality", good)]

    # resume: the page shows the first item with an unanswered question, only those questions
    page = ss.voter_page(studio, token)
    assert page.item_id == items[0] and [q.value for q in page.questions] == ["consistency", "style"]
    assert page.position == 1 and page.total == 2
    ss.record_votes(studio, token, items[0], {"consistency": good, "style": good})
    page = ss.voter_page(studio, token)
    assert page.item_id == items[1] and page.position == 2 and page.answered == 1
    assert [c.letter for c in page.candidates] == ["A", "B", "C", "D"]

    ss.set_open(studio, sid, False)
    with pytest.raises(ss.StudyNotOpen):
        ss.record_vote(studio, token, items[1], "quality", key_of(studio, items[1], "Alpha"))
    assert ss.voter_page(studio, token).status == "closed"
    ss.set_open(studio, sid, True)

    # a lost link: the new one works, the old one does not, the votes stay
    voter_id = ss.voter_progress(studio, sid)[0].voter_id
    new = ss.reissue_link(studio, voter_id)
    with pytest.raises(ss.UnknownVoter):
        ss.voter_page(studio, token)
    assert ss.voter_page(studio, new).answered == 1


def test_voter_images_are_per_voter_and_per_study(plain: Studio) -> None:
    studio = plain
    sid = handmade_study(studio, n_items=1)
    other = handmade_study(studio, n_items=1, name="other")
    (_, ann), (_, ben) = ss.add_voters(studio, sid, ["ann", "ben"])
    [(_, olga)] = ss.add_voters(studio, other, ["olga"])
    pa, pb, po = (ss.voter_page(studio, t) for t in (ann, ben, olga))
    assert {c.image for c in pa.candidates}.isdisjoint({c.image for c in pb.candidates})
    with studio.session() as s:
        item = s.get(StudyItem, pa.item_id)
        by_key = {k: studio.blobs.read_bytes(c["sha"], "png") for k, c in item.candidates.items()}
    for c in pa.candidates:
        assert ss.voter_image(studio, ann, c.image) == by_key[c.key]
        with pytest.raises(ss.UnknownItem):  # another voter's name does not open it
            ss.voter_image(studio, ben, c.image)
    for c in po.candidates:  # nor does a voter of another study
        with pytest.raises(ss.UnknownItem):
            ss.voter_image(studio, ann, c.image)
    with pytest.raises(ss.UnknownItem):
        ss.voter_image(studio, ann, "0" * 32)


# ------------------------------------------------------------------------------------------------
# creation checks and the generation job (tiny setup)


@pytest.fixture()
def tiny_studio(data_dir: Path, tmp_path: Path) -> Studio:
    st = small_studio(data_dir, tmp_path)
    for seed, name in enumerate(["warm", "frame"], start=1):
        add_toy_effect(st, tmp_path, name, seed, pairs=2, teacher_std=0.3)
    return st


class StopAfter:
    """A reporter that asks to stop after ``n`` progress reports."""

    def __init__(self, n: int) -> None:
        self.n, self.steps = n, []

    def progress(self, step: int, total: int, metrics: dict) -> None:
        self.steps.append(step)

    def should_stop(self) -> bool:
        return len(self.steps) >= self.n


@pytest.fixture()
def submitted(monkeypatch) -> list[int]:
    """Runs are created but no worker starts; the tests run the job in-process."""
    ids: list[int] = []

    def fake_submit(studio, kind, config, name="", effect_id=None, parent_run_id=None):
        ids.append(runs.create_run(studio, kind, config, name=name))
        return ids[-1]

    monkeypatch.setattr(runs, "submit", fake_submit)
    return ids


def test_create_lists_everything_missing(plain: Studio, tmp_path: Path, submitted) -> None:
    studio = plain
    # no teacher prompt, no teacher
    library.import_pairset(studio, "warm", scene_pairs(tmp_path / "warm", 2, 1))
    with pytest.raises(ss.StudyError) as err:
        ss.create_study(
            studio, "s", ["warm", "nope"], 1, ["Base", "Base+Lightning", "Ours", "weird"], n_items=4
        )
    msg = str(err.value)
    assert "'warm' needs a teacher prompt" in msg and "'warm' needs a teacher LoRA" in msg
    assert "no effect called 'nope'" in msg
    assert "needs a Lightning LoRA" in msg and "needs a CollectionLoRA student" in msg
    assert "unknown system 'weird'" in msg
    assert "4 items need 4 different (effect, source) pairs" in msg
    with pytest.raises(ss.StudyError, match="choose 2 to 8 systems"):
        ss.create_study(studio, "s", ["warm"], 1, ["Base"], n_items=1)
    assert submitted == []
    with studio.session() as s:
        assert s.scalar(select(func.count()).select_from(Study)) == 0


def test_study_gen_job_makes_blinded_candidates(tiny_studio: Studio, tmp_path: Path, submitted) -> None:
    studio = tiny_studio
    light = toy_lora_file(tmp_path / "lightning.safetensors", 11, std=0.3)
    fm = toy_lora_file(tmp_path / "fm_all.safetensors", 12, std=0.3)
    catalog = [
        CatalogEntry("warm", "<warm_Xq1>", "Warm the colours.", "Apply warm."),
        CatalogEntry("frame", "<frame_Xq2>", "Add a frame.", "Apply frame."),
    ]
    student = toy_lora_file(tmp_path / "student.safetensors", 13, std=0.3, name="student", catalog=catalog)
    sid = ss.create_study(
        studio,
        "paper four",
        ["warm", "frame"],
        2,  # two EffectBench-mini test sources
        ["Base", "Base+Lightning", "FM+Lightning", "Ours"],
        n_items=4,
        seed=3,
        student=student,
        lightning=light,
        fm=fm,
        base_steps=3,
        fast_steps=2,
    )
    assert len(submitted) == 1
    # any LoRA file is a system too: a plain LoRA uses the teacher prompt, a CollectionLoRA its catalog
    specs, problems = ss.resolve_systems(studio, [f"Mine={light}", str(student)], ["warm", "frame"])
    assert problems == []
    assert [(x.label, x.kind, x.steps, x.prompts) for x in specs] == [
        ("Mine", "lora", ss.FAST_STEPS, None),
        ("student", "lora", 2, {"warm": "<warm_Xq1> Warm the colours.", "frame": "<frame_Xq2> Add a frame."}),
    ]
    # the Base system samples at the backbone's teacher CFG unless the study says otherwise
    from distill.backbones.tiny import TinyConfig

    (base,), _ = ss.resolve_systems(studio, ["Base"], ["warm"])
    (own,), _ = ss.resolve_systems(studio, ["Base"], ["warm"], base_cfg=3.5)
    assert (base.kind, base.cfg, own.cfg) == ("base", TinyConfig.teacher_cfg, 3.5)
    assert TinyConfig.teacher_cfg != 4.0  # not the Qwen pipeline's scale
    info = ss.get_study(studio, sid)
    assert info.status == "draft" and info.run_id == submitted[0] and info.planned_items == 4
    with studio.session() as s:
        cfg = runs.job_config(s.get(runs.Run, submitted[0]))
    assert cfg == {"study_id": sid}

    # a stop after three of the eight (system, effect) batches; the resumed job makes only the rest
    work = runs.run_dir(studio, submitted[0])
    stopper = StopAfter(3)
    out = ss.generate(studio, sid, stopper, work_dir=work)
    assert out.stopped and out.items == 0 and ss.get_study(studio, sid).status == "draft"
    first = json.loads((work / "generated.json").read_text())
    assert len(first) == 3 and stopper.steps == [1, 2, 3]

    reporter = runs.DbReporter(studio, submitted[0], flush_interval_s=0)
    ctx = runs.RunContext(studio, submitted[0], cfg, work, reporter, None)
    metrics = jobs_study.run_study_gen(ctx)
    assert metrics == {"items": 4, "images": 16, "stopped": False}
    done = json.loads((work / "generated.json").read_text())
    assert len(done) == 8 and all(done[k] == v for k, v in first.items())

    info = ss.get_study(studio, sid)
    assert info.status == "open" and info.items == 4
    with studio.session() as s:
        items = s.scalars(
            select(StudyItem).where(StudyItem.study_id == sid).order_by(StudyItem.position)
        ).all()
        sources = s.get(Study, sid).config["sources"]
    assert len(sources) == 2
    assert {(it.instruction, it.source_sha) for it in items} == {
        (f"Apply {e}.", src) for e in ("warm", "frame") for src in sources
    }
    outputs: dict[str, list[np.ndarray]] = {}
    for it in items:
        cands = it.candidates
        assert sorted(c["system"] for c in cands.values()) == sorted(ss.PAPER_SYSTEMS)
        assert sorted(c["slot"] for c in cands.values()) == [0, 1, 2, 3]
        for key, c in cands.items():
            assert len(key) == 16 and key not in c["system"] and key != c["sha"]
            im = np.asarray(Image.open(io.BytesIO(studio.blobs.read_bytes(c["sha"], "png"))))
            assert im.shape == (32, 32, 3)
            outputs.setdefault(c["system"], []).append(im)
    # the four systems really differ (different adapters, prompts and step counts)
    sys_means = {k: np.mean(v, axis=0) for k, v in outputs.items()}
    names = list(sys_means)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert np.abs(sys_means[names[i]] - sys_means[names[j]]).mean() > 0.5, (names[i], names[j])
    # the study's adapters were removed again; generating twice is refused
    with pytest.raises(ss.StudyError, match="already has its images"):
        ss.generate(studio, sid)
    with studio.session() as s:
        run = s.get(runs.Run, submitted[0])
        assert run.step == run.total_steps == 8  # 4 systems x 2 effects


# ------------------------------------------------------------------------------------------------
# the UI tab's handlers


def test_study_tab_builds_and_its_handlers_act(plain: Studio) -> None:
    import gradio as gr

    from studio.ui import study_tab as st
    from studio.ui.app import build_app

    studio = plain
    assert isinstance(build_app(studio, tabs=[("User study", st.build)]), gr.Blocks)
    view = st.render(studio, None)
    assert view.selected is None and "No study yet" in view.detail
    view = st.create(studio, "", [], ["Base"], "", 5, 0, None)
    assert "Cannot create the study" in view.error and "give the study a name" in view.error

    sid = handmade_study(studio, n_items=2)
    view = st.add_voters(studio, sid, "ann\nben", "http://studio.example:9000/")
    lines = view.links.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["ann", "ben"] and "Copy their links now" in view.notice
    token = lines[0].split("\t")[1].removeprefix("http://studio.example:9000/vote/")
    page = ss.voter_page(studio, token)
    ss.record_votes(studio, token, page.item_id, {q.value: page.candidates[0].key for q in ss.QUESTIONS})

    view = st.render(studio, sid)
    assert view.selected == sid and list(view.voters["items answered"]) == ["1/2", "0/2"]
    assert view.chart is not None and len(view.results) == 3 * len(SYSTEMS)
    assert view.results["votes"].sum() == 3  # one vote per criterion so far
    assert Path(st.csv_file(studio, sid)).read_text() == ss.results_csv(studio, sid)
    assert "closed" in st.set_open(studio, sid, False).notice
    assert "has no generation run" in st.stop_generation(studio, sid).error
