"""Pure rules: statuses and their moves, template validation, quantities, culling decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.deploy_kubernetes.engine.culler import cull_reason
from services.deploy_kubernetes.errors import MalformedRequestError
from services.deploy_kubernetes.models import (
    TRANSITIONS,
    Deployment,
    Status,
    cpu_cores,
    memory_bytes,
    parse_cull_timeout,
    parse_template,
    sources_of,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_final_statuses_allow_no_move_and_deployed_is_reached_only_from_deploying() -> None:
    assert TRANSITIONS[Status.FAILED] == frozenset()
    assert TRANSITIONS[Status.DELETED] == frozenset()
    assert sources_of(Status.DEPLOYED) == [Status.DEPLOYING]
    assert set(sources_of(Status.DELETED)) == {Status.DEPLOYING, Status.DEPLOYED}


def test_template_from_toml_keys() -> None:
    t = parse_template(
        {
            "name": "nb",
            "image-source": "img:1",
            "command": ["x", "{port}"],
            "limits": {"memory": "1Gi", "cpu": 2},
            "env": {"A_1": "b"},
            "pool-size": 2,
        }
    )
    assert t.limits == {"memory": "1Gi", "cpu": "2"}
    assert t.pool_size == 2
    assert t.image_name == "nb"
    assert t.to_api()["image-source"] == "img:1"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "a", "command": "x"}, "command"),
        ({"name": "a b", "command": ["x"]}, "name"),
        ({"name": "a", "command": ["x"], "limits": {"gpu": "1"}}, "limits"),
        ({"name": "a", "command": ["x"], "limits": {"cpu": "fast"}}, "limits.cpu"),
        ({"name": "a", "command": ["x"], "env": {"1BAD": "v"}}, "env"),
        ({"name": "a", "command": ["x"], "colour": "red"}, "colour"),
        ({"name": "a", "command": ["x"], "pool-size": -1}, "pool-size"),
    ],
)
def test_bad_templates_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(MalformedRequestError, match=field):
        parse_template(data)


def test_quantities() -> None:
    assert memory_bytes("512Mi") == 512 * 2**20
    assert memory_bytes("1G") == 10**9
    assert cpu_cores("500m") == 0.5
    assert cpu_cores("2") == 2.0


def test_cull_timeout_accepts_cli_strings_and_bounds() -> None:
    assert parse_cull_timeout("60000") == 60000
    for bad in (True, "soon", 10, 10**12, float("nan")):
        with pytest.raises(MalformedRequestError):
            parse_cull_timeout(bad)


def _dep(**kw: object) -> Deployment:
    base = {
        "id": "a" * 32,
        "template": "t",
        "status": Status.DEPLOYED,
        "created": T0,
        "cull_timeout_ms": 60_000,
        "deployed_at": T0,
    }
    return Deployment(**{**base, **kw})  # type: ignore[arg-type]


def test_cull_only_after_inactivity_measured_from_last_activity() -> None:
    dep = _dep()
    recent = T0 + timedelta(minutes=5)
    assert cull_reason(dep, recent, recent + timedelta(seconds=59), 86400) is None
    assert "inactivity" in str(cull_reason(dep, recent, recent + timedelta(seconds=61), 86400))
    # with no activity recorded, the deploy time counts
    assert "inactivity" in str(cull_reason(dep, None, T0 + timedelta(seconds=61), 86400))


def test_cull_by_age_even_when_busy_and_never_pooled_or_deploying() -> None:
    now = T0 + timedelta(hours=7)
    assert "maximum age" in str(cull_reason(_dep(), now, now, 6 * 3600))
    assert cull_reason(_dep(pooled=True), None, now, 6 * 3600) is None
    assert cull_reason(_dep(status=Status.DEPLOYING), None, now, 6 * 3600) is None
