"""HTTP serving of a CollectionLoRA (or of the LoRA-bank baseline, on the same code).

    GET  /health    status and counters (requests, batches, LoRA switches); no token needed
    GET  /effects   the catalog: name, trigger, student prompt, teacher prompt per effect
    POST /edit      multipart: image + (effect | compose=A,B | instruction), steps, seed, format;
                    answers a PNG with X-NFE / X-Seconds / X-Batch-Size headers, or JSON with the
                    PNG in base64 (format=json or Accept: application/json)

Requests from concurrent clients are batched: one worker thread owns the model and takes the oldest
request, then gathers up to ``max_batch`` compatible ones that arrive within ``max_wait_ms``.
Compatible means same steps for the CollectionLoRA (one fused LoRA serves every effect, and the
sampler draws each image's noise from its own seed, so mixed effects share a batch without changing
anyone's output) and, for the LoRA bank, also the same teacher LoRA(s).

Bound to loopback the server is open to this machine; anywhere else it refuses to start without an
access token (``studio.ui.access.is_loopback``), sent as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from fastapi import Request  # module level: FastAPI resolves the endpoint's annotations here
from PIL import Image
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distill.serving import (
    DEFAULT_STEPS,
    MAX_STEPS,
    CollectionEditor,
    EditResult,
    LoraBankEditor,
    Plan,
    ServingError,
    UnknownEffectError,
)

from .ui.access import MIN_TOKEN_LENGTH, is_loopback, token_matches

MB = 1024 * 1024
Editor = CollectionEditor | LoraBankEditor


class ServeAccessError(ValueError):
    """The server must not start with these settings; the message says what to do."""


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8188
    token: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 20.0
    max_upload_bytes: int = 10 * MB
    max_side: int = 4096  # pixels, either side of an uploaded image
    max_steps: int = MAX_STEPS

    def check(self) -> None:
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ServeAccessError(f"The access token must be at least {MIN_TOKEN_LENGTH} characters.")
        if not self.token and not is_loopback(self.host):
            raise ServeAccessError(
                f"Refusing to serve on {self.host} without an access token: anyone who can reach this "
                "machine could use its GPU. Add --token TOKEN (e.g. from `python -c 'import secrets; "
                "print(secrets.token_urlsafe(24))'`) or bind to 127.0.0.1."
            )
        if self.max_batch < 1 or self.max_wait_ms < 0:
            raise ServeAccessError("--max-batch must be at least 1 and --max-wait-ms at least 0.")


# -- batching ----------------------------------------------------------------------------------------
@dataclass
class JobResult:
    png: bytes
    nfe: int
    seconds: float  # the batch's wall time (LoRA loading included)
    batch_size: int
    load_seconds: float
    queued_seconds: float


@dataclass
class _Job:
    image: Image.Image
    plan: Plan
    seed: int
    steps: int
    future: Future = field(default_factory=Future)
    t_submit: float = field(default_factory=time.perf_counter)


class Batcher:
    """One worker thread runs the editor; requests wait in a queue and leave in compatible batches."""

    def __init__(self, editor: Editor, max_batch: int = 8, max_wait_ms: float = 20.0) -> None:
        self.editor = editor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.mixed_prompts = isinstance(editor, CollectionEditor)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._held: deque[_Job] = deque()  # taken from the queue but not batchable with the last batch
        self.requests = 0
        self.batches = 0
        self.batch_sizes: Counter[int] = Counter()
        self._thread = threading.Thread(target=self._loop, name="edit-worker", daemon=True)
        self._thread.start()

    def key(self, job: _Job) -> tuple:
        base = (job.steps, job.plan.loras)
        return base if self.mixed_prompts else (*base, job.plan.prompt)

    def submit(self, image: Image.Image, plan: Plan, seed: int, steps: int) -> Future:
        job = _Job(image, plan, seed, steps)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _gather(self, first: _Job) -> list[_Job]:
        batch, key = [first], self.key(first)
        kept: deque[_Job] = deque()
        while self._held and len(batch) < self.max_batch:
            job = self._held.popleft()
            (batch if self.key(job) == key else kept).append(job)
        self._held = kept + self._held
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if job is None:  # closing: finish this batch first
                self._queue.put(None)
                break
            (batch if self.key(job) == key else self._held).append(job)
        return batch

    def _loop(self) -> None:
        while True:
            first = self._held.popleft() if self._held else self._queue.get()
            if first is None:
                return
            batch = self._gather(first)
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        t_start = time.perf_counter()
        try:
            res: EditResult = self.editor.run(
                [j.image for j in batch],
                [j.plan.prompt for j in batch],
                [j.seed for j in batch],
                batch[0].steps,
                batch[0].plan.loras,
            )
            pngs = [_png(im) for im in res.images]
        except Exception as e:  # every waiting client hears about it; the worker lives on
            for j in batch:
                j.future.set_exception(e)
            return
        self.requests += len(batch)
        self.batches += 1
        self.batch_sizes[len(batch)] += 1
        for j, png in zip(batch, pngs, strict=True):
            j.future.set_result(
                JobResult(png, res.nfe, res.seconds, len(batch), res.load_seconds, t_start - j.t_submit)
            )


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- request limits and access ----------------------------------------------------------------------
def _json_bytes(payload: dict) -> tuple[list, bytes]:
    body = json.dumps(payload).encode()
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


class _TooLarge(Exception):
    pass


class GuardMiddleware:
    """Token check (all paths but /health) and the upload size bound, before any body is parsed."""

    def __init__(self, app: ASGIApp, token: str | None, max_bytes: int) -> None:
        self.app, self.token, self.max_bytes = app, token, max_bytes

    async def _reply(self, send: Send, status: int, payload: dict) -> None:
        headers, body = _json_bytes(payload)
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token and scope["path"] != "/health":
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            if not token_matches(given, self.token):
                await self._reply(
                    send, 401, {"error": "Send the access token as 'Authorization: Bearer <token>'."}
                )
                return
        too_big = {"error": f"The upload is larger than {self.max_bytes // MB} MB."}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reply(send, 413, too_big)
            return
        seen, started = 0, False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reply(send, 413, too_big)


# -- the app -----------------------------------------------------------------------------------------
def _error(status: int, message: str, **extra):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message, **extra}, status_code=status)


def _read_image(data: bytes, max_side: int) -> Image.Image | tuple[int, str]:
    if not data:
        return 400, "The 'image' field is empty."
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size  # from the header, before any pixel is decoded
        if max(w, h) > max_side:
            return 413, f"The image is {w}x{h} px; the largest side allowed is {max_side} px."
        im.load()
    except Image.DecompressionBombError:
        return 413, "The image has too many pixels."
    except (OSError, SyntaxError, ValueError) as e:
        return 400, f"The upload is not an image this server can read (PNG, JPEG, WebP, ...): {e}."
    return im.convert("RGB")


def create_app(editor: Editor, config: ServeConfig = ServeConfig()):
    """The FastAPI app serving ``editor``; ``app.state.batcher`` holds the counters."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    config.check()
    mode = "collection" if isinstance(editor, CollectionEditor) else "bank"
    batcher = Batcher(editor, config.max_batch, config.max_wait_ms)
    app = FastAPI(title="CollectionLoRA serving", docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.state.editor = editor
    app.add_middleware(GuardMiddleware, token=config.token, max_bytes=config.max_upload_bytes)
    app.router.add_event_handler("shutdown", batcher.close)

    @app.get("/health")
    def health() -> dict:
        out = {
            "status": "ok",
            "mode": mode,
            "backbone": editor.backbone.name,
            "effects": len(editor.effect_names()),
            "requests": batcher.requests,
            "batches": batcher.batches,
            "batch_sizes": {str(k): v for k, v in sorted(batcher.batch_sizes.items())},
            "max_batch": batcher.max_batch,
            "max_wait_ms": config.max_wait_ms,
        }
        if isinstance(editor, LoraBankEditor):
            out.update(switches=editor.switches, load_seconds=round(editor.load_seconds, 4))
        return out

    @app.get("/effects")
    def effects() -> dict:
        out: dict = {"mode": mode, "effects": [e.to_dict() for e in editor.effects()]}
        if isinstance(editor, CollectionEditor):
            out["composition_template"] = editor.catalog.composition_template
        return out

    @app.post("/edit")
    async def edit(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return _error(400, "Send the image as multipart/form-data with an 'image' field.")
        try:
            form = await request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
        except _TooLarge:
            raise  # the guard answers 413
        except Exception as e:  # a malformed multipart body
            return _error(400, f"The form could not be read: {e}.")
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            return _error(400, "The form has no 'image' file field.")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            steps = int(fields.get("steps", DEFAULT_STEPS))
            seed = int(fields.get("seed", 0))
        except ValueError:
            return _error(422, "steps and seed must be whole numbers.")
        if not 1 <= steps <= config.max_steps:
            return _error(422, f"steps must be from 1 to {config.max_steps}.")
        fmt = fields.get("format") or (
            "json" if "application/json" in request.headers.get("accept", "") else "png"
        )
        if fmt not in ("png", "json"):
            return _error(422, "format must be 'png' or 'json'.")
        compose = fields.get("compose")
        compose_names = [c.strip() for c in compose.split(",")] if compose else None
        try:
            plan = editor.plan(fields.get("effect") or None, compose_names, fields.get("instruction") or None)
        except UnknownEffectError as e:
            return _error(404, str(e), known=e.known)
        except ServingError as e:
            return _error(422, str(e))
        image = _read_image(await upload.read(), config.max_side)
        if isinstance(image, tuple):
            return _error(*image)
        try:
            res: JobResult = await asyncio.wrap_future(batcher.submit(image, plan, seed, steps))
        except ServingError as e:
            return _error(422, str(e))
        except Exception as e:  # the model failed: say so, keep serving
            return _error(500, f"The edit failed: {type(e).__name__}: {e}")
        headers = {
            "X-NFE": str(res.nfe),
            "X-Seconds": f"{res.seconds:.4f}",
            "X-Batch-Size": str(res.batch_size),
            "X-Queue-Seconds": f"{res.queued_seconds:.4f}",
            "X-Load-Seconds": f"{res.load_seconds:.4f}",
            "X-Effect": plan.label,
        }
        if plan.routed:
            headers["X-Routed-Effect"] = plan.routed
        if fmt == "json":
            return JSONResponse(
                {
                    "image": base64.b64encode(res.png).decode(),
                    "media_type": "image/png",
                    "nfe": res.nfe,
                    "seconds": res.seconds,
                    "batch_size": res.batch_size,
                    "load_seconds": res.load_seconds,
                    "effect": plan.label,
                    "routed": plan.routed,
                    "prompt": plan.prompt,
                },
                headers=headers,
            )
        return Response(res.png, media_type="image/png", headers=headers)

    return app


# -- running it --------------------------------------------------------------------------------------
class ServerThread:
    """uvicorn in a background thread (tests, benches); ``url`` once started, ``stop()`` to end it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host = host

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        t0 = time.perf_counter()
        while not self.server.started:
            if not self.thread.is_alive() or time.perf_counter() - t0 > timeout:
                raise RuntimeError("The HTTP server did not start (is the port in use?).")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(editor: Editor, config: ServeConfig) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    config.check()
    app = create_app(editor, config)
    print(f"serving {len(editor.effect_names())} effects on http://{config.host}:{config.port}", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
