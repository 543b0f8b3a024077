"""Stage 6, evaluate: test-split metrics (scikit-learn), predictions, confusion matrix and the gate.

Against a production model, the gate holds the model to production's accuracy on this test split
(overall and per class), and on production's reference set: the test split production was judged
on, kept with its version, so that a new, easier or broken test split cannot hide a worse model.
Production's embeddings of the two splits are compared too (validate.embedding_drift). Every
figure is a row of model_checks.parquet, in check_data's table shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from convflow.catalog import schemas
from convflow.catalog.registry import Production, load_reference_set
from convflow.checks.checks import CheckResult, results_table
from convflow.checks.config import EmbeddingDriftConfig
from convflow.checks.embedding_drift import mmd_test
from convflow.checks.model_checks import class_recall_rows, embedding_drift_row, not_run, reference_row
from convflow.config.schema import EvaluateConfig
from convflow.core.context import RunContext
from convflow.core.records import Evaluation, TFRecordSet, TrainedModel, WrappedModel
from convflow.core.run_log import artifact_key
from convflow.core.stage import stage_task
from convflow.core.storage import staged_output
from convflow.modeling.classifier import load_classifier, predict_split, probabilities_from_logits, serve_split
from convflow.modeling.serving import serving_function
from convflow.tfrecords.features import read_dataset

# Test images kept for the report (sample predictions, worst mistakes, feature maps).
REPORT_SAMPLES = 16
# Images per call of a serving function.
SERVING_BATCH = 512
# The MMD permutation test's seed: the same embeddings always get the same p-value.
DRIFT_SEED = 0


def _metrics_table(labels, probabilities, loss: float, label_names: list[str], top_k: int) -> pa.Table:
    from sklearn import metrics

    classes = list(range(len(label_names)))
    predicted = probabilities.argmax(axis=1)
    binary = len(classes) == 2  # scikit-learn takes the positive class's score alone there
    k = 1 if binary else min(top_k, len(classes) - 1)
    scores = probabilities[:, 1] if binary else probabilities
    rows = [
        {"metric": "accuracy", "class_name": None, "value": metrics.accuracy_score(labels, predicted)},
        {"metric": "loss", "class_name": None, "value": loss},
        {
            "metric": f"top_{k}_accuracy",
            "class_name": None,
            "value": metrics.top_k_accuracy_score(labels, scores, k=k, labels=classes),
        },
    ]
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    for index, name in enumerate(label_names):
        for metric, values in (("precision", precision), ("recall", recall), ("f1", f1), ("support", support)):
            rows.append({"metric": metric, "class_name": name, "value": float(values[index])})
    return pa.Table.from_pylist(rows, schema=schemas.METRICS_SCHEMA)


def _gate(
    accuracy: float, evaluate: EvaluateConfig, production: Production | None, production_accuracy: float | None
) -> tuple[bool, str]:
    if accuracy < evaluate.min_accuracy:
        return False, f"test accuracy {accuracy:.4f} < min_accuracy {evaluate.min_accuracy}"
    if production is None:
        return True, f"test accuracy {accuracy:.4f} ≥ min_accuracy {evaluate.min_accuracy}; no production model yet"
    floor = production_accuracy - evaluate.max_regression
    verdict = f"production v{production.version} scores {production_accuracy:.4f} on the same test split"
    if accuracy < floor:
        return (
            False,
            f"test accuracy {accuracy:.4f} < {floor:.4f} ({verdict}, max_regression {evaluate.max_regression})",
        )
    return True, f"test accuracy {accuracy:.4f} ≥ min_accuracy {evaluate.min_accuracy} and ≥ {floor:.4f} ({verdict})"


def class_recalls(labels: np.ndarray, predicted: np.ndarray, label_names: list[str]) -> dict[str, float]:
    """Each class's recall on the split: the share of its examples predicted as it (0 with none)."""
    return {
        name: float((predicted[labels == index] == index).mean()) if (labels == index).any() else 0.0
        for index, name in enumerate(label_names)
    }


def _class_gate(
    recalls: dict[str, float], evaluate: EvaluateConfig, production_recalls: dict[str, float] | None
) -> list[str]:
    """Why the per-class gate fails, a reason per class (none: it passes or is not set)."""
    reasons = []
    if evaluate.min_class_recall is not None:
        reasons += [
            f"{name} recall {recall:.4f} < min_class_recall {evaluate.min_class_recall}"
            for name, recall in recalls.items()
            if recall < evaluate.min_class_recall
        ]
    if evaluate.max_class_regression is not None and production_recalls is not None:
        reasons += [
            f"{name} recall {recall:.4f} < production's {production_recalls[name]:.4f} - max_class_regression "
            f"{evaluate.max_class_regression}"
            for name, recall in recalls.items()
            if name in production_recalls and recall < production_recalls[name] - evaluate.max_class_regression
        ]
    return reasons


def _in_batches(serve, images: np.ndarray) -> dict[str, np.ndarray]:
    """A serving function's outputs over `images`, SERVING_BATCH at a time, stacked by name."""
    import tensorflow as tf

    batches = [
        {name: value.numpy() for name, value in serve(tf.constant(images[start : start + SERVING_BATCH])).items()}
        for start in range(0, len(images), SERVING_BATCH)
    ]
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def saved_model_outputs(saved_model: str, *image_sets: np.ndarray | None) -> list[dict[str, np.ndarray] | None]:
    """A SavedModel's serving outputs for each set of raw uint8 images (None for None): probabilities,
    class names, and embeddings when it was exported with them; the SavedModel loaded once for all."""
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model)  # keep referenced while calling its signature
    serve = loaded.signatures["serving_default"]
    return [None if images is None else _in_batches(lambda batch: serve(images=batch), images) for images in image_sets]


@dataclass(frozen=True)
class _Reference:
    """Production's reference set, read back: its images (uint8, at production's size), each one's
    class name, and whether this run trained or validated on the same content."""

    images: np.ndarray
    names: np.ndarray
    learned: np.ndarray


def _read_reference(
    production: Production, channels: int, image_properties: str | None
) -> tuple[_Reference | None, str | None]:
    """Production's reference set, or why there is none to score. Its examples are known by content
    hash (production's per-image table): those this run's train or validation split holds too
    (`image_properties`, this run's table) are marked learned, as a model scores its own training
    data too well."""
    if production.reference_set is None:
        return None, f"production v{production.version} was promoted before reference sets were kept"
    reference = load_reference_set(production.reference_set)
    if reference.channels != channels or not reference.examples:
        return None, (
            f"production v{production.version}'s reference set has {reference.examples} images of "
            f"{reference.channels} channels; this model takes {channels}"
        )
    images, labels, ids = [], [], []
    for batch_images, batch_labels, batch_ids in read_dataset(
        reference.shards, reference.image_size, reference.channels, SERVING_BATCH, cache=False, with_ids=True
    ):
        images.append(batch_images.numpy().astype(np.uint8))  # whole numbers 0..255: exact
        labels.append(batch_labels.numpy())
        ids += [example_id.decode() for example_id in batch_ids.numpy()]
    learned = _learned(ids, production.image_properties, image_properties)
    names = np.asarray(reference.label_names)[np.concatenate(labels)]
    return _Reference(np.concatenate(images), names, learned), None


def _learned(reference_ids: list[str], production_properties: str | None, run_properties: str | None) -> np.ndarray:
    """For each reference example, whether this run's train or validation split has its content."""
    if not production_properties or not run_properties:
        return np.zeros(len(reference_ids), bool)
    production = pq.read_table(production_properties, columns=["example_id", "split", "sha256"]).to_pydict()
    digests = {
        example_id: digest
        for example_id, split, digest in zip(production["example_id"], production["split"], production["sha256"])
        if split == "test"
    }
    run = pq.read_table(run_properties, columns=["split", "sha256"]).to_pydict()
    seen = {digest for split, digest in zip(run["split"], run["sha256"]) if split != "test"}
    return np.asarray([digests.get(example_id) in seen for example_id in reference_ids], bool)


def _reference_check(
    serve,
    label_names: list[str],
    reference: _Reference,
    production_outputs: dict,
    settings: EvaluateConfig,
    version: int,
) -> CheckResult:
    """Both models' accuracy on production's reference set, by class name; examples of a class this
    model does not know are left out for both (a class that disappeared is check_data's to flag)."""
    candidate = np.asarray(label_names)[_in_batches(serve, reference.images)["probabilities"].argmax(axis=1)]
    production = np.asarray([name.decode() for name in production_outputs["classes"]])
    known = np.isin(reference.names, label_names)
    kept = known & ~reference.learned
    subject = f"production v{version}'s test split"
    if not kept.any():
        return not_run("reference_set", subject, "none of its examples is of a class this model knows and unseen by it")
    return reference_row(
        accuracy=float((candidate == reference.names)[kept].mean()),
        production_accuracy=float((production == reference.names)[kept].mean()),
        max_regression=settings.max_regression,
        version=version,
        examples=int(kept.sum()),
        skipped=int((~known).sum()),
        learned=int((known & reference.learned).sum()),
    )


def _drift_check(
    drift: EmbeddingDriftConfig, version: int, test_outputs: dict, reference_outputs: dict
) -> tuple[CheckResult, dict[str, float]]:
    """Production's embeddings of this test split against its reference set's, and the figures for the record."""
    subject = f"production v{version}'s embeddings"
    if "embeddings" not in test_outputs:
        return not_run("embedding_drift", subject, f"production v{version} was exported without embeddings"), {}
    if min(len(test_outputs["embeddings"]), len(reference_outputs["embeddings"])) < 2:
        return not_run("embedding_drift", subject, "fewer than two examples on a side"), {}
    result = mmd_test(
        test_outputs["embeddings"], reference_outputs["embeddings"], drift.max_examples, drift.permutations, DRIFT_SEED
    )
    figures = {"embedding_drift_p_value": result.p_value, "embedding_drift_mmd2": result.mmd2}
    return embedding_drift_row(result, drift, version), figures


def _production_checks(
    serve,
    images: np.ndarray,
    label_names: list[str],
    settings: EvaluateConfig,
    drift: EmbeddingDriftConfig,
    production: Production,
    image_properties: str | None = None,
) -> tuple[np.ndarray, list[CheckResult], dict]:
    """Production's predictions on this test split, the reference-set and embedding-drift rows, and
    their figures for the Evaluation record."""
    reference, missing = _read_reference(production, images.shape[-1], image_properties)
    test_outputs, reference_outputs = saved_model_outputs(
        production.saved_model, images, reference.images if reference else None
    )
    predicted = test_outputs["probabilities"].argmax(axis=1)
    if reference is None:
        rows = [not_run("reference_set", f"production v{production.version}'s test split", missing)]
        if drift.action != "off":
            rows.append(not_run("embedding_drift", f"production v{production.version}'s embeddings", missing))
        return predicted, rows, {}
    row = _reference_check(serve, label_names, reference, reference_outputs, settings, production.version)
    figures = {
        "reference_accuracy": row.value,
        "production_reference_accuracy": row.baseline,
        "reference_examples": int((np.isin(reference.names, label_names) & ~reference.learned).sum()),
    }
    rows = [row]
    if drift.action != "off":
        drift_row, drift_figures = _drift_check(drift, production.version, test_outputs, reference_outputs)
        rows.append(drift_row)
        figures |= drift_figures
    return predicted, rows, figures


def score_untrained(wrapped: WrappedModel, tfrecords: TFRecordSet) -> tuple[float, float]:
    """The tutorials' "initial accuracy": (test accuracy, test loss) of the wrapped model before
    training; its head is random, so about chance."""
    from sklearn.metrics import log_loss

    _, labels, _, logits = predict_split(wrapped.model_path, tfrecords, "test")
    probabilities = probabilities_from_logits(logits)
    loss = float(log_loss(labels, probabilities, labels=list(range(len(tfrecords.label_names)))))
    return float((probabilities.argmax(axis=1) == labels).mean()), loss


def first_conv_feature_maps(model, image: np.ndarray, limit: int = 16) -> np.ndarray:
    """The first convolution's activations for one image, as the tutorials draw them (H, W, filters)."""
    import keras

    base = model.get_layer("base")
    conv = next((layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)), None)
    if conv is None:
        return np.zeros((0, 0, 0), np.float32)
    probe = keras.Model(base.inputs[0], conv.output)
    return np.asarray(probe(image[np.newaxis].astype(np.float32), training=False))[0, ..., :limit]


def _report_samples(images, labels, probabilities) -> dict[str, np.ndarray]:
    """The first test images and the most confident mistakes, for the report."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:REPORT_SAMPLES]
    first = np.arange(min(REPORT_SAMPLES, len(labels)))
    return {
        "sample_images": images[first],
        "sample_labels": labels[first],
        "sample_predicted": predicted[first],
        "mistake_images": images[worst],
        "mistake_labels": labels[worst],
        "mistake_predicted": predicted[worst],
        "mistake_confidence": probabilities[worst, predicted[worst]],
    }


def _predictions_table(ids, labels: np.ndarray, probabilities: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "example_id": ids,
            "label": labels.astype(np.int64),
            "predicted": probabilities.argmax(axis=1).astype(np.int64),
            "confidence": probabilities.max(axis=1).astype(np.float32),
            "probabilities": list(probabilities.astype(np.float32)),
        },
        schema=schemas.PREDICTIONS_SCHEMA,
    )


def evaluate_model(
    trained: TrainedModel,
    tfrecords: TFRecordSet,
    settings: EvaluateConfig,
    output_dir: Path,
    production: Production | None = None,
    drift: EmbeddingDriftConfig | None = None,
) -> Evaluation:
    """Score the trained model on the test split; gate on min_accuracy and on the production
    model's accuracy on the same split (max_regression), then on each class's recall
    (min_class_recall, and max_class_regression against production's on the same split), then on
    production's reference set (max_regression again) and, where `drift` blocks, on embedding drift."""
    from sklearn.metrics import confusion_matrix, log_loss

    drift = drift or EmbeddingDriftConfig()
    model = load_classifier(trained.model_path)
    serve = serving_function(model, tfrecords)
    images, labels, ids, probabilities = serve_split(serve, tfrecords, "test")
    classes = list(range(len(tfrecords.label_names)))
    loss = float(log_loss(labels, probabilities, labels=classes))
    metrics = _metrics_table(labels, probabilities, loss, tfrecords.label_names, settings.top_k)
    accuracy = float(metrics.column("value")[0].as_py())
    confusion = confusion_matrix(labels, probabilities.argmax(axis=1), labels=classes)
    recalls = class_recalls(labels, probabilities.argmax(axis=1), tfrecords.label_names)
    production_accuracy = production_recalls = None
    production_rows, figures = [], {}
    if production:
        production_predicted, production_rows, figures = _production_checks(
            serve, images, tfrecords.label_names, settings, drift, production, tfrecords.image_properties
        )
        production_accuracy = float((production_predicted == labels).mean())
        production_recalls = class_recalls(labels, production_predicted, tfrecords.label_names)
    passed, reason = _gate(accuracy, settings, production, production_accuracy)
    class_failures = _class_gate(recalls, settings, production_recalls)
    if passed and class_failures:
        passed, reason = False, "; ".join(class_failures)
    blocks = [f"{row.check.replace('_', ' ')}: {row.detail}" for row in production_rows if row.verdict == "block"]
    if passed and blocks:
        passed, reason = False, "; ".join(blocks)
    rows = [
        *class_recall_rows(recalls, production_recalls, settings.min_class_recall, settings.max_class_regression),
        *production_rows,
    ]
    with staged_output(output_dir) as staging:
        schemas.write_parquet(metrics, staging / "metrics.parquet")
        schemas.write_parquet(_predictions_table(ids, labels, probabilities), staging / "predictions.parquet")
        schemas.write_parquet(results_table(rows), staging / "model_checks.parquet")
        (staging / "confusion.json").write_text(
            json.dumps({"labels": tfrecords.label_names, "matrix": confusion.tolist()})
        )
        samples = _report_samples(images, labels, probabilities)
        samples["feature_maps"] = first_conv_feature_maps(model, images[0])
        np.savez_compressed(staging / "samples.npz", **samples)
    return Evaluation(
        output_dir=str(output_dir),
        metrics_parquet=str(output_dir / "metrics.parquet"),
        predictions_parquet=str(output_dir / "predictions.parquet"),
        confusion_json=str(output_dir / "confusion.json"),
        samples_npz=str(output_dir / "samples.npz"),
        model_checks_parquet=str(output_dir / "model_checks.parquet"),
        test_accuracy=accuracy,
        test_loss=loss,
        passed_gate=passed,
        gate_reason=reason,
        production_version=production.version if production else None,
        production_accuracy=production_accuracy,
        class_recalls=recalls,
        production_class_recalls=production_recalls,
        **figures,
    )


@stage_task()
def evaluate(
    trained: TrainedModel,
    tfrecords: TFRecordSet,
    settings: EvaluateConfig,
    drift: EmbeddingDriftConfig,
    production: Production | None,
    run: RunContext,
) -> Evaluation:
    """Prefect task over evaluate_model; `production` (or None) and `drift` (validate.embedding_drift,
    the only validate setting it reads, so other data-check thresholds leave it cached) are part of the
    cache key."""
    evaluation = evaluate_model(trained, tfrecords, settings, run.stage_dir("evaluate"), production, drift)
    _publish_model_checks(evaluation, run.pipeline)
    return evaluation


def _publish_model_checks(evaluation: Evaluation, pipeline: str) -> None:
    """Every model check's figure as a Prefect table artifact, beside the data checks' in the UI."""
    from prefect.artifacts import create_table_artifact

    key = artifact_key(pipeline)
    rows = pq.read_table(evaluation.model_checks_parquet).drop(["files"]).to_pylist()
    verdict = "passed" if evaluation.passed_gate else "failed"
    create_table_artifact(key=f"{key}-model-checks", table=rows, description=f"Model checks: the gate {verdict}")
