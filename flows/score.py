"""The scoring flow: a pipeline's production model scores what it has not scored yet
(`score:` in pipelines.yaml; deployed as `convflow-score/<pipeline>` beside the training flow)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from convflow.config.errors import ConfigError
from convflow.config.load import load_pipeline
from convflow.core.object_store import normalized_root
from convflow.tasks.score import score_new_inputs


@flow(name="convflow-score", flow_run_name="{pipeline}")
def score_pipeline(pipeline: str, pipelines_file: str = "pipelines.yaml", artifacts: str = "artifacts") -> dict:
    """Score the pipeline's `score.input` with its production model into `score.output`.

    Raises:
        ConfigError: the pipeline has no score section.
        PredictError: the pipeline has no production model yet.
    """
    spec = load_pipeline(pipelines_file, pipeline)
    if spec.score is None:
        raise ConfigError(Path(pipelines_file), [f"pipelines.{pipeline}.score: required by the scoring flow"])
    result = score_new_inputs(pipeline, normalized_root(artifacts), spec.score.input, spec.score.output)
    rows = [
        {"what": "scored", "value": result["scored"]},
        {"what": "errors", "value": result["errors"]},
        {"what": "already scored by this model", "value": result["already_scored"]},
        *({"what": f"predicted {name}", "value": count} for name, count in sorted(result["per_class"].items())),
    ]
    create_table_artifact(
        table=rows,
        key=f"{pipeline.replace('_', '-').replace('.', '-')}-scoring",
        description=f"{pipeline}: scoring with model version {result['model_version']}",
    )
    get_run_logger().info(
        f"{pipeline}: scored {result['scored']} ({result['errors']} errors), "
        f"{result['already_scored']} already scored; partition {result['partition']}"
    )
    return result
