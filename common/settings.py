"""Settings of the suite: frozen dataclasses per component, loaded in layers.

The layers are the embedded defaults (``configs/defaults.toml``), then the operator's ``--config``
file, then ``BINDER_<SECTION>_<KEY>`` environment variables. Every value is validated against the
dataclass field's type; an error names the file (or variable), the key and the expected type.
Secrets (the API key, the proxy and logging tokens) never come from a file: they arrive through
the environment and are ``repr=False``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from common.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULTS_FILE = CONFIGS_DIR / "defaults.toml"


@dataclass(frozen=True)
class DbSettings:
    uri: str = ""
    """External MongoDB URI; empty means the suite runs its own ``db`` program."""
    host: str = "127.0.0.1"
    """Address the ``db`` program listens on."""
    port: int = 27017
    """Port of the ``db`` program."""
    database: str = "binder"
    """Database name used by every service."""
    command: str = ""
    """Server command; empty means ``mongod`` when on PATH, else the embedded server."""

    @property
    def effective_uri(self) -> str:
        return self.uri or f"mongodb://{self.host}:{self.port}/?directConnection=true"


@dataclass(frozen=True)
class ProxySettings:
    public_host: str = ""
    """``host[:port]`` used in ``location``; empty means this host's name and the proxy port."""
    public_url: str = ""
    """``scheme://host[:port]`` users reach the proxy at (``https://`` behind a TLS front): the
    base of each deployment's ``url``, of badges and of the pages' links; empty means
    ``http://<public_host>``."""
    ip: str = "0.0.0.0"
    """Public bind address of the proxy."""
    port: int = 8000
    """Public port of the proxy."""
    api_ip: str = "127.0.0.1"
    """Bind address of the proxy's REST API."""
    api_port: int = 8001
    """Port of the proxy's REST API."""
    per_client_max_connections: int = 200
    """Connections one client address may hold open at the public port at once; more are
    answered 429 and closed (``deploy.trusted_proxies`` are not counted). The proxy's request
    heads are bounded by ``http.header_timeout_seconds`` and ``http.max_header_count``."""
    token: str = field(default="", repr=False)
    """The proxy API token (secret; environment only)."""

    @property
    def api_url(self) -> str:
        return f"http://{self.api_ip}:{self.api_port}"

    @property
    def local_url(self) -> str:
        """Where the suite itself reaches the proxy's public port (on this host)."""
        host = "127.0.0.1" if self.ip in ("0.0.0.0", "") else self.ip
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class LoggingSettings:
    host: str = "127.0.0.1"
    """Bind address of the log aggregator."""
    port: int = 8050
    """Port of the log aggregator."""
    retention_days: int = 7
    """Log lines older than this are removed."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest ingest body accepted; larger ones are answered 413."""
    retention_check_seconds: float = 60
    """How often lines older than ``retention_days`` are removed."""
    tail_skip: str = "deploy-kubernetes.out"
    """Comma-separated prefixes of files in ``<home>/logs`` not followed (their program ships
    its records through the loguru sink already; its stderr, where tracebacks that bypass loguru
    go, is followed)."""
    app_lines_per_second: int = 1000
    """Lines of one app's output stored per second at most (bursts of one second's worth); the
    rest is dropped, one record saying how many."""
    app_bytes_per_second: int = 1048576
    """Bytes of one app's output stored per second at most, likewise."""
    token: str = field(default="", repr=False)
    """Bearer token of the aggregator's ingest and query (secret; ``BINDER_LOGGING_TOKEN``)."""

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class KubernetesSettings:
    kubeconfig: str = ""
    """Path of a kubeconfig; empty means in-cluster config, then the default kubeconfig."""
    namespace: str = "binder"
    """Namespace the deployments' pods live in."""
    suite_label: str = "binder"
    """Value of the ``binder.suite`` label on this suite's pods."""


@dataclass(frozen=True)
class DockerSettings:
    host: str = ""
    """Docker engine address; empty means the engine's default socket."""
    suite_label: str = ""
    """Value of the ``binder.suite`` label on this suite's containers (and the name of its
    network); empty means one derived from the home (:func:`derived_suite_label`), so that two
    suites on one engine never touch each other's containers."""

    def label(self, home: Path) -> str:
        """The label this suite's containers carry."""
        return self.suite_label or derived_suite_label(home)


def derived_suite_label(home: Path) -> str:
    """``binder-`` and 12 hex digits of a digest of the home's absolute path."""
    return "binder-" + hashlib.sha256(str(home.expanduser().resolve()).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LocalSettings:
    user: str = ""
    """Unprivileged user the apps run as; empty means the dedicated ``binder-app`` user (created by
    ``make setup`` when run as root). A server that is not root runs apps as its own user."""
    allow_root: bool = False
    """Allow apps to run as root (never wise on a public host); without it the server refuses."""
    workdir: str = ""
    """Folder holding each unsandboxed app's working directory (outside the home); empty means
    ``<temp dir>/binder-apps-<uid of the server>``."""
    sandbox: bool = True
    """Each app in a sandbox of its own (a uid of ``uid_range``, private folders, its own pid and
    network namespaces, a cgroup with the template's limits); needs a server running as root.
    False runs apps as ``user`` on the host's network, as trusted programs: for trusted
    templates only."""
    uid_range: str = "200000-299999"
    """Uids (and gids) handed to sandboxed apps, one per running app; they have no passwd
    entries, and a uid some process of the host runs as is never handed out."""
    sandbox_slots: int = 10
    """Sandboxes made ahead of launches (cgroup, network namespace, a parked helper): a burst of
    this many launches costs no more each than one; past it a launch makes its own (~20 ms)."""
    sandbox_network: str = ""
    """IPv4 network (at least a /28) of the sandboxed apps' addresses; empty means a /20 in
    10.64.0.0/10 derived from the suite's home, so two suites on a host do not meet."""
    log_max_bytes: int = 8388608
    """Bound of each app's output file (``logs/apps/<id>.log`` with its predecessor ``.1``):
    past it the oldest output is dropped, saying so in the log."""


@dataclass(frozen=True)
class HttpSettings:
    """Edge limits of the suite's HTTP services (the deploy API and the log aggregator; the
    proxy takes the head's deadline and field count)."""

    max_header_bytes: int = 32768
    """Largest request line plus headers; a larger one is answered 431 and the connection closed."""
    max_header_count: int = 100
    """Most header fields in one request; more are answered 431."""
    header_timeout_seconds: float = 10
    """A request whose line and headers have not all arrived this long after its first byte (or
    after the connection opened) is cut."""
    idle_timeout_seconds: float = 15
    """A connection that sends nothing this long (between requests, or within a request body) is
    closed."""
    max_connections: int = 1000
    """Open connections and requests at once; beyond it new requests are answered 503."""
    max_json_depth: int = 32
    """Deepest nesting of arrays and objects accepted in a JSON body (deeper: 422)."""


@dataclass(frozen=True)
class DeploySettings:
    host: str = "0.0.0.0"
    """Bind address of the deploy API."""
    port: int = 8084
    """Port of the deploy API."""
    backend: str = "local"
    """Where templates run: ``local``, ``kubernetes`` or ``docker``."""
    launch_requires_key: bool = False
    """When true, launching needs the API key too."""
    max_deployments: int = 100
    """Most deployments (deploying or deployed) at once, over all templates."""
    cull_interval_seconds: float = 60
    """How often the culler looks for idle deployments."""
    max_age_seconds: float = 21600
    """A deployment older than this is culled however busy it is."""
    default_cull_timeout_ms: int = 3_600_000
    """Inactivity after which a deployment is culled, when neither request nor template says."""
    launch_timeout_seconds: float = 120
    """A launch not deployed after this long fails."""
    templates_dir: str = ""
    """Folder of ``*.toml`` templates seeded at start; empty means ``configs/templates``."""
    per_client_max_deployments: int = 20
    """Deployments (deploying or deployed) one client address may hold at once."""
    per_client_launches_per_minute: int = 30
    """Launches one client address may start in any 60 seconds."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or networks whose ``X-Forwarded-For`` names the client (proxies of the
    operator's own in front; the suite's proxy is believed without being listed)."""
    per_client_max_connections: int = 200
    """Connections one client address may hold open at the deploy API at once; more are
    answered 429 and closed (trusted proxies are not counted: they carry many clients)."""
    per_client_event_streams: int = 60
    """Event streams (``GET .../events``) one client address may hold open at once; more are
    answered 429 (callers with the API key are not counted)."""
    servers: int = 1
    """Deploy-server processes on this host, sharing ``port`` (``SO_REUSEPORT``)."""
    history_days: float = 30
    """Ended deployments' records are kept this long, then removed by the leader."""
    leader_lease_seconds: float = 5
    """How long the leader's lease lasts unrenewed: a new leader takes over this long after the
    old one stops renewing it (it dies or stalls)."""
    local: LocalSettings = field(default_factory=LocalSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    docker: DockerSettings = field(default_factory=DockerSettings)

    @property
    def local_url(self) -> str:
        """Where the suite's own programs on this host (the proxy) reach the deploy API."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: Path("~/.binder").expanduser())
    """Where the suite writes everything: config, socket, logs, data, the API key."""
    db: DbSettings = field(default_factory=DbSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    deploy: DeploySettings = field(default_factory=DeploySettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    api_key: str = field(default="", repr=False)
    """The deploy API key (secret; environment or the stored key file only)."""

    @property
    def templates_dir(self) -> Path:
        return (
            Path(self.deploy.templates_dir)
            if self.deploy.templates_dir
            else CONFIGS_DIR / "templates"
        )

    @property
    def public_host(self) -> str:
        if self.proxy.public_host:
            return self.proxy.public_host
        import socket

        return f"{socket.gethostname()}:{self.proxy.port}"

    @property
    def public_url(self) -> str:
        """``proxy.public_url``, or ``http://<public_host>``: the base of every link users get."""
        return (self.proxy.public_url or f"http://{self.public_host}").rstrip("/")


SECRET_KEYS = frozenset({"api_key", "token"})
BACKENDS = ("local", "kubernetes", "docker")


def load_settings(
    config: Path | None = None,
    *,
    home: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load defaults, then ``config``, then ``BINDER_*`` variables of ``environ``."""
    environ = os.environ if environ is None else environ
    raw = _read_toml(DEFAULTS_FILE)
    if config is not None:
        _merge(raw, _read_toml(config), source=str(config))
    _apply_environ(raw, environ)
    home_path = home or Path(environ.get("BINDER_HOME") or "~/.binder").expanduser()
    raw["home"] = home_path
    raw.setdefault("proxy", {})["token"] = environ.get("CONFIGPROXY_AUTH_TOKEN", "")
    raw.setdefault("logging", {})["token"] = environ.get("BINDER_LOGGING_TOKEN", "")
    raw["api_key"] = environ.get("BINDER_API_KEY", "")
    settings = _build(Settings, raw, source=str(config or DEFAULTS_FILE), prefix="")
    assert isinstance(settings, Settings)
    _check(settings, source=str(config or DEFAULTS_FILE))
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _merge(base: dict[str, Any], top: Mapping[str, Any], *, source: str, prefix: str = "") -> None:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, source=source, prefix=f"{prefix}{key}.")
        elif key not in base and not isinstance(base.get(key), dict):
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'")
        else:
            base[key] = value


OTHER_VARIABLES = frozenset(
    {
        "BINDER_HOME",  # --home
        "BINDER_API_KEY",  # the secrets (section 4b of the spec)
        "BINDER_LOGGING_TOKEN",
        "BINDER_DB_URI",
        "BINDER_CONFIG_DIGEST",  # set by control in each service's environment
        "BINDER_READY_SOCKET",  # set by control: each deploy-server process's own socket
        "BINDER_TESTENV_CACHE",  # scripts/kube-testenv
        "BINDER_TESTENV_DIR",
    }
)
"""``BINDER_*`` variables that are not settings but are known: everything else of that form
must name a setting, as every key of a config file must."""


def _apply_environ(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    known: set[str] = set()

    def walk(node: dict[str, Any], path: list[str]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, [*path, key])
                continue
            name = "BINDER_" + "_".join([*path, key]).upper()
            known.add(name)
            if name in environ:
                node[key] = _EnvValue(name, environ[name])

    walk(raw, [])
    for name in sorted(environ):
        if name.startswith("BINDER_") and name not in known and name not in OTHER_VARIABLES:
            close = difflib.get_close_matches(name, sorted(known | OTHER_VARIABLES), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"environment variable {name}: no such setting{hint}")


@dataclass(frozen=True)
class _EnvValue:
    name: str
    text: str


def _build(cls: type, raw: Mapping[str, Any], *, source: str, prefix: str) -> object:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value = raw[f.name]
        kind = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: '{key}' must be a table")
            kwargs[f.name] = _build(kind, value, source=source, prefix=f"{key}.")  # type: ignore[arg-type]
        else:
            kwargs[f.name] = _coerce(kind, value, source=source, key=key)
    return cls(**kwargs)


def _string_list(value: Any, *, source: str, key: str) -> tuple[str, ...]:
    """A list of strings: a TOML array, or a comma-separated environment variable."""
    if isinstance(value, _EnvValue):
        return tuple(part.strip() for part in value.text.split(",") if part.strip())
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{source}: '{key}' must be a list of strings, got {type(value).__name__} {value!r}"
        )
    return tuple(value)


def _coerce(kind: Any, value: Any, *, source: str, key: str) -> Any:
    if typing.get_origin(kind) is tuple:
        return _string_list(value, source=source, key=key)
    if isinstance(value, _EnvValue):
        source, text = value.name, value.text
        try:
            if kind is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                return text.lower() in ("1", "true", "yes")
            return Path(text) if kind is Path else kind(text)
        except ValueError as exc:
            raise ConfigError(
                f"{source}: '{key}' must be {_type_name(kind)}, got {text!r}"
            ) from exc
    if kind is Path:
        return Path(value)
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, kind) and not isinstance(value, bool)
        if kind in (int, str)
        else isinstance(value, int | float) and not isinstance(value, bool)
        if kind is float
        else True
    )
    if not ok:
        raise ConfigError(
            f"{source}: '{key}' must be {_type_name(kind)}, got {type(value).__name__} {value!r}"
        )
    return float(value) if kind is float else value


def _type_name(kind: Any) -> str:
    if isinstance(kind, types.UnionType):
        return " or ".join(_type_name(k) for k in typing.get_args(kind))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        kind, getattr(kind, "__name__", str(kind))
    )


def _check(settings: Settings, *, source: str) -> None:
    if settings.deploy.backend not in BACKENDS:
        raise ConfigError(
            f"{source}: 'deploy.backend' must be one of {', '.join(BACKENDS)}, "
            f"got {settings.deploy.backend!r}"
        )
    _check_ports(settings, source=source)
    _check_hosts(settings, source=source)
    positive = {
        "deploy.max_deployments": settings.deploy.max_deployments,
        "deploy.cull_interval_seconds": settings.deploy.cull_interval_seconds,
        "deploy.max_age_seconds": settings.deploy.max_age_seconds,
        "deploy.default_cull_timeout_ms": settings.deploy.default_cull_timeout_ms,
        "deploy.launch_timeout_seconds": settings.deploy.launch_timeout_seconds,
        "logging.retention_days": settings.logging.retention_days,
        "logging.retention_check_seconds": settings.logging.retention_check_seconds,
        "logging.max_body_bytes": settings.logging.max_body_bytes,
        "logging.app_lines_per_second": settings.logging.app_lines_per_second,
        "logging.app_bytes_per_second": settings.logging.app_bytes_per_second,
        "deploy.per_client_max_deployments": settings.deploy.per_client_max_deployments,
        "deploy.per_client_launches_per_minute": settings.deploy.per_client_launches_per_minute,
        "deploy.per_client_max_connections": settings.deploy.per_client_max_connections,
        "proxy.per_client_max_connections": settings.proxy.per_client_max_connections,
        "deploy.per_client_event_streams": settings.deploy.per_client_event_streams,
        "deploy.local.log_max_bytes": settings.deploy.local.log_max_bytes,
        "deploy.servers": settings.deploy.servers,
        "deploy.history_days": settings.deploy.history_days,
        "deploy.leader_lease_seconds": settings.deploy.leader_lease_seconds,
        **{
            f"http.{f.name}": getattr(settings.http, f.name)
            for f in dataclasses.fields(HttpSettings)
        },
    }
    for key, number in positive.items():
        if number <= 0:
            raise ConfigError(f"{source}: '{key}' must be greater than 0, got {number}")
    if settings.deploy.local.sandbox_slots < 0:
        raise ConfigError(
            f"{source}: 'deploy.local.sandbox_slots' must be 0 or more, "
            f"got {settings.deploy.local.sandbox_slots}"
        )
    for address in settings.deploy.trusted_proxies:
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError as exc:
            raise ConfigError(
                f"{source}: 'deploy.trusted_proxies' must list IP addresses or networks, "
                f"got {address!r}"
            ) from exc
    folder = settings.deploy.templates_dir
    if folder and not Path(folder).is_dir():
        raise ConfigError(
            f"{source}: 'deploy.templates_dir' must be an existing folder of templates, "
            f"got {folder!r}"
        )


def _check_ports(settings: Settings, *, source: str) -> None:
    """Every port in range, and no two services on one port."""
    ports = {
        "db.port": settings.db.port,
        "proxy.port": settings.proxy.port,
        "proxy.api_port": settings.proxy.api_port,
        "logging.port": settings.logging.port,
        "deploy.port": settings.deploy.port,
    }
    if settings.db.uri:
        del ports["db.port"]  # an external database: the suite listens on no db port
    seen: dict[int, str] = {}
    for key, port in ports.items():
        if not 0 < port < 65536:
            raise ConfigError(f"{source}: '{key}' must be a port between 1 and 65535, got {port}")
        if port in seen:
            raise ConfigError(
                f"{source}: '{key}' and '{seen[port]}' are both {port}: "
                "each service needs a port of its own"
            )
        seen[port] = key


_HOST_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def valid_host(text: str) -> bool:
    """An IP address or a DNS host name."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(_HOST_RE.match(text))
    return True


def _check_hosts(settings: Settings, *, source: str) -> None:
    hosts = {
        "db.host": settings.db.host,
        "proxy.ip": settings.proxy.ip,
        "proxy.api_ip": settings.proxy.api_ip,
        "logging.host": settings.logging.host,
        "deploy.host": settings.deploy.host,
    }
    for key, host in hosts.items():
        if not valid_host(host):
            raise ConfigError(
                f"{source}: '{key}' must be an IP address or a host name, got {host!r}"
            )
    public = settings.proxy.public_host
    if public and not _valid_public_host(public):
        raise ConfigError(
            f"{source}: 'proxy.public_host' must be host[:port] (no scheme, no path), "
            f"got {public!r}"
        )
    url = settings.proxy.public_url
    if url and not _valid_public_url(url):
        raise ConfigError(
            f"{source}: 'proxy.public_url' must be http:// or https:// then host[:port] "
            f"(no path, query or user), got {url!r}"
        )


def _valid_public_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.netloc)
        and "@" not in parts.netloc
        and parts.path in ("", "/")
        and not parts.query
        and not parts.fragment
        and _valid_public_host(parts.netloc)
    )


def _valid_public_host(text: str) -> bool:
    host, colon, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        colon, port = (":", rest[1:]) if rest.startswith(":") else ("", rest)
        if rest and not colon:
            return False
    if colon and not (port.isdigit() and 0 < int(port) < 65536):
        return False
    return valid_host(host)


def dump_toml(settings: Settings, *, secrets: str = "omit") -> str:
    """The effective settings as TOML, without the secrets. ``secrets="mask"`` (for display)
    also hides the password of ``db.uri``."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, tuple):
            return "[" + ", ".join(value(item) for item in v) + "]"
        text = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'

    def section(obj: Any, name: str) -> list[str]:
        lines = [f"[{name}]"] if name else []
        tables = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                tables.append((f.name, v))
            elif f.name in SECRET_KEYS:
                continue  # the environment's, not what the suite runs with: never shown
            elif f.name == "uri" and secrets == "mask":
                lines.append(f"{f.name} = {value(mask_uri(v))}")
            elif name or f.name != "home":
                lines.append(f"{f.name} = {value(v)}")
        for sub, v in tables:
            lines += ["", *section(v, f"{name}.{sub}" if name else sub)]
        return lines

    head = [f"# home = {value(settings.home)}"]
    return "\n".join(head + section(settings, "")) + "\n"


def mask_uri(uri: str) -> str:
    """``uri`` with its password, if it has one, shown as ``***``."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
