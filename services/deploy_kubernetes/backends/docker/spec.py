"""What a container of the docker backend is, built from a launch (pure: its tests compare dicts).

Every app's container runs
- as a user that is not root: the image's own user when it names one that is not root, else
  ``nobody`` (65534:65534);
- with every capability dropped, and ``no-new-privileges`` (a setuid program gains nothing): an
  app needs none (even to listen below 1024: the engine opens every port of a container's own
  network namespace to every user, ``ip_unprivileged_port_start=0``);
- with the template's limits: memory (swap included, so none beyond it), CPU and pids;
- on the suite's own network, a bridge with inter-container traffic off: an app reaches no other
  app, and the engine keeps other networks' containers apart;
- with a ``/tmp`` of its own in memory (counted in its memory limit, owned by the app's user when
  that is nobody), which is also its ``HOME`` unless the template sets one: the image's files are
  root's, read-only to the app's user;
- with the engine's copy of its output bounded (``json-file``, two files of 10 MB): the suite
  keeps its own in ``logs/apps/<id>.log``.
"""

from __future__ import annotations

import re
from typing import Any

from services.deploy_kubernetes.backends.base import LaunchSpec
from services.deploy_kubernetes.models import cpu_cores, memory_bytes

SUITE_LABEL = "binder.suite"
NOBODY = "65534:65534"
ROOT_USERS = frozenset({"", "0", "root"})
TMP_SIZE_WITHOUT_LIMIT = "512m"
LOG_CONFIG = {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}}
NETWORK_OPTIONS = {"com.docker.network.bridge.enable_icc": "false"}
"""The suite's network: a bridge on which containers cannot reach one another."""


def network_name(suite: str) -> str:
    """The name of the suite's network (Docker's name characters only)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{suite}-apps").lstrip("-_.") or "binder-apps"


def app_user(image_user: str) -> str:
    """The user a container runs as: the image's (``Config.User``) unless it is root, or
    none, whatever its group; otherwise nobody."""
    name = image_user.split(":", 1)[0].strip()
    return NOBODY if name in ROOT_USERS else image_user


def container_spec(spec: LaunchSpec, *, suite: str, network: str, user: str) -> dict[str, Any]:
    """The arguments of ``containers.run`` for ``spec``."""
    template = spec.template
    port = template.port
    command = [spec.substitute(w, port=port, python="python3") for w in template.command]
    env = {"HOME": "/tmp", **spec.environment(port=port, python="python3")}
    memory = memory_bytes(template.limits["memory"]) if "memory" in template.limits else None
    tmp = f"rw,exec,nosuid,nodev,size={memory or TMP_SIZE_WITHOUT_LIMIT},mode=1777"
    if user == NOBODY:  # the engine gives /tmp the mode of the image's (root's, 755 at times)
        tmp += ",uid=65534,gid=65534"
    out: dict[str, Any] = {
        "image": template.image_source or template.image_name,
        "command": command,
        "name": f"binder-{spec.id}",
        "detach": True,
        "init": True,  # an init as pid 1 passes signals on and reaps what the app leaves behind
        "environment": env,
        "labels": {SUITE_LABEL: suite, "binder.id": spec.id, "binder.template": template.name},
        "ports": {f"{port}/tcp": ("127.0.0.1", None)},
        "user": user,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": template.pids,
        "network": network,
        "tmpfs": {"/tmp": tmp},
        "log_config": LOG_CONFIG,
    }
    if memory is not None:
        out["mem_limit"] = memory
        out["memswap_limit"] = memory
    if "cpu" in template.limits:
        out["nano_cpus"] = int(cpu_cores(template.limits["cpu"]) * 1e9)
    return out
