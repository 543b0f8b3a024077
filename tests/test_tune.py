"""`convflow tune`: the tune section checked at load time, KerasTuner's oracle driving trials that are
Prefect tasks, a failed trial recorded while the others go on, and the best setting's final model gated."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import PYTHON, REPO, run_convflow, write_yaml
from convflow.config.derive import tuned_spec
from convflow.config.errors import ConfigError
from convflow.config.load import load_pipelines
from convflow.tasks.tune_trial import TrialResult, best_trial, search

SPACE = {
    "learning_rate": {"min": 0.0003, "max": 0.01, "log": True},
    "dropout": {"values": [0.0, 0.3]},
    "batch_size": {"values": [32, 128]},
}


def _tune_document(tiny_document: dict, **tune) -> dict:
    tiny_document["pipelines"]["tiny"]["tune"] = {"space": SPACE, **tune}
    return tiny_document


def test_tuned_settings_land_where_they_belong_and_tune_leaves_the_config_hash_alone(tmp_path, tiny_document):
    plain = load_pipelines(write_yaml(tmp_path / "a.yaml", tiny_document))["tiny"]
    spec = load_pipelines(write_yaml(tmp_path / "b.yaml", _tune_document(tiny_document, max_trials=6)))["tiny"]

    tuned = tuned_spec(spec, {"learning_rate": 0.002, "dropout": 0.3, "batch_size": 32.0})

    assert spec.config_hash() == plain.config_hash()  # convflow run ignores tune:
    assert (tuned.train.learning_rate, tuned.model.dropout, tuned.train.batch_size) == (0.002, 0.3, 32)
    assert tuned.tune is None and tuned.config_hash() != plain.config_hash()


def test_augment_strength_scales_every_augmentation_setting(tmp_path, tiny_document):
    tiny_document["pipelines"]["tiny"]["train"]["augment"] = ["flip", {"rotation": 0.1}, {"mixup": 0.2}]
    document = _tune_document(tiny_document)
    document["pipelines"]["tiny"]["tune"]["space"] = {"augment_strength": {"min": 0.5, "max": 2}}
    spec = load_pipelines(write_yaml(tmp_path / "p.yaml", document))["tiny"]

    assert tuned_spec(spec, {"augment_strength": 2.0}).train.augment == [
        {"flip": None},
        {"rotation": 0.2},
        {"mixup": 0.4},
    ]


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"momentum": {"values": [0.9]}}, "unknown setting 'momentum'; expected any of ['learning_rate', 'dropout'"),
        ({"dropout": {"min": 0.5, "max": 0.2}}, "min 0.5 must be below max 0.2"),
        ({"dropout": {"values": [0.2, 1.5]}}, "dropout: [0.2, 1.5] must lie within 0 and 0.95"),
        ({"batch_size": {"values": [32, 48.5]}}, "batch_size: [32.0, 48.5] must be whole numbers"),
        ({"learning_rate": {"min": 0, "max": 0.1, "log": True}}, "a log range needs min > 0"),
        (
            {"unfreeze_top": {"values": [10, 20]}},
            "tune.space.unfreeze_top tunes model.fine_tune.unfreeze_top: add a fine_tune section that sets it",
        ),
        (
            {"augment_strength": {"values": [0.5]}},
            "tune.space.augment_strength scales train.augment: turn augmentation on",
        ),
    ],
)
def test_tune_mistakes_are_named_at_load_time(tmp_path, tiny_document, space, expected):
    document = _tune_document(tiny_document)
    document["pipelines"]["tiny"]["tune"]["space"] = space

    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_pipelines(write_yaml(tmp_path / "p.yaml", document))


def test_the_oracle_hears_of_failed_trials_and_the_search_goes_on(tmp_path, tiny_document):
    spec = load_pipelines(write_yaml(tmp_path / "p.yaml", _tune_document(tiny_document, max_trials=5)))["tiny"]
    asked = []

    def run_one(trial_id, settings, epochs):
        asked.append(settings)
        if len(asked) == 2:
            return TrialResult(trial_id=trial_id, settings=settings, epochs=epochs, status="failed", error="OOM")
        return TrialResult(
            trial_id=trial_id, settings=settings, epochs=epochs, status="completed", score=settings["learning_rate"]
        )

    results = search(spec.tune, 3, tmp_path / "oracle", run_one)

    assert [result.status for result in results] == ["completed", "failed", "completed", "completed", "completed"]
    assert all(set(settings) == set(SPACE) for settings in asked)
    assert len({json.dumps(settings, sort_keys=True) for settings in asked}) == 5  # no setting tried twice
    assert best_trial(results, "val_accuracy").score == max(r.score for r in results if r.score is not None)
    assert best_trial(results, "val_loss").score == min(r.score for r in results if r.score is not None)


def test_hyperband_gives_trials_their_epochs(tmp_path, tiny_document):
    document = _tune_document(tiny_document, algorithm="hyperband", max_trials=30, epochs=9)
    spec = load_pipelines(write_yaml(tmp_path / "p.yaml", document))["tiny"]

    results = search(
        spec.tune,
        9,
        tmp_path / "oracle",
        lambda trial_id, settings, epochs: TrialResult(
            trial_id=trial_id, settings=settings, epochs=epochs, status="completed", score=epochs + settings["dropout"]
        ),
    )

    assert {result.epochs for result in results} == {1, 3, 9}  # Hyperband's rungs with factor 3
    assert all(not name.startswith("tuner/") for result in results for name in result.settings)


# ----------------------------------------------------------------------------- end to end


def _tune(root: Path, document: dict, program: list[str]) -> dict:
    write_yaml(root / "pipelines.yaml", document)
    return run_convflow(
        ["tune", "tiny", "-f", "pipelines.yaml", "--artifacts", "artifacts", "--json"],
        cwd=root,
        timeout=900,
        program=program,
    ).summary


@pytest.mark.e2e
@pytest.mark.slow
def test_a_tune_run_on_digits_lists_every_trial_goes_on_past_a_failed_one_and_gates_the_best(tmp_path, tiny_document):
    """Seven trials on the 12 px digits, trial 1 out of memory (tests/oom_trial_convflow.py): six
    complete with their settings and validation scores, the failed one is recorded, the best's
    settings train the final model, which passes the gate."""
    program = [PYTHON, str(REPO / "tests" / "oom_trial_convflow.py")]

    summary = _tune(tmp_path, _tune_document(tiny_document, max_trials=7), program)

    trials = summary["trials"]
    assert [trial["trial_id"] for trial in trials] == [str(number) for number in range(7)]
    failed, completed = trials[1], [trial for trial in trials if trial["trial_id"] != "1"]
    assert failed["status"] == "failed" and failed["score"] is None
    assert failed["error"].startswith("ResourceExhaustedError: OOM when allocating")
    assert all(trial["status"] == "completed" and 0 < trial["score"] <= 1 for trial in completed)
    assert all(set(trial["settings"]) == set(SPACE) for trial in trials)
    assert summary["best"]["score"] == max(trial["score"] for trial in completed)
    final = summary["final"]
    assert final["passed_gate"] and final["status"] == "completed" and final["promoted_version"] == 1
    table = pq.read_table(Path(summary["report"]).with_name("trials.parquet")).to_pylist()
    assert [row["trial_id"] for row in table] == [trial["trial_id"] for trial in trials]
    assert [json.loads(row["settings"]) for row in table] == [trial["settings"] for trial in trials]
    assert [row["status"] for row in table] == [trial["status"] for trial in trials]
    assert sum(row["best"] for row in table) == 1 and all(row["objective"] == "val_accuracy" for row in table)
    page = Path(summary["report"]).read_text()
    assert page.count("<tr>") == 1 + 7 and final["run_id"] in page and "OOM when allocating" in page
