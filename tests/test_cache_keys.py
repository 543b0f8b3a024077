"""A stage's cache key covers every convflow module its code imports: editing one of them (in a copy
of the package) makes the stages that import it, and the stages after them, run again; editing
what no stage computes with (the CLI, the pipelines file's loader, an error message's wording, a
report template) changes nothing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, STAGES, TINY_PIPELINES, run_tiny, subprocess_env, write_yaml
from convflow.core.cache_keys import code_closure


def installed_copy(destination: Path) -> Path:
    """convflow laid out as installed (flows/ and tasks/ inside the package), under `destination`."""
    package = destination / "convflow"
    shutil.copytree(REPO / "convflow", package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("flows", "tasks"):
        shutil.copytree(REPO / name, package / name, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


def edit(copy: Path, module: str, old: str | None = None, new: str | None = None) -> None:
    """Change a file of the package (`module`, relative to it): replace `old` by `new`, or append a
    comment, which changes a module's source without changing what it does."""
    path = copy / "convflow" / module
    text = path.read_text()
    if old is None:
        comment = "# edited by test_cache_keys" if path.suffix == ".py" else "{# edited by test_cache_keys #}"
        path.write_text(f"{text}\n{comment}\n")
        return
    assert old in text, f"{module} no longer holds {old!r}"
    path.write_text(text.replace(old, new))


class CopyRunner:
    def __init__(self, root: Path):
        self.copy = installed_copy(root / "code")
        self.env = {**subprocess_env(), "PYTHONPATH": str(self.copy)}
        write_yaml(root / "pipelines.yaml", TINY_PIPELINES)
        self.root = root

    def imported_from(self) -> str:
        check = "import convflow.tasks.train as module; print(module.__file__)"
        # From the run's folder, as the runs below: `python -c` puts its working folder first on
        # sys.path, and in the checkout that would be the checkout's convflow.
        return subprocess.run(
            [PYTHON, "-c", check], env=self.env, cwd=self.root, capture_output=True, text=True, check=True
        ).stdout.strip()

    def cache_hits(self) -> list[str]:
        """`convflow run tiny` with the copy's code; the stages that were cache hits."""
        return [name for name, cached in run_tiny(self.root, env=self.env)["cached"].items() if cached]


def test_code_closure_follows_imports_but_not_the_flows():
    names = {str(path.relative_to(REPO)) for path in code_closure("convflow.tasks.train")}

    assert {
        "tasks/train.py",
        "convflow/core/records.py",
        "convflow/modeling/layers.py",
        "convflow/catalog/schemas.py",
        "convflow/config/schema.py",
        "convflow/core/storage.py",
        "convflow/core/stage.py",
    } <= names
    # Where and how training runs is not what it makes: no flows, runtime (work pool, process caches) or CLI.
    assert not any(name.startswith(("flows/", "convflow/runtime/", "convflow/cli/")) for name in names)
    assert "tasks/evaluate.py" not in names  # another stage's code is not in train's key
    # The schema, not the file's loader, its error wording or the tune and compare derivations.
    assert not names & {
        "convflow/config/load.py",
        "convflow/config/errors.py",
        "convflow/config/derive.py",
        "convflow/config/yaml_loader.py",
    }
    download = {str(path.relative_to(REPO)) for path in code_closure("convflow.tasks.download_and_split")}
    assert "convflow/modeling/layers.py" not in download and "convflow/catalog/schemas.py" in download


def test_code_closure_is_read_without_importing_tensorflow():
    """The closure is read from source: a cache hit must not pay for importing TensorFlow (it once
    imported convflow/modeling/layers.py, and Keras with it, to look up `from ... import ReverseChannels`)."""
    check = (
        "import sys\n"
        "from convflow.tasks import build_base, evaluate, train\n"
        "from convflow.core.cache_keys import code_closure\n"
        "for module in (build_base, evaluate, train):\n"
        "    code_closure(module.__name__)\n"
        "heavy = [name for name in ('tensorflow', 'keras', 'convflow.modeling.layers') if name in sys.modules]\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)\n"
    )
    result = subprocess.run([PYTHON, "-c", check], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.e2e
@pytest.mark.slow
def test_editing_imported_code_misses_the_stages_that_import_it(tmp_path):
    runner = CopyRunner(tmp_path)
    assert runner.imported_from().startswith(str(runner.copy))  # the copy runs, not the checkout

    assert runner.cache_hits() == []
    cached = STAGES[:-1]  # write_report always runs: it reports this run
    edit(runner.copy, "cli/app.py")  # no stage imports the CLI
    assert runner.cache_hits() == cached
    edit(runner.copy, "config/load.py")  # the pipelines file's loader
    assert runner.cache_hits() == cached
    edit(runner.copy, "config/errors.py", '"unknown key"', '"not a key of this section"')  # an error's wording
    assert runner.cache_hits() == cached
    edit(runner.copy, "reporting/templates/report.html.j2")  # how the report looks
    assert runner.cache_hits() == cached
    edit(runner.copy, "modeling/layers.py")  # custom Keras layers: the model stages, not the data ones
    assert runner.cache_hits() == ["download_and_split", "to_tfrecords", "check_data"]
    edit(runner.copy, "catalog/schemas.py")  # Parquet schemas: download_and_split writes splits.parquet
    assert runner.cache_hits() == []
    edit(runner.copy, "config/schema.py")  # every stage reads its config slice through it
    assert runner.cache_hits() == []
