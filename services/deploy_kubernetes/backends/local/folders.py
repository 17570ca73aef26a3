"""The local backend's folders: its own (state, logs, the suite's home) kept owner-only, and each
app's working folder (its ``HOME``), owned by the app's user, outside the suite's home.

Only a deployment id (32 hex digits) names a file or folder here, and folders are made and
removed through a descriptor of their parent, never by following a link an app may have left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

from common.settings import LocalSettings
from services.deploy_kubernetes.backends.local.users import AppUser
from services.deploy_kubernetes.errors import LaunchError
from services.deploy_kubernetes.models import is_id


def checked_id(dep_id: str) -> str:
    """``dep_id`` when it is a deployment id, the only form that may name a file or folder."""
    if not is_id(dep_id):
        raise LaunchError(f"not a deployment id: {dep_id[:40]!r}")
    return dep_id


def workdir_root(settings: LocalSettings) -> Path:
    """Where the apps' working directories are made: outside the suite's home."""
    return Path(settings.workdir or Path(tempfile.gettempdir()) / f"binder-apps-{os.geteuid()}")


def private_dir(path: Path, mode: int) -> None:
    """Make ``path`` a directory of this process's user with ``mode``, refusing one that is a
    link or belongs to someone else (the parent may be a shared folder such as /tmp)."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise LaunchError(f"{path} is not a directory of the server's own user")
    if stat.S_IMODE(info.st_mode) != mode:
        path.chmod(mode)


@contextlib.contextmanager
def opened_dir(path: Path) -> Iterator[int]:
    """A descriptor of the folder ``path`` itself (not of where a link there points)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


class Workdirs:
    """The apps' working folders, one per deployment, in ``root``."""

    def __init__(self, root: Path, user: AppUser | None) -> None:
        self.root = root
        self._user = user

    def open(self) -> None:
        private_dir(self.root, 0o711)  # apps reach their own folder, list none

    def make(self, dep_id: str) -> Path:
        """The app's own working directory (and its HOME), owned by the app's user: made and
        handed over inside the folder of working directories without following a link."""
        name = checked_id(dep_id)
        with opened_dir(self.root) as parent:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
            if self._user is not None:
                uid, gid = self._user.uid, self._user.gid
                os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
        return self.root / name

    def remove(self, dep_id: str) -> None:
        """Remove the app's folder, by its name inside the folder of working directories (an
        open descriptor, not a path): nothing the app made there, links included, is followed."""
        try:
            with opened_dir(self.root) as parent:
                shutil.rmtree(checked_id(dep_id), dir_fd=parent)
        except FileNotFoundError:
            return
        except OSError as exc:
            logger.bind(id=dep_id).warning("could not remove the app's folder: {}", exc)
