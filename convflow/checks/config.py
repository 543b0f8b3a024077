"""pipelines.yaml's `validate:` section: what each data check does when its figure is past its
threshold (block, warn or off), the thresholds, and what a blocked run does (fail, or ask a person)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from convflow.checks.image_properties import PROPERTIES

Action = Literal["block", "warn", "off"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckConfig(_Strict):
    """One check: `block` stops the run, `warn` records and reports, `off` skips it. A bare action
    (`leakage: warn`) stands for `{action: warn}` with the default thresholds."""

    action: Action = Field(
        "block", description="block: the run stops (or asks); warn: recorded and reported; off: not run."
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_action(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false (and `on` as true).
        if value is False:
            return {"action": "off"}
        if isinstance(value, str):
            return {"action": value}
        return value


class ClassSetConfig(CheckConfig):
    """A class present in production's data and missing from this run's, or the reverse."""


class ClassBalanceConfig(CheckConfig):
    max_distance: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Largest change of a class's share of the examples against production's (the L-infinity "
        "distance of the class shares); a change within sampling noise at `validate.alpha` never fires. Moving "
        "half of any one flowers class into another moves 0.08-0.12; random halves of flowers differ by 0.03.",
    )


class MinCountConfig(CheckConfig):
    train: int = Field(1, ge=0, description="Fewest training examples of each class.")
    validation: int = Field(
        1,
        ge=0,
        description="Fewest validation examples of each class (splits with no examples at all are not checked).",
    )
    test: int = Field(1, ge=0, description="Fewest test examples of each class.")


class LabelConflictsConfig(CheckConfig):
    max_conflicts: int = Field(
        0,
        ge=0,
        description="Most examples of a class whose content (sha256) is also filed under another class: in this "
        "run, or in production's data (relabelled since).",
    )


class LeakageConfig(CheckConfig):
    max_distance: int = Field(
        2,
        ge=0,
        le=4,
        description="Bits in which two images' 64-bit dHashes may differ and still count as near copies. 2 "
        "catches JPEG re-encoding, a resize by a pixel and a brightness change in 99.7% of cases on "
        "../shared/data/flowers, and finds almost no distinct photos there.",
    )
    min_side: int = Field(
        32,
        ge=1,
        description="Images whose shorter side (as decoded, the median of the dataset) is under this many pixels "
        "count as copies only when their content is identical: a dHash cannot tell small images such as digits apart.",
    )
    max_share: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Largest share of a held-out split's examples (validation, test) that may have a near copy in "
        "an earlier split (train, validation). Photo collections hold some duplicates of their own: "
        "flowers' random splits leak about 0.5%.",
    )


class DriftConfig(CheckConfig):
    max_statistic: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Largest two-sample Kolmogorov-Smirnov statistic (the biggest gap between the two cumulative "
        "distributions, 0-1) of an image property against production's; a gap within sampling noise at "
        "`validate.alpha` never fires.",
    )
    properties: list[Literal[PROPERTIES]] = Field(  # type: ignore[valid-type]
        list(PROPERTIES), description="The image properties compared."
    )
    per_class: bool = Field(True, description="Also compare each class's images with production's of that class.")


class EmbeddingDriftConfig(CheckConfig):
    """Production's penultimate-layer embeddings of this run's test split against those of its own
    test split (its reference set): MMD² with an RBF kernel and a permutation p-value. Checked in
    evaluate, once there is a model; production versions exported without embeddings skip it."""

    action: Action = Field(
        "warn",
        description="block: the gate fails (nothing is promoted); warn: recorded and reported; off: not run.",
    )
    alpha: float = Field(
        0.001,
        gt=0,
        lt=1,
        description="The permutation p-value under which the embeddings count as drifted: the chance that two "
        "samples of one distribution look this different.",
    )
    max_examples: int = Field(
        500,
        ge=10,
        le=5000,
        description="Most examples per side (a seeded random sample of each): the test costs (2 x max_examples)² "
        "kernel values.",
    )
    permutations: int = Field(
        2000,
        ge=20,
        le=100_000,
        description="Random relabellings of the pooled examples the p-value is counted over; the smallest p-value "
        "it can give is 1 / (permutations + 1), which must be under `alpha`.",
    )

    @model_validator(mode="after")
    def _alpha_reachable(self) -> EmbeddingDriftConfig:
        # Otherwise the check could never fire, and would look like it passed.
        if 1 / (self.permutations + 1) >= self.alpha:
            raise ValueError(
                f"permutations ({self.permutations}) cannot give a p-value under alpha ({self.alpha}): "
                f"use at least {int(1 / self.alpha)} permutations, or a larger alpha"
            )
        return self


class ValidateConfig(_Strict):
    """The data checks between to_tfrecords and build_base, against the data that made the
    production model. With no production model yet, only min_count, label_conflicts and leakage run."""

    on_block: Literal["fail", "ask"] = Field(
        "fail", description="What a blocked run does: fail (ends Blocked), or ask a person in the Prefect UI."
    )
    ask_timeout: float = Field(
        86_400, gt=0, description="Seconds a blocked run waits for a decision under on_block: ask; then it is blocked."
    )
    alpha: float = Field(
        1e-4,
        gt=0,
        lt=1,
        description="Chance that sampling alone takes a class share or a property distribution past its "
        "threshold, per compared subject: thresholds are raised to this noise level for small samples.",
    )
    class_set: ClassSetConfig = Field(ClassSetConfig(), description="A class appeared or disappeared.")
    class_balance: ClassBalanceConfig = Field(ClassBalanceConfig(), description="Class shares moved.")
    min_count: MinCountConfig = Field(MinCountConfig(), description="Too few examples of a class in a split.")
    label_conflicts: LabelConflictsConfig = Field(
        LabelConflictsConfig(), description="Identical image content under two labels."
    )
    leakage: LeakageConfig = Field(
        LeakageConfig(), description="Near-copies of validation or test images in an earlier split."
    )
    drift: DriftConfig = Field(DriftConfig(), description="Image properties drifted from production's.")
    embedding_drift: EmbeddingDriftConfig = Field(
        EmbeddingDriftConfig(),
        description="Production's embeddings of this run's test split drifted from those of its own test split "
        "(checked in evaluate).",
    )
