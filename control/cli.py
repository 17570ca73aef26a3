"""``binder-control``: start, watch, restart and stop the supervised Binder suite on this host."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from common.errors import BinderError
from common.settings import Settings, dump_toml, load_settings
from control.globals import GlobalOptionsGroup
from control.logs_cmd import show_logs
from control.secrets import choose_api_key, described, read_secrets, stored_api_key
from control.services import ORDER
from control.suite import Suite
from control.supervisor_client import ControlError
from control.systemd import UNIT_PATH, unit_text

app = typer.Typer(
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=GlobalOptionsGroup,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="BINDER_HOME",
        show_default="~/.binder",
        help="Where the suite keeps everything it writes (before or after the command).",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", help="TOML file overriding the defaults (before or after the command)."
    ),
]
KeyOpt = Annotated[str | None, typer.Option("--api-key", help="Use this API key (stored 0600).")]
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


def _service_name(value: str) -> str:
    if value not in ORDER:
        raise typer.BadParameter(f"no service named {value!r} (services: {', '.join(ORDER)})")
    return value


@app.command("start-all")
def start_all(ctx: typer.Context, api_key: KeyOpt = None, config: ConfigOpt = None) -> None:
    """Start supervisord and every service in order, each awaited until ready.

    If a service fails to start, what this command started is stopped again.

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


@app.command("stop-all")
def stop_all(ctx: typer.Context) -> None:
    """Stop every service (reverse order), the deployed apps on this host, then supervisord."""
    suite = _run(lambda: _ctx(ctx).suite())
    on_wait, done = _spinner("stopping")
    try:
        _run(lambda: suite.stop_all(on_wait=on_wait))
    finally:
        done()
    out.print("suite stopped")


@app.command()
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """One row per service; exit 0 only when all are RUNNING and ready."""
    suite = _run(lambda: _ctx(ctx).suite())
    rows = [r.as_dict() for r in _run(suite.status)]
    if as_json:
        out.print_json(json.dumps(rows))
    else:
        out.print(_table(rows))
    if not all(r["state"] == "RUNNING" and r["ready"] for r in rows):
        raise typer.Exit(1)


@app.command()
def restart(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help=", ".join(ORDER), callback=_service_name)],
) -> None:
    """Restart one service and wait until it is ready again."""
    suite = _run(lambda: _ctx(ctx).suite())
    on_wait, done = _spinner("waiting for")
    try:
        _run(lambda: suite.restart(service, on_wait=on_wait))
    finally:
        done()
    out.print(f"{service} restarted")


def _service_app(name: str) -> typer.Typer:
    sub = typer.Typer(help=f"Control the {name} service alone.", no_args_is_help=True)

    @sub.command("start")
    def start(ctx: typer.Context, api_key: KeyOpt = None, config: ConfigOpt = None) -> None:
        """Start it (or restart it with new options), starting supervisord if needed."""
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

    @sub.command("stop")
    def stop(ctx: typer.Context) -> None:
        """Stop it."""
        suite = _run(lambda: _ctx(ctx).suite())
        _run(lambda: suite.stop(name))
        out.print(f"{name} stopped")

    @sub.command("restart")
    def restart_one(ctx: typer.Context) -> None:
        """Restart it and wait until it is ready."""
        suite = _run(lambda: _ctx(ctx).suite())
        _run(lambda: suite.restart(name))
        out.print(f"{name} restarted")

    @sub.command("status")
    def status_one(ctx: typer.Context, as_json: JsonOpt = False) -> None:
        """Its row of ``status``; exit 0 only when it is RUNNING and ready."""
        suite = _run(lambda: _ctx(ctx).suite())
        rows = [r.as_dict() for r in _run(suite.status) if r.name == name]
        if not rows:
            _run(lambda: suite.service(name))
        out.print_json(json.dumps(rows[0])) if as_json else out.print(_table(rows))
        if not (rows[0]["state"] == "RUNNING" and rows[0]["ready"]):
            raise typer.Exit(1)

    return sub


for _name in ORDER:
    app.add_typer(_service_app(_name), name=_name)


@app.command()
def logs(
    ctx: typer.Context,
    service: Annotated[str | None, typer.Argument(help="Only this service's lines.")] = None,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Print the newest lines, then new ones as they come."),
    ] = False,
    since: Annotated[str | None, typer.Option(help="ISO time or duration back (10m, 2h).")] = None,
    level: Annotated[
        str | None, typer.Option(help="Lowest level shown (info, warning ...).")
    ] = None,
    app_id: Annotated[
        str | None, typer.Option("--app", help="Only this deployment (an id or a unique prefix).")
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", "-n", min=0, help="How many of the newest lines (newest last, like tail)."
        ),
    ] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Query or tail the log aggregator: the newest lines, oldest of them first."""
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


@app.command()
def config(
    ctx: typer.Context,
    render: Annotated[
        bool, typer.Option("--render", help="Print the rendered supervisord.conf.")
    ] = False,
) -> None:
    """Print the effective configuration (secrets masked) or the rendered supervisord.conf."""
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


@app.command("systemd-unit")
def systemd_unit(
    ctx: typer.Context,
    install: Annotated[bool, typer.Option("--install", help=f"Write it to {UNIT_PATH}.")] = False,
) -> None:
    """Print (or install) a systemd unit that runs supervisord for this home."""
    suite = _run(lambda: _ctx(ctx).suite(persist=install))
    text = unit_text(home=suite.home, binder_control=Path(sys.argv[0]).resolve())
    if not install:
        print(text, end="")
        return
    _run(suite.prepare)
    _run(lambda: UNIT_PATH.write_text(text))
    out.print(
        f"installed {UNIT_PATH}; run: systemctl daemon-reload && systemctl enable --now binder"
    )


@app.command("api-key")
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
            info = suite.supervisor.info("deploy-kubernetes")
            if info and info["statename"] == "RUNNING":
                suite.restart("deploy-kubernetes")

    _run(apply)
    print(suite.api_key)


def main() -> None:
    app()
