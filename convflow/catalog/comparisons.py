"""The records of a comparison (`convflow compare`): each variant's result and the ranked whole, as
the comparison report shows them and the runs catalog records them."""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from convflow.core.records import Evaluation, ExportedModel, StageRun, TrainedModel


class VariantResult(pydantic.BaseModel):
    """One variant of a comparison: its scores before and after training and its costs, or why it failed."""

    model_config = pydantic.ConfigDict(frozen=True)

    name: str
    status: Literal["completed", "failed"]
    error: str | None = pydantic.Field(None, description="Why it failed: config problems or the stage's error.")
    run_id: str | None = None
    config_hash: str | None = None
    pid: int | None = pydantic.Field(None, description="The process that ran its stages.")
    rank: int | None = pydantic.Field(None, description="1 = the winner; None until ranked, and for failures.")
    initial_accuracy: float | None = None
    initial_loss: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    macro_f1: float | None = None
    per_class_f1: dict[str, float] = pydantic.Field(default_factory=dict)
    total_params: int | None = None
    trainable_params: int | None = None
    saved_model_mb: float | None = None
    latency_ms: float | None = pydantic.Field(None, description="Median SavedModel latency for one image.")
    stages: list[StageRun] = pydantic.Field(default_factory=list)
    trained: TrainedModel | None = None
    evaluation: Evaluation | None = None
    exported: ExportedModel | None = None

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def passed_gate(self) -> bool | None:
        return self.evaluation.passed_gate if self.evaluation else None

    @property
    def promoted_version(self) -> int | None:
        return self.exported.promoted_version if self.exported else None

    def metric(self, name: str) -> float | None:
        return getattr(self, name)


class Comparison(pydantic.BaseModel):
    """A comparison of a pipeline's variants, ranked; what `convflow compare` reports."""

    model_config = pydantic.ConfigDict(frozen=True)

    pipeline: str
    comparison_id: str
    started: str
    metric: str
    promote: str
    runner: str = pydantic.Field(description="How the variants ran, e.g. 'threads (3 at a time)'.")
    flow_pid: int = pydantic.Field(description="The flow's process; variants on Dask run in others.")
    data_fingerprint: str
    counts: dict[str, int] = pydantic.Field(description="Examples per split, shared by every variant.")
    label_names: list[str]
    overrides: dict[str, dict[str, Any]] = pydantic.Field(description="Each variant's overrides of the pipeline.")
    variants: list[VariantResult] = pydantic.Field(description="Completed variants by rank, then failed ones.")
    verdict: str = pydantic.Field(description="The winner and what happened to it.")
    stages: list[StageRun] = pydantic.Field(description="The shared data stages.")
    report: str | None = pydantic.Field(None, description="comparison.html, once written.")
    blocked: bool = pydantic.Field(False, description="The data checks blocked it: no variant trained.")

    @property
    def winner(self) -> VariantResult | None:
        return self.variants[0] if self.variants and self.variants[0].rank == 1 else None
