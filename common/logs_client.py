"""Client of the log aggregator's query API, used by ``binder-control logs``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from common.errors import BinderError


class LogsClient:
    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _params(self, **filters: str | int | None) -> dict[str, str]:
        return {k: str(v) for k, v in filters.items() if v not in (None, "")}

    def query(self, *, limit: int = 100, **filters: str | None) -> Iterator[dict[str, Any]]:
        """Records matching ``filters``, oldest first, following the pages."""
        params = self._params(limit=min(limit, 1000), order="oldest", **filters)
        left = limit
        with httpx.Client(timeout=self.timeout) as client:
            while left > 0:
                try:
                    response = client.get(f"{self.base_url}/logs", params=params)
                except httpx.HTTPError as exc:
                    raise BinderError(
                        f"log aggregator unreachable at {self.base_url}: {exc}"
                    ) from exc
                if response.status_code != 200:
                    raise BinderError(
                        f"log aggregator answered {response.status_code}: {_error(response)}"
                    )
                page = response.json()
                yield from page["records"][:left]
                left -= len(page["records"])
                if not page.get("next"):
                    return
                params["cursor"] = page["next"]

    def follow(self, **filters: str | None) -> Iterator[dict[str, Any]]:
        """Records as they arrive (server-sent events), until interrupted."""
        params = self._params(**filters)
        try:
            with httpx.stream(
                "GET",
                f"{self.base_url}/logs/stream",
                params=params,
                timeout=httpx.Timeout(self.timeout, read=None),
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise BinderError(
                        f"log aggregator answered {response.status_code}: {_error(response)}"
                    )
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        yield json.loads(line[6:])
        except httpx.HTTPError as exc:
            raise BinderError(f"log aggregator unreachable at {self.base_url}: {exc}") from exc


def _error(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error"))
    except ValueError:
        return response.text[:200]
