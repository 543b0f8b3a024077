"""The embedding drift statistic: MMD² with an RBF kernel and its permutation p-value, and its settings."""

from __future__ import annotations

import time

import numpy as np
import pydantic
import pytest

from convflow.checks.config import EmbeddingDriftConfig, ValidateConfig
from convflow.checks.embedding_drift import mmd_test, rbf_kernel
from convflow.checks.model_checks import embedding_drift_row


def _embeddings(rng: np.random.Generator, count: int, shift: float = 0.0, width: int = 32) -> np.ndarray:
    """Made-up embeddings: ReLU'd Gaussian features, as pooled CNN features are non-negative."""
    return np.maximum(rng.normal(size=(count, width)) + shift, 0.0)


def test_two_samples_of_one_distribution_get_a_large_p_value():
    rng = np.random.default_rng(7)
    result = mmd_test(_embeddings(rng, 300), _embeddings(rng, 200), permutations=1000)
    assert result.p_value > 0.05
    assert abs(result.mmd2) < 0.01
    assert (result.sample_size, result.reference_size, result.permutations) == (300, 200, 1000)


def test_a_shifted_sample_gets_the_smallest_p_value_the_permutations_allow():
    rng = np.random.default_rng(7)
    result = mmd_test(_embeddings(rng, 300, shift=0.5), _embeddings(rng, 200), permutations=1000)
    assert result.p_value == pytest.approx(1 / 1001)  # no relabelling comes near it
    assert result.mmd2 > 0.05


def test_under_the_null_small_p_values_are_as_rare_as_they_should_be():
    """A permutation test's p-value is uniform under the null: about 10% of tests fall under 0.1."""
    p_values = [
        mmd_test(_embeddings(rng, 60), _embeddings(rng, 80), permutations=200, seed=seed).p_value
        for seed, rng in enumerate(np.random.default_rng(seed) for seed in range(60))
    ]
    assert 0.0 <= np.mean(np.array(p_values) < 0.1) <= 0.25


def test_the_same_inputs_give_the_same_p_value_and_the_cost_stays_small():
    rng = np.random.default_rng(3)
    sample, reference = _embeddings(rng, 900, width=256), _embeddings(rng, 700, width=256)
    started = time.perf_counter()
    first = mmd_test(sample, reference)  # the defaults: 500 a side, 2000 permutations
    seconds = time.perf_counter() - started
    assert mmd_test(sample, reference) == first
    assert (first.sample_size, first.reference_size) == (500, 500)  # each side cut to max_examples
    assert seconds < 2.0, f"{seconds:.2f} s for 500 + 500 examples"


def test_the_bandwidth_is_the_median_distance_and_equal_rows_keep_the_kernel_defined():
    points = np.array([[0.0], [1.0], [3.0]])  # distances 1, 2, 3: median 2
    kernel, bandwidth = rbf_kernel(points)
    assert bandwidth == pytest.approx(2.0)
    assert kernel[0, 1] == pytest.approx(np.exp(-1 / 8))
    kernel, bandwidth = rbf_kernel(np.zeros((4, 3)))
    assert bandwidth == 1.0 and np.all(kernel == 1.0)


def test_too_few_examples_or_different_widths_are_refused():
    with pytest.raises(ValueError, match="two examples a side; got 1 and 5"):
        mmd_test(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"differ in shape: \(4,\) and \(3,\)"):
        mmd_test(np.zeros((5, 4)), np.zeros((5, 3)))


def test_the_row_holds_the_p_value_and_names_the_mmd2():
    rng = np.random.default_rng(7)
    result = mmd_test(_embeddings(rng, 100, shift=0.5), _embeddings(rng, 100), permutations=1000)
    row = embedding_drift_row(result, EmbeddingDriftConfig(action="block"), version=3)
    assert (row.check, row.subject, row.verdict) == ("embedding_drift", "production v3's embeddings", "block")
    assert row.value == result.p_value and row.threshold == 0.001 and row.baseline is None
    assert "p-value" in row.detail and f"MMD² {result.mmd2:.3g}" in row.detail
    assert embedding_drift_row(result, EmbeddingDriftConfig(), version=3).verdict == "warn"  # the default action


def test_settings_refuse_too_few_permutations_for_alpha():
    assert ValidateConfig().embedding_drift == EmbeddingDriftConfig(action="warn", alpha=0.001)
    assert ValidateConfig.model_validate({"embedding_drift": "block"}).embedding_drift.action == "block"
    with pytest.raises(pydantic.ValidationError, match=r"permutations \(200\) cannot give a p-value under alpha"):
        EmbeddingDriftConfig(permutations=200)
    assert EmbeddingDriftConfig(permutations=200, alpha=0.01).permutations == 200
