"""Scheduled scoring's one task: the production model scores the inputs it has not scored yet."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from convflow.core.object_store import is_remote, store_for
from convflow.scoring.predict import choose_model, score_new


@task(name="score_new_inputs", cache_policy=NO_CACHE)
def score_new_inputs(pipeline: str, artifacts: str, inputs: list[str], output: str) -> dict:
    """Prefect task over predict.score_new with the pipeline's production model. An `output` on
    object storage is pulled into the local cache (what was scored before), written there, and the
    new partition uploaded."""
    model = choose_model(artifacts, pipeline)
    if not is_remote(output):
        result = score_new(model, inputs, Path(output))
    else:
        store = store_for(output)
        if store.exists(output):
            store.pull(output)
        result = score_new(model, inputs, store.mirror)
        if result["partition"]:
            result["partition"] = store.push(result["partition"])
    return {**result, "model_version": model.version, "run_id": model.run_id}
