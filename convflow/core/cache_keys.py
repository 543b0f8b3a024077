"""A stage's cache key: its inputs, its config slice, the artifacts root, and the source of every
convflow module its code can run. Modules that decide where, when or how fast code runs (flows,
runtime, cli) are left out: they never change what a stage writes."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from convflow.core.hashing import hash_json
from convflow.core.records import StageRecord
from convflow.core.run_log import run_logger

MAX_CACHE_GENERATIONS = 100
# Sub-packages whose code never shapes a stage's output: where and when it runs (flows, runtime) and
# the command line (cli).
NOT_IN_CACHE_KEYS = ("flows", "runtime", "cli")


def _spec(module_name: str):
    """The module's spec, found without importing it (only the packages above it are imported)."""
    try:
        return importlib.util.find_spec(module_name)
    except ImportError:
        return None


def _source_file(module_name: str) -> Path | None:
    spec = _spec(module_name)
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


@functools.cache  # each source file is read once per process, however many closures hold it
def _convflow_imports(source: Path, package: str) -> frozenset[str]:
    """The convflow modules `source` imports anywhere (at its top or inside a function), read from
    its syntax tree: `from convflow.x import y` names convflow.x, and convflow.x.y when convflow.x is
    a package. NOT_IN_CACHE_KEYS are left out: they decide where and when a stage runs (train on a
    work pool, say), never what it writes."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_bytes())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            if node.module.startswith(package) and _is_package(node.module):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(
        name
        for name in names
        if (name == package or name.startswith(package + ".")) and not _outside_cache_keys(name, package)
    )


def _outside_cache_keys(module_name: str, package: str) -> bool:
    return any(
        module_name == f"{package}.{sub}" or module_name.startswith(f"{package}.{sub}.") for sub in NOT_IN_CACHE_KEYS
    )


def _is_package(module_name: str) -> bool:
    spec = _spec(module_name)
    return spec is not None and spec.submodule_search_locations is not None


@functools.cache
def code_closure(module_name: str) -> tuple[Path, ...]:
    """The source files of `module_name` and of every convflow module it imports, directly or not:
    all the code that can shape a stage's output (records, schemas, layers, config, ...)."""
    package = module_name.split(".")[0]
    seen: dict[str, Path] = {}
    pending = [module_name]
    while pending:
        name = pending.pop()
        source = None if name in seen else _source_file(name)
        if source is not None:
            seen[name] = source
            pending.extend(_convflow_imports(source, package))
    return tuple(seen[name] for name in sorted(seen))


def code_hash(module_name: str) -> str:
    """sha256 over the sources of `module_name`'s code closure: a cache key part that changes when
    any code the module runs changes, and not when code it never imports does."""
    digest = hashlib.sha256()
    for source in code_closure(module_name):
        digest.update(source.read_bytes())
    return digest.hexdigest()


@dataclass
class StageCachePolicy(CachePolicy):
    """Cache key = the stage's inputs (records carry content fingerprints), its config slice,
    the artifacts root and the sources of the stage's module and of every convflow module it imports.

    A cached result whose files are gone is not a hit: the key moves on to the next
    generation (`<key>.1`, `<key>.2`, ...), so the stage runs again and stores its new result there.
    """

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        context = inputs.get("run")
        payload = {name: value for name, value in inputs.items() if name != "run"}
        payload["artifacts_root"] = context.artifacts_root if context else None
        payload["code"] = code_hash(task_ctx.task.fn.__module__)
        base_key = f"{task_ctx.task.name}-{hash_json(payload)[:24]}"
        return _first_usable_generation(task_ctx.result_store, base_key)


def _first_usable_generation(result_store: Any, base_key: str) -> str:
    for generation in range(MAX_CACHE_GENERATIONS):
        key = base_key if generation == 0 else f"{base_key}.{generation}"
        if not result_store.exists(key):
            return key
        try:
            record = result_store.read(key).result
        except Exception as error:  # an unreadable cache entry is a miss, never a failed run
            _log_cache_miss(key, [f"cached result unreadable: {error}"])
            continue
        damaged = record.damaged_files() if isinstance(record, StageRecord) else ["not a stage record"]
        if not damaged:
            return key
        _log_cache_miss(key, damaged)
    return f"{base_key}.{uuid.uuid4().hex[:8]}"


def _log_cache_miss(key: str, problems: list[str]) -> None:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    run_logger("convflow.cache").warning(f"cache entry {key} is not usable ({shown}): the stage runs again")
