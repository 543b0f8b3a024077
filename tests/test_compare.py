"""`convflow compare`: variants deep-merged and validated one by one, ranked by the configured metric,
a bad variant failing alone, the winner alone promoted, and variants in Dask worker processes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import CONVFLOW, REPO, run_convflow, subprocess_env, write_yaml
from convflow.catalog import registry, schemas, tables
from convflow.catalog.comparisons import VariantResult
from convflow.config.derive import variant_specs
from convflow.config.errors import ConfigError
from convflow.config.load import load_pipeline, load_pipelines
from convflow.core.context import RunContext
from convflow.tasks.compare_variant import promote_winner, rank_variants


def _compare_document(tiny_document: dict, variants: list[dict], **compare) -> dict:
    tiny_document["pipelines"]["tiny"]["compare"] = {"variants": variants, **compare}
    return tiny_document


# ----------------------------------------------------------------------------- config


def test_repository_comparison_has_the_three_mobilenet_variants():
    spec = load_pipeline(REPO / "pipelines.yaml", "cats-vs-dogs-compare")
    variants = variant_specs(spec, REPO)

    assert list(variants) == ["frozen", "fine-tuned", "scratch"]
    frozen, fine_tuned, scratch = variants.values()
    assert frozen.model == spec.model and frozen.model.frozen
    assert fine_tuned.model.fine_tune.unfreeze_top == 30 and fine_tuned.model.fine_tune.learning_rate == 1e-4
    assert fine_tuned.model.weights == frozen.model.weights and fine_tuned.model.alpha == 0.25
    assert scratch.model.weights == "none" and not scratch.model.frozen
    assert all(variant.compare is None and variant.name == spec.name for variant in variants.values())


def test_variants_deep_merge_over_the_pipeline(tmp_path, tiny_document):
    document = _compare_document(
        tiny_document,
        [
            {"name": "as-is"},
            {"name": "wider", "model": {"dropout": 0.3}, "train": {"learning_rate": 0.01}},
            {"name": "own-weights", "model": {"weights": "weights/seed.h5"}},
        ],
    )
    path = write_yaml(tmp_path / "configs" / "pipelines.yaml", document)
    spec = load_pipeline(path, "tiny")

    variants = variant_specs(spec, path.parent)

    assert variants["as-is"].model_dump(exclude={"compare"}) == spec.model_dump(exclude={"compare"})
    assert variants["wider"].model.dropout == 0.3
    assert variants["wider"].train.learning_rate == 0.01
    assert variants["wider"].train.batch_size == 128  # from the pipeline
    assert variants["wider"].train.seed == 0  # from the file's defaults
    assert variants["own-weights"].model.weights == str(tmp_path / "configs" / "weights" / "seed.h5")


MOBILENET_WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"


def _mobilenet_document(tiny_document: dict, images: Path, variants: list[dict]) -> dict:
    """tiny on 32x32 RGB images with the frozen MobileNet 0.25 of ../shared/weights, and `variants`."""
    tiny = tiny_document["pipelines"]["tiny"]
    tiny["data"] = {
        "source": f"folder:{images}",
        "image_size": [32, 32],
        "channels": 3,
        "split": {"train": 0.5, "validation": 0.2, "test": 0.3},
    }
    tiny["model"] = {
        "base": "mobilenet",
        "alpha": 0.25,
        "weights": str(MOBILENET_WEIGHTS),
        "dropout": 0.2,
        "fine_tune": {"epochs": 1, "unfreeze_top": 5},
    }
    tiny["evaluate"] = {"min_accuracy": 0.0}
    return _compare_document(tiny_document, variants)


def test_a_variant_naming_another_base_drops_the_settings_of_the_pipelines_base(tmp_path, tiny_document):
    document = _mobilenet_document(
        tiny_document,
        tmp_path / "images",
        [
            {"name": "seed-cnn", "model": {"base": "augment_cnn"}},
            {"name": "v2-scratch", "model": {"base": "mobilenet_v2", "weights": "none"}},
            {"name": "v2-own-alpha", "model": {"base": "mobilenet_v2", "alpha": 0.5, "freeze": True}},
            {"name": "same-base", "model": {"base": "mobilenet", "dropout": 0.5}},
        ],
    )
    spec = load_pipeline(write_yaml(tmp_path / "pipelines.yaml", document), "tiny")

    variants = variant_specs(spec, tmp_path)

    seed_cnn, v2_scratch, v2_own_alpha, same_base = variants.values()
    assert (seed_cnn.model.base, seed_cnn.model.alpha, seed_cnn.model.weights) == ("augment_cnn", None, "none")
    assert seed_cnn.model.fine_tune is None and seed_cnn.model.dropout == 0.2  # dropout is the head's: kept
    assert (v2_scratch.model.alpha, v2_scratch.model.weights, v2_scratch.model.frozen) == (None, "none", False)
    assert (v2_own_alpha.model.alpha, v2_own_alpha.model.weights, v2_own_alpha.model.frozen) == (0.5, "none", True)
    assert same_base.model.alpha == 0.25
    assert Path(same_base.model.weights).resolve() == MOBILENET_WEIGHTS.resolve()  # ../shared may be a link
    assert same_base.model.fine_tune == spec.model.fine_tune


def test_an_invalid_variant_is_reported_alone(tmp_path, tiny_document):
    document = _compare_document(
        tiny_document,
        [
            {"name": "good"},
            {"name": "no-such-base", "model": {"base": "no_such_net"}},
            {"name": "zero-epochs", "train": {"epochs": 0}},
        ],
    )
    path = write_yaml(tmp_path / "pipelines.yaml", document)
    spec = load_pipelines(path)["tiny"]  # the file stays valid

    variants = variant_specs(spec, tmp_path)

    assert variants["good"].train.epochs == 1
    assert variants["no-such-base"] == [
        next(
            line
            for line in variants["no-such-base"]
            if line.startswith('pipelines.tiny.compare.variants.no-such-base.model.base: "no_such_net"')
        )
    ]
    assert "unknown base model" in variants["no-such-base"][0]
    assert variants["zero-epochs"] == ["pipelines.tiny.compare.variants.zero-epochs.train.epochs: 0 — must be ≥ 1"]


@pytest.mark.parametrize(
    ("compare", "expected"),
    [
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "variant names must be unique; repeated: ['a']"),
        ({"variants": [{"name": "a"}]}, "compare.variants"),
        ({"variants": [{"name": "a"}, {"name": "b", "data": {"channels": 3}}]}, "compare.variants.1.data"),
        ({"variants": [{"name": "a"}, {"name": "b"}], "metric": "speed"}, 'compare.metric: "speed" — must be one of'),
        ({"variants": [{"name": "a"}, {"name": "B C"}]}, "variants.1.name"),
    ],
)
def test_the_compare_section_itself_is_checked_at_load_time(tmp_path, tiny_document, compare, expected):
    tiny_document["pipelines"]["tiny"]["compare"] = compare
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_pipelines(write_yaml(tmp_path / "pipelines.yaml", tiny_document))


def test_variants_override_model_train_and_evaluate_only(tmp_path, tiny_document):
    tiny_document["pipelines"]["tiny"]["compare"] = {"variants": [{"name": "a"}, {"name": "b", "data": {}}]}
    with pytest.raises(ConfigError) as error:
        load_pipelines(write_yaml(tmp_path / "pipelines.yaml", tiny_document))
    assert error.value.problems[0].startswith("pipelines.tiny.compare.variants.1.data:")
    assert error.value.problems[0].endswith("unknown key")


def test_validate_warns_about_an_invalid_variant_and_passes(tmp_path, tiny_document):
    document = _compare_document(tiny_document, [{"name": "good"}, {"name": "bad", "train": {"epochs": 0}}])
    path = write_yaml(tmp_path / "pipelines.yaml", document)

    result = subprocess.run([CONVFLOW, "validate", str(path)], capture_output=True, text=True, env=subprocess_env())

    assert result.returncode == 0
    assert "warning: compare variant tiny/bad will fail:" in result.stderr
    assert "pipelines.tiny.compare.variants.bad.train.epochs: 0 — must be ≥ 1" in result.stderr


def test_a_compare_section_leaves_the_config_hash_alone(tmp_path, tiny_document):
    before = load_pipelines(write_yaml(tmp_path / "a.yaml", tiny_document))["tiny"].config_hash()
    document = _compare_document(tiny_document, [{"name": "a"}, {"name": "b", "train": {"epochs": 2}}])
    after = load_pipelines(write_yaml(tmp_path / "b.yaml", document))["tiny"].config_hash()
    assert before == after


def test_compare_needs_a_compare_section(pipelines_file, tmp_path):
    result = subprocess.run(
        [CONVFLOW, "compare", "tiny", "-f", str(pipelines_file), "--artifacts", str(tmp_path / "artifacts")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert result.returncode == 2
    assert "pipelines.tiny.compare: required by convflow compare" in result.stderr
    assert not (tmp_path / "artifacts").exists()


# ----------------------------------------------------------------------------- ranking


def _result(name: str, accuracy: float | None, loss: float | None = 1.0) -> VariantResult:
    if accuracy is None:
        return VariantResult(name=name, status="failed", error="boom")
    return VariantResult(name=name, status="completed", test_accuracy=accuracy, test_loss=loss, run_id=f"r-{name}")


def test_ranking_puts_the_best_first_and_failures_last():
    results = [
        _result("a", 0.8, 0.5),
        _result("broken", None),
        _result("b", 0.9, 0.7),
        _result("c", 0.8, 0.4),
        _result("d", 0.8, 0.4),
    ]

    by_accuracy = rank_variants(results, "test_accuracy")
    by_loss = rank_variants(results, "test_loss")

    # a tie on accuracy goes to the lower loss, then to the config's order
    assert [(r.name, r.rank) for r in by_accuracy] == [("b", 1), ("c", 2), ("d", 3), ("a", 4), ("broken", None)]
    assert [r.name for r in by_loss] == ["c", "d", "a", "b", "broken"]


def test_nothing_is_promoted_without_promote_best_or_a_winner(tmp_path):
    run = RunContext(pipeline="tiny", run_id="cmp-x", artifacts_root=str(tmp_path))
    ranked = rank_variants([_result("a", 0.7), _result("b", 0.9)], "test_accuracy")

    _, verdict = promote_winner(ranked, "none", run)
    assert verdict == "compare.promote is none: b won, nothing was promoted"
    _, verdict = promote_winner(rank_variants([_result("x", None)], "test_accuracy"), "best", run)
    assert verdict == "no variant completed: nothing to promote"
    assert registry.current(tmp_path, "tiny") is None


# ----------------------------------------------------------------------------- end to end


def _run_compare(root: Path, document: dict, *extra: str) -> dict:
    write_yaml(root / "pipelines.yaml", document)
    return run_convflow(
        ["compare", "tiny", "-f", "pipelines.yaml", "--artifacts", "artifacts", "--json", *extra], cwd=root, timeout=900
    ).summary


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """tiny (12x12 digits, mnist_cnn, one epoch) with two good variants, one invalid and one whose
    weights file is missing (it fails inside build_base); the winner goes through the gate."""
    from conftest import TINY_PIPELINES

    document = json.loads(json.dumps(TINY_PIPELINES))
    _compare_document(
        document,
        [
            {"name": "plain"},
            {"name": "faster", "train": {"learning_rate": 0.003}},
            {"name": "broken", "model": {"base": "no_such_net"}},
            {"name": "lost-weights", "model": {"weights": "nowhere/seed.h5"}},
        ],
        promote="best",
    )
    root = tmp_path_factory.mktemp("compare")
    return root, _run_compare(root, document)


@pytest.mark.e2e
@pytest.mark.xdist_group("compare")
def test_the_good_variants_complete_and_are_ranked(comparison):
    _, summary = comparison
    variants = {row["variant"]: row for row in summary["variants"]}

    assert [row["variant"] for row in summary["variants"]][:2] == sorted(
        ["plain", "faster"], key=lambda name: -variants[name]["test_accuracy"]
    )
    assert summary["winner"] == summary["variants"][0]["variant"]
    for name in ("plain", "faster"):
        row = variants[name]
        assert row["status"] == "completed" and row["error"] is None
        assert row["initial_accuracy"] < 0.3  # the untrained head: about chance over ten digits
        assert row["test_accuracy"] > row["initial_accuracy"] + 0.2
        assert row["test_loss"] < row["initial_loss"]
        assert set(row["per_class_f1"]) == {str(digit) for digit in range(10)}
        assert row["total_params"] == row["trainable_params"] > 0  # mnist_cnn trains from scratch
        assert row["train_seconds"] > 0 and row["images_per_second"] > 0
        assert row["saved_model_mb"] > 0 and row["latency_ms"] > 0
        assert row["pid"] == summary["flow_pid"]  # a thread of the flow's process
    assert summary["runner"] == "sequential (one variant at a time)"


@pytest.mark.e2e
@pytest.mark.xdist_group("compare")
def test_bad_variants_are_reported_as_failed_with_why(comparison):
    root, summary = comparison
    variants = {row["variant"]: row for row in summary["variants"]}

    assert variants["broken"]["status"] == "failed" and variants["broken"]["rank"] is None
    assert variants["broken"]["error"].startswith(
        'invalid config: pipelines.tiny.compare.variants.broken.model.base: "no_such_net"'
    )
    assert variants["lost-weights"]["status"] == "failed"
    assert variants["lost-weights"]["error"] == (
        f"WeightsError: model.weights: file {root / 'nowhere' / 'seed.h5'} does not exist"
    )
    page = Path(summary["report"]).read_text()
    failed_section = page.split('id="failed"')[1].split("<h2")[0]
    assert "broken" in failed_section and "unknown base model" in failed_section
    assert "lost-weights" in failed_section and "does not exist" in failed_section


@pytest.mark.e2e
@pytest.mark.xdist_group("compare")
def test_the_report_is_one_self_contained_page_in_the_comparison_folder(comparison):
    root, summary = comparison
    report = Path(summary["report"])

    assert report.parent.parent == root / "artifacts" / "tiny" / summary["comparison_id"]
    page = report.read_text()
    for section in ("verdict", "ranking", "initial-vs-final", "curves", "per-class", "failed", "variants", "stages"):
        assert f'id="{section}"' in page, section
    assert page.count("data:image/png;base64,") == 2  # accuracy bars, overlaid curves
    assert 'src="http' not in page and 'href="http' not in page
    table = pq.read_table(report.with_name("comparison.parquet"))
    assert table.schema.equals(schemas.COMPARISON_SCHEMA, check_metadata=False)
    assert table.column("variant").to_pylist() == [row["variant"] for row in summary["variants"]]


@pytest.mark.e2e
@pytest.mark.xdist_group("compare")
def test_only_the_winner_is_promoted_and_every_completed_variant_is_in_the_catalog(comparison):
    root, summary = comparison
    artifacts = root / "artifacts"
    winner = summary["variants"][0]
    runs = tables.read_runs(artifacts / "runs.parquet").to_pylist()

    assert {row["variant"] for row in runs} == {"plain", "faster"}  # failed variants finished no run
    assert {row["comparison_id"] for row in runs} == {summary["comparison_id"]}
    by_variant = {row["variant"]: row for row in runs}
    assert by_variant[winner["variant"]]["status"] == "completed"
    assert by_variant[winner["variant"]]["promoted_version"] == 1
    loser = next(name for name in by_variant if name != winner["variant"])
    assert by_variant[loser]["status"] == "not-promoted" and by_variant[loser]["promoted_version"] is None
    assert all(row["report"] == summary["report"] for row in runs)
    assert all(Path(row["run_dir"]) == artifacts / "tiny" / row["run_id"] for row in runs)
    production = registry.current(artifacts, "tiny")
    assert production.version == 1 and production.run_id == winner["run_id"]
    assert summary["verdict"] == f"{winner['variant']} won and is production version 1"


@pytest.mark.e2e
@pytest.mark.slow
def test_with_dask_the_variants_run_in_separate_worker_processes(tmp_path, tiny_document):
    if importlib.util.find_spec("prefect_dask") is None:
        if os.environ.get("CI"):
            pytest.fail("prefect-dask is missing: the dev extra installs it")
        pytest.skip("prefect-dask is not installed: pip install -e '.[dev]'")
    document = _compare_document(tiny_document, [{"name": "first"}, {"name": "second", "train": {"seed": 1}}])

    summary = _run_compare(tmp_path, document, "--dask", "2")

    pids = [row["pid"] for row in summary["variants"]]
    assert all(row["status"] == "completed" for row in summary["variants"])
    assert summary["runner"] == "dask (2 worker processes)"
    assert len(set(pids)) == 2 and summary["flow_pid"] not in pids


@pytest.mark.e2e
@pytest.mark.slow
def test_variants_that_change_a_mobilenet_pipelines_base_all_run(tmp_path, tiny_document):
    from conftest import make_image_folder

    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=20, size=(32, 32))
    document = _mobilenet_document(
        tiny_document,
        images,
        [
            {"name": "seed-cnn", "model": {"base": "augment_cnn"}},
            {"name": "v2-scratch", "model": {"base": "mobilenet_v2", "weights": "none"}},
        ],
    )

    summary = _run_compare(tmp_path, document)

    variants = {row["variant"]: row for row in summary["variants"]}
    assert set(variants) == {"seed-cnn", "v2-scratch"}
    for name, row in variants.items():
        assert row["status"] == "completed" and row["error"] is None, (name, row["error"])
        assert row["total_params"] == row["trainable_params"] > 0  # trained from scratch: nothing frozen
