"""The fault matrix: `convflow run` SIGKILLed while each stage runs, then run again.

The kill lands at each stage's most fragile moment: tests/held_convflow.py, a wrapper of the
`convflow` command, stops the stage just before it renames its finished output into place, writes
`<stage>.held` and waits.
The test waits for that marker (no guessed sleeps) and kills the whole process group (the CLI,
its flow, its temporary Prefect server and any helper process). The next run must redo that
stage and reuse what was finished, a final run without the hook must complete with the outputs
of an uninterrupted run, no folder named after a stage may be incomplete, and the catalog must
hold one readable row per completed run.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import PYTHON, STAGES, TINY_PIPELINES, run_tiny, subprocess_env, write_yaml
from convflow.catalog import registry, schemas
from convflow.core.hashing import hash_json

# One reference run and one kill chain, launched in order: one worker runs every test of the module.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("faults")]

HOLD_TIMEOUT_SECONDS = 420
HELD_CONVFLOW = Path(__file__).with_name("held_convflow.py")
ACCURACY_TOLERANCE = 0.02


def kill_while_holding(root: Path, stage: str) -> Path:
    """Start `convflow run` held at `stage`, SIGKILL its process group once the stage holds;
    return the killed run's folder."""
    command = [
        PYTHON,
        str(HELD_CONVFLOW),
        stage,
        "run",
        "tiny",
        "-f",
        str(root / "pipelines.yaml"),
        "--artifacts",
        str(root / "artifacts"),
        "--json",
    ]
    log_path = root / f"killed-at-{stage}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + HOLD_TIMEOUT_SECONDS
        try:
            while not (markers := list((root / "artifacts").glob(f"tiny/*/{stage}.held"))):
                if process.poll() is not None:
                    pytest.fail(f"the run ended before {stage} held:\n{log_path.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{stage} did not hold within {HOLD_TIMEOUT_SECONDS} s")
                time.sleep(0.1)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return markers[0].parent


def _walk_tfrecord(content: bytes, path: Path) -> None:
    """Step over each record (8-byte length, 4-byte CRC, data, 4-byte CRC); a cut-off file ends
    inside a record."""
    position = 0
    while position < len(content):
        length = int.from_bytes(content[position : position + 8], "little")
        position += 8 + 4 + length + 4
    assert position == len(content), f"{path}: last record cut short"


def _readable(path: Path) -> None:
    """Open `path` the way a later stage or a user would; raise if it is half-written."""
    name = path.name
    if name.endswith(".parquet"):
        pq.read_table(path)
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".npy"):
        np.load(path)
    elif name.endswith(".npz"):
        with np.load(path) as archive:
            for key in archive.files:
                archive[key]
    elif name.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None, f"{path}: corrupt member"
    elif name.endswith(".gz"):
        with gzip.open(path) as handle:
            while handle.read(1 << 20):
                pass
    elif name.endswith(".tfrecord"):
        _walk_tfrecord(path.read_bytes(), path)
    elif name.endswith(".html"):
        assert path.read_text().rstrip().endswith("</html>"), f"{path}: cut short"
    else:
        assert path.stat().st_size > 0, f"{path}: empty"


def stage_files(stage_dir: Path) -> list[str]:
    return sorted(str(path.relative_to(stage_dir)) for path in stage_dir.rglob("*") if path.is_file())


def _kinds_of_files(stage_dir: Path) -> list[str]:
    """stage_files, TensorBoard's event files as one name per folder: their names hold the time, host
    and process, and a resumed training adds a file of its own to each folder (TensorBoard reads all)."""
    return sorted(
        {re.sub(r"events\.out\.tfevents\..*$", "events.out.tfevents.*", name) for name in stage_files(stage_dir)}
    )


def assert_stage_complete(stage_dir: Path, reference_dir: Path) -> None:
    """A stage folder is complete: the files of the reference run's folder, each readable."""
    assert _kinds_of_files(stage_dir) == _kinds_of_files(reference_dir), f"{stage_dir} differs from a complete one"
    for relative in stage_files(stage_dir):
        _readable(stage_dir / relative)


def assert_catalog_sound(artifacts: Path, completed_run_ids: list[str]) -> None:
    """runs.parquet reads as it is, one row per completed run, no duplicates, none set aside."""
    rows = pq.read_table(artifacts / "runs.parquet", schema=schemas.RUNS_SCHEMA).to_pylist()
    assert sorted(row["run_id"] for row in rows) == sorted(completed_run_ids)
    assert not list(artifacts.glob("runs.parquet.damaged-*"))
    records = sorted(json.loads(path.read_text())["run_id"] for path in artifacts.glob("tiny/*/run.json"))
    assert records == sorted(completed_run_ids)


def splits_content(artifacts: Path) -> list[dict]:
    """Every splits.parquet under `artifacts` must say the same; return that."""
    contents = [
        pq.read_table(path).sort_by("example_id").drop_columns(["path"]).to_pylist()
        for path in sorted(artifacts.glob("tiny/*/download_and_split/splits.parquet"))
    ]
    assert contents and all(content == contents[0] for content in contents[1:])
    return contents[0]


# Training is redone after the kill at the train stage; with TensorFlow's op determinism the
# redone one-epoch model equals the reference's, so the runs compare within ACCURACY_TOLERANCE
# by more than luck (multi-threaded reductions moved a one-epoch model by 5 points).
FAULT_PIPELINES = json.loads(json.dumps(TINY_PIPELINES))
FAULT_PIPELINES["pipelines"]["tiny"]["train"]["deterministic"] = True


def data_fingerprint(splits: list[dict]) -> str:
    """The data fingerprint that download_and_split derives from these rows."""
    return hash_json(sorted((row["sha256"], row["label"], row["split"]) for row in splits))[:24]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One uninterrupted run of the tiny pipeline, for every fault test to compare with."""
    root = tmp_path_factory.mktemp("reference")
    write_yaml(root / "pipelines.yaml", FAULT_PIPELINES)
    summary = run_tiny(root)
    artifacts = root / "artifacts"
    summary["catalog"] = pq.read_table(artifacts / "runs.parquet").to_pylist()
    summary["splits"] = splits_content(artifacts)
    assert data_fingerprint(summary["splits"]) == summary["catalog"][0]["data_fingerprint"]
    return summary


class KillChain:
    """One artifacts root, killed at each stage in turn: launch i holds at STAGES[i] and is
    killed there; it is also the rerun after the kill at STAGES[i - 1], which it must redo
    while reusing everything finished before. The last launch runs without the hook and must
    complete. (Independent kill-and-rerun pairs cost a whole pipeline run per stage; the chain
    costs about two, and every rerun meets the debris of every earlier kill.)"""

    def __init__(self, root: Path):
        self.root = root
        self.artifacts = root / "artifacts"
        write_yaml(root / "pipelines.yaml", FAULT_PIPELINES)
        self.launches: list[dict] = []

    def launch(self, index: int) -> dict:
        """Launch `index` (below len(STAGES): held and killed at STAGES[index]; len(STAGES): run to completion)."""
        while len(self.launches) <= index:
            position = len(self.launches)
            if position < len(STAGES):
                run_dir = kill_while_holding(self.root, STAGES[position])
                self.launches.append(
                    {
                        "run_dir": run_dir,
                        "catalog_existed": (self.artifacts / "runs.parquet").exists(),
                        "production": registry.current(self.artifacts, "tiny"),
                    }
                )
            else:
                self.launches.append(run_tiny(self.root))
        return self.launches[index]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> KillChain:
    return KillChain(tmp_path_factory.mktemp("killed"))


def assert_stage_folders_complete(run_dir: Path, reference: dict, expected: set[str]) -> None:
    """The run's folders named after stages are exactly `expected`, and each is complete."""
    found = {entry.name for entry in run_dir.iterdir() if entry.is_dir() and not entry.name.startswith(".")}
    assert found == expected, f"{run_dir}: stage folders {sorted(found)}, expected {sorted(expected)}"
    for name in found:
        assert_stage_complete(run_dir / name, reference["run_dir"] / name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_killed_at_stage_then_rerun_redoes_it_and_matches_an_uninterrupted_run(chain, reference, stage):
    position = STAGES.index(stage)
    killed = chain.launch(position)
    killed_dir = killed["run_dir"]

    # The kill: the held stage's output exists only as a hidden temporary folder. This launch
    # redid the stage the previous launch was killed in (and only that one: the rest were cache
    # hits), so its folder holds that stage, complete. No catalog row, no run record; production
    # exists only once export_savedmodel has finished.
    assert not (killed_dir / stage).exists(), f"a killed {stage} left a complete-looking folder"
    assert list(killed_dir.glob(f".{stage}.tmp-*")), "the hold did not stop inside staged_output"
    assert_stage_folders_complete(killed_dir, reference, set(STAGES[position - 1 : position]))
    assert not (killed_dir / "run.json").exists()
    assert not killed["catalog_existed"]
    assert (killed["production"] is not None) == (position > STAGES.index("export_savedmodel"))

    # The rerun after this kill redoes the stage, complete and equal to the uninterrupted run's.
    rerun = chain.launch(position + 1)
    redone = rerun["run_dir"] / stage
    assert_stage_complete(redone, reference["run_dir"] / stage)
    if stage == "download_and_split":
        splits = pq.read_table(redone / "splits.parquet").sort_by("example_id").drop_columns(["path"]).to_pylist()
        assert splits == reference["splits"]
        assert data_fingerprint(splits) == reference["catalog"][0]["data_fingerprint"]
    if stage == "evaluate":
        metrics = pq.read_table(redone / "metrics.parquet").to_pylist()
        accuracy = next(row["value"] for row in metrics if row["metric"] == "accuracy")
        assert abs(accuracy - reference["test_accuracy"]) <= ACCURACY_TOLERANCE
    assert splits_content(chain.artifacts) == reference["splits"]


@pytest.mark.slow
def test_after_a_kill_at_every_stage_the_pipeline_completes_as_if_never_killed(chain, reference):
    final = chain.launch(len(STAGES))

    assert final["status"] == "completed"
    assert [final["cached"][name] for name in STAGES] == [True] * (len(STAGES) - 1) + [False]
    assert abs(final["test_accuracy"] - reference["test_accuracy"]) <= ACCURACY_TOLERANCE
    row = pq.read_table(chain.artifacts / "runs.parquet").to_pylist()[0]
    assert row["data_fingerprint"] == reference["catalog"][0]["data_fingerprint"]
    assert row["config_hash"] == reference["catalog"][0]["config_hash"]
    assert splits_content(chain.artifacts) == reference["splits"]

    # Every folder named after a stage, in every run folder, is complete; what the kills left
    # behind is hidden (.<stage>.tmp-*), and nothing reads it.
    for launch in chain.launches:
        for entry in launch["run_dir"].iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                assert_stage_complete(entry, reference["run_dir"] / entry.name)
    assert not list(final["run_dir"].glob(".*.tmp-*"))
    assert_catalog_sound(chain.artifacts, [final["run_id"]])
    production = json.loads((chain.artifacts / "models" / "tiny" / registry.POINTER).read_text())
    assert (Path(production["saved_model"]) / "saved_model.pb").is_file()
    checkpoints = [path for path in (chain.artifacts / "tiny" / "checkpoints").glob("*") if path.is_dir()]
    assert not checkpoints, "training checkpoints outlived training"


@pytest.mark.slow
def test_persisted_results_are_json_not_pickle(reference):
    """Prefect's persisted task results (the cache) are JSON documents holding stage records,
    never pickles: reading the cache cannot run code."""
    results_dir = reference["run_dir"].parents[1] / ".prefect-results"
    results = sorted(path for path in results_dir.iterdir() if path.is_file())
    assert sorted(path.name.rsplit("-", 1)[0] for path in results) == sorted(STAGES)
    for path in results:
        document = json.loads(path.read_bytes())
        assert document["metadata"]["serializer"]["type"] == "json", path
        record = json.loads(document["result"])
        assert record["__class__"].startswith("convflow.core.records."), path
        assert b"pickle" not in path.read_bytes(), path
