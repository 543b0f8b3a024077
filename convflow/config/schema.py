"""pipelines.yaml's schema: one pydantic tree, what the stages compute with. Reading the file and
wording its errors live in load.py and errors.py, so that editing them never misses a stage's cache."""

from __future__ import annotations

import hashlib
import json
import re
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from convflow.checks.config import ValidateConfig
from convflow.config.model_zoo import get_base_spec

PIPELINE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
SOURCE_SCHEMES = ("sklearn", "tfds", "folder", "idx", "parquet")
SKLEARN_DATASETS = ("digits",)


def _safe_name(name: str) -> str:
    """Pipeline and variant names become folder names: nothing that could leave the artifacts root."""
    if not PIPELINE_NAME.match(name):
        raise ValueError("must be 1-64 of a-z 0-9 _ . - and start with a letter or digit")
    return name


SafeName = Annotated[str, AfterValidator(_safe_name)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitFractions(StrictModel):
    train: float = Field(0.8, gt=0, lt=1, description="Share of examples for training.")
    validation: float = Field(0.1, ge=0, lt=1, description="Share for validation during training.")
    test: float = Field(0.1, gt=0, lt=1, description="Share held out for evaluation and the gate.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitFractions:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must be 1, got {total:g}")
        return self


class DataConfig(StrictModel):
    # Where the work runs, not what it makes: left out of stage cache keys and the config hash.
    EXECUTION_ONLY: ClassVar[frozenset[str]] = frozenset({"dask_scheduler"})

    source: str = Field(description="sklearn:digits | tfds:NAME | folder:PATH | idx:PATH | parquet:PATH")
    image_size: tuple[int, int] = Field(description="Height, width the model sees.")
    channels: Literal[1, 3] = Field(3, description="1 for grayscale, 3 for RGB.")
    split: SplitFractions = Field(SplitFractions(), description="Shares of train, validation and test.")
    resize: Literal["stretch", "pad"] = Field(
        "stretch", description="Stretch to image_size, or keep the aspect ratio and pad."
    )
    shard_size: int = Field(10_000, ge=1, description="Examples per TFRecord shard.")
    compression: Literal["none", "gzip"] = Field(
        "none",
        description="TFRecord compression: none is the fastest to write and read (benchmarks/RESULTS.md); "
        "gzip stores small grayscale images in about a fifth of the space.",
    )
    record_format: Literal["auto", "raw", "jpeg", "png"] = Field(
        "auto",
        description="How records store images: raw uint8 pixels (fastest to decode, largest), jpeg (lossy, "
        "quality 95) or png (lossless); auto picks raw while the decoded dataset fits the reader's memory cache "
        "or images are at most 64x64x3, else jpeg (png for grayscale): the measurements in benchmarks/RESULTS.md.",
    )
    label_names: list[str] | None = Field(None, description="Class names, in label order.")
    data_dir: str | None = Field(None, description="Pre-downloaded TFDS directory (tfds sources).")
    dask_scheduler: str | None = Field(
        None,
        description="Dask scheduler address (tcp://host:8786): its workers decode and write the TFRecord "
        "shards; they must see the same artifacts and data paths. Default: this machine's cores.",
    )
    columns: dict[Literal["image", "label", "split"], str] | None = Field(
        None,
        description="parquet sources: the column names of the image (bytes, a {bytes, path} struct or a path), "
        "label (string or integer) and optional split, where they differ from image, label and split.",
    )
    tfds_split: dict[Literal["train", "validation", "test"], str] | None = Field(
        None,
        description="tfds sources: TFDS split or slice per split, e.g. {train: 'train[:80%]', test: "
        "'train[80%:]'}; default: the dataset's own splits, missing ones carved from train.",
    )

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if min(size) < 1:
            raise ValueError(f"height and width must be ≥ 1, got {list(size)}")
        return size

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str, info: ValidationInfo) -> str:
        scheme, sep, rest = source.partition(":")
        if not sep or scheme not in SOURCE_SCHEMES or not rest:
            raise ValueError(f"must look like one of {[s + ':...' for s in SOURCE_SCHEMES]}")
        if scheme == "sklearn" and rest not in SKLEARN_DATASETS:
            raise ValueError(f"unknown sklearn dataset {rest!r}; expected one of {list(SKLEARN_DATASETS)}")
        if scheme in ("folder", "idx", "parquet"):
            return f"{scheme}:{_resolve(rest, info)}"
        return source

    @field_validator("data_dir")
    @classmethod
    def _resolve_data_dir(cls, data_dir: str | None, info: ValidationInfo) -> str | None:
        return None if data_dir is None else _resolve(data_dir, info)

    @property
    def scheme(self) -> str:
        return self.source.partition(":")[0]

    @property
    def location(self) -> str:
        return self.source.partition(":")[2]


class FineTuneConfig(StrictModel):
    """After the head has trained: unfreeze the base's top layers and train on at a lower rate."""

    epochs: int = Field(ge=1, description="Epochs of fine-tuning after train.epochs.")
    learning_rate: float = Field(1e-5, gt=0, description="Learning rate while fine-tuning.")
    unfreeze_top: int | None = Field(None, ge=1, description="Unfreeze this many of the base's top layers.")
    from_layer: str | None = Field(None, description="Unfreeze from this named base layer to the top.")

    @model_validator(mode="after")
    def _one_boundary(self) -> FineTuneConfig:
        if (self.unfreeze_top is None) == (self.from_layer is None):
            raise ValueError("give exactly one of unfreeze_top or from_layer")
        return self


class ModelConfig(StrictModel):
    # What fits only the base it was written for: a compare variant naming another base drops
    # these from its pipeline unless it sets them.
    BASE_SPECIFIC: ClassVar[tuple[str, ...]] = ("alpha", "weights", "freeze", "fine_tune")

    base: str = Field(description="A seed CNN (mnist_cnn, ...) or a tf.keras.applications name.")
    weights: str = Field("none", description="imagenet | none | path to .h5/.keras | run:<pipeline>")
    alpha: float | None = Field(None, gt=0, description="Width multiplier of MobileNet bases.")
    pooling: Literal["avg", "max", "flatten"] | None = Field(
        None, description="How the head pools the base's feature maps; default by base."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the dense head.")
    freeze: bool | None = Field(
        None, description="Freeze the base; default: freeze exactly when weights are pretrained."
    )
    fine_tune: FineTuneConfig | None = Field(None, description="Optional fine-tuning phase.")
    binary_head: bool = Field(
        False, description="Two classes: one sigmoid logit and binary cross-entropy instead of a softmax pair."
    )

    @field_validator("base")
    @classmethod
    def _known_base(cls, base: str) -> str:
        get_base_spec(base)
        return base

    @field_validator("weights")
    @classmethod
    def _resolve_weights(cls, weights: str, info: ValidationInfo) -> str:
        if weights in ("imagenet", "none") or weights.startswith("run:"):
            return weights
        if not weights.endswith((".h5", ".keras")):
            raise ValueError("must be imagenet, none, run:<pipeline> or a path ending in .h5 or .keras")
        return _resolve(weights, info)

    @model_validator(mode="after")
    def _alpha_only_where_it_applies(self) -> ModelConfig:
        if self.alpha is not None and not get_base_spec(self.base).takes_alpha:
            raise ValueError(f"alpha applies to MobileNet bases only, not {self.base!r}")
        return self

    @model_validator(mode="after")
    def _fine_tune_needs_frozen_base(self) -> ModelConfig:
        if self.fine_tune is not None and not self.frozen:
            raise ValueError("fine_tune applies to a frozen base: set freeze: true or pretrained weights")
        return self

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"

    @property
    def frozen(self) -> bool:
        return self.pretrained if self.freeze is None else self.freeze


# train.augment's layers and each one's default setting: a factor of the image (rotation, zoom,
# contrast), RandAugment's magnitude, MixUp's and CutMix's Beta alpha; flip takes none.
AUGMENT_LAYERS: dict[str, float | None] = {
    "flip": None,
    "rotation": 0.1,
    "zoom": 0.1,
    "contrast": 0.1,
    "randaugment": 0.5,
    "mixup": 0.2,
    "cutmix": 1.0,
}
# The largest setting of each (beyond an alpha of 10 the mix is about always 50:50).
AUGMENT_MAXIMUM = {"rotation": 1.0, "zoom": 1.0, "contrast": 1.0, "randaugment": 1.0, "mixup": 10.0, "cutmix": 10.0}
# `augment: true`: the tutorials' set, as convflow has always applied it.
DEFAULT_AUGMENT = ("flip", "rotation", "zoom", "contrast")


def _augment_step(item: str | dict) -> dict[str, float | None]:
    """One item of train.augment as {name: setting}, the setting given or the layer's default."""
    name, value = next(iter(item.items())) if isinstance(item, dict) and len(item) == 1 else (item, None)
    if not isinstance(name, str) or name not in AUGMENT_LAYERS:
        raise ValueError(f"{item!r}: each item must be one of {list(AUGMENT_LAYERS)}, alone or as {{name: setting}}")
    if name == "flip":
        if value is not None:
            raise ValueError("flip takes no setting")
        return {name: None}
    value = AUGMENT_LAYERS[name] if value is None else value
    if not 0 < value <= AUGMENT_MAXIMUM[name]:
        raise ValueError(f"{name}: {value!r} must be > 0 and ≤ {AUGMENT_MAXIMUM[name]:g}")
    return {name: float(value)}


def _augment_steps(augment: bool | list) -> bool | list[dict[str, float | None]]:
    """`augment` as true, false or a list of {layer: setting}, each setting given or its default."""
    if isinstance(augment, bool):
        return augment
    if not augment:
        raise ValueError("an empty list: use false for no augmentation")
    return [_augment_step(item) for item in augment]


class LearningRateSchedule(StrictModel):
    """How the learning rate moves over train.epochs (Keras schedules and callbacks)."""

    kind: Literal["constant", "cosine", "step", "reduce_on_plateau"] = Field(
        "constant",
        description="constant; cosine decay to 0 after warmup_epochs of linear warm-up; step: times "
        "factor every step_epochs; reduce_on_plateau: times factor when validation loss stalls for patience epochs.",
    )
    warmup_epochs: int = Field(0, ge=0, description="cosine: epochs of linear warm-up from 0 to learning_rate.")
    step_epochs: int = Field(10, ge=1, description="step: epochs between drops.")
    factor: float = Field(0.1, gt=0, lt=1, description="step and reduce_on_plateau: what each drop multiplies by.")
    patience: int = Field(2, ge=1, description="reduce_on_plateau: epochs without improvement before a drop.")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _settings_of_its_kind(self) -> LearningRateSchedule:
        if self.warmup_epochs and self.kind != "cosine":
            raise ValueError(f"warmup_epochs applies to the cosine schedule, not {self.kind}")
        return self


class EarlyStoppingConfig(StrictModel):
    """Stop when the validation metric stops improving, and keep the best epoch's weights."""

    patience: int = Field(3, ge=1, description="Epochs without improvement before training stops.")
    metric: Literal["val_loss", "val_accuracy"] = Field("val_loss", description="The validation metric watched.")


class TrainConfig(StrictModel):
    epochs: int = Field(10, ge=1, description="Passes over the training split.")
    batch_size: int = Field(64, ge=1, description="Examples per step (per replica on GPUs).")
    learning_rate: float = Field(1e-3, gt=0, description="Optimizer learning rate.")
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = Field("adam", description="The Keras optimizer.")
    weight_decay: float | None = Field(
        None, ge=0, lt=1, description="Decoupled weight decay; default: the optimizer's (adamw 0.004, the others none)."
    )
    schedule: LearningRateSchedule = Field(
        LearningRateSchedule(), description="Learning-rate schedule: a kind's name or {kind: ..., its settings}."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy against labels smoothed by this much.")
    class_weight: Literal["balanced"] | None = Field(
        None, description="balanced: weigh each class's loss by n / (classes x its training examples)."
    )
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="Stop after `patience` epochs without improvement and keep the best epoch's weights."
    )
    seed: int = Field(0, ge=0, description="Seeds weights, shuffling and augmentation.")
    shuffle_buffer: int = Field(10_000, ge=0, description="Examples in the shuffle buffer; 0: no shuffle.")
    augment: bool | list[str | dict[str, float | None]] = Field(
        False,
        description="Keras preprocessing layers on training images: true (flip, rotation, zoom, contrast), or a "
        f"list of {list(AUGMENT_LAYERS)}, each alone or with its setting ({{rotation: 0.2}}).",
    )
    cache_features: bool = Field(
        True,
        description="With a frozen base and no augmentation, run the frozen base over each split once and "
        "train the head on its stored features (float16) instead of running the base in every epoch; the "
        "saved model is still base + head. Fine-tuning trains on images.",
    )
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = Field(
        "float32",
        description="Keras dtype policy while training; the output layer stays float32. mixed_float16 pays "
        "on GPUs with tensor cores, mixed_bfloat16 on TPUs and recent GPUs and CPUs (benchmarks/RESULTS.md).",
    )
    jit_compile: bool | Literal["auto"] = Field(
        "auto",
        description="XLA-compile training steps. auto (Keras' rule): on when a GPU is present, off on CPUs only, "
        "where XLA made convflow's CNNs slower (benchmarks/RESULTS.md).",
    )
    deterministic: bool = Field(False, description="Deterministic TF ops: identical weights on CPU.")
    checkpoint_seconds: float = Field(
        10.0,
        ge=0,
        description="Checkpoint at the end of an epoch once this many seconds of training have passed since "
        "the last checkpoint (0: every epoch). A crash loses at most about this much training; short epochs "
        "do not pay a checkpoint each.",
    )
    steps_per_execution: int = Field(
        32,
        ge=1,
        description="Training steps run per call into TensorFlow (Keras' steps_per_execution; at most one "
        "epoch's): fewer Python round trips between steps, so faster epochs. Batch-level callbacks see every "
        "Nth batch. 1 when training on several GPUs, where Keras' multi-step loop fails (keras-team/keras#19246).",
    )

    work_pool: SafeName | None = Field(
        None,
        description="Train on this Prefect work pool's workers (`convflow worker --pool NAME`), as a flow run "
        "of its own; unset: in the flow's process. Needs PREFECT_API_URL and an artifacts root that every "
        "worker mounts at the same path.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="With work_pool: training runs started in all when a worker is lost (its run Crashed); "
        "each resumes from the last checkpoint.",
    )

    # Where and how training runs and how often it checkpoints change no weight: left out of cache
    # keys and the config hash, so moving training to a GPU pool reuses cached results.
    EXECUTION_ONLY: ClassVar[frozenset[str]] = frozenset({"checkpoint_seconds", "work_pool", "max_attempts"})
    # Recipe settings added after models were in production: hashed only when set, so a pipeline that
    # does not use them keeps its config hash (and is not retrained for the upgrade alone).
    HASHED_WHEN_SET: ClassVar[frozenset[str]] = frozenset(
        {"weight_decay", "schedule", "label_smoothing", "class_weight", "early_stopping"}
    )

    @field_validator("augment")
    @classmethod
    def _known_augmentations(cls, augment: bool | list) -> bool | list:
        return _augment_steps(augment)

    @field_validator("weight_decay")
    @classmethod
    def _weight_decay_applies(cls, weight_decay: float | None, info: ValidationInfo) -> float | None:
        optimizer = info.data.get("optimizer")
        if weight_decay is not None and optimizer != "adamw":
            raise ValueError(f"applies to optimizer adamw, not {optimizer}")
        return weight_decay

    @property
    def augment_steps(self) -> list[dict[str, float | None]]:
        """The augmentation layers as {name: setting}; none when augment is false."""
        if self.augment is True:
            return _augment_steps(list(DEFAULT_AUGMENT))
        return self.augment or []

    @property
    def mixes_labels(self) -> bool:
        """MixUp and CutMix blend two images' labels: training then needs one-hot labels."""
        return any(name in ("mixup", "cutmix") for step in self.augment_steps for name in step)


class EvaluateConfig(StrictModel):
    min_accuracy: float = Field(0.0, ge=0, le=1, description="The gate: lowest test accuracy promoted.")
    max_regression: float = Field(
        0.0, ge=0, le=1, description="The gate: how far below production's test accuracy a model may be."
    )
    top_k: int = Field(5, ge=1, description="k of the top-k accuracy.")
    min_class_recall: float | None = Field(
        None, ge=0, le=1, description="The gate: lowest recall of any one class on the test split (unset: not held)."
    )
    max_class_regression: float | None = Field(
        None,
        ge=0,
        le=1,
        description="The gate: how far below production's recall of a class, on the same test split, the model's "
        "may be (unset: not held). A model better overall can still lose one class.",
    )

    # Left out of the config hash while unset, so that pipelines written before them keep their hash.
    HASHED_WHEN_SET: ClassVar[frozenset[str]] = frozenset({"min_class_recall", "max_class_regression"})


class ScheduleConfig(StrictModel):
    cron: str | None = Field(None, description="Cron expression, e.g. '0 3 * * 1'.")
    interval: int | None = Field(None, ge=60, description="Seconds between runs, counted from 2000-01-01 00:00.")
    timezone: str = Field("UTC", description="IANA time zone of the cron times and the interval's start.")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, cron: str | None) -> str | None:
        if cron is not None and len(cron.split()) != 5:
            raise ValueError("must have 5 fields: minute hour day-of-month month day-of-week")
        return cron

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, timezone: str) -> str:
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone; use an IANA name such as UTC or Europe/Berlin") from None
        return timezone

    @model_validator(mode="after")
    def _exactly_one(self) -> ScheduleConfig:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("give exactly one of cron or interval")
        return self


class ScoreConfig(StrictModel):
    """Scheduled scoring: the production model scores what it has not scored yet, into a
    partitioned Parquet table (`convflow-score/<pipeline>`, served or deployed like training)."""

    input: list[str] = Field(min_length=1, description="Image files, folders, globs or Parquet tables to score.")
    output: str = Field(description="Folder of the predictions table, partitioned by scored_date=YYYY-MM-DD.")
    schedule: ScheduleConfig | None = Field(None, description="When scoring runs.")
    on_promotion: bool = Field(
        False,
        description="Score as soon as a new model of the pipeline is promoted (its convflow.model.promoted event), "
        "not at the next scheduled time.",
    )

    @model_validator(mode="after")
    def _runs_sometime(self) -> ScoreConfig:
        if self.schedule is None and not self.on_promotion:
            raise ValueError("give a schedule, on_promotion: true, or both")
        return self

    @field_validator("input")
    @classmethod
    def _resolve_inputs(cls, inputs: list[str], info: ValidationInfo) -> list[str]:
        return [_resolve(item, info) for item in inputs]

    @field_validator("output")
    @classmethod
    def _resolve_output(cls, output: str, info: ValidationInfo) -> str:
        return _resolve(output, info)


class WatchConfig(StrictModel):
    """A scheduled flow (`convflow-watch/<pipeline>`) that lists the source, opening no image, and
    emits convflow.data.landed when the listing changed since the last it reported."""

    # The sources with files to list; the others (sklearn:, tfds:) change only with their library.
    LISTED_SCHEMES: ClassVar[tuple[str, ...]] = ("folder", "idx", "parquet")

    interval: int = Field(ge=5, description="Seconds between the watch's runs.")
    settle: float = Field(
        10,
        ge=0,
        description="Seconds a changed listing must stay the same before the event, so that a copy in "
        "progress is reported once, whole.",
    )


class OnDataConfig(StrictModel):
    """Retrain when data lands: convflow.data.landed events about the pipeline (from its watch,
    `convflow notify`, or a POST to the server's events endpoint) start its training deployment."""

    within: int = Field(
        300,
        ge=1,
        description="Seconds after an event in which further events start no other run: one run per burst.",
    )
    delay: int = Field(
        0, ge=0, description="Seconds between the first event and the run it starts (a burst's files all land)."
    )
    watch: WatchConfig | None = Field(None, description="List the source on a schedule and emit when it changed.")


class VariantConfig(StrictModel):
    """One variant of a comparison: overrides deep-merged over its pipeline, validated as a pipeline
    when the comparison runs (a variant whose merged config is invalid fails alone)."""

    name: SafeName = Field(description="Names the variant in the report and its run id.")
    model: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the pipeline's model section; naming another base drops the pipeline's "
        "base-specific settings (ModelConfig.BASE_SPECIFIC) the variant does not set.",
    )
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the pipeline's train section.")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="Overrides of the pipeline's evaluate section.")


class CompareConfig(StrictModel):
    """`convflow compare`: the pipeline's variants side by side on shared data stages."""

    variants: list[VariantConfig] = Field(min_length=2, description="The variants; data stages are shared.")
    metric: Literal["test_accuracy", "test_loss", "macro_f1", "latency_ms"] = Field(
        "test_accuracy", description="Ranks the variants: accuracy and F1 higher, loss and latency lower is better."
    )
    promote: Literal["best", "none"] = Field(
        "none", description="best: the winner alone goes through the gate and may be promoted; none: nothing is."
    )
    runner: Literal["sequential", "threads", "dask"] = Field(
        "sequential",
        description="sequential: one variant at a time in the flow's process; threads: at once in its threads "
        "(they share TensorFlow's global random state, so initial weights are not reproducible); dask: at once "
        "in the worker processes of a local Dask cluster (needs convflow[dask]).",
    )
    workers: int | None = Field(
        None, ge=1, description="threads: variants at a time; dask: worker processes; default: one per variant."
    )

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, variants: list[VariantConfig]) -> list[VariantConfig]:
        names = [variant.name for variant in variants]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"variant names must be unique; repeated: {repeated}")
        return variants


class SearchRange(StrictModel):
    """One tuned setting's candidates: `values`, or a range from min to max (log-spaced with log: true,
    on a grid with step)."""

    values: list[float] | None = Field(None, min_length=1, description="The candidates, tried as given.")
    min: float | None = Field(None, description="Lowest value of a range.")
    max: float | None = Field(None, description="Highest value of a range.")
    log: bool = Field(False, description="Sample the range on a log scale (learning rates).")
    step: float | None = Field(None, gt=0, description="Grid step of the range.")

    @model_validator(mode="after")
    def _values_or_range(self) -> SearchRange:
        if (self.values is None) == (self.min is None or self.max is None):
            raise ValueError("give either values or both min and max")
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise ValueError(f"min {self.min:g} must be below max {self.max:g}")
        if self.log and (self.min or 0) <= 0:
            raise ValueError("a log range needs min > 0")
        return self


class TuneConfig(StrictModel):
    """`convflow tune`: a KerasTuner search over named settings, scored on the validation split only;
    the best setting then trains the final model through the usual gate. `convflow run` ignores it."""

    # What each tunable name sets, and the bounds of its values.
    SETTINGS: ClassVar[dict[str, tuple[str, float, float]]] = {
        "learning_rate": ("train.learning_rate", 1e-7, 1.0),
        "dropout": ("model.dropout", 0.0, 0.95),
        "batch_size": ("train.batch_size", 1, 65536),
        "unfreeze_top": ("model.fine_tune.unfreeze_top", 1, 10_000),
        "augment_strength": ("train.augment (each setting times it)", 0.01, 10.0),
    }
    INTEGER_SETTINGS: ClassVar[frozenset[str]] = frozenset({"batch_size", "unfreeze_top"})

    algorithm: Literal["random", "hyperband"] = Field(
        "random",
        description="random: KerasTuner's random search; hyperband: many short trials, the best trained longer.",
    )
    max_trials: int = Field(10, ge=1, description="Trials in all (Hyperband may stop sooner).")
    objective: Literal["val_accuracy", "val_loss"] = Field(
        "val_accuracy", description="Validation metric that ranks trials (the test split stays for the gate)."
    )
    epochs: int | None = Field(None, ge=1, description="Epochs per trial (Hyperband's most); default train.epochs.")
    seed: int = Field(0, ge=0, description="Seeds the search.")
    space: dict[str, SearchRange] = Field(min_length=1, description=f"Settings to search: any of {list(SETTINGS)}.")

    @field_validator("space")
    @classmethod
    def _known_settings(cls, space: dict[str, SearchRange]) -> dict[str, SearchRange]:
        for name, candidates in space.items():
            if name not in cls.SETTINGS:
                raise ValueError(f"unknown setting {name!r}; expected any of {list(cls.SETTINGS)}")
            _, low, high = cls.SETTINGS[name]
            values = candidates.values or [candidates.min, candidates.max]
            if not all(low <= value <= high for value in values):
                raise ValueError(f"{name}: {values} must lie within {low:g} and {high:g}")
            if name in cls.INTEGER_SETTINGS and not all(float(value).is_integer() for value in values):
                raise ValueError(f"{name}: {values} must be whole numbers")
        return space


class PipelineSpec(StrictModel):
    # `validate` is a field of pydantic's BaseModel, so the section is the field validate_ under the
    # alias validate; by name too, so that a spec dumped by name (a task's parameters) reads back.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: SafeName = Field(description="The pipeline's key under `pipelines:`; it names its artifacts folder.")
    data: DataConfig = Field(description="Where the images come from, the size the model sees, and the splits.")
    model: ModelConfig = Field(description="The base network, its weights, and the head put on it.")
    train: TrainConfig = Field(TrainConfig(), description="How the model is trained, and where.")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description="The gate a model must pass to be promoted.")
    validate_: ValidateConfig = Field(
        ValidateConfig(),
        alias="validate",
        description="The data checks between to_tfrecords and training, against the production model's data; "
        "each blocks, warns or is off.",
    )
    schedule: ScheduleConfig | None = Field(None, description="When `convflow serve` or `deploy` retrains it.")
    retrain: Literal["on_change", "always"] = Field(
        "on_change",
        description="Scheduled runs: on_change trains only when the data fingerprint or config differs from "
        "the production model's; always trains every time. `convflow run` always runs the stages.",
    )
    on_data: OnDataConfig | None = Field(
        None, description="Retrain when data lands (Prefect events), besides or instead of the schedule."
    )
    compare: CompareConfig | None = Field(None, description="Variants that `convflow compare` runs side by side.")
    score: ScoreConfig | None = Field(
        None, description="Scoring with the production model, on a schedule or when a model is promoted."
    )
    tune: TuneConfig | None = Field(None, description="A search over settings that `convflow tune` runs.")

    @model_validator(mode="after")
    def _fits_base(self) -> PipelineSpec:
        spec = get_base_spec(self.model.base)
        if min(self.data.image_size) < spec.min_size:
            raise ValueError(
                f"data.image_size {list(self.data.image_size)} is below {self.model.base}'s minimum "
                f"of {spec.min_size}x{spec.min_size}"
            )
        if self.model.weights == "imagenet" and spec.kind == "seed":
            raise ValueError(
                f"model.weights imagenet exists only for tf.keras.applications bases, not {self.model.base!r}"
            )
        if self.model.weights == "imagenet" and self.data.channels != spec.imagenet_channels:
            raise ValueError(
                f"data.channels {self.data.channels} does not match imagenet weights, "
                f"which take {spec.imagenet_channels} channels"
            )
        if spec.kind == "application" and self.data.channels != 3:
            raise ValueError(
                f"data.channels {self.data.channels}: {self.model.base} takes RGB images; set data.channels: 3"
            )
        return self

    @model_validator(mode="after")
    def _validation_split_when_watched(self) -> PipelineSpec:
        watched = [
            name
            for name, on in (
                ("train.early_stopping", self.train.early_stopping is not None),
                ("train.schedule reduce_on_plateau", self.train.schedule.kind == "reduce_on_plateau"),
            )
            if on
        ]
        # tfds sources bring their own validation split or carve one out of train
        if watched and self.data.split.validation == 0 and self.data.scheme != "tfds":
            raise ValueError(f"{' and '.join(watched)} watch the validation split: set data.split.validation > 0")
        return self

    @model_validator(mode="after")
    def _tuned_settings_apply(self) -> PipelineSpec:
        space = self.tune.space if self.tune else {}
        if "unfreeze_top" in space and (self.model.fine_tune is None or self.model.fine_tune.unfreeze_top is None):
            raise ValueError(
                "tune.space.unfreeze_top tunes model.fine_tune.unfreeze_top: add a fine_tune section that sets it"
            )
        if "augment_strength" in space and not self.train.augment:
            raise ValueError("tune.space.augment_strength scales train.augment: turn augmentation on")
        if self.tune and self.data.split.validation == 0 and self.data.scheme != "tfds":
            raise ValueError("tune scores trials on the validation split: set data.split.validation > 0")
        return self

    @model_validator(mode="after")
    def _watch_has_files(self) -> PipelineSpec:
        if self.on_data and self.on_data.watch and self.data.scheme not in WatchConfig.LISTED_SCHEMES:
            raise ValueError(
                f"on_data.watch lists the source's files; {self.data.source} has none: "
                "drop the watch and send `convflow notify` instead"
            )
        return self

    @model_validator(mode="after")
    def _mixing_needs_softmax(self) -> PipelineSpec:
        if self.train.mixes_labels and self.model.binary_head:
            raise ValueError("train.augment mixup and cutmix blend one-hot labels: set model.binary_head: false")
        return self

    def config_hash(self) -> str:
        """Hash of everything that shapes the model; the schedule, retraining policy and how the
        data stages run or store their files are left out."""
        payload = self.model_dump(
            mode="json",
            exclude={
                "schedule": True,
                "name": True,
                "retrain": True,
                "on_data": True,
                "compare": True,
                "score": True,
                "tune": True,
                "validate_": True,
                "data": {*DataConfig.EXECUTION_ONLY, "compression"},
                "train": set(TrainConfig.EXECUTION_ONLY),
            },
        )
        for section, model in (("train", TrainConfig), ("evaluate", EvaluateConfig)):
            defaults = model().model_dump(mode="json")
            for name in model.HASHED_WHEN_SET:
                if payload[section][name] == defaults[name]:
                    del payload[section][name]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _resolve(path: str, info: ValidationInfo) -> str:
    if "://" in path:  # a URL (score.output on object storage): not a path to resolve
        return path
    base_dir = (info.context or {}).get("base_dir")
    resolved = Path(path).expanduser()
    if base_dir is not None and not resolved.is_absolute():
        resolved = Path(base_dir) / resolved
    return str(resolved.resolve()) if base_dir is not None else str(resolved)
