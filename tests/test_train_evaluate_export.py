"""Stages 5-7, train, evaluate and export_savedmodel, on the session's 12x12 digits TFRecords."""

from __future__ import annotations

import json
import math
import re
import subprocess
import textwrap
from pathlib import Path

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FOLDER_SPLIT, PYTHON, REPO, data_config, subprocess_env
from convflow.catalog import registry, schemas
from convflow.catalog.registry import Production
from convflow.checks.config import EmbeddingDriftConfig
from convflow.checks.schemas import CHECK_RESULTS_SCHEMA
from convflow.config.schema import EvaluateConfig, ModelConfig, TrainConfig
from convflow.modeling.classifier import load_classifier, predict_split, probabilities_from_logits, serve_split
from convflow.modeling.export_check import FRESH_PROCESS, ExportMismatch, FreshProcessCheck, verify_saved_model
from convflow.modeling.serving import serving_function
from convflow.runtime import process_caches
from convflow.tasks.build_base import build_base_model
from convflow.tasks.download_and_split import split_dataset
from convflow.tasks.evaluate import evaluate_model
from convflow.tasks.export_savedmodel import MODEL_VERSION, export_model
from convflow.tasks.freeze_and_wrap import freeze_and_wrap_model
from convflow.tasks.to_tfrecords import write_tfrecords
from convflow.tasks.train import checkpoint_key, train_model
from convflow.tfrecords.spec import shard_name
from convflow.tfrecords.writer import ShardFile, encode_example


def assert_schema(actual: pa.Schema, expected: pa.Schema) -> None:
    """Names, types, nullability and descriptions; Parquet renames a list's child field, so
    list types are compared by their value type."""
    assert actual.names == expected.names
    for got, want in zip(actual, expected):
        if pa.types.is_list(want.type):
            assert pa.types.is_list(got.type) and got.type.value_type == want.type.value_type, got
        else:
            assert got.type == want.type, got
        assert got.nullable == want.nullable, got
        assert got.metadata == want.metadata, got


@pytest.fixture(scope="module")
def digits_evaluation(tmp_path_factory, digits_trained, digits_tfrecords):
    return evaluate_model(
        digits_trained,
        digits_tfrecords,
        EvaluateConfig(min_accuracy=0.5, top_k=3),
        tmp_path_factory.mktemp("digits-eval") / "evaluate",
    )


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory, digits_trained, digits_tfrecords):
    return export_model(digits_trained, digits_tfrecords, "digits", tmp_path_factory.mktemp("digits-export") / "export")


# ----------------------------------------------------------------------------- train


def test_train_writes_model_and_history(digits_trained, digits_wrapped, digits_train_config, digits_tfrecords):
    history = pq.read_table(digits_trained.history_parquet)

    assert_schema(history.schema, schemas.HISTORY_SCHEMA)
    rows = history.to_pylist()
    assert [row["epoch"] for row in rows] == [1, 2]  # one row per epoch
    for row in rows:
        assert math.isfinite(row["loss"]) and 0 <= row["accuracy"] <= 1
        assert row["val_loss"] is not None and 0 <= row["val_accuracy"] <= 1  # digits has a validation split
        assert row["seconds"] > 0
    assert rows[1]["loss"] < rows[0]["loss"]
    assert digits_trained.epochs == 2 and digits_trained.resumed_from_epoch == 0
    assert digits_trained.images_per_second > 0
    # the fingerprint is the checkpoint key: the same model, data and settings resume the same training
    assert digits_trained.fingerprint == checkpoint_key(digits_wrapped, digits_tfrecords, digits_train_config)
    model = keras.models.load_model(digits_trained.model_path, compile=False)
    assert model.output_shape == (None, 10)


def test_training_removes_its_checkpoints(tmp_path, digits_wrapped, digits_tfrecords):
    checkpoint_dir = tmp_path / "checkpoint"
    trained = train_model(
        digits_wrapped, digits_tfrecords, TrainConfig(epochs=1, batch_size=256), checkpoint_dir, tmp_path / "train"
    )
    assert not checkpoint_dir.exists()
    assert trained.damaged_files() == []
    assert pq.read_table(trained.history_parquet).column("epoch").to_pylist() == [1]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["train"]


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import keras

    from convflow.config.schema import TrainConfig
    from convflow.core.records import TFRecordSet, WrappedModel
    from convflow.tasks.train import train_model

    CRASH_AT = int(sys.argv[2])

    class CrashingBackup(keras.callbacks.BackupAndRestore):
        # The worker dies at the start of epoch CRASH_AT (0-based), after every callback of the
        # previous epoch ran: no exception handler, no clean-up, like a lost machine.
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == CRASH_AT:
                os._exit(17)
            super().on_epoch_begin(epoch, logs)

    keras.callbacks.BackupAndRestore = CrashingBackup
    args = json.loads(Path(sys.argv[1]).read_text())
    train_model(
        WrappedModel(**args["wrapped"]), TFRecordSet(**args["tfrecords"]), TrainConfig(**args["train"]),
        Path(args["checkpoint_dir"]), Path(args["output_dir"]),
    )
    """
)


def _crash_during_training(tmp_path, digits_wrapped, digits_tfrecords, train, crash_at_epoch: int):
    """train_model in a process that dies at the start of epoch `crash_at_epoch` (0-based)."""
    checkpoint_dir, output_dir = tmp_path / "checkpoint", tmp_path / "train"
    arguments = tmp_path / "arguments.json"
    arguments.write_text(
        json.dumps(
            {
                "wrapped": digits_wrapped.model_dump(),
                "tfrecords": digits_tfrecords.model_dump(),
                "train": train.model_dump(),
                "checkpoint_dir": str(checkpoint_dir),
                "output_dir": str(output_dir),
            }
        )
    )
    script = tmp_path / "crash.py"
    script.write_text(RESUME_SCRIPT)
    crashed = subprocess.run(
        [PYTHON, str(script), str(arguments), str(crash_at_epoch)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
        timeout=300,
    )
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert not output_dir.exists()  # nothing that looks like a finished training
    logged = [json.loads(line)["epoch"] for line in (checkpoint_dir / "history.jsonl").read_text().splitlines()]
    assert logged == list(range(1, crash_at_epoch + 1))
    return checkpoint_dir, output_dir


@pytest.mark.e2e
def test_training_resumes_after_a_crash(tmp_path, digits_wrapped, digits_tfrecords):
    train = TrainConfig(epochs=4, batch_size=128, seed=0, checkpoint_seconds=0)  # a checkpoint every epoch
    checkpoint_dir, output_dir = _crash_during_training(tmp_path, digits_wrapped, digits_tfrecords, train, 2)

    resumed = train_model(digits_wrapped, digits_tfrecords, train, checkpoint_dir, output_dir)

    assert resumed.resumed_from_epoch == 2
    assert resumed.epochs == 4
    history = pq.read_table(resumed.history_parquet).to_pylist()
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    # epoch 3 continued from the restored weights: its loss is far below a fresh model's first epoch
    assert history[2]["loss"] < history[0]["loss"]


@pytest.mark.e2e
def test_epochs_shorter_than_checkpoint_seconds_are_not_checkpointed(tmp_path, digits_wrapped, digits_tfrecords):
    train = TrainConfig(epochs=3, batch_size=128, seed=0, checkpoint_seconds=3600)
    checkpoint_dir, output_dir = _crash_during_training(tmp_path, digits_wrapped, digits_tfrecords, train, 2)
    assert not (checkpoint_dir / "backup").exists()  # two short epochs: no checkpoint written

    resumed = train_model(digits_wrapped, digits_tfrecords, train, checkpoint_dir, output_dir)

    assert resumed.resumed_from_epoch == 0  # the lost epochs are trained again, and logged once each
    assert [row["epoch"] for row in pq.read_table(resumed.history_parquet).to_pylist()] == [1, 2, 3]
    same_but_every_epoch = train.model_copy(update={"checkpoint_seconds": 0})
    assert checkpoint_key(digits_wrapped, digits_tfrecords, same_but_every_epoch) == checkpoint_key(
        digits_wrapped, digits_tfrecords, train
    )  # how often to save is not what is trained
    assert not checkpoint_dir.exists()
    assert keras.models.load_model(resumed.model_path, compile=False).output_shape == (None, 10)


def test_steps_per_execution_runs_one_optimizer_step_per_batch(tmp_path, digits_wrapped, digits_tfrecords):
    # 1,437 training images at batch 128 are 12 steps an epoch: 5 runs 5+5+2 steps per call;
    # 64 is capped at one epoch's 12
    weights = {}
    for steps in (5, 64):
        train = TrainConfig(epochs=2, batch_size=128, seed=0, deterministic=True, steps_per_execution=steps)
        trained = train_model(
            digits_wrapped, digits_tfrecords, train, tmp_path / f"checkpoint-{steps}", tmp_path / f"train-{steps}"
        )
        model = keras.models.load_model(trained.model_path)
        assert int(model.optimizer.iterations.numpy()) == 2 * math.ceil(digits_tfrecords.counts["train"] / 128)
        assert [row["epoch"] for row in pq.read_table(trained.history_parquet).to_pylist()] == [1, 2]
        weights[steps] = [weight.numpy() for weight in model.weights]
    for five, sixty_four in zip(weights[5], weights[64]):
        np.testing.assert_array_equal(five, sixty_four)


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_outputs_agree(digits_evaluation, digits_tfrecords, digits_split):
    predictions = pq.read_table(digits_evaluation.predictions_parquet)
    metrics = pq.read_table(digits_evaluation.metrics_parquet)
    confusion = json.loads(open(digits_evaluation.confusion_json).read())
    assert_schema(predictions.schema, schemas.PREDICTIONS_SCHEMA)
    assert_schema(metrics.schema, schemas.METRICS_SCHEMA)

    rows = predictions.to_pydict()
    labels, predicted = np.asarray(rows["label"]), np.asarray(rows["predicted"])
    probabilities = np.asarray(rows["probabilities"])
    test_count = digits_tfrecords.counts["test"]
    splits = pq.read_table(digits_split.splits_parquet).to_pydict()
    test_ids = {e for e, s in zip(splits["example_id"], splits["split"]) if s == "test"}

    assert len(labels) == test_count and set(rows["example_id"]) == test_ids
    assert probabilities.shape == (test_count, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(predicted, probabilities.argmax(axis=1))
    np.testing.assert_allclose(rows["confidence"], probabilities.max(axis=1))

    accuracy = float(np.mean(predicted == labels))
    by_metric = {(m, c): v for m, c, v in zip(*metrics.to_pydict().values())}
    assert by_metric[("accuracy", None)] == pytest.approx(accuracy)
    assert digits_evaluation.test_accuracy == pytest.approx(accuracy)
    assert digits_evaluation.test_loss == pytest.approx(by_metric[("loss", None)])
    assert by_metric[("loss", None)] == pytest.approx(
        -np.mean(np.log(probabilities[np.arange(test_count), labels])), rel=1e-4
    )
    top3 = np.mean([label in np.argsort(-p)[:3] for label, p in zip(labels, probabilities)])
    assert by_metric[("top_3_accuracy", None)] == pytest.approx(top3)

    matrix = np.asarray(confusion["matrix"])
    assert confusion["labels"] == digits_tfrecords.label_names
    assert matrix.shape == (10, 10) and matrix.sum() == test_count
    assert np.trace(matrix) / test_count == pytest.approx(accuracy)
    for index, name in enumerate(digits_tfrecords.label_names):
        assert by_metric[("support", name)] == matrix[index].sum() == np.sum(labels == index)
        if matrix[:, index].sum():
            assert by_metric[("precision", name)] == pytest.approx(matrix[index, index] / matrix[:, index].sum())
        assert by_metric[("recall", name)] == pytest.approx(matrix[index, index] / max(matrix[index].sum(), 1))

    samples = np.load(digits_evaluation.samples_npz)
    assert samples["sample_images"].shape == (16, 12, 12, 1) and samples["sample_images"].dtype == np.uint8
    wrong = int(np.sum(predicted != labels))
    assert len(samples["mistake_images"]) == min(16, wrong)
    assert np.all(samples["mistake_labels"] != samples["mistake_predicted"])


def test_gate(digits_trained, digits_tfrecords, digits_evaluation, tmp_path):
    assert digits_evaluation.passed_gate is True
    assert "≥ min_accuracy 0.5" in digits_evaluation.gate_reason
    assert digits_evaluation.test_accuracy < 1.0  # two epochs on 12x12 digits are not perfect

    strict = evaluate_model(digits_trained, digits_tfrecords, EvaluateConfig(min_accuracy=1.0), tmp_path / "strict")

    assert strict.passed_gate is False
    assert "min_accuracy 1.0" in strict.gate_reason and "<" in strict.gate_reason
    assert strict.test_accuracy == pytest.approx(digits_evaluation.test_accuracy)


@pytest.mark.xdist_group("digits-export")
def test_gate_against_production(
    digits_trained, digits_wrapped, digits_tfrecords, digits_evaluation, digits_export, tmp_path
):
    """A model worse than production on the same test split is not promoted, whatever min_accuracy says."""
    production = Production(
        pipeline="digits",
        version=1,
        run_id="earlier",
        saved_model=digits_export.saved_model,
        model=digits_trained.model_path,
        test_accuracy=digits_evaluation.test_accuracy,
        promoted_at="2026-01-01T00:00:00+00:00",
    )
    untrained = digits_trained.model_copy(update={"model_path": digits_wrapped.model_path})  # the same net, not trained

    worse = evaluate_model(
        untrained, digits_tfrecords, EvaluateConfig(min_accuracy=0.0), tmp_path / "worse", production
    )
    same = evaluate_model(
        digits_trained, digits_tfrecords, EvaluateConfig(min_accuracy=0.0), tmp_path / "same", production
    )

    # production is scored afresh, through its SavedModel, on this run's test split
    assert worse.production_version == 1
    assert worse.production_accuracy == pytest.approx(
        digits_evaluation.test_accuracy, abs=1 / digits_tfrecords.counts["test"]
    )
    assert worse.test_accuracy < worse.production_accuracy
    assert worse.passed_gate is False and "production v1" in worse.gate_reason
    assert same.passed_gate is True
    # Per class, production's recall on the same split beside the model's: the same model, the same recalls.
    assert same.production_class_recalls == pytest.approx(same.class_recalls, abs=1 / digits_tfrecords.counts["test"])
    assert set(same.class_recalls) == set(digits_tfrecords.label_names)

    # The untrained net loses classes: the per-class gate names them even where accuracy is let through.
    lenient = EvaluateConfig(min_accuracy=0.0, max_regression=1.0, max_class_regression=0.3)
    per_class = evaluate_model(untrained, digits_tfrecords, lenient, tmp_path / "per-class", production)
    production_recalls = per_class.production_class_recalls
    lost = [name for name, recall in per_class.class_recalls.items() if recall < production_recalls[name] - 0.3]
    assert lost and per_class.passed_gate is False
    assert per_class.gate_reason.count("max_class_regression") == len(lost)
    assert all(f"{name} recall" in per_class.gate_reason for name in lost)
    # Each class's row holds both recalls and the floor; a version that kept no reference set has its rows, not run.
    rows = {(row["check"], row["subject"]): row for row in pq.read_table(per_class.model_checks_parquet).to_pylist()}
    assert {
        subject for check, subject in rows if check == "class_recall" and rows[check, subject]["verdict"] == "block"
    }
    assert all(
        rows["class_recall", name]["threshold"] == pytest.approx(production_recalls[name] - 0.3) for name in lost
    )
    assert rows["reference_set", "production v1's test split"]["value"] is None
    assert (
        "not run: production v1 was promoted before reference sets were kept"
        in rows["embedding_drift", "production v1's embeddings"]["detail"]
    )
    assert per_class.reference_accuracy is None and per_class.embedding_drift_p_value is None


def _with_test_split(tfrecords, images: np.ndarray, labels: np.ndarray, ids: list[str], folder: Path):
    """`tfrecords` with its test split replaced by `images` filed under `labels` (raw records)."""
    folder.mkdir(parents=True)
    shard = folder / shard_name("test", 0, 1, len(labels), "raw", "none")
    with ShardFile(shard, "none") as records:
        for image, label, example_id in zip(images, labels, ids):
            records.write(encode_example(image.astype(np.uint8).tobytes(), int(label), example_id))
    return tfrecords.model_copy(
        update={"shards": {**tfrecords.shards, "test": [str(shard)]}, "counts": {**tfrecords.counts, "test": len(ids)}}
    )


def _promoted(root: Path, trained, export, tfrecords, accuracy: float) -> Production:
    """`export` promoted as version 1, its test split kept as the reference set (as tasks/promote.py does)."""
    return registry.promote(
        root,
        "digits",
        "earlier",
        export.saved_model,
        trained.model_path,
        accuracy,
        reference_set=registry.ReferenceSet.of_test_split(tfrecords),
    )


def _model_checks(evaluation) -> dict[tuple[str, str], dict]:
    table = pq.read_table(evaluation.model_checks_parquet)
    assert_schema(table.schema, CHECK_RESULTS_SCHEMA)
    return {(row["check"], row["subject"]): row for row in table.to_pylist()}


def test_model_checks_are_written_with_no_production(digits_evaluation, digits_tfrecords):
    rows = _model_checks(digits_evaluation)
    assert [subject for _, subject in rows] == digits_tfrecords.label_names
    assert all(check == "class_recall" for check, _ in rows)
    assert all(
        row["baseline"] is None and row["threshold"] is None and row["verdict"] == "pass" for row in rows.values()
    )
    assert digits_evaluation.model_checks_parquet in digits_evaluation.required_files()


@pytest.mark.xdist_group("digits-export")
def test_productions_reference_set_exposes_a_worse_model_that_a_broken_test_split_hides(
    digits_trained, digits_wrapped, digits_tfrecords, digits_evaluation, digits_export, tmp_path
):
    """A new drop whose test split is labelled the way a broken model answers: the untrained net
    scores 1.0 there, above production, and passes the overall gate; production's own test split,
    kept with its version, shows it for what it is."""
    production = _promoted(
        tmp_path / "artifacts", digits_trained, digits_export, digits_tfrecords, digits_evaluation.test_accuracy
    )
    untrained = digits_trained.model_copy(update={"model_path": digits_wrapped.model_path})
    serve = serving_function(load_classifier(untrained.model_path), digits_tfrecords)
    images, _, ids, probabilities = serve_split(serve, digits_tfrecords, "test")
    broken = _with_test_split(digits_tfrecords, images, probabilities.argmax(axis=1), ids, tmp_path / "broken")

    evaluation = evaluate_model(untrained, broken, EvaluateConfig(min_accuracy=0.9), tmp_path / "evaluate", production)

    assert evaluation.test_accuracy == 1.0 and evaluation.production_accuracy < 1.0  # the broken split hides it
    assert evaluation.passed_gate is False
    assert evaluation.reference_examples == digits_tfrecords.counts["test"]
    assert evaluation.production_reference_accuracy == pytest.approx(
        digits_evaluation.test_accuracy, abs=1 / digits_tfrecords.counts["test"]
    )
    assert evaluation.reference_accuracy < 0.5 < evaluation.production_reference_accuracy
    reason = evaluation.gate_reason
    assert reason.startswith("reference set: ") and "production v1's reference set" in reason
    assert (
        f"{evaluation.reference_accuracy:.4f}" in reason and f"{evaluation.production_reference_accuracy:.4f}" in reason
    )
    rows = _model_checks(evaluation)
    reference = rows["reference_set", "production v1's test split"]
    assert reference["verdict"] == "block" and reference["value"] == evaluation.reference_accuracy
    # max_regression 0: the floor is production's own accuracy
    assert reference["baseline"] == reference["threshold"] == evaluation.production_reference_accuracy
    # the same images as production's test split: production's embeddings of the two agree
    drift = rows["embedding_drift", "production v1's embeddings"]
    assert drift["verdict"] == "pass" and drift["value"] == evaluation.embedding_drift_p_value > 0.5
    assert "p-value" in drift["detail"] and "MMD²" in drift["detail"]
    assert {subject for check, subject in rows if check == "class_recall"} == set(digits_tfrecords.label_names)


@pytest.mark.xdist_group("digits-export")
def test_reference_examples_this_run_trained_on_are_left_out(
    digits_trained, digits_tfrecords, digits_evaluation, digits_export, tmp_path
):
    """Known by content hash: a reference example whose content is in this run's train split (the
    fractions changed, or a source's own splits) would flatter the model, and is not scored."""
    import pyarrow as pa

    production = registry.promote(
        tmp_path / "artifacts",
        "digits",
        "earlier",
        digits_export.saved_model,
        digits_trained.model_path,
        digits_evaluation.test_accuracy,
        image_properties=digits_tfrecords.image_properties,
        reference_set=registry.ReferenceSet.of_test_split(digits_tfrecords),
    )
    table = pq.read_table(digits_tfrecords.image_properties)
    tests = [index for index, split in enumerate(table["split"].to_pylist()) if split == "test"]
    moved = set(tests[: len(tests) // 3])  # a third of production's test content now trains this run's model
    splits = pa.array(["train" if index in moved else split for index, split in enumerate(table["split"].to_pylist())])
    pq.write_table(table.set_column(table.column_names.index("split"), "split", splits), tmp_path / "props.parquet")
    this_run = digits_tfrecords.model_copy(update={"image_properties": str(tmp_path / "props.parquet")})

    evaluation = evaluate_model(digits_trained, this_run, EvaluateConfig(), tmp_path / "evaluate", production)

    assert evaluation.reference_examples == len(tests) - len(moved)
    detail = _model_checks(evaluation)["reference_set", "production v1's test split"]["detail"]
    assert f"({len(tests) - len(moved)} examples; {len(moved)} this model trained or validated on left out)" in detail


@pytest.mark.xdist_group("digits-export")
def test_embedding_drift_is_recorded_and_fails_the_gate_only_when_set_to_block(
    digits_trained, digits_tfrecords, digits_evaluation, digits_export, tmp_path
):
    """A test split production sees differently (every digit inverted) drifts from its reference
    set; the same model on both sides passes every other check."""
    production = _promoted(
        tmp_path / "artifacts", digits_trained, digits_export, digits_tfrecords, digits_evaluation.test_accuracy
    )
    images, labels, ids, _ = predict_split(digits_trained.model_path, digits_tfrecords, "test")
    inverted = _with_test_split(digits_tfrecords, 255 - images, labels, ids, tmp_path / "inverted")
    lenient = EvaluateConfig(min_accuracy=0.0)

    blocked = evaluate_model(
        digits_trained, inverted, lenient, tmp_path / "blocked", production, EmbeddingDriftConfig(action="block")
    )
    warned = evaluate_model(digits_trained, inverted, lenient, tmp_path / "warned", production)

    assert blocked.embedding_drift_p_value == pytest.approx(1 / 2001) and blocked.embedding_drift_mmd2 > 0
    assert blocked.passed_gate is False
    assert blocked.gate_reason.startswith("embedding drift: ") and "production v1" in blocked.gate_reason
    assert _model_checks(blocked)["embedding_drift", "production v1's embeddings"]["verdict"] == "block"
    assert _model_checks(blocked)["reference_set", "production v1's test split"]["verdict"] == "pass"
    assert warned.passed_gate is True  # the default action, warn, records it only
    assert _model_checks(warned)["embedding_drift", "production v1's embeddings"]["verdict"] == "warn"


def test_evaluate_two_classes(tmp_path, image_folder_factory):
    """A binary classifier (cats vs dogs) is evaluated like any other."""
    root = image_folder_factory(tmp_path / "photos", classes=("cat", "dog"), per_class=20)
    data = data_config(f"folder:{root}", split=FOLDER_SPLIT)
    tfrecords = write_tfrecords(split_dataset(data, tmp_path / "split"), data, tmp_path / "tfr")
    model = ModelConfig(base="mnist_cnn")
    base = build_base_model(model, tfrecords, 0, tmp_path / "base")
    wrapped = freeze_and_wrap_model(base, model, 2, 0, tmp_path / "wrapped")
    trained = train_model(
        wrapped, tfrecords, TrainConfig(epochs=1, batch_size=16), tmp_path / "ckpt", tmp_path / "train"
    )

    evaluation = evaluate_model(trained, tfrecords, EvaluateConfig(top_k=5), tmp_path / "evaluate")

    matrix = np.asarray(json.loads(open(evaluation.confusion_json).read())["matrix"])
    assert matrix.shape == (2, 2) and matrix.sum() == tfrecords.counts["test"]
    assert evaluation.test_accuracy == pytest.approx(np.trace(matrix) / matrix.sum())


# ----------------------------------------------------------------------------- export

SERVE_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(sys.argv[1])
    serve = loaded.signatures["serving_default"]
    inputs = np.load(sys.argv[2])
    outputs = {}
    for name in inputs.files:
        result = serve(images=tf.constant(inputs[name]))
        outputs[name + "_probabilities"] = result["probabilities"].numpy()
        outputs[name + "_classes"] = np.array([c.decode() for c in result["classes"].numpy()])
    outputs["input_names"] = np.array([spec.name for spec in serve.structured_input_signature[1].values()])
    outputs["input_dtype"] = np.array([spec.dtype.name for spec in serve.structured_input_signature[1].values()])
    np.savez(sys.argv[3], **outputs)
    """
)


@pytest.mark.xdist_group("digits-export")
def test_export_serves_raw_images_in_a_fresh_process(digits_export, digits_trained, digits_tfrecords, tmp_path):
    saved_model = digits_export.saved_model
    assert saved_model.endswith(f"/digits/{MODEL_VERSION}")
    assert digits_export.damaged_files() == [] and digits_export.max_abs_difference <= 1e-5

    images, labels, ids, logits = predict_split(digits_trained.model_path, digits_tfrecords, "test")
    keras_classes = np.asarray(digits_tfrecords.label_names)[logits.argmax(axis=1)]
    rng = np.random.default_rng(0)
    bigger = rng.integers(0, 256, size=(5, 20, 20, 1), dtype=np.uint8)
    np.savez(tmp_path / "inputs.npz", same_size=images.astype(np.uint8), bigger=bigger)
    script = tmp_path / "serve.py"
    script.write_text(SERVE_SCRIPT)

    result = subprocess.run(
        [PYTHON, str(script), saved_model, str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(tmp_path / "outputs.npz")
    assert served["input_names"].tolist() == ["images"] and served["input_dtype"].tolist() == ["uint8"]
    np.testing.assert_array_equal(served["same_size_classes"], keras_classes)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(served["same_size_probabilities"], expected, atol=1e-5)
    # other sizes are resized inside the graph
    assert served["bigger_probabilities"].shape == (5, 10)
    assert served["bigger_classes"].shape == (5,)
    assert set(served["bigger_classes"]) <= set(digits_tfrecords.label_names)
    np.testing.assert_allclose(served["bigger_probabilities"].sum(axis=1), 1, atol=1e-5)


@pytest.mark.xdist_group("digits-export")
def test_export_carries_the_embeddings_its_final_dense_layer_reads(digits_export, digits_trained, digits_tfrecords):
    """The serving signature answers the input of the "logits" layer too (pooled features): later
    runs compare production's embeddings of their test split with those of its own."""
    import tensorflow as tf

    images = predict_split(digits_trained.model_path, digits_tfrecords, "test")[0][:32]
    loaded = tf.saved_model.load(digits_export.saved_model)
    outputs = loaded.signatures["serving_default"](images=tf.constant(images.astype(np.uint8)))

    assert set(outputs) == {"probabilities", "classes", "embeddings"}
    model = load_classifier(digits_trained.model_path)
    penultimate = keras.Model(model.input, model.get_layer("logits").input)
    expected = np.asarray(penultimate(images.astype(np.float32), training=False))
    assert outputs["embeddings"].shape == (32, model.get_layer("logits").kernel.shape[0])
    np.testing.assert_allclose(outputs["embeddings"].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_export_checks_against_the_evaluate_stage_predictions(
    digits_trained, digits_tfrecords, digits_evaluation, tmp_path
):
    exported = export_model(digits_trained, digits_tfrecords, "digits", tmp_path / "export", digits_evaluation)
    assert exported.max_abs_difference <= 1e-5

    # predictions.parquet is what the SavedModel is held to: a different one is refused
    tampered = pq.read_table(digits_evaluation.predictions_parquet).to_pydict()
    tampered["probabilities"][3] = tampered["probabilities"][3][::-1]
    pq.write_table(pa.table(tampered, schema=schemas.PREDICTIONS_SCHEMA), tmp_path / "tampered.parquet")
    wrong = digits_evaluation.model_copy(update={"predictions_parquet": str(tmp_path / "tampered.parquet")})
    with pytest.raises(ExportMismatch, match="differ from Keras"):
        export_model(digits_trained, digits_tfrecords, "digits", tmp_path / "export-2", wrong)
    assert not (tmp_path / "export-2").exists()


def test_export_takes_the_fresh_process_started_ahead_of_it(
    digits_trained, digits_tfrecords, digits_evaluation, tmp_path
):
    assert process_caches.start_ahead(FRESH_PROCESS, FreshProcessCheck)
    waiting = process_caches.waiting(FRESH_PROCESS)
    assert waiting is not None and waiting.process.poll() is None  # importing TensorFlow, no model yet
    assert not process_caches.start_ahead(FRESH_PROCESS, FreshProcessCheck)  # one at a time
    exported = export_model(digits_trained, digits_tfrecords, "digits", tmp_path / "export", digits_evaluation)
    assert process_caches.waiting(FRESH_PROCESS) is None  # taken: a second export starts its own
    process_caches.stop_unused(FRESH_PROCESS)  # nothing left to stop
    assert waiting.process.returncode == 0 and exported.max_abs_difference <= 1e-5

    process_caches.start_ahead(FRESH_PROCESS, FreshProcessCheck)  # no export comes (a cache hit)
    unused = process_caches.waiting(FRESH_PROCESS)
    process_caches.stop_unused(FRESH_PROCESS)
    assert unused.process.poll() is not None and process_caches.waiting(FRESH_PROCESS) is None


def test_predictions_run_as_a_graph_equal_the_eager_model(digits_trained, digits_tfrecords):
    images, _, _, logits = predict_split(digits_trained.model_path, digits_tfrecords, "test")
    model = keras.models.load_model(digits_trained.model_path, compile=False)
    eager = np.asarray(model(images.astype(np.float32), training=False))
    np.testing.assert_allclose(logits, eager, atol=1e-5)


@pytest.mark.xdist_group("digits-export")
def test_saved_model_that_disagrees_with_keras_is_refused(digits_export, digits_trained, digits_tfrecords):
    images, _, _, logits = predict_split(digits_trained.model_path, digits_tfrecords, "test")
    expected = probabilities_from_logits(logits)
    assert verify_saved_model(Path(digits_export.saved_model), images, expected) <= 1e-5
    expected[0] = expected[0][::-1]  # as if the export had lost a layer for one image
    with pytest.raises(
        ExportMismatch,
        match=re.escape(digits_export.saved_model) + r": SavedModel probabilities "
        r"differ from Keras by \d",
    ):
        verify_saved_model(Path(digits_export.saved_model), images, expected)


@pytest.mark.xdist_group("digits-export")
def test_export_is_written_atomically(digits_export):
    export_dir = Path(digits_export.output_dir)
    assert [path.name for path in export_dir.parent.iterdir()] == [export_dir.name]
    assert sorted(path.name for path in export_dir.iterdir()) == ["digits"]
    assert (Path(digits_export.saved_model) / "saved_model.pb").is_file()
    assert (Path(digits_export.saved_model) / "variables").is_dir()


def test_report_figures_are_drawn_once_per_model_and_evaluation(
    digits_split, digits_trained, digits_evaluation, tmp_path, monkeypatch
):
    from convflow.tasks import write_report

    cache = tmp_path / "figures"
    figures = write_report.report_figures(digits_split, digits_trained, digits_evaluation, cache)
    assert set(figures) == {"augmentation", "curves", "confusion", "samples", "mistakes", "feature_maps"}
    assert all(figures[name].startswith("<img") for name in ("curves", "confusion"))
    assert all("<img" in figures[name] and "<figcaption>" in figures[name] for name in ("samples", "mistakes"))
    [cached] = cache.iterdir()

    def draw(*args):
        raise AssertionError("figures drawn again")

    monkeypatch.setattr(write_report, "_render_figures", draw)
    assert write_report.report_figures(digits_split, digits_trained, digits_evaluation, cache) == figures

    cached.write_text('{"curves": ')  # cut short: drawn again, not a failed report
    monkeypatch.undo()
    assert write_report.report_figures(digits_split, digits_trained, digits_evaluation, cache) == figures
    assert [path.name for path in cache.iterdir()] == [cached.name]

    retrained = digits_trained.model_copy(update={"epochs": digits_trained.epochs + 1})
    write_report.report_figures(digits_split, retrained, digits_evaluation, cache)
    assert len(list(cache.iterdir())) == 2  # another model: its own figures
