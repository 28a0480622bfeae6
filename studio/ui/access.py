"""Who may open the studio: the loopback rule, user/password pairs, and an access token.

Bound to loopback (127.0.0.1, ::1, localhost) the studio is open to whoever is on this machine.
Bound anywhere else it refuses to start unless some authentication is configured: user/password
pairs (Gradio's login page) or a shared access token. The token travels as
``Authorization: Bearer <token>`` (scripts) or once as ``?token=<token>`` in the URL, which the
studio swaps for an HttpOnly cookie so the page's own requests carry it.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_COOKIE = "studio-token"
TOKEN_USER = "token"  # the user name a token holder appears as
MIN_TOKEN_LENGTH = 16
_TOKEN_RE = re.compile(rf"[A-Za-z0-9._~-]{{{MIN_TOKEN_LENGTH},}}")


class AccessError(ValueError):
    """The studio must not start with these access settings; the message says what to do."""


@dataclass(frozen=True)
class Access:
    """The authentication the studio runs with; empty means open (loopback only)."""

    users: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    token: str | None = None

    @property
    def open(self) -> bool:
        return not self.users and not self.token


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or a wildcard: it may be reachable from outside


def parse_user_pass(text: str, where: str = "--auth") -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise AccessError(f"{where}: expected USER:PASSWORD (both non-empty), got '{_mask(text)}'.")
    return user, password


def read_auth_file(path: Path) -> list[tuple[str, str]]:
    """One USER:PASSWORD a line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise AccessError(f"Cannot read the auth file {path}: {e.strerror or e}.") from e
    users = [
        parse_user_pass(line, f"{path} line {i}")
        for i, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not users:
        raise AccessError(f"The auth file {path} holds no USER:PASSWORD lines.")
    return users


def resolve_access(
    host: str,
    auth: list[str] | None = None,
    auth_file: Path | None = None,
    token: str | None = None,
    env: dict[str, str] | None = None,
) -> Access:
    """The access settings from flags (and env STUDIO_AUTH / STUDIO_TOKEN); refuse unsafe ones.

    Raises AccessError when the host is reachable from other machines and nothing guards it.
    """
    env = os.environ if env is None else env
    users = [parse_user_pass(a) for a in auth or []]
    if auth_file is not None:
        users += read_auth_file(auth_file)
    if not users and env.get("STUDIO_AUTH"):
        users = [parse_user_pass(a, "STUDIO_AUTH") for a in env["STUDIO_AUTH"].split(",") if a.strip()]
    token = token or env.get("STUDIO_TOKEN") or None
    if token is not None and not _TOKEN_RE.fullmatch(token):
        raise AccessError(
            f"The access token must be at least {MIN_TOKEN_LENGTH} characters of letters, digits, "
            "'-', '_', '.' or '~' (it goes into URLs and cookies), for example the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`."
        )
    if users and token:
        raise AccessError(
            "Give either user/password logins (--auth, --auth-file, STUDIO_AUTH) or an access token "
            "(--token, STUDIO_TOKEN), not both."
        )
    access = Access(tuple(users), token)
    if access.open and not is_loopback(host):
        raise AccessError(
            f"Refusing to serve the studio on {host} without authentication: anyone who can reach this "
            "machine could read and delete your effects. Add --auth USER:PASSWORD (repeatable), "
            "--auth-file FILE, or --token TOKEN (or set STUDIO_AUTH=user:pass), or bind to 127.0.0.1."
        )
    return access


def _mask(text: str) -> str:
    user, sep, _ = text.partition(":")
    return f"{user}:***" if sep else text


# ---------------------------------------------------------------------------------------------
# Token mode: a Gradio auth dependency plus a middleware that turns ?token= into a cookie.


def token_matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def token_dependency(token: str):
    """For Gradio's ``auth_dependency``: the user name when the request carries the token, else None."""

    def check(request) -> str | None:
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header.lower().startswith("bearer ") else None
        if token_matches(bearer, token) or token_matches(request.cookies.get(TOKEN_COOKIE), token):
            return TOKEN_USER
        return None

    return check


class TokenCookieMiddleware:
    """On a request with a valid ``?token=``: redirect to the same URL without it, setting the cookie."""

    def __init__(self, app: ASGIApp, token: str, secure: bool = False) -> None:
        self.app = app
        self.token = token
        self.secure = secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or b"token=" not in scope.get("query_string", b""):
            await self.app(scope, receive, send)
            return
        query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        given = next((v for k, v in query if k == "token"), None)
        if not token_matches(given, self.token):
            await self.app(scope, receive, send)  # Gradio answers 401 itself
            return
        rest = urlencode([(k, v) for k, v in query if k != "token"])
        location = scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else "")
        cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Lax" + (
            "; Secure" if self.secure else ""
        )
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"set-cookie", cookie.encode("latin-1")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})
