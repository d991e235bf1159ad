"""File helpers shared by the checkpoint writer and the embedding cache."""
from __future__ import annotations

import os


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)   # elsewhere: set and restore (a brief window another thread could see)
    os.umask(mask)
    return mask


def plain_file_mode(path) -> None:
    """Give a ``tempfile.mkstemp`` file (always 0600) the mode a plain ``open(path, "w")`` would have."""
    os.chmod(path, 0o666 & ~umask())
