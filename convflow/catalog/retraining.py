"""The retraining policy of scheduled runs: train only when the data or the config changed.

A scheduled run learns the data fingerprint from download_and_split (a cache hit while the source
is unchanged) and compares it, and the pipeline's config hash, with what made the production
model. When both match, and the pipeline says `retrain: on_change`, it trains nothing and records
an "unchanged" row in the catalog (runs.record_unchanged). Nothing here imports TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

from convflow.catalog import registry
from convflow.config.schema import PipelineSpec
from convflow.core import object_store


def unchanged_production(
    artifacts_root: str | Path, spec: PipelineSpec, data_fingerprint: str
) -> registry.Production | None:
    """The production model that `spec`'s config made from this very data, when the pipeline
    retrains only on change; None when there is none (or its files are gone), anything differs,
    or `retrain: always`."""
    if spec.retrain == "always":
        return None
    production = registry.current(artifacts_root, spec.name)
    if production is None or not object_store.exists(production.saved_model):  # gone: make a new one
        return None
    if (production.config_hash, production.data_fingerprint) != (spec.config_hash(), data_fingerprint):
        return None
    return production
