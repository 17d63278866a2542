"""What went wrong when a process could not start, as one line an operator can act on.

A port already taken and a data directory that cannot be written are the usual
ways `threadline serve`/`up` fail to start; both surface deep inside grpc or
sqlite as a traceback of a hundred lines. `describe` turns them (and domain
errors raised while starting) into the few fields that name the problem and the
setting that fixes it; the CLI logs those as one JSON line and exits 1.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from threadline import errors


class BindError(OSError):
    """A listener could not bind its address (another process holds the port)."""

    def __init__(self, listener: str, address: str, setting: str) -> None:
        super().__init__(errno.EADDRINUSE, f"{listener}: cannot listen on {address}")
        self.listener = listener
        self.address = address
        self.setting = setting


def _within(path: str, directory: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(directory.resolve())
    except (OSError, ValueError):
        return False


def describe(exc: BaseException, data_dir: Path) -> dict[str, Any] | None:
    """The fields of a start-up failure, or None for one that is a bug (keep its traceback)."""
    if isinstance(exc, BindError):
        return {
            "problem": "address_in_use",
            "listener": exc.listener,
            "address": exc.address,
            "setting": exc.setting,
            "hint": "another process listens there: stop it or choose another port",
        }
    if isinstance(exc, errors.ThreadlineError):
        return {"problem": exc.code.lower(), "error": exc.message}
    if isinstance(exc, OSError):
        path = exc.filename if isinstance(exc.filename, str) else ""
        if path and _within(path, data_dir):
            return {
                "problem": "data_dir_not_writable",
                "path": path,
                "error": exc.strerror or str(exc),
                "setting": "data_dir (THREADLINE_DATA_DIR)",
            }
        if path:
            # Another file a setting names (a certificate, a config file, a store's file).
            return {"problem": "file_unusable", "path": path, "error": exc.strerror or str(exc)}
    if type(exc).__name__ == "OperationalError" and "unable to open database" in str(exc):
        # sqlite3 names no path: the stores live under data_dir unless configured elsewhere.
        return {
            "problem": "data_dir_not_writable",
            "path": str(data_dir),
            "error": str(exc),
            "setting": "data_dir (THREADLINE_DATA_DIR) or the store's database setting",
        }
    return None
