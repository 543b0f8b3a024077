"""Content digests: of JSON-able values (records, config slices) and of files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pydantic


def hash_json(value: Any) -> str:
    """A stable sha256 of a JSON-able value; pydantic models in it are dumped first.

    json.dumps walks plain lists, tuples and dicts in C and calls `_dump_model` only for what it
    cannot serialise itself, so large plain payloads (70,000 example hashes) hash quickly.
    """
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=_dump_model).encode()).hexdigest()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _dump_model(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):  # EXECUTION_ONLY fields change where, not what
        return value.model_dump(mode="json", exclude=set(getattr(value, "EXECUTION_ONLY", ())))
    raise TypeError(f"{type(value).__name__} is not JSON-able: {value!r}")
