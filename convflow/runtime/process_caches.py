"""Everything a convflow process keeps between stages to go faster, in one place: the classifier last
saved or loaded, the serving function last traced, and helper processes started ahead of the stage
that takes them. None of it changes what a stage writes; a cold process computes the same."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- the classifier by file

# Train saves the model that evaluate and then export load, which in one process (`convflow run`)
# would each read and rebuild it again.
_last_classifier: tuple[tuple, object] | None = None


def _file_identity(model_path: str | Path) -> tuple:
    status = os.stat(model_path)
    return os.path.realpath(model_path), status.st_size, status.st_mtime_ns


def remember_classifier(model_path: str | Path, model) -> None:
    """`model` is what `model_path` holds (just saved there): recalled_classifier returns it while
    the file is unchanged."""
    global _last_classifier
    _last_classifier = (_file_identity(model_path), model)


def recalled_classifier(model_path: str | Path):
    """The classifier remembered for `model_path` while that file is unchanged, else None."""
    if _last_classifier is not None and _last_classifier[0] == _file_identity(model_path):
        return _last_classifier[1]
    return None


# ----------------------------------------------------------------------------- one trace per model

BACKGROUND_NICENESS = 10  # of work started ahead: it takes what the stages leave idle

# The serving function last made (or being made): (model, what it was made for, a Future of it).
_last_traced: tuple[object, tuple, Future] | None = None
_traced_lock = threading.Lock()


def traced_once(model, made_for: tuple, trace: Callable[[], Any], in_background: bool) -> Future:
    """A Future of `trace()`, made once for the same model object and `made_for`: a stage before
    this one in the process may have traced it, or be tracing it (then the Future is that one)."""
    global _last_traced
    with _traced_lock:
        if _last_traced is not None and _last_traced[0] is model and _last_traced[1] == made_for:
            return _last_traced[2]
        future = Future()
        _last_traced = (model, made_for, future)
    if in_background:
        threading.Thread(target=_fill_in_background, args=(future, trace), name="trace-serving", daemon=True).start()
    else:
        _fill(future, trace)
    return future


def _fill_in_background(future: Future, trace: Callable[[], Any]) -> None:
    """_fill at low priority: the trace overlaps the train stage's work and must take only the CPU
    it leaves idle (Linux gives each thread its own niceness)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
    _fill(future, trace)


def _fill(future: Future, trace: Callable[[], Any]) -> None:
    try:
        future.set_result(trace())
    except BaseException as error:  # raised again where the function is wanted
        future.set_exception(error)


# ----------------------------------------------------------------------------- helpers started early

_prestarted: dict[str, Any] = {}


def start_ahead(name: str, start: Callable[[], Any]) -> bool:
    """Start the helper `name` now unless one is waiting; True when this call started it (its
    starter must then stop_unused it)."""
    if name in _prestarted:
        return False
    _prestarted[name] = start()
    return True


def stop_unused(name: str) -> None:
    """Stop the helper started for `name` if no stage took it."""
    waiting = _prestarted.pop(name, None)
    if waiting is not None:
        waiting.stop()


def take_prestarted(name: str, start: Callable[[], Any]) -> Any:
    """The helper started ahead for `name`, or a new one: each is used once."""
    return _prestarted.pop(name, None) or start()


def waiting(name: str) -> Any:
    """The helper started for `name` and not taken yet, or None."""
    return _prestarted.get(name)
