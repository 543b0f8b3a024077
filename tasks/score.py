"""Scheduled scoring's one task: the production model scores the inputs it has not scored yet."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from convflow.scoring.predict import choose_model, score_new


@task(name="score_new_inputs", cache_policy=NO_CACHE)
def score_new_inputs(pipeline: str, artifacts: str, inputs: list[str], output: str) -> dict:
    """Prefect task over predict.score_new with the pipeline's production model."""
    model = choose_model(Path(artifacts), pipeline)
    result = score_new(model, inputs, Path(output))
    return {**result, "model_version": model.version, "run_id": model.run_id}
