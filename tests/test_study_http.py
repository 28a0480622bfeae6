"""The voter pages end to end on loopback: many voters at once, tampering, blinding, isolation, resume."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from test_study import SYSTEMS, handmade_study, item_ids, key_of

from storage import StudyItem, Vote
from studio import study_service as ss
from studio.config import StudioConfig
from studio.context import Studio
from studio.serve import ServerThread
from studio.study_pages import create_app

RADIO = re.compile(r"name='(quality|consistency|style)' value='([^']+)'")
ACTION = re.compile(r"action='/vote/[^/]+/item/(\d+)'")
IMG = re.compile(r"src='([^']+)'")


@pytest.fixture()
def studio(data_dir: Path) -> Studio:
    return Studio.open(StudioConfig(data_dir=data_dir))


@pytest.fixture()
def server(studio: Studio):
    with ServerThread(create_app(studio)) as srv:
        yield srv


def _form(html: str) -> tuple[int, dict[str, list[str]]]:
    """The item id and the offered choices per question of a vote page."""
    item = int(ACTION.search(html).group(1))
    offered: dict[str, list[str]] = {}
    for q, v in RADIO.findall(html):
        offered.setdefault(q, []).append(v)
    return item, offered


def test_many_voters_at_once_store_every_vote_exactly_once(studio: Studio, server) -> None:
    n_voters, n_items = 12, 4
    sid = handmade_study(studio, n_items=n_items)
    links = ss.add_voters(studio, sid, [f"voter{i}" for i in range(n_voters)])
    statuses: dict[str, list[int]] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(2)

    def post(client: httpx.Client, token: str, item: int, data: dict) -> int:
        r = client.post(f"/vote/{token}/item/{item}", data=data, timeout=60)
        assert r.status_code in (303, 409), r.text
        if r.status_code == 303:
            assert r.headers["location"] == f"/vote/{token}"
        return r.status_code

    def vote_all(i: int, token: str, twin: bool) -> None:
        with httpx.Client(base_url=server.url) as client:
            for k in range(n_items):
                page = client.get(f"/vote/{token}", timeout=60)
                assert page.status_code == 200 and f"Item {k + 1} of {n_items}" in page.text
                item, offered = _form(page.text)
                data = {
                    q: opts[(i + k + j) % len(opts)] for j, (q, opts) in enumerate(sorted(offered.items()))
                }
                if twin and k == 1:  # two tabs send the same item at the same moment
                    barrier.wait(timeout=30)
                code = post(client, token, item, data)
                with lock:
                    statuses.setdefault(f"{token}/{item}", []).append(code)
            assert "You answered all 4 items" in client.get(f"/vote/{token}", timeout=60).text

    def twin(token: str) -> None:  # the second tab of voter 0: posts item 2 while the first tab does
        with httpx.Client(base_url=server.url) as client:
            barrier.wait(timeout=30)
            item = item_ids(studio, sid)[1]
            data = {q: key_of(studio, item, "Delta") for q in ("quality", "consistency", "style")}
            code = post(client, token, item, data)
            with lock:
                statuses.setdefault(f"{token}/{item}", []).append(code)

    with ThreadPoolExecutor(max_workers=8) as pool:
        # the twin goes second, so it runs while voter 0 waits for it at the barrier
        futures = [pool.submit(vote_all, 0, links[0][1], True), pool.submit(twin, links[0][1])]
        futures += [pool.submit(vote_all, i, t, False) for i, (_, t) in enumerate(links) if i > 0]
        for f in futures:
            f.result(timeout=120)

    with studio.session() as s:
        rows = s.execute(select(Vote.voter_id, Vote.item_id, Vote.question)).all()
    assert len(rows) == n_voters * n_items * 3 == len(set(rows))
    # every (voter, item) was accepted exactly once; the racing twin got 409 (or won, and the tab 409)
    assert all(codes.count(303) == 1 for codes in statuses.values())
    assert sorted(len(c) for c in statuses.values()) == [1] * (n_voters * n_items - 1) + [2]
    assert [p.answered for p in ss.voter_progress(studio, sid)] == [n_items] * n_voters


def test_tampered_tokens_items_and_choices_are_refused(studio: Studio, server) -> None:
    sid = handmade_study(studio, n_items=2)
    other = handmade_study(studio, n_items=1, name="other")
    [(_, token)] = ss.add_voters(studio, sid, ["ann"])
    [(_, olga)] = ss.add_voters(studio, other, ["olga"])
    items, other_item = item_ids(studio, sid), item_ids(studio, other)[0]
    full = {q: key_of(studio, items[0], "Alpha") for q in ("quality", "consistency", "style")}
    with httpx.Client(base_url=server.url) as c:
        flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
        for bad in (flipped, "a" * 32, token + "x", "..%2F..%2Fetc"):
            assert c.get(f"/vote/{bad}").status_code == 404
            assert c.post(f"/vote/{bad}/item/{items[0]}", data=full).status_code == 404
        # an item of another study, a made-up item, a non-number
        other_full = {q: key_of(studio, other_item, "Alpha") for q in full}
        assert c.post(f"/vote/{token}/item/{other_item}", data=other_full).status_code == 404
        assert c.post(f"/vote/{token}/item/999999", data=full).status_code == 404
        assert c.post(f"/vote/{token}/item/1x", data=full).status_code == 404
        # a choice that is not one of the item's candidates; a missing answer
        wrong = {**full, "style": key_of(studio, items[1], "Alpha")}
        assert c.post(f"/vote/{token}/item/{items[0]}", data=wrong).status_code == 422
        assert c.post(f"/vote/{token}/item/{items[0]}", data={**full, "style": "Alpha"}).status_code == 422
        r = c.post(f"/vote/{token}/item/{items[0]}", data={"quality": full["quality"]})
        assert r.status_code == 422 and "Consistency" in r.text and "Style alignment" in r.text
        # nothing was stored by the refused requests
        with studio.session() as s:
            assert s.scalar(select(func.count()).select_from(Vote)) == 0
        # the same answers twice: stored once, then 409
        assert c.post(f"/vote/{token}/item/{items[0]}", data=full).status_code == 303
        again = c.post(
            f"/vote/{token}/item/{items[0]}", data={q: key_of(studio, items[0], "Bravo") for q in full}
        )
        assert again.status_code == 409 and "cannot be changed" in again.text
        # a voter of another study cannot vote on or see this study's items
        assert c.post(f"/vote/{olga}/item/{items[1]}", data=full).status_code == 404
        ann_imgs = IMG.findall(c.get(f"/vote/{token}").text)
        for src in ann_imgs:
            name = src.rsplit("/", 1)[1]
            assert c.get(f"/vote/{olga}/img/{name}").status_code == 404
            assert c.get(src).status_code == 200
        assert c.get(f"/vote/{token}/img/{'0' * 32}").status_code == 404
        # a closed study takes no votes
        ss.set_open(studio, sid, False)
        assert "This study is closed" in c.get(f"/vote/{token}").text
        r = c.post(
            f"/vote/{token}/item/{items[1]}", data={q: key_of(studio, items[1], "Alpha") for q in full}
        )
        assert r.status_code == 403


def test_pages_reveal_no_system_and_no_blob(studio: Studio, server) -> None:
    sid = handmade_study(studio, n_items=2)
    [(_, token)] = ss.add_voters(studio, sid, ["ann"])
    with studio.session() as s:
        items = s.scalars(select(StudyItem).where(StudyItem.study_id == sid)).all()
        shas = {c["sha"] for it in items for c in it.candidates.values()} | {it.source_sha for it in items}
    with httpx.Client(base_url=server.url) as c:
        for _ in range(2):
            r = c.get(f"/vote/{token}")
            assert r.status_code == 200
            page = r.text
            assert r.headers["cache-control"] == "no-store" and r.headers["referrer-policy"] == "no-referrer"
            for word in (*SYSTEMS, "hand", "slot", "system"):  # labels, the study's name, internals
                assert word.lower() not in page.lower(), word
            for sha in shas:
                assert sha[:12] not in page
            srcs = IMG.findall(page)
            assert len(srcs) == 5  # the original and A-D
            for src in srcs:
                assert re.fullmatch(rf"/vote/{token}/img/[0-9a-f]{{32}}", src)
                img = c.get(src)
                assert img.status_code == 200 and img.headers["content-type"] == "image/png"
                assert "etag" not in img.headers and "content-disposition" not in img.headers
                assert not any(sha[:12] in v for v in img.headers.values() for sha in shas)
            assert [m for m in re.findall(r"<figcaption>([^<]+)</figcaption>", page)] == ["Original", *"ABCD"]
            item, offered = _form(page)
            assert all(v not in shas and v not in SYSTEMS for opts in offered.values() for v in opts)
            r = c.post(f"/vote/{token}/item/{item}", data={q: o[0] for q, o in offered.items()})
            assert r.status_code == 303
        assert "You answered all 2 items" in c.get(f"/vote/{token}").text


def test_voters_reach_nothing_but_their_pages_and_resume(studio: Studio, server) -> None:
    sid = handmade_study(studio, n_items=3)
    [(_, token)] = ss.add_voters(studio, sid, ["ann"])
    items = item_ids(studio, sid)
    with httpx.Client(base_url=server.url) as c:
        for path in ("/", "/docs", "/openapi.json", "/redoc", f"/results/{sid}", "/vote", f"/study/{sid}"):
            assert c.get(path).status_code == 404, path
        ss.record_votes(
            studio,
            token,
            items[0],
            {q: key_of(studio, items[0], "Alpha") for q in ("quality", "consistency", "style")},
        )
        ss.record_vote(studio, token, items[1], "quality", key_of(studio, items[1], "Bravo"))
        # a fresh visit resumes at item 2 and asks only what is still open there
        page = c.get(f"/vote/{token}").text
        assert "Item 2 of 3" in page and f"/item/{items[1]}'" in page
        item, offered = _form(page)
        assert item == items[1] and sorted(offered) == ["consistency", "style"]
        r = c.post(f"/vote/{token}/item/{item}", data={q: o[-1] for q, o in offered.items()})
        assert r.status_code == 303
        assert "Item 3 of 3" in c.get(r.headers["location"]).text
