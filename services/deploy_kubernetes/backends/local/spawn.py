"""Spawning an app that outlives the server, without holding up the server while it starts.

Python 3.11's ``subprocess`` (the interpreter these machines have) keeps the GIL across its
``vfork`` until the child has exec'd: on a busy machine the child waits for a core, and every
thread of the server waits with it (1 to 12 ms per spawn, measured in bursts of 10, so the tenth
app started 60 to 100 ms after the first). CPython 3.12 drops the GIL there (gh-104372).

:func:`spawn` calls the C library's ``posix_spawn`` through ``ctypes``, which lets go of the GIL
for the call; run from a worker thread, the server goes on meanwhile and concurrent spawns
overlap. ``posix_spawn`` creates the child with ``CLONE_VFORK`` too: the server is not copied,
whatever its size, and a failed exec is its return value. It needs glibc 2.34 or later (for the
two ``_np`` file actions used); there is no second way: an older C library is refused, saying
so. ``tests/unit/test_spawn.py`` holds the property this module exists for: the event loop runs
on while a child that is slow to exec starts.

Exit condition: delete this module when CPython 3.12 or later is the floor; then
``subprocess.Popen(..., start_new_session=True, cwd=...)`` from a worker thread does the same
without holding the GIL."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from pathlib import Path

_SETSIGDEF, _SETSIGMASK, _SETSID = 0x04, 0x08, 0x80  # <spawn.h> (glibc)
_OPAQUE = 1024
"""Room for ``posix_spawn_file_actions_t`` (80 bytes on x86-64), ``posix_spawnattr_t`` (336)
and ``sigset_t`` (128), which only the C library reads and writes."""


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        for name in (
            "posix_spawn_file_actions_addchdir_np",
            "posix_spawn_file_actions_addclosefrom_np",
        ):
            getattr(libc, name)
    except (OSError, AttributeError):
        return None
    char_pp = ctypes.POINTER(ctypes.c_char_p)
    libc.posix_spawn.argtypes = [
        ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
        char_pp, char_pp,
    ]  # fmt: skip
    libc.posix_spawnattr_setflags.argtypes = [ctypes.c_void_p, ctypes.c_short]
    return libc


_LIBC = _libc()


class Child:
    """A child made by :func:`spawn`: its ``pid``, and its exit code once it has been reaped
    (``poll``, ``wait``; the exit code is ``-N`` for a signal, as ``subprocess`` has it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self) -> int | None:
        return self._reap(0)

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped already: nothing more will be known
                return None
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


NO_STDIN = Path("/dev/null")


def spawn(
    argv: list[str], *, env: dict[str, str], cwd: Path, output: Path, stdin: Path = NO_STDIN
) -> Child:
    """Start ``argv`` (its first word found on ``env``'s ``PATH``) in a session of its own, in
    ``cwd``, with ``env`` only, stdin read from ``stdin`` (opened by the child) and stdout and
    stderr appended to ``output``; no other descriptor of the server is passed on, and every
    signal starts at its default. ``OSError`` when it cannot start (no such program, no such
    folder, a C library without what it needs...).

    Blocking for as long as the child takes to exec, without the GIL: call it from a worker
    thread."""
    if _LIBC is None:
        raise OSError(
            errno.ENOSYS,
            "the C library has no posix_spawn_file_actions_addclosefrom_np: spawning apps "
            "needs glibc 2.34 or later",
        )
    program = _which(argv[0], env)
    with open(output, "ab") as log:
        return Child(_posix_spawn(_LIBC, program, argv, env, cwd, log.fileno(), stdin))


def _which(name: str, env: dict[str, str]) -> str:
    """``name`` itself when it is a path (exec says what is wrong with it), else the program of
    that name on ``env``'s ``PATH``."""
    if "/" in name:
        return name
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    return found


def _strings(items: list[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def _posix_spawn(
    libc: ctypes.CDLL,
    program: str,
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    out: int,
    stdin: Path,
) -> int:
    actions, attr = ctypes.create_string_buffer(_OPAQUE), ctypes.create_string_buffer(_OPAQUE)
    mask, defaults = ctypes.create_string_buffer(_OPAQUE), ctypes.create_string_buffer(_OPAQUE)
    for call in (libc.posix_spawn_file_actions_init(actions), libc.posix_spawnattr_init(attr)):
        if call:
            raise OSError(call, os.strerror(call))
    try:
        steps = (  # stdout and stderr first: ``out`` may itself be descriptor 0
            libc.posix_spawn_file_actions_adddup2(actions, out, 1),
            libc.posix_spawn_file_actions_adddup2(actions, out, 2),
            libc.posix_spawn_file_actions_addopen(actions, 0, os.fsencode(stdin), os.O_RDONLY, 0),
            libc.posix_spawn_file_actions_addchdir_np(actions, os.fsencode(cwd)),
            libc.posix_spawn_file_actions_addclosefrom_np(actions, 3),
            libc.sigemptyset(mask),
            libc.sigfillset(defaults),
            libc.posix_spawnattr_setsigmask(attr, mask),
            libc.posix_spawnattr_setsigdefault(attr, defaults),
            libc.posix_spawnattr_setflags(attr, _SETSID | _SETSIGMASK | _SETSIGDEF),
        )
        failed = next((code for code in steps if code), 0)
        if failed:
            raise OSError(failed, os.strerror(failed))
        pid = ctypes.c_int()
        code = libc.posix_spawn(
            ctypes.byref(pid),
            os.fsencode(program),
            actions,
            attr,
            _strings([os.fsencode(word) for word in argv]),
            _strings([os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]),
        )
    finally:
        libc.posix_spawn_file_actions_destroy(actions)
        libc.posix_spawnattr_destroy(attr)
    if code:
        raise OSError(code, os.strerror(code), argv[0])
    return pid.value
