"""Work on every core, in order and in bounded memory: the data stages' one way to do it.

Small jobs run in threads: Pillow decodes and hashlib hashes without the GIL, but each image also
costs tens of microseconds of Python that holds it (opening the file, parsing headers, encoding
the record), which is what kept two threads from two cores' worth of work. Large jobs run in
worker processes: spawned, not forked (the flow's process runs TensorFlow's threads, and a fork
copies none of them but their locks), importing only what the work needs, never TensorFlow. The
pool is started once and kept for the next data stage (download_and_split then to_tfrecords), and
ended once idle for IDLE_SECONDS (training should not share the machine with idle workers' memory).

`Executor.map` submits every item at once, holding a future per image of the dataset;
`ordered_map` keeps a few chunks in flight, so what it holds does not grow with the dataset.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import functools
import itertools
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# Items per task: one future per image costs more of the GIL than a small image's decode frees.
CHUNK = 32
# Below this many items a stage uses threads: starting worker processes (each imports numpy and
# Pillow, about 0.3 s) costs more than the GIL does on a few thousand images.
PROCESSES_FROM = 4_000

IDLE_SECONDS = 10.0

_workers: concurrent.futures.ProcessPoolExecutor | None = None
_workers_lock = threading.Lock()
_idle_timer: threading.Timer | None = None


def worker_count() -> int:
    return os.cpu_count() or 1


def ordered_map(
    function: Callable[[Item], Result], items: Iterable[Item], chunk: int = CHUNK, processes: bool = False
) -> Iterator[Result]:
    """`function` of each item, in the items' order, a chunk of items a task, on a thread per core
    (or, with `processes`, a worker process per core: then `function` and the items must pickle),
    at most two chunks per worker in flight. An exception of `function` is raised here, where its
    item's result would be."""
    items = iter(items)
    # A daemonic process (a Dask worker's) may not start processes: its chunks go to threads.
    in_workers = processes and not multiprocessing.current_process().daemon
    pool = _worker_pool() if in_workers else concurrent.futures.ThreadPoolExecutor(worker_count())
    run = functools.partial(_each, function)
    try:
        pending: collections.deque = collections.deque()
        while batch := list(itertools.islice(items, chunk)):
            pending.append(pool.submit(run, batch))
            if len(pending) >= 2 * worker_count():
                yield from _result(pending.popleft())
        while pending:
            yield from _result(pending.popleft())
    finally:
        for future in pending:
            future.cancel()
        if in_workers:
            _release_when_idle()
        else:
            pool.shutdown(wait=True, cancel_futures=True)


def _each(function: Callable[[Item], Result], batch: list[Item]) -> list[Result]:
    """One task: `function` of each item of a chunk (a module-level function, so that it pickles)."""
    return [function(item) for item in batch]


def _result(future: concurrent.futures.Future) -> list:
    try:
        return future.result()
    except concurrent.futures.process.BrokenProcessPool as error:
        release_workers()
        raise RuntimeError(
            "a data stage's worker process died: killed for memory, or a Python script that runs convflow "
            'without `if __name__ == "__main__":` around it (each worker process imports the script again); '
            "rerun to start new ones"
        ) from error


def _worker_pool() -> concurrent.futures.ProcessPoolExecutor:
    global _workers
    with _workers_lock:
        if _idle_timer is not None:
            _idle_timer.cancel()
        if _workers is None:
            _workers = concurrent.futures.ProcessPoolExecutor(
                worker_count(), mp_context=multiprocessing.get_context("spawn")
            )
        return _workers


def _release_when_idle() -> None:
    global _idle_timer
    with _workers_lock:
        if _idle_timer is not None:
            _idle_timer.cancel()
        _idle_timer = threading.Timer(IDLE_SECONDS, release_workers)
        _idle_timer.daemon = True
        _idle_timer.start()


def release_workers() -> None:
    """End the worker processes; a later ordered_map starts new ones."""
    global _workers
    with _workers_lock:
        pool, _workers = _workers, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(release_workers)
