"""Embedding drift: the squared maximum mean discrepancy (MMD²) between two sets of a model's
embeddings, with an RBF kernel, and its permutation p-value.

MMD² is the distance between the two samples' mean embeddings in the kernel's feature space:
about 0 when both come from one distribution, larger as they part. It needs no bins and looks at
all the embedding's dimensions at once, where a per-dimension test would need a correction for
hundreds of tests. The kernel's bandwidth is the median distance between the pooled examples
(the "median heuristic"), so one setting serves embeddings of any scale. The p-value counts how
often a random relabelling of the pooled examples gives an MMD² at least as large: it is exact
for any sample size, with no asymptotic formula to trust on a few hundred examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Permutations evaluated at a time: bounds the (examples x permutations) weight matrices.
PERMUTATIONS_PER_CHUNK = 500


@dataclass(frozen=True)
class MMDResult:
    """One two-sample test: the statistic, its p-value, and what it was computed on."""

    mmd2: float
    p_value: float
    bandwidth: float
    sample_size: int  # examples of the first set used
    reference_size: int  # examples of the second set used
    permutations: int


def subsample(values: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most `limit` rows of `values`, drawn without replacement (all of them, in order, when fewer)."""
    if len(values) <= limit:
        return values
    return values[np.sort(rng.choice(len(values), limit, replace=False))]


def rbf_kernel(pooled: np.ndarray) -> tuple[np.ndarray, float]:
    """The RBF kernel matrix of the pooled rows, exp(-d² / (2 h²)), and its bandwidth h: the median
    of the distances between distinct rows (1 when they are all equal, so the kernel stays defined)."""
    squared = np.einsum("ij,ij->i", pooled, pooled)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2.0 * pooled @ pooled.T, 0.0)
    off_diagonal = distances[~np.eye(len(pooled), dtype=bool)]
    positive = off_diagonal[off_diagonal > 0]
    bandwidth = float(np.sqrt(np.median(positive))) if positive.size else 1.0
    return np.exp(-distances / (2.0 * bandwidth**2)), bandwidth


def _unbiased_mmd2(kernel: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The unbiased MMD² for each column of `first`, a 0/1 matrix (pooled rows x labellings) that
    marks the rows of the first sample; the others are the second. The kernel's diagonal is 1 (RBF)."""
    n = int(first[:, 0].sum())
    m = len(kernel) - n
    total = kernel.sum()
    kernel_first = kernel @ first
    within_first = (first * kernel_first).sum(axis=0)  # sum of k over pairs inside the first sample
    across = kernel_first.sum(axis=0) - within_first  # ... over pairs across the two samples
    within_second = total - within_first - 2.0 * across
    return (within_first - n) / (n * (n - 1)) + (within_second - m) / (m * (m - 1)) - 2.0 * across / (n * m)


def mmd_test(
    sample: np.ndarray, reference: np.ndarray, max_examples: int = 500, permutations: int = 2000, seed: int = 0
) -> MMDResult:
    """MMD² between `sample` and `reference` (rows are examples) and its permutation p-value,
    (1 + relabellings at least as large) / (1 + permutations). Each side is first cut to a seeded
    random `max_examples` rows, which bounds the cost whatever the test split's size.

    Raises:
        ValueError: either side has fewer than two rows, or the two differ in width.
    """
    if len(sample) < 2 or len(reference) < 2:
        raise ValueError(f"MMD needs two examples a side; got {len(sample)} and {len(reference)}")
    if sample.shape[1:] != reference.shape[1:]:
        raise ValueError(f"embeddings differ in shape: {sample.shape[1:]} and {reference.shape[1:]}")
    rng = np.random.default_rng(seed)
    sample = subsample(np.asarray(sample, np.float64).reshape(len(sample), -1), max_examples, rng)
    reference = subsample(np.asarray(reference, np.float64).reshape(len(reference), -1), max_examples, rng)
    kernel, bandwidth = rbf_kernel(np.concatenate([sample, reference]))
    labels = np.zeros((len(kernel), 1))
    labels[: len(sample)] = 1.0
    observed = float(_unbiased_mmd2(kernel, labels)[0])
    exceeded = 0
    for start in range(0, permutations, PERMUTATIONS_PER_CHUNK):
        count = min(PERMUTATIONS_PER_CHUNK, permutations - start)
        shuffled = rng.permuted(np.repeat(labels, count, axis=1), axis=0)  # each column its own relabelling
        exceeded += int((_unbiased_mmd2(kernel, shuffled) >= observed).sum())
    return MMDResult(
        mmd2=observed,
        p_value=(1 + exceeded) / (1 + permutations),
        bandwidth=bandwidth,
        sample_size=len(sample),
        reference_size=len(reference),
        permutations=permutations,
    )
