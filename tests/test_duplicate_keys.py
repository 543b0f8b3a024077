"""A key written twice in a pipelines file is an error naming the key and both its lines (exit 2),
from `convflow validate` and `convflow run`; anchors and merge keys are not duplicates."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from conftest import CONVFLOW, subprocess_env
from convflow.cli.app import EXIT_BAD_CONFIG
from convflow.config.errors import ConfigError
from convflow.config.load import load_pipelines
from convflow.config.yaml_loader import DuplicateKey, duplicate_keys

# `train:` twice in one pipeline (lines 10 and 13), `seed:` twice under defaults (lines 3 and 4).
TRAIN_TWICE = """\
defaults:
  train:
    seed: 0
    seed: 1
pipelines:
  tiny:
    data: {source: "sklearn:digits", image_size: [12, 12], channels: 1}
    model:
      base: mnist_cnn
    train:
      epochs: 1
    evaluate: {min_accuracy: 0.5}
    train:
      epochs: 3
"""


@pytest.fixture
def train_twice(tmp_path):
    path = tmp_path / "pipelines.yaml"
    path.write_text(TRAIN_TWICE)
    return path


def test_every_duplicate_is_found_with_its_path_and_lines():
    assert duplicate_keys(TRAIN_TWICE) == [
        DuplicateKey("defaults.train.seed", "seed", 3, 4),
        DuplicateKey("pipelines.tiny.train", "train", 10, 13),
    ]


def test_a_key_written_three_times_is_reported_against_its_first_line():
    text = "pipelines:\n  a: 1\n  a: 2\n  a: 3\n"

    assert [(d.first_line, d.line) for d in duplicate_keys(text)] == [(2, 3), (2, 4)]


def test_same_key_in_different_mappings_and_merge_keys_are_not_duplicates():
    text = """\
base: &base {epochs: 2, seed: 0}
pipelines:
  a: {train: {epochs: 1}}
  b: {train: {epochs: 1}}
  c:
    train:
      <<: *base
      epochs: 5
  d:
    - {epochs: 1}
    - {epochs: 2}
"""
    assert duplicate_keys(text) == []
    assert yaml.safe_load(text)["pipelines"]["c"]["train"] == {"epochs": 5, "seed": 0}


def test_load_pipelines_refuses_the_file(train_twice):
    with pytest.raises(ConfigError) as refused:
        load_pipelines(train_twice)

    assert refused.value.problems == [
        f"{train_twice}: defaults.train.seed: key 'seed' written twice, on lines 3 and 4 "
        "(the second would silently replace the first); keep one",
        f"{train_twice}: pipelines.tiny.train: key 'train' written twice, on lines 10 and 13 "
        "(the second would silently replace the first); keep one",
    ]


@pytest.mark.parametrize("command", [["validate"], ["run", "tiny", "--artifacts", "artifacts", "-f"]])
def test_validate_and_run_exit_2_naming_the_key_and_its_lines(train_twice, command):
    result = subprocess.run(
        [CONVFLOW, *command, str(train_twice)],
        cwd=train_twice.parent,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )

    assert result.returncode == EXIT_BAD_CONFIG == 2
    assert "pipelines.tiny.train: key 'train' written twice, on lines 10 and 13" in result.stderr
    assert "defaults.train.seed: key 'seed' written twice, on lines 3 and 4" in result.stderr
    assert not (train_twice.parent / "artifacts").exists()
