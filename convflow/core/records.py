"""The typed records that stages pass to each other: small, frozen, and pointing at files."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic
from pydantic import ConfigDict, Field

from convflow.core.object_store import is_remote, outermost, store_containing
from convflow.core.skips import skipped_summary


class StageRecord(pydantic.BaseModel):
    """A stage's output: the folder it wrote and the files a later stage will open.

    `file_sizes` snapshots every required file (all files under a required folder) when the
    record is made, so a cache hit can tell a deleted or truncated file from an intact one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_dir: str = Field(description="The stage's folder under artifacts/<pipeline>/<run-id>/.")
    file_sizes: dict[str, int] = Field(default_factory=dict, description="Bytes of each output file.")

    @pydantic.model_validator(mode="after")
    def _snapshot_sizes(self) -> StageRecord:
        if not self.file_sizes:
            object.__setattr__(self, "file_sizes", _sizes(self.required_files()))
        return self

    def required_files(self) -> list[str]:
        """Files (or folders) that must exist for this record to be usable."""
        return [self.output_dir]

    def damaged_files(self) -> list[str]:
        """Output files that are gone or changed size since the stage wrote them, with why."""
        if is_remote(self.output_dir):
            return self._damaged_in_store()
        problems = [f"{path}: missing" for path in self.required_files() if not Path(path).exists()]
        for path, size in self.file_sizes.items():
            file = Path(path)
            if not file.exists():
                problems.append(f"{path}: missing")
            elif file.stat().st_size != size:
                problems.append(f"{path}: {file.stat().st_size} bytes, written as {size}")
        return sorted(set(problems))

    def _damaged_in_store(self) -> list[str]:
        """damaged_files for a record whose files are on object storage: one listing of its folder
        (and of the folder of each required file outside it), not one request per file."""
        store = store_containing(self.output_dir)
        required = self.required_files()
        folders = outermost([self.output_dir, *(path.rsplit("/", 1)[0] for path in required)])
        stored = {url: size for folder in folders for url, size in store.sizes(folder).items()}
        held = {parent for url in stored for parent in _parents(url)}
        problems = [f"{path}: missing" for path in required if path not in stored and path not in held]
        for path, size in self.file_sizes.items():
            if path not in stored:
                problems.append(f"{path}: missing")
            elif stored[path] != size:
                problems.append(f"{path}: {stored[path]} bytes, written as {size}")
        return sorted(set(problems))

    def log_line(self) -> str:
        """What the stage made, in one line for the run's log (the Prefect UI's Logs tab)."""
        return f"wrote {self.output_dir}"


def _parents(url: str) -> list[str]:
    parts = url.split("/")
    return ["/".join(parts[:end]) for end in range(1, len(parts))]


def _sizes(paths: list[str]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        sizes.update({str(file): file.stat().st_size for file in files})
    return sizes


class SplitSet(StageRecord):
    """download_and_split: the examples, their labels and the split each one belongs to."""

    splits_parquet: str
    images_npy: str | None = Field(None, description="uint8 images for in-memory sources.")
    label_names: list[str]
    counts: dict[str, int] = Field(description="Examples per split.")
    data_fingerprint: str = Field(description="Hash over example hashes, labels and splits.")
    skipped: list[str] = Field(default_factory=list, description="Unusable source files, with why.")
    duplicates: int = Field(0, description="Examples whose bytes equal an earlier example's.")
    duplicates_across_splits: int = Field(0, description="Distinct images present in more than one split.")

    def required_files(self) -> list[str]:
        return [self.splits_parquet, *([self.images_npy] if self.images_npy else [])]

    def log_line(self) -> str:
        splits = ", ".join(f"{split} {count:,}" for split, count in self.counts.items())
        line = f"{sum(self.counts.values()):,} examples in {len(self.label_names)} classes ({splits})"
        return line + (f"; {skipped_summary(self.skipped)}" if self.skipped else "")


class TFRecordSet(StageRecord):
    """to_tfrecords: sharded TFRecords per split, images at the model's size (raw uint8, JPEG or PNG)."""

    shards: dict[str, list[str]] = Field(description="Shard paths per split.")
    compression: str = Field("none", description="data.compression they were written with: none | gzip.")
    record_format: str = Field(
        "raw", description="How records hold images: raw | jpeg | png (data.record_format, auto resolved)."
    )
    counts: dict[str, int]
    image_size: tuple[int, int]
    channels: int
    label_names: list[str]
    data_fingerprint: str
    fingerprint: str = Field(
        description="Hash over the shards' contents (each shard: the sha256 of its parts' sha256s)."
    )
    image_properties: str | None = Field(
        None, description="image_properties.parquet: each image's properties for the data checks, measured as decoded."
    )

    def shard_files(self) -> list[str]:
        return [path for paths in self.shards.values() for path in paths]

    def required_files(self) -> list[str]:
        return self.shard_files() + ([self.image_properties] if self.image_properties else [])

    def log_line(self) -> str:
        shards = sum(len(paths) for paths in self.shards.values())
        height, width = self.image_size
        return (
            f"{shards} shards, {sum(self.file_sizes.values()) / 1e6:.1f} MB of {height}x{width}x{self.channels} "
            f"images ({self.record_format} records, {self.compression} compression) in {self.output_dir}"
        )


class DataChecks(StageRecord):
    """check_data: every data check's figure, this run's data against the production model's, and
    the verdict."""

    results_parquet: str = Field(description="checks.parquet: a row per check and subject (CHECK_RESULTS_SCHEMA).")
    report_html: str = Field(description="checks.html: the figures, offending files and their thumbnails.")
    verdict: Literal["pass", "warn", "block"]
    reasons: list[str] = Field(description="Each result that did not pass, in words, blocks first.")
    baseline_version: int | None = Field(
        description="The production version whose data this run's was compared with; None before a first promotion."
    )
    checks: int = Field(description="Result rows, passing or not.")

    def required_files(self) -> list[str]:
        return [self.results_parquet, self.report_html]

    def blocking(self) -> list[str]:
        """The reasons of the results that block, without their "block: " prefix."""
        return [reason.removeprefix("block: ") for reason in self.reasons if reason.startswith("block: ")]

    def log_line(self) -> str:
        against = f"production version {self.baseline_version}" if self.baseline_version else "no production yet"
        line = f"data checks against {against}: {self.verdict} ({self.checks} figures)"
        return line + "".join(f"\n  {reason}" for reason in self.reasons[:10])


class Decision(pydantic.BaseModel):
    """A person's answer to a blocked run under `validate.on_block: ask` (or its absence: timed out)."""

    model_config = ConfigDict(frozen=True)

    about: Literal["data checks", "model gate"] = Field(description="What blocked the run: its data or its model.")
    approved: bool
    reason: str = Field(description="The person's reason, or why there is none (no decision in time).")
    timed_out: bool = False

    def line(self) -> str:
        if self.timed_out:
            return f"{self.about}: {self.reason}"
        verdict = "approved" if self.approved else "rejected"
        return f"{self.about} {verdict} by a person: {self.reason}"


class BaseNetwork(StageRecord):
    """build_base: the base network, saved as a .keras file."""

    model_path: str
    base: str
    input_shape: tuple[int, int, int]
    pretrained: bool
    fingerprint: str

    def required_files(self) -> list[str]:
        return [self.model_path]

    def log_line(self) -> str:
        weights = "pretrained weights" if self.pretrained else "random weights"
        return f"{self.base} for {'x'.join(map(str, self.input_shape))} inputs, {weights}"


class WrappedModel(StageRecord):
    """freeze_and_wrap: base (frozen when pretrained) + pooling + dropout + dense head, untrained."""

    model_path: str
    base_frozen: bool
    trainable_params: int
    total_params: int
    fingerprint: str
    features_fingerprint: str = Field(
        "", description="Hash of what the frozen front (base + pooling) computes: keys its cached features."
    )

    def required_files(self) -> list[str]:
        return [self.model_path]

    def log_line(self) -> str:
        frozen = "frozen base" if self.base_frozen else "trainable base"
        return f"{frozen} + head: {self.trainable_params:,} of {self.total_params:,} parameters trainable"


class TrainedModel(StageRecord):
    """train: the trained Keras model and its per-epoch history."""

    model_path: str
    history_parquet: str
    model_summary_parquet: str
    augmentation_npy: str | None = Field(None, description="Training images and augmented versions.")
    epochs: int
    resumed_from_epoch: int = Field(0, description="Epochs restored from a checkpoint, not retrained.")
    train_seconds: float = Field(description="Wall seconds of the train stage's work: loading, fitting, saving.")
    images_per_second: float = Field(description="Training images per second of model.fit (validation included).")
    fingerprint: str
    host: str = Field("", description="Host name of the machine that trained (the last attempt's, on a work pool).")
    pid: int = Field(0, description="Process id that trained (the flow's, or a work-pool worker's flow run's).")
    head_trained_on: Literal["images", "cached features"] = Field(
        "images",
        description="What the head phase fed: images through the whole model, or the frozen base's cached features.",
    )
    precision: str = Field("float32", description="train.precision: the Keras dtype policy it trained under.")
    replicas: int = Field(
        1, description="Devices that trained in step (MirroredStrategy), each on train.batch_size examples."
    )
    tensorboard_dir: str | None = Field(
        None, description="TensorBoard event files of this training (`tensorboard --logdir`)."
    )
    schedule: str = Field("constant", description="train.schedule in words.")
    best_epoch: int | None = Field(
        None, description="train.early_stopping: the epoch whose weights were kept (1-based)."
    )
    stopped_epoch: int | None = Field(
        None, description="train.early_stopping: the epoch it stopped after; None: ran all."
    )

    def required_files(self) -> list[str]:
        return [self.model_path, self.history_parquet, self.model_summary_parquet]

    def log_line(self) -> str:
        resumed = f", resumed after epoch {self.resumed_from_epoch}" if self.resumed_from_epoch else ""
        fed = "the head on cached features" if self.head_trained_on == "cached features" else "on images"
        return (
            f"{self.epochs} epochs in {self.train_seconds:.1f} s ({self.images_per_second:,.0f} images/s), {fed}, "
            f"{self.precision}, {self.replicas} replica(s) on {self.host}{resumed}"
        )


class Evaluation(StageRecord):
    """evaluate: test-split metrics, predictions and the gate's verdict."""

    metrics_parquet: str
    predictions_parquet: str
    confusion_json: str
    samples_npz: str = Field(description="Sample test images and worst mistakes for the report.")
    test_accuracy: float
    test_loss: float
    passed_gate: bool
    gate_reason: str
    production_version: int | None = Field(None, description="The production model compared against.")
    production_accuracy: float | None = Field(None, description="Its accuracy on the same test split.")
    class_recalls: dict[str, float] = Field(default_factory=dict, description="Each class's recall on the test split.")
    production_class_recalls: dict[str, float] | None = Field(
        None, description="The production model's recall of each class on the same test split."
    )
    model_checks_parquet: str = Field(
        description="model_checks.parquet: the gate's figures, a row per check and subject (CHECK_RESULTS_SCHEMA)."
    )
    reference_accuracy: float | None = Field(
        None, description="The model's accuracy on production's reference set (its own test split)."
    )
    production_reference_accuracy: float | None = Field(
        None, description="The production model's accuracy on its reference set, scored now."
    )
    reference_examples: int | None = Field(
        None,
        description="Reference examples scored: of a class the model knows, not in its train or validation split.",
    )
    embedding_drift_p_value: float | None = Field(
        None,
        description="Permutation p-value of the MMD² between production's embeddings of this test split and of "
        "its reference set; None when not checked.",
    )
    embedding_drift_mmd2: float | None = Field(None, description="That MMD² (RBF kernel, median-distance bandwidth).")

    def required_files(self) -> list[str]:
        return [
            self.metrics_parquet,
            self.predictions_parquet,
            self.confusion_json,
            self.samples_npz,
            self.model_checks_parquet,
        ]

    def log_line(self) -> str:
        verdict = "passed" if self.passed_gate else "failed"
        return (
            f"test accuracy {self.test_accuracy:.4f}, loss {self.test_loss:.4f}; the gate {verdict}: {self.gate_reason}"
        )


class ExportedModel(StageRecord):
    """export_savedmodel: a TF-Serving layout <name>/<version>/ whose signature takes raw images."""

    saved_model: str
    max_abs_difference: float = Field(description="SavedModel vs Keras probabilities on the test split.")
    promoted_version: int | None = Field(None, description="Registry version, when the gate passed.")

    def required_files(self) -> list[str]:
        return [self.saved_model]

    def log_line(self) -> str:
        version = Path(self.saved_model).name
        return (
            f"SavedModel version {version} at {self.saved_model} (largest difference from Keras "
            f"{self.max_abs_difference:.1e})"
        )


class Report(StageRecord):
    """write_report: one self-contained HTML page."""

    report_html: str

    def required_files(self) -> list[str]:
        return [self.report_html]

    def log_line(self) -> str:
        return f"report at {self.report_html}"


class StageRun(pydantic.BaseModel):
    """How one stage went in one run."""

    name: str
    seconds: float
    cached: bool
    cache_key: str | None = None


class RunSummary(pydantic.BaseModel):
    """What `convflow run` reports; also the source of the run's row in runs.parquet."""

    pipeline: str
    run_id: str
    status: str
    started: str
    config_hash: str
    data_fingerprint: str
    test_accuracy: float | None = Field(description="None for a run blocked before training with no production model.")
    passed_gate: bool | None = Field(description="None for a scheduled run that trained nothing (unchanged).")
    gate_reason: str
    model: str | None = Field(description="Unchanged and blocked runs: production's model (None if there is none).")
    saved_model: str | None
    report: str | None = Field(description="None for a scheduled run that trained nothing (unchanged).")
    resumed_from_epoch: int
    promoted_version: int | None = None
    stages: list[StageRun]
