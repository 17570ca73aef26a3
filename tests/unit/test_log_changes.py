"""Which log files changed, as the kernel tells: on a real folder (inotify needs no fake)."""

from __future__ import annotations

from pathlib import Path

import anyio

from services.logging.changes import Changes


async def _next(changes: Changes) -> set[Path] | None:
    with anyio.fail_after(5):
        await changes.arrived()
    return changes.take()


def test_a_written_file_is_told_and_a_quiet_folder_tells_nothing(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()

    async def main() -> None:
        with Changes(folders=[logs, logs / "apps"]) as changes:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(changes.collect)
                changes.watch()
                assert changes.take() is None, "at first every file must be looked at"
                (logs / "a.log").write_text("one\n")
                assert await _next(changes) == {logs / "a.log"}
                with anyio.move_on_after(0.3):
                    await changes.arrived()
                assert changes.take() == set(), "nothing was written"
                (logs / "apps").mkdir()  # made after the watch: watched from now on
                assert await _next(changes) is None
                (logs / "apps" / "b.log").write_text("two\n")
                assert await _next(changes) == {logs / "apps" / "b.log"}
                tasks.cancel_scope.cancel()

    anyio.run(main)
