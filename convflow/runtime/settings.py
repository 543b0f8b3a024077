"""The settings of a convflow flow run, decided here alone: the CLI, `convflow serve`, deployments'
workers and Python callers of the flows all get them from these functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convflow.core.object_store import is_remote, local_root

RESULTS_FOLDER = ".prefect-results"


def results_folder(artifacts_root: str | Path) -> Path:
    """Where Prefect keeps the stages' cached results: beside the artifacts they describe, so a
    cache hit and its files live and go together. The flows hand it to every stage task, so
    calling a flow from Python caches where the CLI does. For an object store's root: the folder in
    its local mirror (the stage runner hands the tasks the store's own folder, result_storage)."""
    return local_root(artifacts_root) / RESULTS_FOLDER


def result_storage(artifacts_root: str | Path) -> Any:
    """Prefect's result storage of a remote artifacts root: its .prefect-results/ prefix, through
    fsspec like every other file there; None for a local root (results_folder). Prefect takes
    only a block saved on its server (one per root, named by the URL's hash; no credentials in it:
    fsspec reads them from the environment where the task runs)."""
    if not is_remote(artifacts_root):
        return None
    import hashlib

    from prefect.filesystems import RemoteFileSystem

    url = str(artifacts_root).rstrip("/")
    block = RemoteFileSystem(basepath=f"{url}/{RESULTS_FOLDER}")
    block.save(f"convflow-results-{hashlib.sha256(url.encode()).hexdigest()[:12]}", overwrite=True)
    return block


def process_environment(artifacts_root: str | Path) -> dict[str, str]:
    """Environment of a process that runs convflow flows (the CLI's, a served or deployed run's):
    Prefect's local storage beside the artifacts, no analytics calls (offline machines), and
    TensorFlow's C++ start-up chatter off (it is not errors)."""
    return {
        "PREFECT_LOCAL_STORAGE_PATH": str(results_folder(artifacts_root)),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def flow_call_settings(artifacts_root: str | Path, temporary_api_url: str | None) -> dict[Any, Any]:
    """Prefect settings to call a flow under in this process (`prefect.settings.temporary_settings`).

    Against a temporary server (`temporary_api_url`): its address, since a process that imported
    Prefect before the server started (main() called from Python) keeps the address it read then
    and would start Prefect's own temporary server as well; and no flow-run heartbeats, which let a
    lasting server mark a crashed run, while a temporary server dies with this process and joining
    the heartbeat thread (it sleeps in 1 s steps) adds up to a second to every run's end. Prefect's
    "View at" link then names the run's address on a lasting server (ui_address), not on the
    temporary one, which is gone by the time anyone opens it.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_UI_URL,
    )

    from convflow.runtime.ui_address import lasting_ui_url

    settings: dict[Any, Any] = {PREFECT_LOCAL_STORAGE_PATH: results_folder(artifacts_root)}
    if temporary_api_url is not None:
        settings.update(
            {
                PREFECT_API_URL: temporary_api_url,
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                PREFECT_UI_URL: lasting_ui_url(),
            }
        )
    return settings
