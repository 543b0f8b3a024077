"""Stage 6, evaluate: test-split metrics (scikit-learn), predictions, confusion matrix and the gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from convflow import tables
from convflow.config import EvaluateConfig
from convflow.tasks import features
from convflow.tasks.records import Evaluation, TFRecordSet, TrainedModel
from convflow.tasks.stage import RunContext, stage_task, staged_output

# Test images kept for the report (sample predictions, worst mistakes, feature maps).
REPORT_SAMPLES = 16


def predict_split(model_path: str, tfrecords: TFRecordSet, split: str, batch_size: int = 256):
    """Run the Keras model over one split: (images uint8, labels, example ids, logits)."""
    import keras

    import convflow.tasks.layers  # noqa: F401  (registers custom layers for loading)

    model = keras.models.load_model(model_path, compile=False)
    dataset = features.read_dataset(
        tfrecords.shards[split], tfrecords.image_size, tfrecords.channels, batch_size, cache=False, with_ids=True
    )
    images, labels, ids, logits = [], [], [], []
    for batch_images, batch_labels, batch_ids in dataset:
        logits.append(np.asarray(model(batch_images, training=False)))
        images.append(batch_images.numpy().astype(np.uint8))
        labels.append(batch_labels.numpy())
        ids += [value.decode() for value in batch_ids.numpy()]
    return np.concatenate(images), np.concatenate(labels), ids, np.concatenate(logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _metrics_table(labels, probabilities, loss: float, label_names: list[str], top_k: int) -> pa.Table:
    from sklearn import metrics

    classes = list(range(len(label_names)))
    predicted = probabilities.argmax(axis=1)
    k = min(top_k, len(classes) - 1) if len(classes) > 2 else 1
    rows = [
        {"metric": "accuracy", "class_name": None, "value": metrics.accuracy_score(labels, predicted)},
        {"metric": "loss", "class_name": None, "value": loss},
        {"metric": f"top_{k}_accuracy", "class_name": None,
         "value": metrics.top_k_accuracy_score(labels, probabilities, k=k, labels=classes)},
    ]
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    for index, name in enumerate(label_names):
        for metric, values in (("precision", precision), ("recall", recall), ("f1", f1), ("support", support)):
            rows.append({"metric": metric, "class_name": name, "value": float(values[index])})
    return pa.Table.from_pylist(rows, schema=tables.METRICS_SCHEMA)


def _gate(accuracy: float, evaluate: EvaluateConfig) -> tuple[bool, str]:
    if accuracy >= evaluate.min_accuracy:
        return True, f"test accuracy {accuracy:.4f} ≥ min_accuracy {evaluate.min_accuracy}"
    return False, f"test accuracy {accuracy:.4f} < min_accuracy {evaluate.min_accuracy}"


def _report_samples(images, labels, probabilities) -> dict[str, np.ndarray]:
    """The first test images and the most confident mistakes, for the report."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:REPORT_SAMPLES]
    first = np.arange(min(REPORT_SAMPLES, len(labels)))
    return {
        "sample_images": images[first], "sample_labels": labels[first], "sample_predicted": predicted[first],
        "mistake_images": images[worst], "mistake_labels": labels[worst], "mistake_predicted": predicted[worst],
        "mistake_confidence": probabilities[worst, predicted[worst]],
    }


def evaluate_model(trained: TrainedModel, tfrecords: TFRecordSet, evaluate: EvaluateConfig, output_dir: Path) -> Evaluation:
    """Score the trained model on the test split and apply the min_accuracy gate."""
    from sklearn.metrics import confusion_matrix, log_loss

    images, labels, ids, logits = predict_split(trained.model_path, tfrecords, "test")
    probabilities = _softmax(logits.astype(np.float64))
    classes = list(range(len(tfrecords.label_names)))
    loss = float(log_loss(labels, probabilities, labels=classes))
    metrics = _metrics_table(labels, probabilities, loss, tfrecords.label_names, evaluate.top_k)
    accuracy = float(metrics.column("value")[0].as_py())
    predictions = pa.table(
        {
            "example_id": ids,
            "label": labels.astype(np.int64),
            "predicted": probabilities.argmax(axis=1).astype(np.int64),
            "confidence": probabilities.max(axis=1).astype(np.float32),
            "probabilities": list(probabilities.astype(np.float32)),
        },
        schema=tables.PREDICTIONS_SCHEMA,
    )
    confusion = confusion_matrix(labels, probabilities.argmax(axis=1), labels=classes)
    passed, reason = _gate(accuracy, evaluate)
    with staged_output(output_dir) as staging:
        tables.write_parquet(metrics, staging / "metrics.parquet")
        tables.write_parquet(predictions, staging / "predictions.parquet")
        (staging / "confusion.json").write_text(
            json.dumps({"labels": tfrecords.label_names, "matrix": confusion.tolist()})
        )
        np.savez_compressed(staging / "samples.npz", **_report_samples(images, labels, probabilities))
    return Evaluation(
        output_dir=str(output_dir),
        metrics_parquet=str(output_dir / "metrics.parquet"),
        predictions_parquet=str(output_dir / "predictions.parquet"),
        confusion_json=str(output_dir / "confusion.json"),
        samples_npz=str(output_dir / "samples.npz"),
        test_accuracy=accuracy,
        test_loss=loss,
        passed_gate=passed,
        gate_reason=reason,
    )


@stage_task()
def evaluate(trained: TrainedModel, tfrecords: TFRecordSet, evaluate: EvaluateConfig, run: RunContext) -> Evaluation:
    """Prefect task over evaluate_model."""
    return evaluate_model(trained, tfrecords, evaluate, run.stage_dir("evaluate"))
