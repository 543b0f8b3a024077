"""convflow.runtime.parallel.ordered_map: results in order from threads or worker processes, an error
raised where its item's result would be, and threads inside a daemonic process (a Dask worker),
which may not start processes of its own."""

from __future__ import annotations

import multiprocessing

import pytest

from convflow.core.errors import DataError
from convflow.data import imaging
from convflow.runtime import parallel


def test_worker_processes_and_threads_give_the_same_results_in_order(tmp_path):
    paths = [str(tmp_path / f"{index}.txt") for index in range(300)]  # "not an image file", in order
    (tmp_path / "empty.png").write_bytes(b"")
    paths[7] = str(tmp_path / "empty.png")
    by_threads = list(parallel.ordered_map(imaging.inspect_image_file, paths))
    by_workers = list(parallel.ordered_map(imaging.inspect_image_file, paths, chunk=16, processes=True))
    assert by_workers == by_threads and len(by_workers) == 300
    assert by_threads[0] == ("not an image file", (0, 0), b"")
    assert by_threads[7][0] == "empty file"


def test_an_error_in_a_worker_process_is_raised_here_with_its_message(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    images = imaging.RecordImages((8, 8), 3, "stretch", "raw")
    with pytest.raises(DataError, match=f"{broken}: cannot decode"):
        list(parallel.ordered_map(images.one, [str(broken)], chunk=1, processes=True))


def _map_in_daemon(paths: list[str], results: multiprocessing.Queue) -> None:
    results.put(list(parallel.ordered_map(imaging.inspect_image_file, paths, chunk=4, processes=True)))


def test_a_daemonic_process_maps_in_threads(tmp_path):
    paths = [str(tmp_path / f"{index}.txt") for index in range(10)]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    daemon = context.Process(target=_map_in_daemon, args=(paths, results), daemon=True)
    daemon.start()
    assert results.get(timeout=60) == [("not an image file", (0, 0), b"")] * 10
    daemon.join(timeout=30)
    assert daemon.exitcode == 0
