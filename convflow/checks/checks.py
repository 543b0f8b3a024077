"""The data checks: this run's per-image table against production's (the table saved with the
promoted model), one result row per check and subject, every figure recorded, offending files named.

Property drift is measured by the two-sample Kolmogorov-Smirnov statistic D, the largest gap
between the two cumulative distributions. It is bounded (0-1) and unchanged by any monotone
rescaling of a property, so one threshold serves brightness (0-255), sharpness (thousands) and
width (pixels) alike, and it needs no binning (PSI does, and its bins fail on a constant width);
Wasserstein distances come in each property's units and would need a threshold per property. A
fixed D threshold fires on sampling noise in small datasets, so each threshold is raised to
the D that samples of those sizes reach by chance with probability `alpha`.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from convflow.checks.config import (
    ClassBalanceConfig,
    ClassSetConfig,
    DriftConfig,
    LabelConflictsConfig,
    LeakageConfig,
    MinCountConfig,
    ValidateConfig,
)
from convflow.checks.image_properties import popcount
from convflow.checks.schemas import CHECK_RESULTS_SCHEMA, IMAGE_PROPERTIES_SCHEMA, MAX_FILES

Verdict = Literal["pass", "warn", "block"]
SEVERITY = {"pass": 0, "warn": 1, "block": 2}
SPLITS = ("train", "validation", "test")
# Candidate pairs verified at a time in the leakage search (bounds its memory).
PAIRS_PER_CHUNK = 4_000_000


class CheckResult(BaseModel):
    """One figure of one check about one subject (a class, a property, a split)."""

    model_config = ConfigDict(frozen=True)

    check: str
    subject: str
    value: float | None
    baseline: float | None
    threshold: float | None
    verdict: Verdict
    detail: str
    files: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class _Images:
    """The per-image table's columns as numpy arrays."""

    ids: np.ndarray
    splits: np.ndarray
    labels: np.ndarray
    sha256: np.ndarray
    dhash: np.ndarray
    table: pa.Table

    @classmethod
    def of(cls, table: pa.Table) -> _Images:
        missing = [name for name in IMAGE_PROPERTIES_SCHEMA.names if name not in table.column_names]
        if missing:
            raise ValueError(
                f"the per-image table lacks column(s) {missing}: expected IMAGE_PROPERTIES_SCHEMA's "
                f"{IMAGE_PROPERTIES_SCHEMA.names}"
            )
        if not table.num_rows:
            raise ValueError("the per-image table has no rows: there is nothing to check")

        def strings(name: str) -> np.ndarray:
            return np.asarray(table.column(name).to_pylist(), dtype=object)

        return cls(
            strings("example_id"),
            strings("split"),
            strings("label"),
            strings("sha256"),
            table.column("dhash").to_numpy().astype(np.uint64),
            table,
        )

    def property(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy().astype(np.float64)

    def classes(self) -> list[str]:
        return sorted(set(self.labels.tolist()))


def run_data_checks(current: pa.Table, baseline: pa.Table | None, config: ValidateConfig) -> list[CheckResult]:
    """Every check that is not off, this run's per-image table against production's.

    Args:
        current: this run's per-image table (IMAGE_PROPERTIES_SCHEMA).
        baseline: production's, or None when there is no production model: then only the checks
            that need none run (min_count, label_conflicts, leakage).
    """
    now = _Images.of(current)
    before = None if baseline is None else _Images.of(baseline)
    results = [
        *_min_count(now, config.min_count),
        *_label_conflicts(now, before, config.label_conflicts),
        *_leakage(now, config.leakage),
    ]
    if before is not None:
        results += [
            *_class_set(now, before, config.class_set),
            *_class_balance(now, before, config.class_balance, config.alpha),
            *_drift(now, before, config.drift, config.alpha),
        ]
    return results


def verdict(results: list[CheckResult]) -> tuple[Verdict, list[str]]:
    """The run's verdict (its worst row's) and a reason per row that did not pass, blocks first."""
    failed = sorted((row for row in results if row.verdict != "pass"), key=lambda row: -SEVERITY[row.verdict])
    worst = failed[0].verdict if failed else "pass"
    return worst, [f"{row.verdict}: {row.check} {row.subject}: {row.detail}" for row in failed]


def results_table(results: list[CheckResult]) -> pa.Table:
    return pa.Table.from_pylist([row.model_dump() for row in results], schema=CHECK_RESULTS_SCHEMA)


def check_class_set(current: pa.Table, baseline: pa.Table, settings: ClassSetConfig) -> list[CheckResult]:
    """Per class of either run: its example count now and in production; fires for a class that
    appeared or disappeared."""
    return list(_class_set(_Images.of(current), _Images.of(baseline), settings))


def check_class_balance(
    current: pa.Table, baseline: pa.Table, settings: ClassBalanceConfig, alpha: float = 1e-4
) -> list[CheckResult]:
    """Per class: its share of the examples now and in production; fires when the share moved by
    more than max_distance and by more than sampling noise at `alpha`."""
    return list(_class_balance(_Images.of(current), _Images.of(baseline), settings, alpha))


def check_min_count(current: pa.Table, settings: MinCountConfig) -> list[CheckResult]:
    """Per class and split: its example count; fires below the split's minimum."""
    return list(_min_count(_Images.of(current), settings))


def check_label_conflicts(
    current: pa.Table, baseline: pa.Table | None, settings: LabelConflictsConfig
) -> list[CheckResult]:
    """Per class: its examples whose content (sha256) is also filed under another class in this run;
    and, with a baseline, those production had under another class (relabelled since)."""
    return list(_label_conflicts(_Images.of(current), None if baseline is None else _Images.of(baseline), settings))


def check_leakage(current: pa.Table, settings: LeakageConfig) -> list[CheckResult]:
    """Per pair of splits: the share of the later split's examples with a near copy (dHash within
    max_distance bits) in the earlier one."""
    return list(_leakage(_Images.of(current), settings))


def check_drift(current: pa.Table, baseline: pa.Table, settings: DriftConfig, alpha: float = 1e-4) -> list[CheckResult]:
    """Per property (and per property and class): the KS statistic against production's."""
    return list(_drift(_Images.of(current), _Images.of(baseline), settings, alpha))


def judge(fired: bool, action: str) -> Verdict:
    """A result's verdict: the check's action (block or warn) when its figure is past the threshold."""
    return action if fired else "pass"  # type: ignore[return-value]


def _named(files: np.ndarray) -> tuple[list[str], str]:
    """At most MAX_FILES of `files`, and a note of how many there were when some were left out."""
    named = [str(name) for name in files[:MAX_FILES]]
    return named, (f" ({len(files)} in all, {len(named)} named)" if len(files) > len(named) else "")


def _class_set(now: _Images, before: _Images, settings: ClassSetConfig) -> Iterator[CheckResult]:
    if settings.action == "off":
        return
    for name in sorted(set(now.classes()) | set(before.classes())):
        in_now, in_before = now.labels == name, before.labels == name
        count, was = int(in_now.sum()), int(in_before.sum())
        if count and was:
            detail, files = f"in both: {count} examples, {was} in production", []
        elif count:
            files, more = _named(now.ids[in_now])
            detail = f"appeared: {count} examples, none in production" + more
        else:
            files, more = _named(before.ids[in_before])
            detail = f"disappeared: no examples, {was} in production" + more
        yield CheckResult(
            check="class_set",
            subject=name,
            value=count,
            baseline=was,
            threshold=None,
            verdict=judge(not (count and was), settings.action),
            detail=detail,
            files=files,
        )


def _class_balance(now: _Images, before: _Images, settings: ClassBalanceConfig, alpha: float) -> Iterator[CheckResult]:
    if settings.action == "off":
        return
    n, m = len(now.labels), len(before.labels)
    z = NormalDist().inv_cdf(1 - alpha / 2)
    for name in sorted(set(now.classes()) | set(before.classes())):
        count, was = int((now.labels == name).sum()), int((before.labels == name).sum())
        share, share_before = count / n, was / m
        pooled = (count + was) / (n + m)
        noise = z * math.sqrt(pooled * (1 - pooled) * (1 / n + 1 / m))
        allowed = max(settings.max_distance, noise)
        moved = abs(share - share_before)
        detail = (
            f"share {share:.3f} ({count} of {n}), {share_before:.3f} in production ({was} of {m}): moved "
            f"{moved:.3f}, allowed {allowed:.3f} (max_distance {settings.max_distance:g}, sampling noise "
            f"{noise:.3f})"
        )
        yield CheckResult(
            check="class_balance",
            subject=name,
            value=share,
            baseline=share_before,
            threshold=allowed,
            verdict=judge(moved > allowed, settings.action),
            detail=detail,
        )


def _min_count(now: _Images, settings: MinCountConfig) -> Iterator[CheckResult]:
    if settings.action == "off":
        return
    for split in SPLITS:
        in_split = now.splits == split
        if not in_split.any():  # the pipeline has no such split (data.split gives it nothing)
            continue
        minimum = getattr(settings, split)
        for name in now.classes():
            count = int((in_split & (now.labels == name)).sum())
            yield CheckResult(
                check="min_count",
                subject=f"{name} / {split}",
                value=count,
                baseline=None,
                threshold=minimum,
                verdict=judge(count < minimum, settings.action),
                detail=f"{count} {split} examples of {name}, at least {minimum} wanted",
            )


def _label_conflicts(now: _Images, before: _Images | None, settings: LabelConflictsConfig) -> Iterator[CheckResult]:
    if settings.action == "off":
        return
    labels_of = _labels_by_digest(now)
    labels_before = {} if before is None else _labels_by_digest(before)
    for name in now.classes():
        mine = np.flatnonzero(now.labels == name)
        shared = {at: labels_of[now.sha256[at]] - {name} for at in mine}
        yield _conflict_row(now, name, name, shared, "share their content with another class", settings)
        if before is not None:
            moved = {at: labels_before.get(now.sha256[at], set()) - {name} for at in mine}
            yield _conflict_row(
                now, f"{name} vs production", name, moved, "were filed under another class in production", settings
            )


def _labels_by_digest(images: _Images) -> dict[str, set[str]]:
    labels: dict[str, set[str]] = defaultdict(set)
    for digest, label in zip(images.sha256.tolist(), images.labels.tolist()):
        labels[digest].add(label)
    return labels


def _conflict_row(
    now: _Images, subject: str, name: str, others: dict[int, set[str]], what: str, settings: LabelConflictsConfig
) -> CheckResult:
    conflicted = [at for at, labels in others.items() if labels]
    files, more = _named(now.ids[conflicted])
    classes = sorted(set().union(*others.values()))
    detail = f"{len(conflicted)} examples of {name} {what}" + (f" ({', '.join(classes)})" if classes else "") + more
    return CheckResult(
        check="label_conflicts",
        subject=subject,
        value=len(conflicted),
        baseline=None,
        threshold=settings.max_conflicts,
        verdict=judge(len(conflicted) > settings.max_conflicts, settings.action),
        detail=detail,
        files=files,
    )


def _leakage(now: _Images, settings: LeakageConfig) -> Iterator[CheckResult]:
    if settings.action == "off":
        return
    present = [split for split in SPLITS if (now.splits == split).any()]
    sides = np.minimum(now.table["width"].to_numpy(), now.table["height"].to_numpy())
    # A dHash is a 9 x 8 thumbnail: of a digit drawn in 8 x 8 or 28 x 28 pixels, most images of a
    # class share one (sklearn's digits: two thirds of the test split "leaked"). Small images count
    # as copies when their content is identical.
    small = float(np.median(sides)) < settings.min_side
    how = (
        f"identical content: images under {settings.min_side} px"
        if small
        else f"dHash within {settings.max_distance} bits"
    )
    for earlier, later in itertools.combinations(present, 2):
        held_out, seen = np.flatnonzero(now.splits == later), np.flatnonzero(now.splits == earlier)
        if small:
            partner = _identical(now.sha256[held_out], now.sha256[seen])
        else:
            partner, _ = near_copies(now.dhash[held_out], now.dhash[seen], settings.max_distance)
        leaked = np.flatnonzero(partner >= 0)
        share = len(leaked) / len(held_out)
        pairs = [str(now.ids[index]) for at in leaked[: MAX_FILES // 2] for index in (held_out[at], seen[partner[at]])]
        more = f", {len(leaked) - MAX_FILES // 2} more not named" if len(leaked) > MAX_FILES // 2 else ""
        detail = (
            f"{len(leaked)} of {len(held_out)} {later} examples ({share:.2%}) have a near copy in {earlier} "
            f"({how}{more}); at most {settings.max_share:.2%} allowed"
        )
        yield CheckResult(
            check="leakage",
            subject=f"{later} ~ {earlier}",
            value=share,
            baseline=None,
            threshold=settings.max_share,
            verdict=judge(share > settings.max_share, settings.action),
            detail=detail,
            files=pairs,
        )


def _identical(queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """For each query digest, the index of an equal digest in `pool`, or -1."""
    first = {digest: index for index, digest in reversed(list(enumerate(pool.tolist())))}
    return np.array([first.get(digest, -1) for digest in queries.tolist()], np.int64)


def near_copies(queries: np.ndarray, pool: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash, a pool hash within max_distance bits: its index (-1 if none) and distance.

    Pigeonhole: two 64-bit hashes within k bits agree exactly on at least one of k + 1 bands of
    their bits. So candidates are the pairs that share a band (found by sorting the pool's band
    values and searching the queries' in them), verified by popcount; each distinct hash is looked
    up once, so identical hashes (flat images) cost one candidate, not a square of them.
    """
    partner = np.full(len(queries), -1, np.int64)
    distance = np.full(len(queries), 255, np.uint8)
    if not len(queries) or not len(pool):
        return partner, distance
    query_values, query_of = np.unique(queries, return_inverse=True)
    pool_values, pool_first = np.unique(pool, return_index=True)
    best = np.full(len(query_values), 255, np.uint8)
    best_pool = np.full(len(query_values), -1, np.int64)
    for shift, width in _bands(max_distance):
        mask = np.uint64((1 << width) - 1)
        pool_band = (pool_values >> np.uint64(shift)) & mask
        order = np.argsort(pool_band, kind="stable")
        sorted_band = pool_band[order]
        query_band = (query_values >> np.uint64(shift)) & mask
        lows = np.searchsorted(sorted_band, query_band, side="left")
        highs = np.searchsorted(sorted_band, query_band, side="right")
        for queries_at, pools_at in _candidate_pairs(lows, highs, order):
            bits = popcount(query_values[queries_at] ^ pool_values[pools_at])
            close = np.flatnonzero(bits <= max_distance)
            # Closest last: where a query has several candidates, the last one written wins.
            close = close[np.argsort(-bits[close].astype(np.int16), kind="stable")]
            queries_at, pools_at, bits = queries_at[close], pools_at[close], bits[close]
            better = bits < best[queries_at]
            best_pool[queries_at[better]] = pools_at[better]
            best[queries_at[better]] = bits[better]
    found = best_pool[query_of]
    partner[found >= 0] = pool_first[found[found >= 0]]
    distance[found >= 0] = best[query_of][found >= 0]
    return partner, distance


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of max_distance + 1 bands that together cover the 64 bits."""
    count = max_distance + 1
    widths = [64 // count + (1 if band < 64 % count else 0) for band in range(count)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(shifts, widths))


def _candidate_pairs(lows: np.ndarray, highs: np.ndarray, order: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(query index, pool index) of every query's [low, high) run of the sorted pool, in chunks of
    about PAIRS_PER_CHUNK pairs."""
    counts = highs - lows
    ends = np.cumsum(counts)
    start = 0
    while start < len(counts):
        stop = max(int(np.searchsorted(ends, (ends[start] - counts[start]) + PAIRS_PER_CHUNK, side="right")), start + 1)
        chunk_counts = counts[start:stop]
        queries_at = np.repeat(np.arange(start, stop), chunk_counts)
        offsets = np.arange(len(queries_at)) - np.repeat(np.cumsum(chunk_counts) - chunk_counts, chunk_counts)
        yield queries_at, order[np.repeat(lows[start:stop], chunk_counts) + offsets]
        start = stop


def ks_statistic(sample: np.ndarray, reference: np.ndarray) -> tuple[float, float, bool]:
    """The two-sample Kolmogorov-Smirnov statistic D; where the gap is largest; and whether
    `sample` has more of its mass at or below that point than `reference` (it lies lower there)."""
    sample, reference = np.sort(sample), np.sort(reference)
    points = np.concatenate([sample, reference])
    gaps = np.searchsorted(sample, points, side="right") / len(sample) - np.searchsorted(
        reference, points, side="right"
    ) / len(reference)
    at = int(np.argmax(np.abs(gaps)))
    return float(abs(gaps[at])), float(points[at]), bool(gaps[at] > 0)


def ks_critical(n: int, m: int, alpha: float) -> float:
    """The D that samples of n and m from one distribution exceed with probability about alpha
    (the asymptotic Kolmogorov bound: sqrt(-ln(alpha / 2) / 2) * sqrt((n + m) / (n m)))."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def _drift(now: _Images, before: _Images, settings: DriftConfig, alpha: float) -> Iterator[CheckResult]:
    if settings.action == "off":
        return
    groups = [(None, np.ones(len(now.ids), bool), np.ones(len(before.ids), bool))]
    if settings.per_class:
        groups += [
            (name, now.labels == name, before.labels == name)
            for name in sorted(set(now.classes()) & set(before.classes()))
        ]
    for name in settings.properties:
        values, values_before = now.property(name), before.property(name)
        for label, mine, theirs in groups:
            subject = name if label is None else f"{name} / {label}"
            yield _drift_row(subject, values[mine], values_before[theirs], now.ids[mine], settings, alpha)


def _drift_row(
    subject: str, values: np.ndarray, values_before: np.ndarray, ids: np.ndarray, settings: DriftConfig, alpha: float
) -> CheckResult:
    statistic, point, lower = ks_statistic(values, values_before)
    noise = ks_critical(len(values), len(values_before), alpha)
    allowed = max(settings.max_statistic, noise)
    fired = statistic > allowed
    files, more = [], ""
    if fired:  # the images on the side where this run has too many, the farthest out first
        beyond = np.flatnonzero(values <= point) if lower else np.flatnonzero(values > point)
        farthest = beyond[np.argsort(values[beyond], kind="stable")]
        files, more = _named(ids[farthest if lower else farthest[::-1]])
    side = "at or below" if lower else "above"
    detail = (
        f"KS {statistic:.3f}, allowed {allowed:.3f} (max_statistic {settings.max_statistic:g}, sampling noise "
        f"{noise:.3f}); median {np.median(values):.4g}, {np.median(values_before):.4g} in production; "
        f"{np.mean(values <= point) if lower else np.mean(values > point):.1%} of this run's images "
        f"{side} {point:.4g}, {np.mean(values_before <= point) if lower else np.mean(values_before > point):.1%} "
        f"of production's ({len(values)} and {len(values_before)} images){more}"
    )
    return CheckResult(
        check="drift",
        subject=subject,
        value=statistic,
        baseline=None,
        threshold=allowed,
        verdict=judge(fired, settings.action),
        detail=detail,
        files=files,
    )
