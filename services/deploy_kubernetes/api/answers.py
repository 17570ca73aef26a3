"""``StatusAnswers``: the rendered JSON of deployments' status, made once per version of a record.

Clients poll a deployment's status far more often than it changes. A :class:`Deployment` is a
frozen value that the records replace on every change, so an answer rendered from one stays
right for as long as that very object is the current record: it is kept beside the object and
used again only when the record asked for *is* that object.
"""

from __future__ import annotations

import json

from services.deploy_kubernetes.models import Deployment

MAX_KEPT = 20_000
"""Answers kept at most (a few hundred bytes each); beyond it they are all made afresh."""


class StatusAnswers:
    def __init__(self, *, max_kept: int = MAX_KEPT) -> None:
        self._kept: dict[str, tuple[Deployment, bytes]] = {}
        self._max_kept = max_kept

    def of(self, dep: Deployment) -> bytes:
        """``dep.to_api()`` as JSON, as Starlette's ``JSONResponse`` renders it; its ``url``
        carries the launch's token (an id's own status is the launching client's to read)."""
        kept = self._kept.get(dep.id)
        if kept is not None and kept[0] is dep:
            return kept[1]
        body = json.dumps(
            dep.to_api(with_token=True), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode()
        if len(self._kept) >= self._max_kept:
            self._kept.clear()
        self._kept[dep.id] = (dep, body)
        return body
