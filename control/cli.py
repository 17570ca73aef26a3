"""``binder-control``: start, watch, restart and stop the supervised Binder suite on this host."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from common.errors import BinderError
from common.logs_client import LogsClient
from common.settings import Settings, dump_toml, load_settings
from control.secrets import ensure_home, mask, resolve_api_key
from control.services import ORDER
from control.suite import Suite
from control.systemd import UNIT_PATH, unit_text

app = typer.Typer(
    help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="BINDER_HOME",
        show_default="~/.binder",
        help="Where the suite keeps everything it writes.",
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML file overriding the defaults.")
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

    def suite(self, *, config: Path | None = None, api_key: str | None = None) -> Suite:
        settings = self.settings(config)
        ensure_home(self.home)
        key, _ = resolve_api_key(self.home, api_key, os.environ)
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


@app.command("start-all")
def start_all(ctx: typer.Context, api_key: KeyOpt = None, config: ConfigOpt = None) -> None:
    """Start supervisord and every service in order, each awaited until ready."""
    c = _ctx(ctx)
    suite = _run(lambda: c.suite(config=config, api_key=api_key))
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
    out.print(f"API key: {suite.api_key}", markup=False, highlight=False)


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
    ctx: typer.Context, service: Annotated[str, typer.Argument(help=", ".join(ORDER))]
) -> None:
    """Restart one service and wait until it is ready again."""
    suite = _run(lambda: _ctx(ctx).suite())
    _run(suite.prepare)
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
        suite = _run(lambda: _ctx(ctx).suite(config=config, api_key=api_key))

        def go() -> None:
            changed = suite.prepare()
            suite.ensure_supervisord()
            if changed and name in ("deploy-kubernetes", "proxy"):
                suite.supervisor.stop(name)
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
        _run(suite.prepare)
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
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    since: Annotated[str | None, typer.Option(help="ISO time or duration back (10m, 2h).")] = None,
    level: Annotated[
        str | None, typer.Option(help="Lowest level shown (info, warning ...).")
    ] = None,
    app_id: Annotated[str | None, typer.Option("--app", help="Only this deployment id.")] = None,
    limit: Annotated[int, typer.Option(help="Most lines printed (without --follow).")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Query or tail the log aggregator."""
    settings = _run(_ctx(ctx).settings)
    client = LogsClient(settings.logging.url)
    filters = {
        "service": service,
        "level": level,
        "app": app_id,
        "since": since or ("10m" if follow else None),
    }
    records = client.follow(**filters) if follow else client.query(limit=limit, **filters)

    def show() -> None:
        for record in records:
            if as_json:
                print(json.dumps(record), flush=True)
            else:
                dep = f" [{record['id'][:8]}]" if record.get("id") else ""
                out.print(
                    f"{record['time']} {record['service']:<18} {record['level']:<8}{dep} "
                    f"{record['message']}",
                    markup=False,
                    highlight=False,
                )

    with contextlib.suppress(KeyboardInterrupt):
        _run(show)


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
    print(f"# api key: {mask(suite.api_key)} (stored in {suite.home / 'api-key'})")


@app.command("systemd-unit")
def systemd_unit(
    ctx: typer.Context,
    install: Annotated[bool, typer.Option("--install", help=f"Write it to {UNIT_PATH}.")] = False,
) -> None:
    """Print (or install) a systemd unit that runs supervisord for this home."""
    suite = _run(lambda: _ctx(ctx).suite())
    _run(suite.prepare)
    text = unit_text(home=suite.home, binder_control=Path(sys.argv[0]).resolve())
    if not install:
        print(text, end="")
        return
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
    """Print the API key, or rotate it."""
    c = _ctx(ctx)
    if not rotate:
        suite = _run(c.suite)
        print(suite.api_key)
        return
    import secrets as _secrets

    suite = _run(lambda: c.suite(api_key=_secrets.token_hex(16)))

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
