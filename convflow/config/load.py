"""Reading a pipelines file: YAML, duplicate keys, defaults merged under each pipeline, every
pipeline validated on its own, warnings to the run's log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from convflow.config.errors import ConfigError, format_error
from convflow.config.schema import PipelineSpec
from convflow.config.yaml_loader import duplicate_keys


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(path, [f"{path}: file not found"]) from None
    try:
        document = yaml.safe_load(text)
        duplicates = duplicate_keys(text)
    except yaml.YAMLError as error:
        raise ConfigError(path, [f"{path}: not valid YAML: {error}"]) from None
    if duplicates:
        raise ConfigError(path, [f"{path}: {duplicate}" for duplicate in duplicates])
    if not isinstance(document, dict) or not isinstance(document.get("pipelines"), dict):
        raise ConfigError(path, [f"{path}: must be a mapping with a 'pipelines:' mapping"])
    unknown = sorted(set(document) - {"defaults", "pipelines"})
    if unknown:
        raise ConfigError(path, [f"{key}: unknown key; expected defaults or pipelines" for key in unknown])
    return document


def _validate_each(path: Path) -> tuple[dict[str, PipelineSpec], dict[str, list[str]]]:
    """Every pipeline of the file validated on its own: the valid ones, and each invalid one's
    problems, one line each. A file that cannot be read as a pipelines file raises.

    Raises:
        ConfigError: the file is missing, not YAML, or not shaped like a pipelines file.
    """
    document = _read_yaml(path)
    defaults = document.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(path, ["defaults: must be a mapping"])
    specs: dict[str, PipelineSpec] = {}
    problems: dict[str, list[str]] = {}
    context = {"base_dir": str(path.resolve().parent)}
    for key, body in document["pipelines"].items():
        name, prefix = str(key), f"pipelines.{key}"
        if not isinstance(body, dict):
            problems[name] = [f"{prefix}: must be a mapping"]
            continue
        try:
            specs[name] = PipelineSpec.model_validate({**deep_merge(defaults, body), "name": name}, context=context)
        except ValidationError as error:
            problems[name] = [format_error(prefix, item) for item in error.errors()]
    return specs, problems


def load_pipelines(path: str | Path) -> dict[str, PipelineSpec]:
    """Load and validate every pipeline of a pipelines file (validate, serve and deploy: a person
    is there to fix any mistake).

    Raises:
        ConfigError: listing every problem found, each with its path and bad value.
    """
    path = Path(path)
    specs, problems = _validate_each(path)
    if problems:
        raise ConfigError(path, [line for lines in problems.values() for line in lines])
    return specs


def check_pipeline(path: str | Path, name: str) -> tuple[PipelineSpec, list[str]]:
    """Load one pipeline by name (with `defaults:`); the other pipelines' mistakes do not stop it.

    Returns:
        The pipeline, and one warning per other pipeline that is invalid, naming it and its problems.

    Raises:
        ConfigError: pipeline `name` is invalid or missing, or the file itself is unusable.
    """
    path = Path(path)
    specs, problems = _validate_each(path)
    if name in problems:
        raise ConfigError(path, problems[name])
    if name not in specs:
        known = sorted([*specs, *problems])
        raise ConfigError(path, [f"pipelines.{name}: no such pipeline; expected one of {known}"])
    warnings = [
        f"{path}: pipeline {other!r} is invalid and cannot run until it is fixed ({name} is not affected): "
        + "; ".join(lines)
        for other, lines in problems.items()
    ]
    return specs[name], warnings


def load_pipeline(path: str | Path, name: str) -> PipelineSpec:
    """Load one pipeline by name, as check_pipeline; inside a Prefect flow or task run, each other
    invalid pipeline is logged as a warning in that run's log (one broken entry of a shared file
    must not stop every scheduled retraining, but it must be seen).

    Raises:
        ConfigError: pipeline `name` is invalid or missing, or the file itself is unusable.
    """
    spec, warnings = check_pipeline(path, name)
    if warnings:
        _log_warnings(warnings)
    return spec


def _log_warnings(warnings: list[str]) -> None:
    """To the current Prefect run's log (the UI shows it), else to the `convflow.config` logger."""
    from convflow.core.run_log import run_logger

    logger = run_logger("convflow.config")
    for warning in warnings:
        logger.warning(warning)
