"""Domain types of the deploy server: deployments, their statuses, and templates."""

from __future__ import annotations

import re
import secrets
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from services.deploy_kubernetes.errors import MalformedRequestError
from services.deploy_kubernetes.urls import app_url, check_relative_path

# anchored with \Z, not $: a $ also matches before a final newline ("<id>\n" would pass)
ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
DEFAULT_PIDS = 1024
"""A template's ``limits.pids`` when it names none."""
MAX_PIDS = 4_194_304
"""Linux's largest ``pid_max``."""
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
QUANTITY_RE = re.compile(
    r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e[0-9]+)?\Z"
)
MAX_CULL_TIMEOUT_MS = 30 * 24 * 3600 * 1000


class Status(StrEnum):
    """A deployment's status, as in Binder's protocol."""

    DEPLOYING = "deploying"
    DEPLOYED = "deployed"
    FAILED = "failed"
    DELETED = "deleted"

    @property
    def final(self) -> bool:
        return self in (Status.FAILED, Status.DELETED)


TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.DEPLOYING: frozenset({Status.DEPLOYED, Status.FAILED, Status.DELETED}),
    Status.DEPLOYED: frozenset({Status.DELETED, Status.FAILED}),
    Status.FAILED: frozenset(),
    Status.DELETED: frozenset(),
}
"""Allowed status changes; the only place that says which moves are legal."""


def sources_of(target: Status) -> list[Status]:
    """The statuses from which ``target`` may be reached."""
    return [s for s, targets in TRANSITIONS.items() if target in targets]


def new_id() -> str:
    return secrets.token_hex(16)


def new_token() -> str:
    """A launch's own secret (``{token}``): 192 random bits, safe in a URL's query."""
    return secrets.token_urlsafe(24)


def is_id(value: object) -> bool:
    """True for a deployment id (32 lowercase hex digits) and nothing else: the only form of an
    id that may name a file, a folder or a process group."""
    return isinstance(value, str) and ID_RE.match(value) is not None


def now() -> datetime:
    """The current time at millisecond precision, as BSON stores it."""
    when = datetime.now(UTC)
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Deployment:
    """One launch of a template."""

    id: str
    template: str
    status: Status
    created: datetime
    cull_timeout_ms: int
    location: str | None = None
    url: str | None = None
    reason: str | None = None
    target: str | None = None
    """Where the proxy sends ``/user/<id>`` (``http://host:port``)."""
    backend_ref: dict[str, Any] = field(default_factory=dict)
    """What the backend needs to find the running app again (pid, pod name, container id)."""
    pooled: bool = False
    """True while the instance waits in its template's pool, not yet handed to a user."""
    deployed_at: datetime | None = None
    last_activity: datetime | None = None
    ended_at: datetime | None = None
    client: str | None = None
    """Who launched it: ``api-key``, or the anonymous client's address (never shown publicly)."""
    urlpath: str = ""
    """The path below the app's base URL that the launch asked to open (``lab/tree/a.ipynb``)."""
    token: str | None = field(default=None, repr=False)
    """The launch's secret (``{token}``) where its template takes one: in ``url`` for the
    launching client only (:meth:`to_api`), never logged."""
    owner: str | None = None
    """The server running its launch while it is ``deploying`` (another server adopts the launch
    when this one stops beating)."""
    ended_seq: int | None = None
    """Its number among the records that ended (the history's order)."""
    template_seq: str | None = None
    """``<template>/<number>``: its number among its template's records that ended."""

    @property
    def template_number(self) -> int | None:
        return None if self.template_seq is None else int(self.template_seq.rsplit("/", 1)[1])

    @property
    def route(self) -> str:
        return f"/user/{self.id}"

    def evolve(self, **changes: Any) -> Deployment:
        return replace(self, **changes)

    def to_api(self, *, with_token: bool = False) -> dict[str, Any]:
        """The record as the API answers it. An ended one has no ``location`` or ``url`` (the
        app is gone: they would lead nowhere); the record keeps them as its history. ``url``
        (the stored base URL, then ``urlpath``) carries the launch's token only ``with_token``:
        in the answers to the launching client (the launch, the status and the events of that
        id), never in lists or the console."""
        out: dict[str, Any] = {
            "id": self.id,
            "template-name": self.template,
            "status": self.status.value,
            "created": iso(self.created),
        }
        if self.location and not self.status.final:
            out["location"] = self.location
            token = self.token if with_token else None
            out["url"] = app_url(self.url, self.urlpath, token) if self.url else self.url
        if self.reason:
            out["reason"] = self.reason
        if self.last_activity:
            out["last-activity"] = iso(self.last_activity)
        return out

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["status"] = self.status.value
        for key in ("ended_seq", "template_seq"):
            if doc[key] is None:
                del doc[key]  # only the records that ended have one (a unique index)
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Deployment:
        fields: dict[str, Any] = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        fields["status"] = Status(doc["status"])
        for key in ("created", "deployed_at", "last_activity", "ended_at"):
            if fields.get(key) is not None and fields[key].tzinfo is None:
                fields[key] = fields[key].replace(tzinfo=UTC)
        fields["backend_ref"] = dict(doc.get("backend_ref") or {})
        return cls(**fields)


@dataclass(frozen=True)
class Template:
    """What a launch runs: an image (container backends) or a command (local backend)."""

    name: str
    command: tuple[str, ...]
    image_name: str = ""
    image_source: str = ""
    port: int = 8888
    env: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)
    """Memory and CPU as Kubernetes quantities."""
    pids: int = DEFAULT_PIDS
    """Processes and threads the app may have at once (``limits.pids``)."""
    cull_timeout_ms: int | None = None
    pool_size: int = 0
    max_deployments: int | None = None
    ready_path: str = ""
    """Where, below the base URL, the app answers once it is ready (2xx, 3xx or 401)."""
    activity_path: str = ""
    """Where, below the base URL, the app tells its own ``last_activity`` (JSON), if it does."""

    @property
    def takes_token(self) -> bool:
        """Whether its command or environment takes ``{token}``: then each launch has one."""
        return any("{token}" in word for word in (*self.command, *self.env.values()))

    def to_api(self, *, with_env: bool = True) -> dict[str, Any]:
        """The template as the API shows it; ``env`` values only to holders of the key."""
        out: dict[str, Any] = {
            "name": self.name,
            "image-name": self.image_name,
            "image-source": self.image_source,
            "command": list(self.command),
            "port": self.port,
            "limits": {**self.limits, "pids": self.pids},
            "pool-size": self.pool_size,
        }
        if with_env:
            out["env"] = dict(self.env)
        if self.cull_timeout_ms is not None:
            out["cull-timeout"] = self.cull_timeout_ms
        if self.max_deployments is not None:
            out["max-deployments"] = self.max_deployments
        if self.ready_path:
            out["ready-path"] = self.ready_path
        if self.activity_path:
            out["activity-path"] = self.activity_path
        return out


def check_name(value: str, what: str = "template-name") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise MalformedRequestError(
            f"{what}: must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def check_id(value: str) -> str:
    if not ID_RE.match(value):
        raise MalformedRequestError("id: must be 32 lowercase hexadecimal characters")
    return value


def check_quantity(value: Any, field_name: str) -> str:
    text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not QUANTITY_RE.match(text):
        raise MalformedRequestError(f"{field_name}: {value!r} is not a Kubernetes quantity")
    return text


def parse_status(value: str) -> Status:
    """The status named ``value`` (422 naming the choices otherwise)."""
    try:
        return Status(value)
    except ValueError as exc:
        choices = ", ".join(s.value for s in Status)
        raise MalformedRequestError(f"status: must be one of {choices}") from exc


def parse_urlpath(value: Any) -> str:
    """A launch's ``urlpath``: a path below the app's base URL (422 naming the field)."""
    return check_relative_path(value, "urlpath")


def parse_cull_timeout(value: Any) -> int:
    """``cull-timeout`` in milliseconds; numeric strings are taken, as Binder's CLI sends them."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise MalformedRequestError("cull-timeout: must be a number of milliseconds")
    if not 1000 <= value <= MAX_CULL_TIMEOUT_MS:
        raise MalformedRequestError(
            f"cull-timeout: must be between 1000 and {MAX_CULL_TIMEOUT_MS} milliseconds"
        )
    return int(value)


def _int_field(data: dict[str, Any], key: str, *, low: int, high: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MalformedRequestError(f"{key}: must be an integer from {low} to {high}")
    return value


def parse_template(data: dict[str, Any], *, name: str | None = None) -> Template:
    """Validate a template as given in TOML or JSON (hyphenated keys, as in Binder)."""
    known = {
        "name",
        "image-name",
        "image-source",
        "command",
        "port",
        "env",
        "limits",
        "cull-timeout",
        "pool-size",
        "max-deployments",
        "ready-path",
        "activity-path",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise MalformedRequestError(f"{unknown[0]}: unknown template field")
    tname = check_name(name or data.get("name", ""), "name")
    if name and data.get("name") not in (None, name):
        raise MalformedRequestError("name: differs from the name in the path")
    command = data.get("command")
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(c, str) and "\x00" not in c for c in command)
    ):
        raise MalformedRequestError("command: must be a non-empty list of strings without NUL")
    for key in ("image-name", "image-source"):
        value = data.get(key, "")
        if not isinstance(value, str) or "\x00" in value or len(value) > 512:
            raise MalformedRequestError(f"{key}: must be a string of at most 512 characters")
    env = data.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and ENV_NAME_RE.match(k) and isinstance(v, str) and "\x00" not in v
        for k, v in env.items()
    ):
        raise MalformedRequestError("env: must map variable names (letters, digits, _) to strings")
    limits = data.get("limits", {})
    if not isinstance(limits, dict) or set(limits) - {"memory", "cpu", "pids"}:
        raise MalformedRequestError("limits: must be a table of 'memory', 'cpu' and 'pids'")
    pids = _int_field(limits, "pids", low=1, high=MAX_PIDS)
    limits = {
        k: check_quantity(v, f"limits.{k}") for k, v in limits.items() if k in ("memory", "cpu")
    }
    cull = data.get("cull-timeout")
    return Template(
        name=tname,
        command=tuple(command),
        image_name=data.get("image-name", "") or tname,
        image_source=data.get("image-source", ""),
        port=_int_field(data, "port", low=1, high=65535) or 8888,
        env=dict(env),
        limits=limits,
        pids=DEFAULT_PIDS if pids is None else pids,
        cull_timeout_ms=None if cull is None else parse_cull_timeout(cull),
        pool_size=_int_field(data, "pool-size", low=0, high=1000) or 0,
        max_deployments=_int_field(data, "max-deployments", low=1, high=100_000),
        ready_path=check_relative_path(data.get("ready-path", ""), "ready-path"),
        activity_path=check_relative_path(data.get("activity-path", ""), "activity-path"),
    )


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity in bytes (``512Mi`` -> 536870912)."""
    factors = {
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "P": 10**15,
        "E": 10**18,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "Pi": 2**50,
        "Ei": 2**60,
    }
    match = QUANTITY_RE.match(quantity)
    if not match:
        raise MalformedRequestError(f"limits.memory: {quantity!r} is not a Kubernetes quantity")
    number, suffix = float(match.group(1)), match.group(3) or ""
    if suffix.startswith("e"):
        return int(number * 10 ** int(suffix[1:]))
    if suffix == "m":
        return int(number / 1000)
    return int(number * factors.get(suffix, 1))


def cpu_cores(quantity: str) -> float:
    """A Kubernetes CPU quantity in cores (``500m`` -> 0.5)."""
    check_quantity(quantity, "limits.cpu")
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
