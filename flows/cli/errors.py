"""Errors a user causes (a wrong path, a bad layout or config, a full disk): `fss` prints them
as one line `fss: error: ...` and exits 2; `fss --debug` adds the traceback. Anything else is a
bug and keeps its traceback."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause (a wrong path, a bad layout or config, an unknown dataset): one
    line and exit 2. Anything else is a bug and keeps its traceback."""
    import yaml

    from tasks.data.readers import DatasetError
    from tasks.data.store import StoreError

    # LayoutError is a DatasetError; pydantic's ValidationError is a ValueError; a bad
    # checkpoint file is a ValueError (tasks.fewshot.training.load_state); FileExistsError and
    # PermissionError are OSErrors, with the others of USER_ERRNOS.
    return (DatasetError, StoreError, ValueError, FileNotFoundError, RuntimeError,
            yaml.YAMLError)


# OSErrors that the user's disk or paths cause, not a bug: a full disk or quota, a read-only
# file system, no permission, a file where a folder should be (or the other way round).
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                         errno.EEXIST, errno.ENOTDIR, errno.EISDIR})


def is_user_error(exc: BaseException) -> bool:
    """Whether `main` prints ``exc`` as one line and exits 2 (else it is a bug: traceback)."""
    return isinstance(exc, user_errors()) or (
        isinstance(exc, OSError) and exc.errno in USER_ERRNOS)


def one_line(exc: BaseException) -> str:
    import yaml

    if isinstance(exc, OSError) and exc.errno in USER_ERRNOS and exc.strerror:
        return _os_error_line(exc)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, yaml.YAMLError):  # PyYAML spreads its position over several lines
        text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    return " ".join(text.split("\n"))  # one line, whatever the message


def _os_error_line(exc: OSError) -> str:
    """``<path>: <reason>`` of a disk or path error. A failed write() names no file: then the
    file is the innermost one the failing code held (a Path, or an open file's name)."""
    path = exc.filename if exc.filename is not None else _file_at_fault(exc.__traceback__)
    where = f"{os.fsdecode(path)}: " if path is not None else ""
    if exc.filename2 is not None:
        where = f"{os.fsdecode(exc.filename)} -> {os.fsdecode(exc.filename2)}: "
    hint = {errno.ENOSPC: " (free some space and rerun: finished shards, checkpoints and "
                          "points are kept)",
            errno.EDQUOT: " (free some space and rerun)",
            errno.EROFS: " (write the store, runs and reports somewhere writable)"}
    return f"{where}{exc.strerror}{hint.get(exc.errno, '')}"


def _file_at_fault(tb: Any) -> str | None:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):  # innermost first
        for value in frame.f_locals.values():
            if isinstance(value, Path):
                return str(value)
            name = getattr(value, "name", None) if hasattr(value, "write") else None
            if isinstance(name, str) and name:
                return name
    return None


class HideUserErrors(logging.Filter):
    """Console handlers only: Prefect logs a flow's or task's exception with its traceback
    before the flow re-raises it; for a user error the one line of `main` says it all (the
    Prefect API and UI still get the full record). Also hides the events worker's shutdown
    note ("Still processing items") that an early failure leaves behind."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_user_error(exc):
            return False
        return not (record.name == "EventsWorker"
                    and str(record.msg).startswith("Still processing items"))

