"""How a mistake in a pipelines file is worded: its path in the file, the bad value, and what is expected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# A mapping shown as a bad value is cut when longer than this: a whole pipeline buries the message.
MAX_SHOWN_SECTION = 80


class ConfigError(ValueError):
    """A pipelines file that cannot be used; `problems` holds one line per mistake."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s)\n" + "\n".join(problems))


def _describe(error: dict[str, Any]) -> str:
    context = error.get("ctx") or {}
    kind = error["type"]
    if kind == "greater_than_equal":
        return f"must be ≥ {context['ge']}"
    if kind == "greater_than":
        return f"must be > {context['gt']}"
    if kind == "less_than_equal":
        return f"must be ≤ {context['le']}"
    if kind == "less_than":
        return f"must be < {context['lt']}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "literal_error":
        return f"must be one of {context['expected']}"
    if kind == "value_error":
        return str(context.get("error", error["msg"]))
    return error["msg"]


def format_error(prefix: str, error: dict[str, Any]) -> str:
    path = ".".join([prefix, *(str(part) for part in error["loc"])])
    message = _describe(error)
    if error["type"] in ("missing",) or "input" not in error:
        return f"{path}: {message}"
    shown = json.dumps(error["input"], default=str)
    if isinstance(error["input"], dict) and len(shown) > MAX_SHOWN_SECTION:
        return f"{path}: {message}"  # a whole section as the value would bury the message
    return f"{path}: {shown} — {message}"
