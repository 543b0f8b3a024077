"""An artifacts root on object storage (`--artifacts s3://...`), against moto's S3 server on
127.0.0.1: the store's cache and conditional writes, a whole pipeline whose working folders hold
nothing of the run, a stage killed mid-upload, two promotions at once, and a lost worker whose
successor resumes from the checkpoints it downloads.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import signal
import subprocess
import threading
import time
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect_server import Background, free_port, prefect_client, started_server
from s3_server import child_env, forget_clients, moto_s3, refusing_s3
from test_train_on_pool import (
    EPOCHS,
    LOST_AFTER_SECONDS,
    Worker,
    infrastructure_pid,
    kill_session,
    parent_pid,
    pool_pipelines,
    train_runs,
)

from conftest import (
    CONVFLOW,
    PYTHON,
    REPO,
    STAGES,
    TINY_PIPELINES,
    last_json_line,
    run_convflow,
    save_image,
    subprocess_env,
    wait_for,
    write_yaml,
)
from convflow.core.object_store import ObjectStore, StoreError

BUCKET = "bkt"


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture
def on_s3(s3, monkeypatch, tmp_path):
    """This process pointed at the module's S3 endpoint, with a cache folder of its own."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CONVFLOW_CACHE_DIR", str(tmp_path / "cache"))
    forget_clients()
    yield s3
    forget_clients()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _blobs(store: ObjectStore) -> dict[bytes, Path]:
    return {path.read_bytes(): path for path in store.blobs.glob("[!.]*")}


# ----------------------------------------------------------------------------- the store and its cache


@pytest.mark.slow
def test_dask_workers_upload_their_shards_to_the_store_and_share_no_folder(on_s3, monkeypatch, tmp_path):
    """data.dask_scheduler with an s3:// root: each worker (its own cache folder) writes its shard
    locally and uploads it to its place; this machine links them in from the store. Same shards as
    written here alone."""
    import distributed
    import numpy as np

    from convflow.config.schema import DataConfig
    from convflow.core.object_store import store_for
    from convflow.tasks.download_and_split import split_dataset
    from convflow.tasks.to_tfrecords import write_tfrecords

    data = DataConfig(source="sklearn:digits", image_size=(16, 16), channels=1, shard_size=600)
    expected = write_tfrecords(split_dataset(data, tmp_path / "split"), data, tmp_path / "local")
    monkeypatch.setenv("CONVFLOW_CACHE_DIR", str(tmp_path / "workers-cache"))  # what the workers start with
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        monkeypatch.setenv("CONVFLOW_CACHE_DIR", str(tmp_path / "parent-cache"))
        forget_clients()
        root = on_s3.url("dask")
        store = store_for(root)
        run_dir = store.mirror / "digits" / "run-1"
        split_set = store.published(split_dataset(data, run_dir / "download_and_split"))
        local_split = store.localized(split_set)
        on_dask = data.model_copy(update={"dask_scheduler": cluster.scheduler_address})
        written = write_tfrecords(local_split, on_dask, run_dir / "to_tfrecords", store)
    shard_keys = [key for key in on_s3.keys("dask/digits/run-1/to_tfrecords/") if key.endswith(".tfrecord")]
    assert sorted(name.rsplit("/", 1)[-1] for name in shard_keys) == sorted(
        Path(shard).name for shards in expected.shards.values() for shard in shards
    )
    assert store.transfers.downloaded_files == len(shard_keys)  # linked in from the store, not written here
    assert (tmp_path / "workers-cache" / "blobs").is_dir()  # the workers pulled images.npy into their cache
    for split, shards in written.shards.items():
        for ours, theirs in zip(shards, expected.shards[split]):
            assert Path(ours).read_bytes() == Path(theirs).read_bytes()
    assert np.array_equal(
        pq.read_table(written.image_properties)["sha256"].to_numpy(zero_copy_only=False),
        pq.read_table(expected.image_properties)["sha256"].to_numpy(zero_copy_only=False),
    )


def test_push_then_pull_round_trips_and_a_cached_file_is_never_downloaded_again(on_s3, monkeypatch, tmp_path):
    writer = ObjectStore(on_s3.url("round-trip"))
    folder = writer.mirror / "stage"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(os.urandom(3000))
    (folder / "sub" / "b.txt").write_text("bee")
    written = _files(folder)

    url = writer.push(folder)

    assert url == on_s3.url("round-trip/stage")
    assert on_s3.keys("round-trip/") == ["round-trip/stage/a.bin", "round-trip/stage/sub/b.txt"]
    assert writer.transfers.uploaded_files == 2
    assert all(path.is_symlink() and path.resolve().parent == writer.blobs for path in folder.rglob("*.*"))
    assert writer.sizes(url) == {f"{url}/a.bin": 3000, f"{url}/sub/b.txt": 3}
    assert _files(folder) == written  # the links read as the files did

    monkeypatch.setenv("CONVFLOW_CACHE_DIR", str(tmp_path / "elsewhere"))  # another machine
    reader = ObjectStore(url.rsplit("/", 1)[0])
    pulled = reader.pull(url)
    assert pulled == reader.mirror / "stage" and pulled != folder
    assert _files(pulled) == written
    assert (reader.transfers.downloaded_files, reader.transfers.cached_files) == (2, 0)

    again = ObjectStore(url.rsplit("/", 1)[0])  # a new process on that machine: same cache folder
    assert _files(again.pull(url)) == written
    assert (again.transfers.downloaded_files, again.transfers.cached_files) == (0, 2)

    with pytest.raises(FileNotFoundError, match="not in the object store"):
        again.pull(on_s3.url("round-trip/nothing-here"))


def test_cache_beyond_its_size_evicts_the_least_recently_used_file(on_s3, monkeypatch):
    client = on_s3.client()
    contents = {name: name.encode() * 1000 for name in ("a", "b", "c")}
    for name, data in contents.items():
        client.put_object(Bucket=BUCKET, Key=f"lru/{name}", Body=data)
    monkeypatch.setenv("CONVFLOW_CACHE_MAX_GB", str(2500 / 1e9))  # room for two of the three files
    store = ObjectStore(on_s3.url("lru"))

    for name in ("a", "b", "a", "c"):  # b is the least recently used when c comes in
        store.pull(on_s3.url(f"lru/{name}"))
        time.sleep(0.05)

    assert sorted(_blobs(store)) == [contents["a"], contents["c"]]
    assert store.transfers.downloaded_files == 3
    assert (store.mirror / "a").read_bytes() == contents["a"]
    assert store.pull(on_s3.url("lru/b")).read_bytes() == contents["b"]  # downloaded again
    assert store.transfers.downloaded_files == 4
    assert contents["b"] in _blobs(store) and len(_blobs(store)) == 2


def test_a_folder_larger_than_the_cache_is_pulled_whole(on_s3, monkeypatch):
    """Eviction never breaks the links a pull has just made: the cache goes over its size instead."""
    client = on_s3.client()
    contents = {name: name.encode() * 1000 for name in ("a", "b", "c")}
    for name, data in contents.items():
        client.put_object(Bucket=BUCKET, Key=f"big/{name}", Body=data)
    monkeypatch.setenv("CONVFLOW_CACHE_MAX_GB", str(1500 / 1e9))  # room for one of the three files
    store = ObjectStore(on_s3.url("big"))

    folder = store.pull(on_s3.url("big"))

    assert {path.name: path.read_bytes() for path in folder.iterdir()} == contents
    assert len(_blobs(store)) == 3


def test_exclusive_write_refuses_a_second_create(on_s3):
    store = ObjectStore(on_s3.url("claims"))
    url = on_s3.url("claims/1")

    assert store.write_bytes(url, b"first", exclusive=True) is True
    assert store.write_bytes(url, b"second", exclusive=True) is False
    assert store.read_text(url) == "first"
    assert store.write_bytes(url, b"third") is True  # a plain write replaces it
    assert on_s3.read("claims/1") == b"third"


def test_exclusive_write_of_an_empty_object_refuses_a_second_create(on_s3):
    """The registry claims a version with an empty object: its create must be conditional too."""
    store = ObjectStore(on_s3.url("claims"))
    url = on_s3.url("claims/empty")

    assert store.write_bytes(url, b"", exclusive=True) is True
    assert store.write_bytes(url, b"", exclusive=True) is False


def _refusal(url: str) -> str:
    forget_clients()
    with pytest.raises(StoreError) as caught:
        ObjectStore(url).check_reachable()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{url}: "), message
    return message


def test_unusable_store_is_named_in_one_line(on_s3, monkeypatch):
    ObjectStore(on_s3.url("fine")).check_reachable()

    assert "the bucket does not exist" in _refusal("s3://no-such-bucket/x")

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    assert "cannot reach the object store" in _refusal(on_s3.url("x"))
    assert time.monotonic() - started < 60

    with refusing_s3(BUCKET) as refusing:
        for key, value in refusing.env.items():
            monkeypatch.setenv(key, value)
        assert "access refused; check the credentials" in _refusal(refusing.url("x"))


# ----------------------------------------------------------------------------- two promotions at once


def _fake_saved_model(folder: Path, label: str) -> Path:
    """A folder shaped like a SavedModel (promotion copies it, never loads it)."""
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(f"graph of {label}".encode())
    (folder / "variables" / "variables.index").write_bytes(f"index of {label}".encode())
    return folder


def _catalog_row(root: str, run_id: str, version: int, saved_model: str) -> dict:
    now = datetime.datetime.now(datetime.UTC)
    return {
        "pipeline": "p",
        "run_id": run_id,
        "started": now,
        "finished": now,
        "status": "completed",
        "config_hash": "h",
        "data_fingerprint": "d",
        "test_accuracy": 0.9,
        "passed_gate": True,
        "gate_reason": "test accuracy 0.9000 ≥ min_accuracy 0.5",
        "model": f"{root}/p/{run_id}/train/model.keras",
        "saved_model": saved_model,
        "promoted_version": version,
        "run_dir": f"{root}/p/{run_id}",
    }


def test_two_promotions_at_once_take_two_versions_and_one_pointer_chain(on_s3, tmp_path):
    from convflow.catalog import registry, tables

    root = on_s3.url("race")
    runs = {f"run-{n}": _fake_saved_model(tmp_path / f"model-{n}", f"run-{n}") for n in (1, 2)}
    barrier = threading.Barrier(len(runs))
    promoted, failures = {}, []

    def promote(run_id: str) -> None:
        try:
            barrier.wait(timeout=30)
            promoted[run_id] = registry.promote(root, "p", run_id, str(runs[run_id]), f"{run_id}.keras", 0.9)
        except BaseException as error:  # reported below, with the thread's run
            failures.append((run_id, error))

    threads = [threading.Thread(target=promote, args=(run_id,)) for run_id in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures

    assert sorted(production.version for production in promoted.values()) == [1, 2]
    pointers = [key for key in on_s3.keys("race/models/p/pointers/")]
    assert pointers == [f"race/models/p/pointers/{n:08d}.json" for n in (1, 2)]  # one chain, no gap, no fork
    chain = [json.loads(on_s3.read(key)) for key in pointers]
    assert {pointer["version"] for pointer in chain} == {1, 2}
    current = registry.current(root, "p")
    assert current.version == chain[-1]["version"] and current == promoted[current.run_id]
    assert [version.version for version in registry.versions(root, "p")] == [1, 2]
    for production in promoted.values():  # each version holds its own run's model, record last
        folder = f"race/models/p/{production.version}"
        assert on_s3.read(f"{folder}/saved_model.pb") == f"graph of {production.run_id}".encode()
        assert json.loads(on_s3.read(f"{folder}/convflow.json"))["run_id"] == production.run_id

    for run_id, production in promoted.items():
        tables.append_to_catalog(root, _catalog_row(root, run_id, production.version, production.saved_model))
    catalog = tables.read_catalog(root).to_pylist()
    by_version = {row["promoted_version"]: row for row in catalog}
    assert sorted(by_version) == [1, 2]
    assert by_version[current.version]["run_id"] == current.run_id
    assert by_version[current.version]["saved_model"] == current.saved_model == f"{root}/models/p/{current.version}"


# ----------------------------------------------------------------------------- a whole pipeline on S3
# One module-scoped sequence of runs against s3://bkt/pipe, each from a working folder and a cache
# folder of its own unless said: a run killed mid-upload of to_tfrecords, its rerun on the same
# machine (completes), and a rerun on another machine (every stage up to export a hit).

PIPELINE_PREFIX = "pipe"
KILLED_STAGE = "to_tfrecords"


class Machine:
    """A working folder holding only pipelines.yaml, and a cache folder of its own, outside it."""

    def __init__(self, folder: Path, s3):
        self.cwd, self.cache = folder / "work", folder / "cache"
        write_yaml(self.cwd / "pipelines.yaml", TINY_PIPELINES)
        self.env = child_env(subprocess_env(), s3, CONVFLOW_CACHE_DIR=str(self.cache))

    def run(self, root: str) -> dict:
        run = run_convflow(
            ["run", "tiny", "-f", "pipelines.yaml", "--artifacts", root, "--json"], cwd=self.cwd, env=self.env
        )
        summary = run.summary
        summary["cached"] = {stage["name"]: stage["cached"] for stage in summary["stages"]}
        summary["output"] = run.output
        (self.cache.parent / f"run-{summary['run_id']}.log").write_text(run.output)  # for a failing test's reader
        return summary

    def leftovers(self) -> list[str]:
        """What the working folder holds besides pipelines.yaml."""
        return sorted(str(path.relative_to(self.cwd)) for path in self.cwd.rglob("*") if path.name != "pipelines.yaml")


@pytest.fixture(scope="module")
def pipeline_runs(s3, tmp_path_factory):
    """The killed run (its exit code, its output and what the bucket held after it), the rerun on
    its machine, and the rerun on another machine."""
    root = s3.url(PIPELINE_PREFIX)
    here = Machine(tmp_path_factory.mktemp("machine-a"), s3)
    command = [PYTHON, str(REPO / "tests" / "s3_server.py"), KILLED_STAGE, "run", "tiny", "-f", "pipelines.yaml"]
    killed = Background([*command, "--artifacts", root, "--json"], here.env, here.cache.parent / "killed.log", here.cwd)
    try:
        killed.process.wait(timeout=300)
    finally:
        killed.stop(timeout=5)  # and what it started (its temporary Prefect server)
    after_kill = s3.keys(f"{PIPELINE_PREFIX}/")
    rerun = here.run(root)
    there = Machine(tmp_path_factory.mktemp("machine-b"), s3)
    elsewhere = there.run(root)
    return {
        "root": root,
        "killed": (killed.process.returncode, killed.output(), after_kill),
        "rerun": rerun,
        "elsewhere": elsewhere,
        "machines": (here, there),
    }


@pytest.mark.e2e
@pytest.mark.xdist_group("object-store-pipeline")
def test_stage_killed_mid_upload_is_a_miss_on_rerun(pipeline_runs):
    code, output, after_kill = pipeline_runs["killed"]
    assert code == -signal.SIGKILL, output[-4000:]
    uploaded = [key for key in after_kill if f"/{KILLED_STAGE}/" in key]
    assert uploaded, after_kill  # killed mid-upload: part of the stage's folder is in the store
    assert any("/download_and_split/" in key for key in after_kill)

    rerun = pipeline_runs["rerun"]
    assert rerun["status"] == "completed", rerun["output"][-4000:]
    assert list(rerun["cached"]) == STAGES
    assert rerun["cached"]["download_and_split"] is True
    assert rerun["cached"][KILLED_STAGE] is False, rerun["output"][-4000:]  # the partial upload is no hit
    assert not any(rerun["cached"][stage] for stage in STAGES[2:])


@pytest.mark.e2e
@pytest.mark.xdist_group("object-store-pipeline")
def test_pipeline_on_s3_keeps_nothing_in_its_working_folders_and_hits_from_another_machine(pipeline_runs, s3):
    root, rerun, elsewhere = pipeline_runs["root"], pipeline_runs["rerun"], pipeline_runs["elsewhere"]
    assert elsewhere["status"] == "completed", elsewhere["output"][-4000:]
    assert elsewhere["run_id"] != rerun["run_id"]
    assert elsewhere["cached"] == {stage: stage != "write_report" for stage in STAGES}, elsewhere["output"][-4000:]
    for summary in (rerun, elsewhere):
        assert summary["saved_model"].startswith(f"{root}/") and summary["report"].startswith(f"{root}/"), summary
        keys = s3.keys(f"{PIPELINE_PREFIX}/tiny/{summary['run_id']}/")
        assert f"{PIPELINE_PREFIX}/tiny/{summary['run_id']}/write_report/report.html" in keys, keys
    assert rerun["promoted_version"] == 1 and elsewhere["promoted_version"] in (None, 1)
    assert any(key.startswith(f"{PIPELINE_PREFIX}/models/tiny/1/") for key in s3.keys(f"{PIPELINE_PREFIX}/models/"))
    for machine in pipeline_runs["machines"]:
        assert machine.leftovers() == [], machine.leftovers()  # no artifacts/ folder, nothing of the run


@pytest.mark.e2e
@pytest.mark.xdist_group("object-store-pipeline")
def test_catalog_on_s3_reads_as_one_table(pipeline_runs, on_s3):
    import duckdb
    import pyarrow.dataset as ds
    import s3fs

    from convflow.catalog import tables

    root = pipeline_runs["root"]
    run_ids = {pipeline_runs["rerun"]["run_id"], pipeline_runs["elsewhere"]["run_id"]}
    fs = s3fs.S3FileSystem()
    dataset = ds.dataset(f"{BUCKET}/{PIPELINE_PREFIX}/runs", filesystem=fs, format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert set(table.column("run_id").to_pylist()) == run_ids
    for column in ("saved_model", "model", "report", "run_dir"):
        assert all(value.startswith(f"{root}/") for value in table.column(column).to_pylist()), column

    with duckdb.connect() as db:  # DuckDB over the Arrow table (its httpfs extension is not installed offline)
        db.register("runs", table)
        counted = db.sql("select pipeline, count(*), min(promoted_version) from runs group by pipeline").fetchall()
    assert counted == [("tiny", 2, 1)]

    assert set(tables.read_catalog(root).column("run_id").to_pylist()) == run_ids
    for run_id in run_ids:
        record = json.loads(on_s3.read(f"{PIPELINE_PREFIX}/tiny/{run_id}/run.json"))
        assert record["run_id"] == run_id and record["run_dir"] == f"{root}/tiny/{run_id}"


@pytest.mark.e2e
@pytest.mark.xdist_group("object-store-pipeline")
def test_runs_promote_rollback_and_predict_work_on_s3(pipeline_runs, on_s3, tmp_path):
    import numpy as np

    from convflow.catalog import registry

    root, s3 = pipeline_runs["root"], on_s3
    machine = Machine(tmp_path / "machine-c", s3)  # a third machine, its cache empty
    rerun, elsewhere = pipeline_runs["rerun"], pipeline_runs["elsewhere"]
    newest = registry.current(root, "tiny").version
    pointers = len(s3.keys(f"{PIPELINE_PREFIX}/models/tiny/pointers/"))

    def convflow(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [CONVFLOW, *args, "--artifacts", root], cwd=machine.cwd, env=machine.env, capture_output=True, text=True
        )

    listed = convflow("runs")
    assert listed.returncode == 0 and rerun["run_id"] in listed.stdout and elsewhere["run_id"] in listed.stdout

    promoted = convflow("promote", elsewhere["run_id"])
    assert promoted.returncode == 0, promoted.stderr
    assert f"tiny: production is now version {newest + 1} (run {elsewhere['run_id']}" in promoted.stdout
    assert f"at {root}/models/tiny/{newest + 1}" in promoted.stdout
    rolled = convflow("rollback", "tiny")
    assert rolled.returncode == 0 and f"tiny: production is now version {newest} " in rolled.stdout, rolled.stderr
    assert len(s3.keys(f"{PIPELINE_PREFIX}/models/tiny/pointers/")) == pointers + 2
    assert registry.current(root, "tiny").version == newest

    images = [
        save_image(tmp_path / "inputs" / f"digit-{n}.png", np.full((8, 8, 1), 40 * n, np.uint8)) for n in range(3)
    ]
    predicted = convflow("predict", "tiny", *map(str, images), "--json")
    assert predicted.returncode == 0, predicted.stderr[-4000:]
    written = last_json_line(predicted.stdout)
    assert (written["scored"], written["errors"], written["model_version"]) == (3, 0, newest), written
    assert written["output"].startswith(f"{root}/tiny/predictions/"), written
    assert written["output"].removeprefix(f"s3://{BUCKET}/") in s3.keys(f"{PIPELINE_PREFIX}/tiny/predictions/")
    assert machine.leftovers() == []


@pytest.mark.e2e
def test_missing_bucket_refuses_the_run_in_one_line(s3, tmp_path):
    machine = Machine(tmp_path, s3)
    buckets_before = [bucket["Name"] for bucket in s3.client().list_buckets()["Buckets"]]
    keys_before = s3.keys()
    result = subprocess.run(
        [CONVFLOW, "run", "tiny", "-f", "pipelines.yaml", "--artifacts", "s3://no-such-bucket/x"],
        cwd=machine.cwd,
        env=machine.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("convflow run tiny: artifacts root s3://no-such-bucket/x: "), lines
    assert "the bucket does not exist" in lines[0]
    assert [bucket["Name"] for bucket in s3.client().list_buckets()["Buckets"]] == buckets_before
    assert s3.keys() == keys_before
    assert machine.leftovers() == []


# ----------------------------------------------------------------------------- a lost worker, on S3


class S3PipelineRun(Background):
    """`convflow run NAME --artifacts s3://... --json` against the server, on the work pool `pool`."""

    def __init__(self, env: dict[str, str], folder: Path, name: str, root: str, pool: str):
        self.cwd, self.name, self.root = folder / "work", name, root
        write_yaml(self.cwd / "pipelines.yaml", pool_pipelines(pool, name))
        command = [CONVFLOW, "run", name, "-f", "pipelines.yaml", "--artifacts", root, "--json"]
        super().__init__(command, env, folder / "run.log", cwd=self.cwd)

    def checkpointed_epochs(self, s3) -> int:
        """Epochs in the checkpoints' history.jsonl in the store (uploaded after each epoch)."""
        prefix = f"{self.root.removeprefix(f's3://{s3.bucket}/')}/{self.name}/checkpoints/"
        logs = [key for key in s3.keys(prefix) if key.endswith("/history.jsonl")]
        return len(s3.read(logs[0]).decode().splitlines()) if logs else 0


@pytest.fixture(scope="module")
def pool_server(tmp_path_factory):
    with started_server(tmp_path_factory.mktemp("s3-pool-server-home")) as server:
        yield server


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("object-store-pool")
@pytest.mark.slow
def test_lost_worker_on_s3_resumes_from_the_checkpoints_another_worker_downloads(pool_server, s3, tmp_path):
    """Two workers whose folders share nothing (their own working folders and caches) and an s3://
    root: the worker training attempt 1 is SIGKILLed after two epochs; attempt 2, on the other
    worker, downloads the checkpoints and resumes from them."""
    pool, name, root = "s3-pool", "lost-s3-worker", s3.url("pool")
    workers = {}
    try:
        for worker in ("worker-a", "worker-b"):
            env = child_env(pool_server.env, s3, CONVFLOW_CACHE_DIR=str(tmp_path / worker / "cache"))
            stand_in = types.SimpleNamespace(env=env)  # Worker takes its environment from a server's
            workers[worker] = Worker(stand_in, tmp_path / worker / "work", worker, pool=pool)
        run_env = child_env(pool_server.env, s3, CONVFLOW_CACHE_DIR=str(tmp_path / "run" / "cache"))
        run = S3PipelineRun(run_env, tmp_path / "run", name, root, pool)
        try:
            wait_for(lambda: run.checkpointed_epochs(s3) >= 2 or run.process.poll() is not None, 300, run.output)
            assert run.process.poll() is None, run.output()[-4000:]
            with prefect_client(pool_server) as client:
                first = train_runs(client, name)[1]
            training_pid = infrastructure_pid(first)
            [lost] = [w for w in workers.values() if parent_pid(training_pid) == w.process.pid]
            [other] = [w for w in workers.values() if w is not lost]
            kill_session(lost.process.pid)
            kill_session(training_pid)
            run.process.wait(timeout=LOST_AFTER_SECONDS + 360)
            output = run.output()
        finally:
            run.stop()
        other_output = other.output()
    finally:
        for worker in workers.values():
            worker.stop()

    assert run.process.returncode == 0, output[-6000:]
    summary = last_json_line(output)
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] >= 2, summary
    with prefect_client(pool_server) as client:
        attempts = train_runs(client, name)
    assert sorted(attempts) == [1, 2] and attempts[2].state.is_completed(), attempts
    assert other.ran(attempts[2].id)
    run_dir = f"pool/{name}/{summary['run_id']}"
    checkpoints = f"{root}/{name}/checkpoints/"
    assert f"resuming from the checkpoints at {checkpoints}" in other_output, other_output[-6000:]  # attempt 2's log
    record = json.loads(s3.read(f"{run_dir}/train-attempts/2.json"))
    assert record["resumed_from_epoch"] == summary["resumed_from_epoch"]
    history = pq.read_table(io.BytesIO(s3.read(f"{run_dir}/train/history.parquet"))).to_pylist()
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))  # every epoch once
    assert summary["saved_model"].startswith(f"{root}/"), summary
    for folder in (tmp_path / "worker-a" / "work", tmp_path / "worker-b" / "work", run.cwd):
        assert sorted(path.name for path in folder.iterdir()) in (["worker.log"], ["pipelines.yaml"]), folder
