"""Why a source's file or row was skipped: the problems' wording, and their counts by reason, as the
summary lines of `convflow init`, a run's log and the report show them."""

from __future__ import annotations

import collections

NOT_AN_IMAGE = "not an image file"
EMPTY = "empty file"
CUT_OFF = "cannot decode: image file is truncated"
HEIC_EXTRA = "pip install 'convflow[heic]'"
NEEDS_HEIC = f"a HEIC/HEIF photo: convflow reads them with the optional pillow-heif plugin: {HEIC_EXTRA}"
NOT_TAKEN = "a format convflow does not take"
RENAME = "rename it to"

# (how a problem starts, the reason it counts under), first match wins; a problem follows its file
# (or table row) and ": " in a skipped line.
_REASONS = (
    (NOT_AN_IMAGE, "not images"),
    (EMPTY, "empty"),
    (CUT_OFF, "cut off"),
    (NEEDS_HEIC, "HEIC without convflow[heic]"),
    ("no image", "no image"),
    ("cannot decode", "cannot decode"),
)


def skip_reason(line: str) -> str:
    """The reason a skipped line ("<file>: <problem>") counts under: "not images", "cut off", ..."""
    for start, reason in _REASONS:
        if f": {start}" in line:
            return reason
    if NOT_TAKEN in line:
        return "formats convflow does not take"
    if RENAME in line:
        return "images to rename"
    if " exceeds " in line:
        return "too large"
    return "other"


def skipped_by_reason(lines: list[str]) -> dict[str, list[str]]:
    """The skipped lines grouped by reason, the most frequent reason first."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for line in lines:
        groups[skip_reason(line)].append(line)
    return dict(sorted(groups.items(), key=lambda group: -len(group[1])))


def skipped_summary(lines: list[str]) -> str:
    """How many were skipped and why, e.g. "72 skipped: 70 not images, 1 empty, 1 cut off"; "" for none."""
    if not lines:
        return ""
    reasons = ", ".join(f"{len(group):,} {reason}" for reason, group in skipped_by_reason(lines).items())
    return f"{len(lines):,} skipped: {reasons}"
