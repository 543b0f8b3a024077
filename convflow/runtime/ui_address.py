"""Where a run can be seen in the Prefect UI once `convflow run` has ended.

A run on a temporary server (no PREFECT_API_URL) is kept in the server's database under
$PREFECT_HOME, but the server stops with the command: its address is dead by the time anyone opens
it. That run is seen on a lasting server over the same database, `prefect server start`, at the
address that server serves its UI from.
"""

from __future__ import annotations

FLOW_RUN_PATH = "/runs/flow-run/"


def lasting_ui_url() -> str:
    """The UI address of `prefect server start` with this environment's settings: PREFECT_UI_URL
    when set, else the server's host and port (127.0.0.1:4200 unless PREFECT_SERVER_API_HOST/PORT)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if "ui_url" in settings.model_fields_set and settings.ui_url:
        return settings.ui_url.rstrip("/")
    host = settings.server.api.host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{settings.server.api.port}"


def _database() -> str:
    """The database a temporary server recorded into, as a user recognises it."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.server.database.connection_url
    url = url.get_secret_value() if url is not None else ""
    if "sqlite" in url:
        return url.split(":///", 1)[-1]
    return "the database of PREFECT_API_DATABASE_CONNECTION_URL" if url else str(settings.home / "prefect.db")


def ui_lines(flow_run: str, temporary_server: bool) -> list[str]:
    """The summary's lines that say how to open flow run `flow_run` in the Prefect UI."""
    if not temporary_server:
        from prefect.settings import get_current_settings

        ui_url = (get_current_settings().ui_url or lasting_ui_url()).rstrip("/")
        return [f"  Prefect UI     {ui_url}{FLOW_RUN_PATH}{flow_run}"]
    return [
        f"  Prefect UI     the run is kept in {_database()}; its temporary server has stopped. To see the run:",
        "                 1. prefect server start",
        f"                 2. open {lasting_ui_url()}{FLOW_RUN_PATH}{flow_run}",
    ]
