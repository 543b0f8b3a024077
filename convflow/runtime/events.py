"""convflow's Prefect events: data landed for a pipeline (its training deployment retrains on it) and a
model promoted (its scoring deployment scores with it). Each event's resource is the pipeline, so the
Prefect UI's event feed lists them under it and deployment triggers match on it."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from prefect.events import Event, emit_event

DATA_LANDED = "convflow.data.landed"
MODEL_PROMOTED = "convflow.model.promoted"
# A Prefect variable per watched pipeline holds the listing its watch last reported.
WATCH_VARIABLE_PREFIX = "convflow-watch-"


def pipeline_resource_id(pipeline: str) -> str:
    return f"convflow.pipeline.{pipeline}"


def pipeline_resource(pipeline: str) -> dict[str, str]:
    """The event's resource: the pipeline, named so in the event feed."""
    return {"prefect.resource.id": pipeline_resource_id(pipeline), "prefect.resource.name": pipeline}


def data_landed_event(pipeline: str, by: str, details: dict[str, Any]) -> Event:
    """The event that data landed in `pipeline`'s source, noticed `by` watch, notify or another sender;
    `details`: what landed (the source's listing fingerprint, files, bytes, a note)."""
    return Event(
        id=uuid.uuid4(),
        occurred=datetime.datetime.now(datetime.UTC),
        event=DATA_LANDED,
        resource=pipeline_resource(pipeline),
        payload={"pipeline": pipeline, "by": by, **details},
    )


def emit_data_landed(pipeline: str, by: str, details: dict[str, Any]) -> None:
    """Emit the data-landed event from a flow run (Prefect relates it to the run)."""
    event = data_landed_event(pipeline, by, details)
    emit_event(event.event, event.resource.root, payload=event.payload, id=event.id)


def emit_model_promoted(pipeline: str, version: int, run_id: str, details: dict[str, Any]) -> None:
    """Emit, from the training flow run, that `run_id` made production version `version` of `pipeline`."""
    emit_event(
        MODEL_PROMOTED,
        pipeline_resource(pipeline),
        payload={"pipeline": pipeline, "version": version, "run_id": run_id, **details},
    )


def post_events(events: list[Event]) -> None:
    """Send `events` to the Prefect server at PREFECT_API_URL now, by the HTTP endpoint a bucket
    notification uses (POST /api/events), outside any flow run.

    Raises:
        httpx.HTTPStatusError: the server refused them.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client.request("POST", "/events", json=[event.model_dump(mode="json") for event in events])
    response.raise_for_status()


def watch_variable(pipeline: str) -> str:
    """The Prefect variable of `pipeline`'s watch (variable names take no dots)."""
    return WATCH_VARIABLE_PREFIX + pipeline.replace(".", "_")


def last_reported(pipeline: str) -> dict[str, Any] | None:
    """The listing the pipeline's watch last reported (or first saw), or None before its first run."""
    from prefect.variables import Variable

    return Variable.get(watch_variable(pipeline), default=None)


def remember_reported(pipeline: str, listing: dict[str, Any]) -> None:
    from prefect.variables import Variable

    Variable.set(watch_variable(pipeline), listing, overwrite=True)
