"""The watch flow: a cheap scheduled look at a pipeline's source (`on_data.watch`; deployed as
`convflow-watch/<pipeline>`) that emits convflow.data.landed when its listing changed."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed

from convflow.config.errors import ConfigError
from convflow.config.load import load_pipeline
from convflow.data.listing import list_source, settled_listing
from convflow.runtime import events


@flow(name="convflow-watch", flow_run_name="{pipeline}")
def watch_source(pipeline: str, pipelines_file: str = "pipelines.yaml"):
    """List the pipeline's source; when the listing differs from the one last reported and has
    settled, emit convflow.data.landed (its training deployment retrains on it). The first run only
    notes what is there: the watch reports data that lands, not data that was there before it.

    Raises:
        ConfigError: the pipeline has no on_data.watch section.
    """
    spec = load_pipeline(pipelines_file, pipeline)
    if spec.on_data is None or spec.on_data.watch is None:
        raise ConfigError(Path(pipelines_file), [f"pipelines.{pipeline}.on_data.watch: required by the watch flow"])
    reported = events.last_reported(pipeline)
    listing = list_source(spec.data)
    if reported is None:
        events.remember_reported(pipeline, listing.as_dict())
        return Completed(name="Watching", message=f"watching {listing.files} files, {listing.bytes} bytes")
    if listing.fingerprint == reported["fingerprint"]:
        return Completed(name="Unchanged", message=f"{listing.source}: unchanged, {listing.files} files")
    settled = settled_listing(spec.data, spec.on_data.watch.settle)
    if settled is None:
        return Completed(name="Changing", message=f"{listing.source}: still changing; the next watch run looks again")
    events.emit_data_landed(pipeline, "watch", {**settled.as_dict(), "watch_flow_run_id": str(flow_run.id)})
    events.remember_reported(pipeline, settled.as_dict())
    message = f"{settled.source}: data landed ({reported['files']} -> {settled.files} files); {events.DATA_LANDED} sent"
    get_run_logger().info(message)
    return Completed(name="Data landed", message=message)
