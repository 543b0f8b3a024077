"""Writing under the artifacts root so that nothing half-written is ever read: files and folders are
written beside their final path and renamed into place, and writers that share a file take its lock.

A process killed half-way leaves a hidden `.<name>.tmp-*` file or folder that nothing reads, never a
complete-looking one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _temporary_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; it replaces `path` only when the block succeeds."""
    temporary = _temporary_beside(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically: a reader sees the old content or the new, never a part."""
    with atomic_file(path) as temporary:
        temporary.write_text(text)
    return path


def publish(staged: Path, final_dir: Path) -> None:
    """Put a finished staged folder in place of `final_dir` (replacing an older one)."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    staged.rename(final_dir)


@contextlib.contextmanager
def staged_output(final_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final_dir`; it becomes `final_dir` only when the block succeeds.

    A stage killed half-way leaves a `.<stage>.tmp-*` folder that nothing reads, never a
    complete-looking `final_dir`. The fault tests stop a stage inside `publish`, its most fragile
    moment, by wrapping that function (tests/held_convflow.py).
    """
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = _temporary_beside(final_dir)
    staged.mkdir()
    try:
        yield staged
        publish(staged, final_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of `path` (the file `<path>.lock` beside it) for the block.

    An fcntl lock: the kernel releases it when its holder dies, even by SIGKILL, so a crashed
    writer never leaves the next one waiting.
    """
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
