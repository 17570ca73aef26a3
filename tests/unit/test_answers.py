"""Status answers rendered once per version of a record, and never stale."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.responses import JSONResponse

from services.deploy_kubernetes.api.answers import StatusAnswers
from services.deploy_kubernetes.models import Deployment, Status


def _dep() -> Deployment:
    return Deployment(
        id="0123456789abcdef0123456789abcdef",
        template="example",
        status=Status.DEPLOYING,
        created=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        cull_timeout_ms=60_000,
    )


def test_an_answer_is_what_a_json_response_would_say() -> None:
    dep = _dep()
    assert StatusAnswers().of(dep) == JSONResponse(dep.to_api()).body


def test_a_changed_record_gets_a_fresh_answer() -> None:
    answers = StatusAnswers(max_kept=1)
    dep = _dep()
    assert b'"deploying"' in answers.of(dep)
    moved = dep.evolve(status=Status.DEPLOYED, location="h/user/x", url="http://h/user/x/")
    assert b'"deployed"' in answers.of(moved)
    assert b'"url":"http://h/user/x/"' in answers.of(moved)
    other = dep.evolve(id="f" * 32)  # beyond max_kept: all made afresh
    assert b'"ffff' in answers.of(other)
    assert b'"deployed"' in answers.of(moved)
