"""Sessions of the operator console.

The API key is posted once to ``POST /console/session``; the server answers with a random session
token in an HttpOnly, SameSite=Strict cookie scoped to ``/console``. The page's scripts never hold
the key or the token. The server keeps only a hash of each token, with its expiry, in memory (a
restart of the deploy server, as after ``api-key --rotate``, ends every session). Calls that
change state also need the ``X-Binder-Console`` header, which no cross-site form can send.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from services.deploy_kubernetes.errors import UnauthorizedError

COOKIE = "binder_console"
COOKIE_PATH = "/console"
CSRF_HEADER = "x-binder-console"
SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 1000


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Sessions:
    """Console sessions by token hash, each with its expiry (monotonic seconds)."""

    lifetime: float = SESSION_SECONDS
    _expiry: dict[str, float] = field(default_factory=dict)

    def create(self) -> str:
        self._prune()
        while len(self._expiry) >= MAX_SESSIONS:  # the oldest make room
            del self._expiry[min(self._expiry, key=self._expiry.__getitem__)]
        token = secrets.token_urlsafe(32)
        self._expiry[_digest(token)] = time.monotonic() + self.lifetime
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        expiry = self._expiry.get(_digest(token))
        return expiry is not None and expiry > time.monotonic()

    def end(self, token: str | None) -> None:
        if token:
            self._expiry.pop(_digest(token), None)

    def _prune(self) -> None:
        moment = time.monotonic()
        for key in [k for k, expiry in self._expiry.items() if expiry <= moment]:
            del self._expiry[key]


def key_matches(given: str, api_key: str) -> bool:
    return bool(api_key) and bool(given) and hmac.compare_digest(given.encode(), api_key.encode())


def signed_in(request: Request, sessions: Sessions) -> bool:
    return sessions.valid(request.cookies.get(COOKIE))


def require_session(request: Request, sessions: Sessions, *, changes_state: bool = False) -> None:
    """Refuse (403) a console call without a live session, or a state change without the header."""
    if not signed_in(request, sessions):
        raise UnauthorizedError("sign in to the console first (POST /console/session)")
    if changes_state and request.headers.get(CSRF_HEADER) != "1":
        raise UnauthorizedError(f"console changes need the {CSRF_HEADER} header")


def set_session_cookie(response: Response, token: str, *, secure: bool) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=secure,
    )


def clear_session_cookie(response: Response, *, secure: bool) -> None:
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=secure
    )
