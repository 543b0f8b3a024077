"""Every base model name builds with weights: none at its minimum input size; smaller is refused."""

from __future__ import annotations

import pytest

from convflow import cli
from convflow.config.model_zoo import APPLICATIONS, SEED_CNNS
from convflow.config.schema import ModelConfig
from convflow.tasks.build_base import make_base

# The big ones take several seconds each to build on two cores.
BIG = {
    "inception_v3",
    "resnet50",
    "resnet50_v2",
    "resnet101_v2",
    "xception",
    "vgg16",
    "vgg19",
    "efficientnet_b0",
    "densenet121",
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=pytest.mark.slow) if name in BIG else name for name in sorted(APPLICATIONS)],
)
def test_application_builds_at_its_minimum_size(name):
    size = APPLICATIONS[name].min_size
    extra = {"alpha": 0.5} if APPLICATIONS[name].takes_alpha else {}
    base = make_base(ModelConfig(base=name, weights="none", **extra), (size, size, 3), seed=0)
    assert base.name == "base"
    assert base.input_shape == (None, size, size, 3)
    assert len(base.output.shape) == 4 and base.output.shape[-1] > 0


@pytest.mark.parametrize("name", sorted(SEED_CNNS))
def test_seed_cnn_builds(name):
    base = make_base(ModelConfig(base=name), (28, 28, 1), seed=0)
    assert len(base.output.shape) == 2


@pytest.mark.parametrize("name", ["inception_v3", "xception", "mobilenet"])
def test_validate_rejects_input_below_the_base_minimum(tmp_path, capsys, name):
    minimum = APPLICATIONS[name].min_size
    pipelines = tmp_path / "pipelines.yaml"
    pipelines.write_text(
        "pipelines:\n  small:\n"
        f"    data: {{source: 'sklearn:digits', image_size: [{minimum - 1}, {minimum - 1}], channels: 3}}\n"
        f"    model: {{base: {name}}}\n"
    )
    assert cli.main(["validate", str(pipelines)]) == 2
    error = capsys.readouterr().err
    assert f"below {name}'s minimum of {minimum}x{minimum}" in error
    assert "pipelines.small" in error
