"""The model checks' rows: the evaluate stage's gate figures in check_data's table shape
(CHECK_RESULTS_SCHEMA), so that one query reads a run's data and model checks alike.

- `class_recall`: each class's recall, production's on the same split beside it, against the
  per-class floor (evaluate.min_class_recall, production's recall - max_class_regression);
- `reference_set`: accuracy on production's own test split (its reference set), the model's
  against production's - max_regression;
- `embedding_drift`: the permutation p-value of the MMD² between production's embeddings of this
  test split and of its reference set, against validate.embedding_drift.alpha.

A check that could not run has a row too, with no value and the reason as its detail.
"""

from __future__ import annotations

from convflow.checks.checks import CheckResult, judge
from convflow.checks.config import EmbeddingDriftConfig
from convflow.checks.embedding_drift import MMDResult


def class_recall_rows(
    recalls: dict[str, float],
    production_recalls: dict[str, float] | None,
    min_class_recall: float | None,
    max_class_regression: float | None,
) -> list[CheckResult]:
    """A row per class: its recall against the higher of the floors that are set (none: it passes)."""
    rows = []
    for name, recall in recalls.items():
        baseline = (production_recalls or {}).get(name)
        floors = [min_class_recall] if min_class_recall is not None else []
        if max_class_regression is not None and baseline is not None:
            floors.append(baseline - max_class_regression)
        floor = max(floors) if floors else None
        compared = f"production's {baseline:.4f}" if baseline is not None else "no production recall"
        held = f"floor {floor:.4f}" if floor is not None else "no floor set"
        rows.append(
            CheckResult(
                check="class_recall",
                subject=name,
                value=recall,
                baseline=baseline,
                threshold=floor,
                verdict="block" if floor is not None and recall < floor else "pass",
                detail=f"recall {recall:.4f} on this test split ({compared}; {held})",
            )
        )
    return rows


def reference_row(
    accuracy: float,
    production_accuracy: float,
    max_regression: float,
    version: int,
    examples: int,
    skipped: int,
    learned: int = 0,
) -> CheckResult:
    """The model's accuracy on production v`version`'s reference set against production's own."""
    floor = production_accuracy - max_regression
    unknown = f"; {skipped} of a class this model does not know left out" if skipped else ""
    unknown += f"; {learned} this model trained or validated on left out" if learned else ""
    return CheckResult(
        check="reference_set",
        subject=f"production v{version}'s test split",
        value=accuracy,
        baseline=production_accuracy,
        threshold=floor,
        verdict="block" if accuracy < floor else "pass",
        detail=f"accuracy {accuracy:.4f} {'<' if accuracy < floor else '≥'} {floor:.4f} on production v{version}'s "
        f"reference set, the test split it was judged on ({examples} examples{unknown}): production v{version} "
        f"scores {production_accuracy:.4f} on it, max_regression {max_regression}",
    )


def embedding_drift_row(result: MMDResult, settings: EmbeddingDriftConfig, version: int) -> CheckResult:
    """The p-value of production v`version`'s embeddings of this test split against its reference set's."""
    fired = result.p_value < settings.alpha
    return CheckResult(
        check="embedding_drift",
        subject=f"production v{version}'s embeddings",
        value=result.p_value,
        baseline=None,
        threshold=settings.alpha,
        verdict=judge(fired, settings.action),
        detail=f"value is the permutation p-value ({result.permutations} permutations) of MMD² {result.mmd2:.3g} "
        f"(RBF kernel, bandwidth {result.bandwidth:.3g}) between production v{version}'s embeddings of this test "
        f"split ({result.sample_size} examples) and of its reference set ({result.reference_size}); "
        f"{'under' if fired else 'not under'} alpha {settings.alpha}",
    )


def not_run(check: str, subject: str, reason: str) -> CheckResult:
    """The row of a check that could not run: no figure, the reason in its detail."""
    return CheckResult(
        check=check,
        subject=subject,
        value=None,
        baseline=None,
        threshold=None,
        verdict="pass",
        detail=f"not run: {reason}",
    )
