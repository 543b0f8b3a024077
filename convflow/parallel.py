"""Work on every core in threads, in order and in bounded memory: the data stages' one way to do it.

Pillow decodes, resizes and encodes, and hashlib hashes, without the GIL, so threads keep both cores
busy without worker processes (each would import TensorFlow again to write its shards).
`Executor.map` submits every item at once, holding a future per image of the dataset; `ordered_map`
keeps a few chunks in flight, so what it holds does not grow with the dataset.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# Items per task: one future per image costs more of the GIL than a small image's decode frees.
CHUNK = 32


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], chunk: int = CHUNK) -> Iterator[Result]:
    """`function` of each item, in the items' order, on a thread per core, at most two chunks per
    thread in flight. An exception of `function` is raised here, where its item's result would be."""
    workers = os.cpu_count() or 1
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        while batch := list(itertools.islice(items, chunk)):
            pending.append(pool.submit(lambda batch=batch: [function(item) for item in batch]))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
