"""The runs catalog, runs.parquet: appended under a lock, rebuilt from each run's run.json when damaged."""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from convflow.catalog.schemas import RUNS_SCHEMA, write_parquet
from convflow.core.object_store import is_remote, store_for
from convflow.core.storage import atomic_write_text, locked

RUN_RECORD = "run.json"
CATALOG_FILE = "runs.parquet"
# On object storage the catalog is one Parquet file per run under a hive-partitioned prefix,
# runs/pipeline=<pipeline>/<run id>.parquet: appending writes a new object, never rewrites one.
CATALOG_PREFIX = "runs"


def catalog_location(artifacts_root: str | Path) -> str:
    """Where the runs catalog of `artifacts_root` is: runs.parquet, or the runs/ prefix of a store."""
    if is_remote(artifacts_root):
        return f"{str(artifacts_root).rstrip('/')}/{CATALOG_PREFIX}/"
    return str(Path(artifacts_root) / CATALOG_FILE)


def append_to_catalog(artifacts_root: str | Path, row: dict[str, Any]) -> None:
    """Append one run's row to the catalog of `artifacts_root` (and its run.json)."""
    if not is_remote(artifacts_root):
        append_run(Path(artifacts_root) / CATALOG_FILE, row)
        return
    store = store_for(artifacts_root)
    row = {**row, "run_dir": store.to_url(row["run_dir"]) if row.get("run_dir") else None}
    if row["run_dir"]:
        store.write_bytes(f"{row['run_dir']}/{RUN_RECORD}", json.dumps(row, default=str, indent=2).encode())
    table = pa.Table.from_pylist([row], schema=RUNS_SCHEMA)
    local = store.mirror / CATALOG_PREFIX / f"pipeline={row['pipeline']}" / f"{row['run_id']}.parquet"
    local.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(table, local)
    store.push(local)


def newest_runs(artifacts_root: str | Path, pipeline: str, count: int) -> list[dict[str, Any]]:
    """The catalog rows of `pipeline`'s `count` newest runs on an object store (run ids sort by time)."""
    store = store_for(artifacts_root)
    folder = f"{catalog_location(artifacts_root)}pipeline={pipeline}"
    names = [name for name in store.list_names(folder) if name.endswith(".parquet")][-count:]
    return [row for name in names for row in pq.read_table(store.pull(f"{folder}/{name}")).to_pylist()]


def read_catalog(artifacts_root: str | Path) -> pa.Table:
    """The runs catalog of `artifacts_root`, oldest run first."""
    if not is_remote(artifacts_root):
        return read_runs(Path(artifacts_root) / CATALOG_FILE)
    store = store_for(artifacts_root)
    files = sorted(url for url in store.sizes(catalog_location(artifacts_root)) if url.endswith(".parquet"))
    parts = [pq.read_table(store.pull(url), schema=RUNS_SCHEMA) for url in files]
    table = pa.concat_tables(parts) if parts else RUNS_SCHEMA.empty_table()
    return table.sort_by("started") if table.num_rows else table


def append_run(catalog: Path, row: dict[str, Any]) -> None:
    """Append one row to runs.parquet; concurrent runs wait on a lock and lose no row.

    The row is first written as run.json in the run's folder, so the catalog can always be
    rebuilt from the run folders.
    """
    run_record = None
    if row.get("run_dir"):
        run_record = Path(row["run_dir"]) / RUN_RECORD
        run_record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_record, json.dumps(row, default=str, indent=2))
    new_row = pa.Table.from_pylist([row], schema=RUNS_SCHEMA)
    with locked(catalog):
        existing = _read_or_rebuild(catalog, exclude=run_record)
        write_parquet(pa.concat_tables([existing, new_row]), catalog)


def rebuild_runs(artifacts_root: Path, exclude: Path | None = None) -> pa.Table:
    """The catalog as the run folders tell it: one row per artifacts/<pipeline>/<run-id>/run.json."""
    rows = []
    for record in sorted(Path(artifacts_root).glob(f"*/*/{RUN_RECORD}")):
        if record != exclude:
            try:
                row = json.loads(record.read_text())
                for column in ("started", "finished"):
                    row[column] = datetime.datetime.fromisoformat(row[column])
            except (OSError, ValueError, KeyError, TypeError) as error:  # one bad record must not lose the others
                logging.getLogger("convflow.catalog").warning(
                    f"run record {record} is unreadable ({type(error).__name__}: {error}); its run is left out of "
                    "the rebuilt catalog"
                )
                continue
            rows.append(row)
    rows.sort(key=lambda row: row["started"])
    return pa.Table.from_pylist(rows, schema=RUNS_SCHEMA)


def _read_or_rebuild(catalog: Path, exclude: Path | None = None) -> pa.Table:
    if not catalog.exists():
        return rebuild_runs(catalog.parent, exclude)
    try:
        return pq.read_table(catalog, schema=RUNS_SCHEMA)
    except (pa.ArrowException, OSError) as error:
        damaged = catalog.with_name(f"{catalog.name}.damaged-{datetime.datetime.now():%Y%m%dT%H%M%S}")
        os.replace(catalog, damaged)
        logging.getLogger("convflow.catalog").warning(
            f"{catalog} is damaged ({error}); kept it as {damaged.name} and rebuilt the catalog from the run folders"
        )
        return rebuild_runs(catalog.parent, exclude)


def read_runs(catalog: Path) -> pa.Table:
    """The runs catalog; a damaged one is set aside and rebuilt from the run folders."""
    if not catalog.parent.is_dir():
        return RUNS_SCHEMA.empty_table()
    with locked(catalog):
        table = _read_or_rebuild(catalog)
        if not catalog.exists() and table.num_rows:
            write_parquet(table, catalog)
    return table


def flow_run_id(artifacts: str | Path, run_id: str) -> str | None:
    """The Prefect flow run of convflow run `run_id`, from the runs catalog; None if not recorded."""
    rows = read_catalog(artifacts).select(["run_id", "flow_run_id"]).to_pylist()
    return next((row["flow_run_id"] for row in rows if row["run_id"] == run_id and row["flow_run_id"]), None)
