"""Damaged outputs: each is found with a message naming the file, and recovered by re-running the
stage that wrote it (or, for the catalog, by rebuilding it from the run folders' run.json).

One artifacts root, damaged step by step after a first complete run:
1. the cached SavedModel loses its variables file, and runs.parquet is overwritten with garbage;
2. the cached evaluate folder is deleted (a cached result pointing at missing files);
3. a cached TFRecord shard is truncated.
The damage goes from the last stage to the first, because a re-run stage gives every later stage
new inputs, and so new cache keys that would never look at damage further down.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from conftest import TinyRunner, write_yaml
from convflow.catalog import registry, tables
from convflow.cli.app import main

pytestmark = pytest.mark.slow

GARBAGE = b"PAR1 this is not a parquet file \x00\xff" * 20


def cache_warning(output: str, stage: str, path: Path) -> str:
    """The cache policy's warning that `stage`'s cached result is unusable because of `path`."""
    pattern = (
        rf"cache entry {stage}-\w+(\.\d+)? is not usable \([^)]*{re.escape(str(path))}: [^)]*\): the stage runs again"
    )
    found = re.search(pattern, output)
    assert found, f"no warning naming {path} for {stage} in:\n{output[-5000:]}"
    return found.group(0)


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> TinyRunner:
    return TinyRunner(tmp_path_factory.mktemp("corruption"))


@pytest.fixture(scope="module")
def first(runner) -> dict:
    return runner.run()


@pytest.fixture(scope="module")
def savedmodel_damaged(runner, first) -> dict:
    """Run 2: the cached SavedModel lost its variables data, and runs.parquet is garbage."""
    variables = Path(first["saved_model"]) / "variables"
    data_file = next(variables.glob("variables.data-*"))
    data_file.unlink()
    (runner.artifacts / "runs.parquet").write_bytes(GARBAGE)
    return {"summary": runner.run(), "damaged": data_file}


@pytest.fixture(scope="module")
def evaluate_deleted(runner, first, savedmodel_damaged) -> dict:
    """Run 3: the cached evaluate folder (the first run's) is gone."""
    evaluate_dir = first["run_dir"] / "evaluate"
    missing = evaluate_dir / "metrics.parquet"
    for path in evaluate_dir.iterdir():
        path.unlink()
    evaluate_dir.rmdir()
    return {"summary": runner.run(), "missing": missing}


@pytest.fixture(scope="module")
def shard_truncated(runner, first, evaluate_deleted) -> dict:
    """Run 4: a cached TFRecord shard (the first run's) is cut in half."""
    shard = next((first["run_dir"] / "to_tfrecords").glob("train-*.tfrecord"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return {"summary": runner.run(), "damaged": shard}


@pytest.mark.e2e
@pytest.mark.xdist_group("corruption")
def test_deleted_savedmodel_file_is_found_and_export_reruns(savedmodel_damaged, first):
    second, damaged = savedmodel_damaged["summary"], savedmodel_damaged["damaged"]

    assert f"{damaged}: missing" in cache_warning(second["output"], "export_savedmodel", damaged)
    cached = second["cached"]
    assert all(cached[stage] for stage in ("download_and_split", "to_tfrecords", "train", "evaluate"))
    assert not cached["export_savedmodel"]
    saved_model = Path(second["saved_model"])
    assert saved_model.is_relative_to(second["run_dir"])
    assert (saved_model / "saved_model.pb").is_file() and list((saved_model / "variables").glob("variables.data-*"))
    # Production (a copy made at promotion) never depended on the run folder's SavedModel.
    production = registry.current(first["run_dir"].parents[1], "tiny")
    assert production.version == 1 and list((Path(production.saved_model) / "variables").glob("variables.data-*"))


@pytest.mark.e2e
@pytest.mark.xdist_group("corruption")
def test_damaged_catalog_is_set_aside_and_rebuilt_from_the_run_folders(savedmodel_damaged, first, runner):
    second = savedmodel_damaged["summary"]
    catalog = runner.artifacts / "runs.parquet"

    kept = list(runner.artifacts.glob("runs.parquet.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == GARBAGE
    assert re.search(
        rf"{re.escape(str(catalog))} is damaged \(.+\); kept it as {re.escape(kept[0].name)} "
        r"and rebuilt the catalog from the run folders",
        second["output"],
    ), second["output"][-3000:]
    assert runner.catalog_ids() == [first["run_id"], second["run_id"]]  # the first run's row is not lost


@pytest.mark.e2e
@pytest.mark.xdist_group("corruption")
def test_cached_result_pointing_at_missing_files_reruns_the_stage(evaluate_deleted, first):
    third, missing = evaluate_deleted["summary"], evaluate_deleted["missing"]

    assert f"{missing}: missing" in cache_warning(third["output"], "evaluate", missing)
    assert third["cached"]["train"] and not third["cached"]["evaluate"]
    assert (third["run_dir"] / "evaluate" / "metrics.parquet").is_file()
    assert third["test_accuracy"] == pytest.approx(first["test_accuracy"])


@pytest.mark.e2e
@pytest.mark.xdist_group("corruption")
def test_truncated_tfrecord_shard_is_found_and_rewritten(shard_truncated, first, runner):
    fourth, shard = shard_truncated["summary"], shard_truncated["damaged"]

    assert re.search(r"\d+ bytes, written as \d+", cache_warning(fourth["output"], "to_tfrecords", shard))
    assert fourth["cached"]["download_and_split"] and not fourth["cached"]["to_tfrecords"]
    rewritten = sorted(path.name for path in (fourth["run_dir"] / "to_tfrecords").glob("*.tfrecord"))
    assert shard.name in rewritten
    assert fourth["status"] in ("completed", "not-promoted")
    assert abs(fourth["test_accuracy"] - first["test_accuracy"]) <= 0.02


@pytest.mark.e2e
@pytest.mark.xdist_group("corruption")
def test_every_completed_run_is_in_the_catalog(first, savedmodel_damaged, evaluate_deleted, shard_truncated, runner):
    runs = [first, savedmodel_damaged["summary"], evaluate_deleted["summary"], shard_truncated["summary"]]
    assert runner.catalog_ids() == [run["run_id"] for run in runs]


@pytest.mark.e2e
@pytest.mark.xdist_group("corruption")
def test_runs_command_rebuilds_a_damaged_catalog(
    first, savedmodel_damaged, evaluate_deleted, shard_truncated, runner, capsys, caplog
):
    catalog = runner.artifacts / "runs.parquet"
    catalog.write_bytes(catalog.read_bytes()[:100])  # cut short, as by a full disk
    runs = [first, savedmodel_damaged["summary"], evaluate_deleted["summary"], shard_truncated["summary"]]

    with caplog.at_level(logging.WARNING, logger="convflow.catalog"):
        assert main(["runs", "tiny", "--artifacts", str(runner.artifacts)]) == 0

    out = capsys.readouterr().out
    assert all(run["run_id"] in out for run in runs)
    assert f"{catalog} is damaged" in caplog.text and "rebuilt the catalog from the run folders" in caplog.text
    assert runner.catalog_ids() == [run["run_id"] for run in runs]
    assert len(list(runner.artifacts.glob("runs.parquet.damaged-*"))) >= 1


def test_rebuild_names_an_unreadable_run_record_and_keeps_the_rest(tmp_path, caplog):
    """A damaged catalog and a damaged run.json: the rebuild keeps every readable run and says
    which record it could not read, instead of failing the whole catalog."""
    good = {
        "pipeline": "p",
        "run_id": "r1",
        "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-01T00:01:00+00:00",
        "status": "completed",
        "config_hash": "c",
        "data_fingerprint": "d",
        "test_accuracy": 0.9,
        "passed_gate": True,
        "gate_reason": "ok",
        "saved_model": "s",
        "run_dir": str(tmp_path / "p" / "r1"),
    }
    write_yaml(tmp_path / "p" / "r1" / tables.RUN_RECORD, json.dumps(good))
    broken = write_yaml(tmp_path / "p" / "r2" / tables.RUN_RECORD, json.dumps(good)[:40])
    (tmp_path / "runs.parquet").write_bytes(GARBAGE)

    with caplog.at_level(logging.WARNING, logger="convflow.catalog"):
        rows = tables.read_runs(tmp_path / "runs.parquet").to_pylist()

    assert [row["run_id"] for row in rows] == ["r1"]
    assert f"{broken}" in caplog.text and "unreadable" in caplog.text
