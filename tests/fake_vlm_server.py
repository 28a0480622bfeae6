"""A real OpenAI-format chat server in the test process, for the VLM student-prompt path.

POST .../chat/completions is answered by ``reply(body) -> (status, payload)`` (a method to override, or
an attribute a test assigns); every request is recorded. ``ScriptedChatServer`` answers from a list.

Imported by bare name (pytest puts tests/ on the path), like studio_fixtures.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(text: str) -> str:
    """The JSON of a chat completion whose one choice says ``text``."""
    return json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        }
    )


class FakeChatServer:
    """Listens on 127.0.0.1 (a free port) from construction until ``close``; ``base_url`` ends in /v1."""

    def __init__(self) -> None:
        self.requests: list[dict] = []  # {"path", "headers", "body"} in arrival order
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw or b"null")
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                code, payload = server.reply(body)
                data = payload.encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def reply(self, body: object) -> tuple[int, str]:
        """The answer to one request (its JSON body): HTTP status and payload text."""
        return 200, completion("fine")

    @property
    def bodies(self) -> list:
        return [r["body"] for r in self.requests]

    @property
    def headers(self) -> list[dict]:
        return [r["headers"] for r in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ScriptedChatServer(FakeChatServer):
    """Answers from ``script``, one reply per request; the last reply repeats once the script runs out.
    A reply is ("ok", text) | ("status", code, body) | ("slow", seconds, text) | ("raw", body)."""

    def __init__(self) -> None:
        self.script: list[tuple] = [("ok", "fine")]
        super().__init__()

    def reply(self, body: object) -> tuple[int, str]:
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        kind = step[0]
        if kind == "slow":
            time.sleep(step[1])
            return 200, completion(step[2])
        if kind == "ok":
            return 200, completion(step[1])
        if kind == "status":
            return step[1], step[2]
        return 200, step[1]
