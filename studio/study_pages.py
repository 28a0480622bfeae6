"""The voters' web pages of a blind user study: plain HTML forms, no JavaScript, no studio access.

    GET  /vote/{token}                  the voter's next item (or "thank you" / "closed"), progress
    POST /vote/{token}/item/{item_id}   the item's answers (form fields quality, consistency, style);
                                        303 back to /vote/{token}, or an error page (404/403/409/422)
    GET  /vote/{token}/img/{name}       one of the voter's images, by a per-voter opaque name

The link token is the only credential and reaches only its own study's items: there are no other
routes (no studio, no other studies, no results, no API docs). Pages name no system and no blob: the
candidates are labelled A, B, C, ... in the item's shuffled order and images are served under an HMAC
of the voter's token (see ``study_service``). Responses are ``no-store`` and send no Referer, so the
link does not leak into caches or other sites.

Serve it alone (``python -m studio study serve``, ``serve_voting``), which is the way to open voting
to other machines: voters then reach these pages and nothing of the studio. On one machine the studio
UI can share the server: ``gr.mount_gradio_app(create_app(studio), blocks, path="/studio")`` keeps
/vote/... here and the studio (with its own auth) under /studio.
"""

from __future__ import annotations

import html
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the endpoints' annotations here
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from . import study_service as ss
from .context import Studio
from .study_service import QUESTION_TEXT, VoteError, VoterPage

MAX_FORM_BYTES = 4096  # three short fields
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}
TITLE = "Which edit is best?"
CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 1.5rem auto; max-width: 1100px; padding: 0 1rem; color: #1f2328; }
h1 { font-size: 1.4rem; } .muted { color: #57606a; }
.row { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: 0; text-align: center; } figcaption { font-weight: 600; margin-top: .3rem; }
img.pic { width: 224px; height: 224px; image-rendering: pixelated; border: 1px solid #d0d7de; border-radius: 6px; }
.source img.pic { border: 3px solid #57606a; }
fieldset { border: 1px solid #d0d7de; border-radius: 6px; margin: 1rem 0; padding: .6rem 1rem; }
legend { font-weight: 600; } label { margin-right: 1.4rem; font-size: 1.1rem; cursor: pointer; }
button { font-size: 1.05rem; padding: .5rem 1.4rem; cursor: pointer; }
progress { width: 240px; vertical-align: middle; }
.instruction { background: #f6f8fa; border-left: 4px solid #57606a; padding: .5rem .8rem; }
.error { border-left: 4px solid #cf222e; background: #fff5f5; padding: .5rem .8rem; }
"""


def _page(body: str, status: int = 200) -> HTMLResponse:
    doc = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta name='robots' content='noindex, nofollow'>"
        f"<title>{TITLE}</title><style>{CSS}</style></head><body>{body}</body></html>"
    )
    return HTMLResponse(doc, status_code=status, headers=SECURITY_HEADERS)


def _error_page(token: str | None, status: int, message: str) -> HTMLResponse:
    back = (
        f"<p><a href='/vote/{html.escape(token)}'>Back to your current item</a></p>"
        if token and status in (409, 422)
        else ""
    )
    return _page(f"<h1>{TITLE}</h1><p class='error'>{html.escape(message)}</p>{back}", status)


def _progress(page: VoterPage) -> str:
    return (
        f"<p class='muted'>Item {page.position} of {page.total} "
        f"<progress max='{page.total}' value='{page.answered}'></progress> "
        f"{page.answered} answered</p>"
    )


def render(token: str, page: VoterPage) -> str:
    """The HTML body of a voter's page (exposed for tests)."""
    who = f"<p class='muted'>Hello {html.escape(page.voter_name)}.</p>" if page.voter_name else ""
    head = f"<h1>{TITLE}</h1>{who}"
    if page.status == "draft":
        return head + "<p>The images for this study are still being prepared. Please come back later.</p>"
    if page.status == "closed":
        return head + "<p>This study is closed. Thank you for your help.</p>"
    if page.done:
        return head + f"<p>You answered all {page.total} items. Thank you!</p>"
    t = html.escape(token)
    img = f"/vote/{t}/img/"
    pictures = [
        f"<figure class='source'><img class='pic' src='{img}{page.source_image}' alt='original image'>"
        "<figcaption>Original</figcaption></figure>"
    ]
    pictures += [
        f"<figure><img class='pic' src='{img}{c.image}' alt='result {c.letter}'>"
        f"<figcaption>{c.letter}</figcaption></figure>"
        for c in page.candidates
    ]
    fields = []
    for q in page.questions:
        title, text = QUESTION_TEXT[q]
        options = "".join(
            f"<label><input type='radio' name='{q.value}' value='{html.escape(c.key)}' required> {c.letter}</label>"
            for c in page.candidates
        )
        fields.append(f"<fieldset><legend>{title}</legend><p>{text}</p>{options}</fieldset>")
    return (
        head
        + _progress(page)
        + f"<p class='instruction'>Requested edit: {html.escape(page.instruction)}</p>"
        + f"<div class='row'>{''.join(pictures)}</div>"
        + f"<form method='post' action='/vote/{t}/item/{page.item_id}'>{''.join(fields)}"
        + "<button type='submit'>Save and continue</button></form>"
        + "<p class='muted'>Answers cannot be changed once saved. You can close this page and come back "
        "to the same link later.</p>"
    )


def create_app(studio: Studio) -> Any:
    """The voters' FastAPI app over ``studio`` (no docs, no OpenAPI schema, nothing but /vote)."""
    from fastapi import FastAPI

    app = FastAPI(title=TITLE, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio

    @app.get("/vote/{token}")
    def vote_page(token: str) -> Response:
        try:
            page = ss.voter_page(studio, token)
        except VoteError as e:
            return _error_page(None, e.status, str(e))
        return _page(render(token, page))

    @app.get("/vote/{token}/img/{name}")
    def vote_image(token: str, name: str) -> Response:
        try:
            data = ss.voter_image(studio, token, name)
        except VoteError:
            return _error_page(None, 404, "No such image.")
        return Response(
            data,
            media_type="image/png",
            headers={**SECURITY_HEADERS, "Cache-Control": "private, max-age=3600"},
        )

    @app.post("/vote/{token}/item/{item_id}")
    async def vote_submit(token: str, item_id: str, request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_FORM_BYTES):
            return _error_page(token, 413, "The form is too large.")
        if not item_id.isdigit() or len(item_id) > 18:
            return _error_page(None, 404, "This item is not part of your study.")
        try:
            form = await request.form(max_files=0, max_fields=8, max_part_size=1024)
        except Exception:  # malformed body
            return _error_page(token, 400, "The form could not be read; go back and try again.")
        choices = {
            k: v for k, v in form.items() if isinstance(v, str) and k in {q.value for q in ss.QUESTIONS}
        }
        try:
            page = await run_in_threadpool(ss.voter_page, studio, token)
            wanted = {q.value for q in page.questions} if page.item_id == int(item_id) else set()
            missing = sorted(wanted - set(choices))
            if missing:
                names = ", ".join(QUESTION_TEXT[ss.VoteQuestion(m)][0] for m in missing)
                raise ss.BadChoice(f"Choose one result for each question (missing: {names}).")
            await run_in_threadpool(ss.record_votes, studio, token, int(item_id), choices)
        except VoteError as e:
            return _error_page(token if e.status in (409, 422) else None, e.status, str(e))
        return RedirectResponse(f"/vote/{token}", status_code=303, headers=SECURITY_HEADERS)

    return app


def serve_voting(studio: Studio, host: str = "127.0.0.1", port: int = 8189) -> None:
    """Serve the voter pages until interrupted."""
    import uvicorn

    uvicorn.run(create_app(studio), host=host, port=port, log_level="warning")
