"""Which log files changed, as the kernel tells (inotify): the follower opens or stats a file only
after it was written, created or moved, and does nothing while no log grows.

One watch per folder (the logs folder and its ``apps`` folder) covers every file in it. The
kernel's queue of events can overflow, and a folder can be removed or made after the watch was
set; then :meth:`Changes.take` answers ``None`` and the follower looks at every file again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType

from asyncinotify import Event, Inotify, Mask

FILE_EVENTS = Mask.MODIFY | Mask.CREATE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.DELETE
FOLDER_EVENTS = Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.ONLYDIR


class Changes:
    """Paths written, created or moved in ``folders`` since the last :meth:`take`."""

    def __init__(self, *, folders: list[Path]) -> None:
        self._folders = folders
        self._inotify = Inotify()
        self._watched: dict[Path, int] = {}
        self._paths: set[Path] = set()
        self._unseen = True
        """True when a change may have gone unseen: every file must be looked at."""
        self._arrived = asyncio.Event()
        self.noted = 0
        """Events taken from the kernel so far: a count that moves while files are written."""

    def __enter__(self) -> Changes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._inotify.close()

    def watch(self) -> None:
        """Watch each folder that exists and is not watched yet (one made later is watched
        when its parent tells of it, or at the next call)."""
        for folder in self._folders:
            if folder in self._watched:
                continue
            try:
                watch = self._inotify.add_watch(folder, FILE_EVENTS | FOLDER_EVENTS)
            except OSError:
                continue  # not there yet
            self._watched[folder] = watch.wd

    async def collect(self) -> None:
        """Take the kernel's events as they come (the event loop wakes only for them)."""
        async for event in self._inotify:
            self.noted += 1
            self._note(event)
            self._arrived.set()

    def _note(self, event: Event) -> None:
        if Mask.Q_OVERFLOW in event.mask:
            self._unseen = True
        elif event.mask & (Mask.IGNORED | Mask.DELETE_SELF | Mask.MOVE_SELF):
            # a watched folder went away or moved: watch it again where it is next time
            self._watched = {f: wd for f, wd in self._watched.items() if event.path != f}
            self._unseen = True
        elif Mask.ISDIR in event.mask:  # e.g. the apps folder, made after the aggregator started
            self.watch()
            self._unseen = True
        elif event.path is not None:
            self._paths.add(event.path)

    async def arrived(self) -> None:
        """Until a change arrives (one not taken yet counts)."""
        await self._arrived.wait()

    def take(self) -> set[Path] | None:
        """The paths changed since the last take, or None when every file must be looked at."""
        self._arrived.clear()
        paths, self._paths = self._paths, set()
        if self._unseen:
            self._unseen = False
            return None
        return paths
