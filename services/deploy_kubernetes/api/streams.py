"""Event streams (``GET /applications/{t}/{id}/events``) held open, at most so many per client.

A stream lasts until its launch ends, and a client may open many: without a bound, one client's
streams held the server's connections (about 1,000: uvicorn's ``limit_concurrency``), and every
other client was answered 503. Each client address (the request's caller) holds at most
``per_client`` streams; one more is answered 429 with ``Retry-After``. Callers with the API key
are not counted. The slot is given back when the response ends, however it ends
(:class:`HeldStream`), not in the stream's generator, which never runs when the client leaves
before the first byte.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from services.deploy_kubernetes.engine.limits import Caller
from services.deploy_kubernetes.errors import RateLimitedError

RETRY_AFTER_SECONDS = 5


class EventStreams:
    """The open event streams of each client address."""

    def __init__(self, *, per_client: int) -> None:
        self.per_client = per_client
        self._open: dict[str, int] = {}

    def take(self, caller: Caller) -> Callable[[], None]:
        """A slot for ``caller``'s stream, or :class:`RateLimitedError` (429) when it holds
        ``per_client`` already; returns what gives the slot back (once)."""
        if caller.keyed:
            return lambda: None
        address = caller.address
        held = self._open.get(address, 0)
        if held >= self.per_client:
            raise RateLimitedError(
                f"per_client_event_streams: this client holds its maximum of {self.per_client} "
                "open event streams; close one or poll the status instead",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self._open[address] = held + 1
        given_back = False

        def release() -> None:
            nonlocal given_back
            if given_back:
                return
            given_back = True
            left = self._open.get(address, 0) - 1
            if left > 0:
                self._open[address] = left
            else:
                self._open.pop(address, None)

        return release

    def held(self, address: str) -> int:
        return self._open.get(address, 0)


class HeldStream(StreamingResponse):
    """A streaming response that gives its client's slot back when it ends."""

    def __init__(self, *args: object, release: Callable[[], None], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
