"""``python -m control.launch ENV_FILE NAMES -- ARGV...``: exec ARGV with the named secrets of
ENV_FILE added to its environment, so that no secret is ever on a command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from control.secrets import read_env_file


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: python -m control.launch ENV_FILE NAME[,NAME...] -- ARGV...")
    env_file, names, command = Path(argv[0]), argv[1].split(","), argv[3:]
    values = read_env_file(env_file)
    env = dict(os.environ)
    for name in filter(None, names):
        if name not in values:
            sys.exit(f"launch: {name} is missing from {env_file}")
        env[name] = values[name]
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
