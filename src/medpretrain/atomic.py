"""Atomic file writes: a reader (or a resumed run after SIGKILL) sees the old file or the new one, never half.

Every writer goes through `atomic_path`: the content is written to a uniquely named temporary file in the
destination's folder (same file system, so `os.replace` is atomic) and renamed over the target. Unique names
matter: a fixed `x.tmp` lets two concurrent writers (Ray workers, two runs sharing a cache) clobber each
other's half-written file. The standard library has no such helper, hence this module.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on normal exit it replaces `path`, on error it is removed.

    `suffix` keeps an extension that a writer insists on (numpy's `save` appends `.npy` otherwise).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    tmp = Path(name)
    # mkstemp makes the file private (0600); a plain open() would honour the umask (usually 0644), and shared
    # caches (checkpoints, features, reports) must stay readable by the other users of a machine.
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1) -> Path:
    """Write `obj` as JSON atomically; values JSON cannot hold (paths, dates) are written as strings."""
    return write_text(path, json.dumps(obj, indent=indent, default=str))


def write_with(path: str | Path, writer: Callable[[Path], Any], *, suffix: str = "") -> Path:
    """Call `writer(tmp_path)` (e.g. `lambda p: torch.save(obj, p)`) and move the result to `path` atomically."""
    with atomic_path(path, suffix=suffix) as tmp:
        writer(tmp)
    return Path(path)


__all__ = ["atomic_path", "write_json", "write_text", "write_with"]
