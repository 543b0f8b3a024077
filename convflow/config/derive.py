"""Pipelines derived from one: a compare variant's, and one with the settings `convflow tune` found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from convflow.config.errors import format_error
from convflow.config.load import deep_merge
from convflow.config.schema import AUGMENT_MAXIMUM, ModelConfig, PipelineSpec, TuneConfig


def _without_base_settings(body: dict[str, Any], model_overrides: dict[str, Any]) -> dict[str, Any]:
    """The pipeline without the model settings that belong to its base, when a variant names
    another base and does not set them itself: a MobileNet's alpha, or its weights file, fits no other."""
    new_base = model_overrides.get("base")
    if new_base is None or new_base == body["model"]["base"]:
        return body
    dropped = set(ModelConfig.BASE_SPECIFIC) - set(model_overrides)
    return {**body, "model": {key: value for key, value in body["model"].items() if key not in dropped}}


def tuned_spec(spec: PipelineSpec, settings: dict[str, float]) -> PipelineSpec:
    """`spec` with tuned `settings` (TuneConfig names) in place, without its tune section.

    Raises:
        ValidationError: the settings make the pipeline invalid.
    """
    body = spec.model_dump(mode="json", exclude={"tune"}, by_alias=True)
    for name, value in settings.items():
        if name == "augment_strength":
            steps = spec.train.augment_steps
            body["train"]["augment"] = [
                {
                    layer: None if setting is None else min(setting * value, AUGMENT_MAXIMUM[layer])
                    for layer, setting in step.items()
                }
                for step in steps
            ]
            continue
        section, *path = TuneConfig.SETTINGS[name][0].split(".")
        target = body[section]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = int(value) if name in TuneConfig.INTEGER_SETTINGS else float(value)
    return PipelineSpec.model_validate(body)


def variant_specs(spec: PipelineSpec, base_dir: str | Path) -> dict[str, PipelineSpec | list[str]]:
    """Each compare variant of `spec` as a pipeline of its own (the pipeline deep-merged with the
    variant's overrides, named like the pipeline, without a compare section), or that variant's
    problems, one line each; relative paths in overrides resolve against `base_dir`."""
    if spec.compare is None:
        return {}
    body = spec.model_dump(mode="json", exclude={"compare"}, by_alias=True)
    results: dict[str, PipelineSpec | list[str]] = {}
    for variant in spec.compare.variants:
        overrides = variant.model_dump(include={"model", "train", "evaluate"})
        try:
            results[variant.name] = PipelineSpec.model_validate(
                deep_merge(_without_base_settings(body, overrides["model"]), overrides),
                context={"base_dir": str(base_dir)},
            )
        except ValidationError as error:
            prefix = f"pipelines.{spec.name}.compare.variants.{variant.name}"
            results[variant.name] = [format_error(prefix, item) for item in error.errors()]
    return results
