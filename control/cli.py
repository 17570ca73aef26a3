"""binder-control: start, watch, restart and stop the supervised Binder suite on this host."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import typer
from rich.console import Console
from rich.table import Table

from common.errors import BinderError
from common.settings import Settings, dump_toml, load_settings
from control.globals import GlobalOptionsGroup, PlainCommand
from control.logs_cmd import show_logs
from control.secrets import choose_api_key, described, read_secrets, stored_api_key
from control.services import ORDER
from control.suite import Suite
from control.supervisor_client import ControlError
from control.systemd import unit_path, unit_text

DURATION = re.compile(r"[0-9]+(?:\.[0-9]+)?[smhdw]")

app = typer.Typer(
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=GlobalOptionsGroup,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="BINDER_HOME",
        metavar="PATH",
        show_default="~/.binder",
        help="Where the suite keeps everything it writes (before or after the command).",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="TOML file overriding the defaults (before or after the command).",
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", metavar="KEY", help="Use this API key (stored 0600)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class Context:
    def __init__(self, home: Path | None, config: Path | None) -> None:
        self.home = (home or Path("~/.binder")).expanduser().resolve()
        self.config = config

    def settings(self, config: Path | None = None) -> Settings:
        chosen = config or self.config
        if chosen is None and (self.home / "effective.toml").exists():
            chosen = self.home / "effective.toml"  # what the running suite was started with
        return load_settings(chosen.resolve() if chosen else None, home=self.home)

    def suite(
        self, *, config: Path | None = None, api_key: str | None = None, persist: bool = False
    ) -> Suite:
        """The suite of this home. Only with ``persist`` (commands that start services) may
        ``--api-key`` or ``BINDER_API_KEY`` replace the stored key; nothing is written here."""
        settings = self.settings(config)
        key = choose_api_key(self.home, api_key, os.environ) if persist else None
        return Suite(settings, api_key=key)


def _ctx(ctx: typer.Context) -> Context:
    obj: Context = ctx.obj
    return obj


def _run(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except BinderError as exc:
        err.print(f"binder-control: {exc.message}", markup=False, highlight=False)
        raise typer.Exit(1) from exc


def _fail(message: str) -> None:
    raise ControlError(message)


def _spinner(verb: str) -> tuple[Callable[[str], None], Callable[[], None]]:
    status = err.status("")
    status.start()

    def on_wait(name: str) -> None:
        status.update(f"{verb} [bold]{name}[/bold] …")

    return on_wait, status.stop


@app.callback()
def main_options(ctx: typer.Context, home: HomeOpt = None, config: ConfigOpt = None) -> None:
    ctx.obj = Context(home, config)


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(show_edge=False)
    for column in ("service", "state", "pid", "uptime", "ready", "restarts"):
        table.add_column(column)
    colours = {"RUNNING": "green", "STARTING": "yellow", "BACKOFF": "yellow", "FATAL": "red"}
    for r in rows:
        uptime = "-" if r["uptime_seconds"] is None else f"{r['uptime_seconds']:.0f}s"
        state = f"[{colours.get(r['state'], 'dim')}]{r['state']}[/]"
        table.add_row(
            r["service"],
            state,
            str(r["pid"] or "-"),
            uptime,
            "yes" if r["ready"] else "no",
            str(r["restarts"]),
        )
    return table


ServiceName = Literal["db", "logging", "proxy", "deploy-kubernetes"]
assert get_args(ServiceName) == ORDER


@app.command("start-all", cls=PlainCommand)
def start_all(ctx: typer.Context, api_key: KeyOpt = None, config: ConfigOpt = None) -> None:
    """Start every service in order, each awaited ready.

    Renders the configuration, starts supervisord, then db, logging, proxy and
    deploy-kubernetes. If a service fails to start, what this command started is stopped again.

    The API key is printed only on a terminal; `binder-control api-key` prints it any time.
    """
    c = _ctx(ctx)
    suite = _run(lambda: c.suite(config=config, api_key=api_key, persist=True))
    on_wait, done = _spinner("waiting for")
    try:
        _run(lambda: suite.start_all(on_wait=on_wait))
    finally:
        done()
    rows = [r.as_dict() for r in suite.status()]
    out.print(_table(rows))
    d = suite.settings.deploy
    host = "127.0.0.1" if d.host in ("0.0.0.0", "") else d.host
    out.print(f"deploy API: http://{host}:{d.port}   public proxy: {suite.settings.public_host}")
    if sys.stdout.isatty():
        out.print(f"API key: {suite.api_key}", markup=False, highlight=False)
    else:  # a file or a journal: the key stays in the owner-only home
        out.print(f"API key: stored in {suite.home / 'api-key'} (print it: binder-control api-key)")


@app.command("stop-all", cls=PlainCommand)
def stop_all(ctx: typer.Context) -> None:
    """Stop the services, the apps on this host, supervisord.

    Services stop in reverse order; the local and docker backends' apps end with them."""
    suite = _run(lambda: _ctx(ctx).suite())
    on_wait, done = _spinner("stopping")
    try:
        _run(lambda: suite.stop_all(on_wait=on_wait))
    finally:
        done()
    out.print("suite stopped")


@app.command(cls=PlainCommand)
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Show each service's state; exit 0 when all are ready.

    One row per service: state, pid, uptime, readiness, restarts."""
    suite = _run(lambda: _ctx(ctx).suite())
    rows = [r.as_dict() for r in _run(suite.status)]
    if as_json:
        out.print_json(json.dumps(rows))
    else:
        out.print(_table(rows))
    if not all(r["state"] == "RUNNING" and r["ready"] for r in rows):
        _hint_never_started(suite)
        raise typer.Exit(1)


def _hint_never_started(suite: Suite) -> None:
    if not suite.started_before():
        err.print(
            f"binder-control: the suite of {suite.home} has never been started; "
            "start it with `binder-control start-all`",
            markup=False,
            highlight=False,
        )


@app.command(cls=PlainCommand)
def restart(
    ctx: typer.Context,
    service: Annotated[ServiceName, typer.Argument(metavar="SERVICE")],
) -> None:
    """Restart one service and wait until it is ready again."""
    suite = _run(lambda: _ctx(ctx).suite())
    on_wait, done = _spinner("waiting for")
    try:
        _run(lambda: suite.restart(service, on_wait=on_wait))
    finally:
        done()
    out.print(f"{service} restarted")


SERVICE_HELP = {
    "db": "The database (the embedded MongoDB-compatible server, or mongod).",
    "logging": "The log aggregator.",
    "proxy": "configurable-http-proxy (the public routes to the apps).",
    "deploy-kubernetes": "The deploy server (its name on every backend: local, docker, kubernetes).",
}


def _service_app(name: str) -> typer.Typer:
    sub = typer.Typer(
        help=f"{SERVICE_HELP[name]} Start, stop, restart or show it alone.",
        short_help=SERVICE_HELP[name],
        no_args_is_help=True,
    )

    @sub.command("start", cls=PlainCommand)
    def start(ctx: typer.Context, api_key: KeyOpt = None, config: ConfigOpt = None) -> None:
        """Start it (or restart it with new options).

        Starts supervisord first if it is not running."""
        suite = _run(lambda: _ctx(ctx).suite(config=config, api_key=api_key, persist=True))

        def go() -> None:
            changed = suite.prepare()
            suite.ensure_supervisord()
            suite.restart_if_secrets_changed(changed, [name])
            suite.start(name, on_wait=on_wait)

        on_wait, done = _spinner("waiting for")
        try:
            _run(go)
        finally:
            done()
        out.print(f"{name} is running and ready")

    @sub.command("stop", cls=PlainCommand)
    def stop(ctx: typer.Context) -> None:
        """Stop it."""
        suite = _run(lambda: _ctx(ctx).suite())
        _run(lambda: suite.stop(name))
        out.print(f"{name} stopped")

    @sub.command("restart", cls=PlainCommand)
    def restart_one(ctx: typer.Context) -> None:
        """Restart it and wait until it is ready."""
        suite = _run(lambda: _ctx(ctx).suite())
        _run(lambda: suite.restart(name))
        out.print(f"{name} restarted")

    @sub.command("status", cls=PlainCommand)
    def status_one(ctx: typer.Context, as_json: JsonOpt = False) -> None:
        """Its row of `status`; exit 0 only when it is RUNNING and ready."""
        suite = _run(lambda: _ctx(ctx).suite())
        rows = [
            r.as_dict() for r in _run(suite.status) if r.name.split(":", 1)[0] == name
        ]  # its processes: deploy-kubernetes:0 ... when it runs several
        if not rows:
            _run(lambda: suite.service(name))
        shown = rows[0] if len(rows) == 1 else rows
        out.print_json(json.dumps(shown)) if as_json else out.print(_table(rows))
        if not all(r["state"] == "RUNNING" and r["ready"] for r in rows):
            _hint_never_started(suite)
            raise typer.Exit(1)

    return sub


for _name in ORDER:
    app.add_typer(_service_app(_name), name=_name)


def _since(value: str | None) -> str | None:
    """``--since``: an ISO time or a duration back (``90s``, ``10m``, ``2h``, ``1d``, ``1w``)."""
    if value is None or DURATION.fullmatch(value):
        return value
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither an ISO time (2026-01-31T12:00) nor a duration "
            "(a number and s, m, h, d or w: 10m, 2h)"
        ) from None
    return value


def _app_filter(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[0-9a-f]{1,32}", value):
        raise typer.BadParameter(
            f"{value!r}: a deployment id is 32 hex digits (or a prefix of at least one)"
        )
    return value


@app.command(cls=PlainCommand)
def logs(
    ctx: typer.Context,
    service: Annotated[
        str | None,
        typer.Argument(metavar="SERVICE", help="Only this service's lines (app: the apps')."),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Print the newest lines, then new ones as they come."),
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(metavar="WHEN", callback=_since, help="ISO time or duration back (10m, 2h)."),
    ] = None,
    level: Annotated[
        str | None,
        typer.Option(metavar="LEVEL", help="Lowest level shown (debug, info, warning, error)."),
    ] = None,
    app_id: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="ID",
            callback=_app_filter,
            help="Only this deployment (an id or a unique prefix).",
        ),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit",
            "-n",
            min=0,
            metavar="N",
            help="How many of the newest lines (newest last, like tail).",
        ),
    ] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Show the suite's and the apps' logs (-f follows).

    The newest lines of the log aggregator, oldest of them first, like tail.

    App output is printed with terminal control characters shown as escapes (an app cannot
    move the cursor or recolour your terminal)."""
    c = _ctx(ctx)
    settings = _run(c.settings)
    filters = {"service": service, "level": level, "app": app_id, "since": since}
    with contextlib.suppress(KeyboardInterrupt):
        _run(
            lambda: show_logs(
                settings=settings,
                secrets=read_secrets(c.home),
                filters=filters,
                follow=follow,
                limit=limit,
                as_json=as_json,
                console=out,
            )
        )


@app.command(cls=PlainCommand)
def config(
    ctx: typer.Context,
    render: Annotated[
        bool, typer.Option("--render", help="Print the rendered supervisord.conf.")
    ] = False,
) -> None:
    """Print the effective configuration or supervisord.conf.

    Secrets are masked; --render prints the rendered supervisord.conf instead."""
    suite = _run(lambda: _ctx(ctx).suite())
    if render:
        print(suite.render(), end="")
        return
    print(dump_toml(suite.settings, secrets="mask"), end="")
    stored = read_secrets(suite.home)
    print(f"\n# secrets: owner-only files in {suite.home}, given to services by environment")
    names = {
        "BINDER_API_KEY": "api key",
        "CONFIGPROXY_AUTH_TOKEN": "proxy token",
        "BINDER_LOGGING_TOKEN": "logging token",
        "BINDER_DB_URI": "database URI",
    }
    for name, what in names.items():
        value = stored_api_key(suite.home) if name == "BINDER_API_KEY" else stored.get(name, "")
        print(f"# {what} ({name}): {described(value)}")


@app.command("systemd-unit", cls=PlainCommand)
def systemd_unit(
    ctx: typer.Context,
    install: Annotated[
        bool,
        typer.Option(
            "--install",
            help="Write it to /etc/systemd/system/ (binder.service for the default home, "
            "binder-<digest of the home>.service for another).",
        ),
    ] = False,
) -> None:
    """Print (or install) the systemd unit of this home.

    The unit runs supervisord in the foreground, then start-all."""
    suite = _run(lambda: _ctx(ctx).suite(persist=install))
    text = unit_text(home=suite.home, binder_control=Path(sys.argv[0]).resolve())
    if not install:
        print(text, end="")
        return
    path = unit_path(suite.home)
    _run(suite.prepare)
    _run(lambda: path.write_text(text))
    out.print(
        f"installed {path}; run: systemctl daemon-reload && systemctl enable --now {path.name}"
    )


@app.command("api-key", cls=PlainCommand)
def api_key_cmd(
    ctx: typer.Context,
    rotate: Annotated[
        bool, typer.Option("--rotate", help="Make a new key and restart what uses it.")
    ] = False,
) -> None:
    """Print the API key the suite runs with, or rotate it."""
    c = _ctx(ctx)
    if not rotate:
        key = stored_api_key(c.home)
        if not key:
            _run(lambda: _fail(f"no API key in {c.home} yet: start-all makes one"))
        print(key)
        return
    suite = _run(lambda: c.suite(api_key=secrets.token_hex(16), persist=True))

    def apply() -> None:
        suite.prepare()
        if suite.supervisor.running():
            suite.restart_users_of("BINDER_API_KEY")

    _run(apply)
    print(suite.api_key)


def main() -> None:
    app()
