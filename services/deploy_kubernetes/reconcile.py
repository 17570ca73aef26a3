"""Start-up reconciliation: records that are not final against the backend and the proxy.

- ``deploying`` records are resumed (waiting on their object, or launching it again) within the
  launch timeout, which the launch itself enforces;
- ``deployed`` records whose object runs get their route back; the others become ``failed``;
- backend objects and ``/user/`` routes without a live record are removed.
"""

from __future__ import annotations

from loguru import logger

from services.deploy_kubernetes.backends.base import State
from services.deploy_kubernetes.deployer import Deployer
from services.deploy_kubernetes.models import Status


async def reconcile(deployer: Deployer) -> dict[str, int]:
    d = deployer
    objects = {obs.id: obs for obs in await d.backend.list()}
    routes = await d.proxy.routes()
    live = await d.store.find(statuses=[Status.DEPLOYING, Status.DEPLOYED], pooled=None)
    counts = {"resumed": 0, "restored": 0, "failed": 0, "orphans": 0, "stale_routes": 0}
    for dep in live:
        d._remember(dep)
        obs = objects.get(dep.id)
        template = d.templates.get(dep.template)
        if dep.status is Status.DEPLOYING:
            if template is None:
                await d.fail(dep, f"template {dep.template} was removed while the server was down")
                counts["failed"] += 1
                continue
            running = obs if obs is not None and obs.state is not State.EXITED else None
            if obs is not None and running is None:
                await d.backend.stop(dep.id, obs.ref)
            d.start_launch(dep, template, running)
            counts["resumed"] += 1
        elif obs is None or obs.state is State.EXITED:
            why = obs.reason if obs is not None and obs.reason else "its app vanished"
            await d.fail(dep, f"{why} while the deploy server was down")
            counts["failed"] += 1
        else:
            if obs.target and routes.get(dep.route, ("",))[0] != obs.target:
                await d.proxy.add_route(dep.route, obs.target)
                if obs.target != dep.target:
                    await d.store.update(dep.id, target=obs.target)
            counts["restored"] += 1
    known = {dep.id for dep in live}
    for obs in objects.values():
        if obs.id not in known:
            await d.backend.stop(obs.id, obs.ref)
            counts["orphans"] += 1
    for path in routes:
        if path.startswith("/user/") and path.removeprefix("/user/") not in known:
            await d.proxy.remove_route(path)
            counts["stale_routes"] += 1
    logger.info("reconciled: {}", ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts
