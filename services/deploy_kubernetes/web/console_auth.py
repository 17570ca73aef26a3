"""Sessions of the operator console.

The API key is posted once to ``POST /console/session``; the server answers with a random session
token in an HttpOnly, SameSite=Strict cookie scoped to ``/console``. The page's scripts never hold
the key or the token. Only a hash of each token is kept, with its expiry, in the database (a
collection whose expiry index removes it when it expires), so a session made on one server is
valid on every other. Calls that change state also need the ``X-Binder-Console`` header, which no
cross-site form can send.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response

from services.deploy_kubernetes.engine.limits import MovingWindow
from services.deploy_kubernetes.errors import RateLimitedError, UnauthorizedError

COOKIE = "binder_console"
COOKIE_PATH = "/console"
CSRF_HEADER = "x-binder-console"
SESSION_SECONDS = 8 * 3600
SIGN_IN_FAILURES = 10
SIGN_IN_WINDOW_SECONDS = 60.0


class SignInThrottle:
    """Wrong keys one client may present in a window: ``SIGN_IN_FAILURES`` in any
    ``SIGN_IN_WINDOW_SECONDS``. Once a client has used them up, each sign-in it attempts is
    answered 429 with ``Retry-After``, a right key too (otherwise the answers would still tell
    a guesser which key is right, at full speed), until its oldest failure leaves the window.

    The window is an in-memory moving window of each server (:class:`MovingWindow`), not the
    ``limits`` library's in the database that the launches use: with several servers a guesser
    has this many tries per server and window."""

    def __init__(
        self, *, failures: int = SIGN_IN_FAILURES, seconds: float = SIGN_IN_WINDOW_SECONDS
    ) -> None:
        self._failures = MovingWindow(amount=failures, seconds=seconds)

    def check(self, client: str) -> None:
        """Refuse (429) a client whose failures fill its window."""
        wait = self._failures.full_for(client)
        if wait:
            seconds = max(1, math.ceil(wait))
            raise RateLimitedError(
                f"too many wrong keys from this client; retry in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )

    def failed(self, client: str) -> None:
        """Count a wrong key presented by ``client``."""
        self._failures.hit(client)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionKeeper(Protocol):
    """Where sessions are kept (the deployer's use cases)."""

    async def open_session(self, digest: str, seconds: float) -> None: ...
    async def session_valid(self, digest: str) -> bool: ...
    async def end_session(self, digest: str) -> None: ...


@dataclass
class Sessions:
    """Console sessions by token hash, each with its expiry, kept by the deployer's store."""

    deployer: SessionKeeper
    lifetime: float = SESSION_SECONDS

    async def create(self) -> str:
        token = secrets.token_urlsafe(32)
        await self.deployer.open_session(_digest(token), self.lifetime)
        return token

    async def valid(self, token: str | None) -> bool:
        if not token:
            return False
        return await self.deployer.session_valid(_digest(token))

    async def end(self, token: str | None) -> None:
        if token:
            await self.deployer.end_session(_digest(token))


def key_matches(given: str, api_key: str) -> bool:
    return bool(api_key) and bool(given) and hmac.compare_digest(given.encode(), api_key.encode())


async def signed_in(request: Request, sessions: Sessions) -> bool:
    return await sessions.valid(request.cookies.get(COOKIE))


async def require_session(
    request: Request, sessions: Sessions, *, changes_state: bool = False
) -> None:
    """Refuse (403) a console call without a live session, or a state change without the header."""
    if not await signed_in(request, sessions):
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
