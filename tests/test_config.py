"""pipelines.yaml: every real pipeline validates; each mistake is reported with its path and value."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_yaml
from convflow.config.errors import ConfigError
from convflow.config.load import check_pipeline, load_pipeline, load_pipelines


def _set(document: dict, dotted: str, value) -> dict:
    """Set pipelines.tiny.<dotted> in `document`."""
    node = document["pipelines"]["tiny"]
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return document


def test_every_benchmark_pipeline_validates():
    specs = load_pipelines(REPO / "benchmarks" / "pipelines.yaml")

    assert specs and all(spec.name == name for name, spec in specs.items())
    assert not set(specs) & set(load_pipelines(REPO / "pipelines.yaml"))  # one home for each pipeline


def test_every_pipeline_in_the_repository_validates():
    specs = load_pipelines(REPO / "pipelines.yaml")

    assert {"digits-cnn", "smoke", "mnist", "cats-vs-dogs", "tfds-mnist"} <= set(specs)
    assert all(spec.name == name for name, spec in specs.items())
    smoke = specs["smoke"]
    assert smoke.data.image_size == (12, 12)
    assert smoke.data.channels == 1
    assert smoke.model.base == "mnist_cnn"
    assert smoke.train.batch_size == 128  # stated by the pipeline
    assert smoke.train.seed == 0  # from defaults
    assert smoke.evaluate.top_k == 3  # from defaults
    assert smoke.data.split.model_dump() == {"train": 0.8, "validation": 0.1, "test": 0.1}


def test_repository_paths_resolve_against_the_file_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    specs = load_pipelines(REPO / "pipelines.yaml")

    shared = (REPO / ".." / "shared").resolve()
    assert specs["mnist"].data.source == f"idx:{shared / 'data' / 'mnist'}"
    assert specs["flowers"].data.source == f"folder:{shared / 'data' / 'flowers'}"
    assert specs["cats-vs-dogs"].model.weights == str(shared / "weights" / "mobilenet_2_5_224_tf_no_top.h5")
    assert specs["digits-cnn"].data.source == "sklearn:digits"
    assert specs["tfds-mnist"].data.source == "tfds:mnist"


def test_relative_paths_resolve_against_the_pipelines_file(tmp_path, tiny_document, monkeypatch):
    _set(tiny_document, "data.source", "folder:photos/train")
    _set(tiny_document, "data.data_dir", "../tfds-data")
    _set(tiny_document, "model.weights", "weights/base.weights.h5")
    write_yaml(tmp_path / "configs" / "pipelines.yaml", tiny_document)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    spec = load_pipeline("../configs/pipelines.yaml", "tiny")

    assert spec.data.source == f"folder:{tmp_path / 'configs' / 'photos' / 'train'}"
    assert spec.data.location == str(tmp_path / "configs" / "photos" / "train")
    assert spec.data.data_dir == str(tmp_path / "tfds-data")
    assert spec.model.weights == str(tmp_path / "configs" / "weights" / "base.weights.h5")
    assert Path(spec.model.weights).is_absolute()


def test_idx_and_absolute_paths(tmp_path, tiny_document):
    _set(tiny_document, "data.source", "idx:mnist")
    tiny_document["pipelines"]["absolute"] = {
        "data": {"source": f"folder:{tmp_path / 'abs'}", "image_size": [8, 8], "channels": 3},
        "model": {"base": "convnet"},
    }
    specs = load_pipelines(write_yaml(tmp_path / "pipelines.yaml", tiny_document))

    assert specs["tiny"].data.source == f"idx:{tmp_path / 'mnist'}"
    assert specs["tiny"].data.scheme == "idx"
    assert specs["absolute"].data.source == f"folder:{tmp_path / 'abs'}"


def test_defaults_deep_merge(tmp_path):
    document = {
        "defaults": {
            "data": {"split": {"train": 0.7, "validation": 0.1, "test": 0.2}, "channels": 3},
            "train": {"batch_size": 64, "seed": 7, "learning_rate": 0.01},
            "evaluate": {"top_k": 2},
        },
        "pipelines": {
            "a": {
                "data": {"source": "sklearn:digits", "image_size": [12, 12], "channels": 1},
                "model": {"base": "mnist_cnn"},
                "train": {"epochs": 3, "batch_size": 32},
            },
            "b": {
                # a partial split merges key by key with the defaults' split
                "data": {"source": "sklearn:digits", "image_size": [12, 12], "split": {"validation": 0.0, "test": 0.3}},
                "model": {"base": "mnist_cnn"},
            },
        },
    }
    specs = load_pipelines(write_yaml(tmp_path / "pipelines.yaml", document))

    a, b = specs["a"], specs["b"]
    assert (a.train.epochs, a.train.batch_size, a.train.seed, a.train.learning_rate) == (3, 32, 7, 0.01)
    assert a.data.channels == 1 and b.data.channels == 3
    assert a.data.split.model_dump() == {"train": 0.7, "validation": 0.1, "test": 0.2}
    assert b.data.split.model_dump() == {"train": 0.7, "validation": 0.0, "test": 0.3}
    assert b.train.batch_size == 64 and b.train.epochs == 10  # defaults file, then the model's default
    assert a.evaluate.top_k == b.evaluate.top_k == 2
    assert document["defaults"]["train"] == {"batch_size": 64, "seed": 7, "learning_rate": 0.01}


def test_config_hash_ignores_schedule_and_name(tmp_path, tiny_document):
    tiny_document["pipelines"]["twin"] = {**tiny_document["pipelines"]["tiny"], "schedule": {"interval": 3600}}
    tiny_document["pipelines"]["other"] = {**tiny_document["pipelines"]["tiny"], "train": {"epochs": 2}}
    specs = load_pipelines(write_yaml(tmp_path / "pipelines.yaml", tiny_document))

    assert specs["tiny"].config_hash() == specs["twin"].config_hash()
    assert specs["tiny"].config_hash() != specs["other"].config_hash()


def test_watching_validation_needs_a_validation_split(tmp_path, tiny_document):
    _set(tiny_document, "data.split", {"train": 0.9, "validation": 0, "test": 0.1})
    _set(tiny_document, "train.early_stopping", {"patience": 2})

    with pytest.raises(
        ConfigError, match=re.escape("train.early_stopping watch the validation split: set data.split.validation > 0")
    ):
        load_pipelines(write_yaml(tmp_path / "pipelines.yaml", tiny_document))


def test_recipe_settings_are_in_the_config_hash_only_when_set(tmp_path, tiny_document):
    plain = load_pipelines(write_yaml(tmp_path / "a.yaml", tiny_document))["tiny"]
    _set(tiny_document, "train.schedule", "constant")  # the default, stated
    stated = load_pipelines(write_yaml(tmp_path / "b.yaml", tiny_document))["tiny"]
    hashes = set()
    for dotted, value in [
        ("train.schedule", {"kind": "cosine", "warmup_epochs": 1}),
        ("train.label_smoothing", 0.1),
        ("train.class_weight", "balanced"),
        ("train.early_stopping", {"patience": 2}),
        ("train.augment", ["flip", {"mixup": 0.2}]),
    ]:
        document = _set(yaml.safe_load(yaml.safe_dump(tiny_document)), dotted, value)
        hashes.add(load_pipelines(write_yaml(tmp_path / "c.yaml", document))["tiny"].config_hash())

    assert stated.config_hash() == plain.config_hash()
    assert len(hashes) == 5 and plain.config_hash() not in hashes


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("train.epoch", 3, "pipelines.tiny.train.epoch: 3 — unknown key"),
        ("train.epochs", 0, "pipelines.tiny.train.epochs: 0 — must be ≥ 1"),
        ("train.epochs", "ten", 'pipelines.tiny.train.epochs: "ten" — Input should be a valid integer'),
        ("train.learning_rate", 0, "pipelines.tiny.train.learning_rate: 0 — must be > 0"),
        (
            "train.optimizer",
            "nadam",
            "pipelines.tiny.train.optimizer: \"nadam\" — must be one of 'adam', 'adamw', 'sgd' or 'rmsprop'",
        ),
        ("train.weight_decay", 0.01, "pipelines.tiny.train.weight_decay: 0.01 — applies to optimizer adamw, not adam"),
        (
            "train.schedule",
            "linear",
            "pipelines.tiny.train.schedule.kind: \"linear\" — must be one of 'constant', 'cosine'",
        ),
        (
            "train.schedule",
            {"kind": "step", "warmup_epochs": 2},
            "warmup_epochs applies to the cosine schedule, not step",
        ),
        ("train.label_smoothing", 1, "pipelines.tiny.train.label_smoothing: 1 — must be < 1"),
        ("train.class_weight", "even", "pipelines.tiny.train.class_weight: \"even\" — must be one of 'balanced'"),
        ("train.early_stopping", {"patience": 0}, "pipelines.tiny.train.early_stopping.patience: 0 — must be ≥ 1"),
        ("train.early_stopping", {"metric": "accuracy"}, 'train.early_stopping.metric: "accuracy" — must be one of'),
        ("train.augment", ["flip", "spin"], "'spin': each item must be one of ['flip', 'rotation', 'zoom'"),
        ("train.augment", [{"rotation": 2}], "rotation: 2.0 must be > 0 and ≤ 1"),
        ("data.channels", 2, "pipelines.tiny.data.channels: 2 — must be one of 1 or 3"),
        ("data.image_size", [0, 12], "pipelines.tiny.data.image_size: [0, 12] — height and width must be ≥ 1"),
        ("data.split", {"train": 0.8, "validation": 0.2, "test": 0.1}, "train + validation + test must be 1, got 1.1"),
        (
            "data.source",
            "s3://bucket/images",
            'pipelines.tiny.data.source: "s3://bucket/images" — must look like one of',
        ),
        ("data.source", "sklearn:iris", "unknown sklearn dataset 'iris'"),
        ("model.base", "resnet9000", "pipelines.tiny.model.base: \"resnet9000\" — unknown base model 'resnet9000'"),
        ("model.weights", "weights.pt", "must be imagenet, none, run:<pipeline> or a path ending in .h5 or .keras"),
        ("model.alpha", 0.5, "alpha applies to MobileNet bases only, not 'mnist_cnn'"),
        ("model.dropout", 1.0, "pipelines.tiny.model.dropout: 1.0 — must be < 1"),
        ("evaluate.min_accuracy", 1.5, "pipelines.tiny.evaluate.min_accuracy: 1.5 — must be ≤ 1"),
        ("schedule", {"cron": "0 3 * * 1", "interval": 3600}, "give exactly one of cron or interval"),
    ],
)
def test_mistakes_name_the_field_and_value(tmp_path, tiny_document, dotted, value, expected):
    path = write_yaml(tmp_path / "pipelines.yaml", _set(tiny_document, dotted, value))

    with pytest.raises(ConfigError, match=re.escape(expected)) as caught:
        load_pipelines(path)

    assert len(caught.value.problems) == 1
    assert caught.value.path == path


def test_missing_required_field(tmp_path, tiny_document):
    del tiny_document["pipelines"]["tiny"]["model"]
    with pytest.raises(ConfigError, match=re.escape("pipelines.tiny.model: required")):
        load_pipelines(write_yaml(tmp_path / "pipelines.yaml", tiny_document))


def test_image_size_below_the_base_minimum(tmp_path, tiny_document):
    _set(tiny_document, "model.base", "inception_v3")
    _set(tiny_document, "data.image_size", [32, 32])
    _set(tiny_document, "data.channels", 3)
    with pytest.raises(ConfigError, match=r"data\.image_size \[32, 32\] is below inception_v3's minimum of 75x75"):
        load_pipelines(write_yaml(tmp_path / "pipelines.yaml", tiny_document))


def test_imagenet_weights_need_three_channels(tmp_path, tiny_document):
    _set(tiny_document, "model.base", "mobilenet_v2")
    _set(tiny_document, "model.weights", "imagenet")
    _set(tiny_document, "data.image_size", [32, 32])
    with pytest.raises(ConfigError, match="data.channels 1 does not match imagenet weights, which take 3 channels"):
        load_pipelines(write_yaml(tmp_path / "pipelines.yaml", tiny_document))


def test_imagenet_weights_rejected_for_a_seed_cnn(tmp_path, tiny_document):
    """The seed CNNs have no ImageNet weights: the mistake belongs at load time, not in build_base.

    (Today the pipeline validates, then build_base either calls Keras' load_weights("imagenet")
    or, offline, asks the user to download weights that do not exist.)
    """
    _set(tiny_document, "model.weights", "imagenet")
    _set(tiny_document, "data.channels", 3)
    with pytest.raises(ConfigError, match=r"pipelines\.tiny.*imagenet"):
        load_pipelines(write_yaml(tmp_path / "pipelines.yaml", tiny_document))


def test_malformed_yaml(tmp_path):
    path = write_yaml(tmp_path / "pipelines.yaml", "pipelines:\n  tiny: {data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipelines(path)


def test_unsafe_yaml_tag_is_rejected_without_running_it(tmp_path):
    marker = tmp_path / "created-by-yaml"
    text = (
        "pipelines:\n"
        f"  tiny: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"
    )
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipelines(write_yaml(tmp_path / "pipelines.yaml", text))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../evil", "Upper", "with space", "-dash-first", "x" * 65])
def test_unsafe_pipeline_names_are_rejected(tmp_path, tiny_document, name):
    tiny_document["pipelines"] = {name: tiny_document["pipelines"]["tiny"]}
    with pytest.raises(ConfigError, match=re.escape(f"pipelines.{name}.name: ") + ".*must be 1-64 of a-z 0-9"):
        load_pipelines(write_yaml(tmp_path / "pipelines.yaml", tiny_document))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- just\n- a list\n", "must be a mapping with a 'pipelines:' mapping"),
        ("pipelines: {}\nextras: 1\n", "extras: unknown key; expected defaults or pipelines"),
        ("defaults: [1]\npipelines: {}\n", "defaults: must be a mapping"),
        ("pipelines:\n  tiny: 3\n", "pipelines.tiny: must be a mapping"),
    ],
)
def test_malformed_documents(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_pipelines(write_yaml(tmp_path / "pipelines.yaml", text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_pipelines(tmp_path / "nope.yaml")


def test_unknown_pipeline_name(pipelines_file):
    with pytest.raises(ConfigError, match=re.escape("pipelines.nope: no such pipeline; expected one of ['tiny']")):
        load_pipeline(pipelines_file, "nope")


def test_three_mistakes_are_all_reported(tmp_path, tiny_document):
    _set(tiny_document, "train.epochs", 0)
    _set(tiny_document, "train.epoch", 3)
    tiny_document["pipelines"]["second"] = {
        "data": {"source": "sklearn:digits", "image_size": [12, 12], "channels": 1},
        "model": {"base": "resnet9000"},
    }
    path = write_yaml(tmp_path / "pipelines.yaml", tiny_document)

    with pytest.raises(ConfigError) as caught:
        load_pipelines(path)

    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert any(p.startswith("pipelines.tiny.train.epochs: 0 — must be ≥ 1") for p in problems)
    assert any(p.startswith("pipelines.tiny.train.epoch: 3 — unknown key") for p in problems)
    assert any(p.startswith("pipelines.second.model.base:") and "resnet9000" in p for p in problems)
    assert str(caught.value).startswith(f"{path}: 3 problem(s)")
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("schedule", "field"),
    [({"cron": "every monday at three"}, "cron"), ({"cron": "0 3 * * 1", "timezone": "Mars/Olympus_Mons"}, "timezone")],
)
def test_schedule_values_are_checked_at_load_time(tmp_path, tiny_document, schedule, field):
    """A cron expression or time zone that no scheduler accepts is a config mistake, found by
    `convflow validate` rather than when the deployment is created."""
    _set(tiny_document, "schedule", schedule)
    with pytest.raises(ConfigError, match=rf"pipelines\.tiny\.schedule.*{field}"):
        load_pipelines(write_yaml(tmp_path / "pipelines.yaml", tiny_document))


def _with_broken_pipeline(document: dict) -> dict:
    """`document` plus pipeline `broken`: tiny's body with two mistakes."""
    broken = {**document["pipelines"]["tiny"], "train": {"epochs": 0, "epoch": 3}}
    document["pipelines"]["broken"] = broken
    return document


def test_one_broken_pipeline_stops_only_itself(tmp_path, tiny_document):
    """A typo in one entry of a shared file must not stop the other pipelines' runs: the valid one
    loads, with one warning naming the broken one and each of its problems."""
    path = write_yaml(tmp_path / "pipelines.yaml", _with_broken_pipeline(tiny_document))

    spec, warnings = check_pipeline(path, "tiny")

    assert spec.name == "tiny" and spec.train.epochs == tiny_document["pipelines"]["tiny"]["train"]["epochs"]
    assert spec.train.batch_size == 128 and spec.evaluate.top_k == 3  # defaults: merged as before
    [warning] = warnings
    assert warning.startswith(f"{path}: pipeline 'broken' is invalid")
    assert "pipelines.broken.train.epochs: 0 — must be ≥ 1" in warning
    assert "pipelines.broken.train.epoch: 3 — unknown key" in warning
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path, "broken")
    assert len(caught.value.problems) == 2 and all(p.startswith("pipelines.broken.") for p in caught.value.problems)
    with pytest.raises(ConfigError, match=r"pipelines\.broken\.train\.epochs"):
        load_pipelines(path)  # validate, serve and deploy stay strict


def test_load_pipeline_logs_the_other_broken_pipelines(tmp_path, tiny_document):
    import prefect  # noqa: F401  its logging set-up (on first import) replaces handlers set before it

    path = write_yaml(tmp_path / "pipelines.yaml", _with_broken_pipeline(tiny_document))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("convflow.config")
    logger.addHandler(handler)
    try:
        assert load_pipeline(path, "tiny").name == "tiny"
    finally:
        logger.removeHandler(handler)
    [record] = records
    assert record.levelname == "WARNING" and "pipeline 'broken' is invalid" in record.getMessage()


def test_a_broken_file_or_defaults_still_stops_every_pipeline(tmp_path, tiny_document):
    """Mistakes shared by every pipeline are no other pipeline's: they stop the one asked for."""
    tiny_document["defaults"]["train"]["learning_rate"] = 0
    with pytest.raises(ConfigError, match=r"pipelines\.tiny\.train\.learning_rate: 0 — must be > 0"):
        check_pipeline(write_yaml(tmp_path / "defaults.yaml", tiny_document), "tiny")
    with pytest.raises(ConfigError, match="not valid YAML"):
        check_pipeline(write_yaml(tmp_path / "broken.yaml", "pipelines: {tiny: [unclosed"), "tiny")


def test_unknown_name_lists_broken_pipelines_too(tmp_path, tiny_document):
    path = write_yaml(tmp_path / "pipelines.yaml", _with_broken_pipeline(tiny_document))
    expected = "pipelines.nope: no such pipeline; expected one of ['broken', 'tiny']"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_pipeline(path, "nope")
