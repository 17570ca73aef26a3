"""Benchmarks of the suite against its real components (see scripts/bench for the subcommands)."""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts.benchmarks import containers, jupyter, kube, launch, sandbox
from scripts.benchmarks.control import bench_control
from scripts.benchmarks.db import bench_db
from scripts.benchmarks.logs import bench_logs
from scripts.benchmarks.pages import bench_pages
from scripts.benchmarks.proxy import bench_proxy
from scripts.benchmarks.servers import bench_servers
from scripts.benchmarks.shared import report
from scripts.benchmarks.status import bench_status


def bench_launch(
    runs: int,
    backend: str,
    bursts: int = 5,
    client: str = "light",
    sandboxed: str = "on",
    template: str = "example",
    servers: int = 1,
) -> None:
    if template == "jupyter" and backend == "kubernetes":
        kube.bench_launch_kubernetes(runs, bursts, template)
    elif template == "jupyter":
        if backend != "local":
            raise SystemExit("--template jupyter measures the local and kubernetes backends")
        figures, targets = jupyter.run(runs)
        report("launch-jupyter", figures, targets)
    elif backend == "kubernetes":
        kube.bench_launch_kubernetes(runs, bursts)
    elif backend != "local":
        containers.bench_launch_container(runs, backend)
    elif sandboxed == "compare":
        figures, targets = sandbox.compare(runs)
        report("launch-sandbox", figures, targets)
    else:
        figures, targets = launch.run(
            runs, bursts, client, sandbox=sandboxed == "on", servers=servers
        )
        report("launch", figures, targets)


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    launch = sub.add_parser("launch")
    launch.add_argument("--runs", type=int, default=None, help="30; 10 with --template jupyter")
    launch.add_argument("--backend", choices=["local", "docker", "kubernetes"], default="local")
    launch.add_argument(
        "--bursts",
        type=int,
        default=5,
        help="bursts of 10 (local), of 10 and of 50 each beside the floor's (kubernetes); median",
    )
    launch.add_argument(
        "--template",
        choices=["example", "jupyter"],
        default="example",
        help="jupyter: JupyterLab's own start beside its launches and pooled launches (local), "
        "or its pod created directly beside its launches (kubernetes); --runs default 10",
    )
    launch.add_argument(
        "--client",
        choices=["light", "httpx"],
        default="light",
        help="how the local launches are made: one plain request each, read by httptools "
        "(light), or httpx (about five times the CPU, on the same two cores as the suite)",
    )
    launch.add_argument(
        "--sandbox",
        choices=["on", "off", "compare"],
        default="on",
        help="local apps in their sandboxes (on) or not (off); compare: a suite of each side by "
        "side, launches interleaved, then the sandbox's parts",
    )
    launch.add_argument("--servers", type=int, default=1, help="deploy servers (local backend)")
    status = sub.add_parser("status")
    status.add_argument("--seconds", type=int, default=10)
    status.add_argument(
        "--servers", default="1,2", help="deploy servers to compare, e.g. 1,2 (default)"
    )
    servers = sub.add_parser("servers", help="several servers: failover, counters, history")
    servers.add_argument("--records", type=int, default=100_000)
    logs = sub.add_parser("logs")
    logs.add_argument("--lines", type=int, default=200_000)
    control = sub.add_parser("control")
    control.add_argument("--runs", type=int, default=5)
    pages = sub.add_parser("pages")
    pages.add_argument("--runs", type=int, default=10)
    db = sub.add_parser("db", help="embedded database candidates side by side")
    db.add_argument("--rounds", type=int, default=5)
    db.add_argument("--seconds", type=float, default=3.0)
    db.add_argument("--records", type=int, default=1000, help="records the status moves go over")
    db.add_argument("--ferretdb", type=Path, default=None, help="a FerretDB 1.x binary")
    proxy = sub.add_parser("proxy", help="the public proxy's bounds: what they cost a request")
    proxy.add_argument("--requests", type=int, default=2000)
    sub.add_parser("all")
    args = parser.parse_args()
    if args.what in ("launch", "all"):
        backend = getattr(args, "backend", "local")
        template = getattr(args, "template", "example")
        runs = getattr(args, "runs", None) or (10 if template == "jupyter" else 30)
        bench_launch(
            runs,
            backend,
            getattr(args, "bursts", 5),
            getattr(args, "client", "light"),
            getattr(args, "sandbox", "on"),
            template,
            getattr(args, "servers", 1),
        )
    if args.what in ("status", "all"):
        chosen = str(getattr(args, "servers", "1,2")) if args.what == "status" else "1,2"
        bench_status(getattr(args, "seconds", 10), [int(n) for n in chosen.split(",")])
    if args.what in ("servers", "all"):
        bench_servers(getattr(args, "records", 100_000))
    if args.what in ("logs", "all"):
        bench_logs(getattr(args, "lines", 200_000))
    if args.what in ("control", "all"):
        bench_control(getattr(args, "runs", 5))
    if args.what in ("pages", "all"):
        bench_pages(getattr(args, "runs", 10) if args.what == "pages" else 10)
    if args.what in ("proxy", "all"):
        bench_proxy(getattr(args, "requests", 2000))
    if args.what in ("db", "all"):
        a = vars(args)
        bench_db(
            rounds=a.get("rounds", 5),
            seconds=a.get("seconds", 3.0),
            records=a.get("records", 1000),
            ferretdb=a.get("ferretdb"),
        )


if __name__ == "__main__":
    main()
