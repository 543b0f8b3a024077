"""The `convflow` command: validate, run's refusal of bad files, runs, help."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from conftest import CONVFLOW, REPO, STAGES, TINY_PIPELINES, last_json_line, run_convflow, subprocess_env, write_yaml
from convflow.cli.app import EXIT_BAD_CONFIG, main


@pytest.fixture
def three_mistakes_file(tmp_path):
    document = copy.deepcopy(TINY_PIPELINES)
    tiny = document["pipelines"]["tiny"]
    tiny["train"]["epochs"] = 0
    tiny["data"]["channels"] = 2
    tiny["model"]["colour"] = "blue"
    return write_yaml(tmp_path / "bad.yaml", document)


THREE_MISTAKES = (
    "pipelines.tiny.train.epochs: 0 — must be ≥ 1",
    "pipelines.tiny.data.channels: 2 — must be one of 1 or 3",
    'pipelines.tiny.model.colour: "blue" — unknown key',
)


def test_validate_reports_every_mistake_and_exits_2(three_mistakes_file):
    result = subprocess.run(
        [CONVFLOW, "validate", str(three_mistakes_file)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )

    assert result.returncode == EXIT_BAD_CONFIG == 2
    assert f"{three_mistakes_file}: 3 problem(s)" in result.stderr
    for line in THREE_MISTAKES:
        assert line in result.stderr
    assert result.stdout == ""


def test_validate_in_process(three_mistakes_file, pipelines_file, capsys):
    assert main(["validate", str(three_mistakes_file)]) == 2
    err = capsys.readouterr().err
    assert all(line in err for line in THREE_MISTAKES)

    assert main(["validate", str(pipelines_file)]) == 0
    assert capsys.readouterr().out.strip() == f"{pipelines_file}: 1 pipeline(s) valid: tiny"


def test_validate_defaults_to_pipelines_yaml_in_the_working_directory(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    assert "pipelines.yaml:" in out and "smoke" in out and "digits-cnn" in out


def test_run_refuses_a_bad_file_before_writing_anything(three_mistakes_file, tmp_path, capsys):
    artifacts = tmp_path / "artifacts"

    code = main(["run", "tiny", "-f", str(three_mistakes_file), "--artifacts", str(artifacts)])

    assert code == 2
    err = capsys.readouterr().err
    assert all(line in err for line in THREE_MISTAKES)
    assert not artifacts.exists()


def test_run_refuses_an_unknown_pipeline(pipelines_file, tmp_path, capsys):
    artifacts = tmp_path / "artifacts"
    assert main(["run", "nope", "-f", str(pipelines_file), "--artifacts", str(artifacts)]) == 2
    assert "pipelines.nope: no such pipeline" in capsys.readouterr().err
    assert not artifacts.exists()


def test_run_subprocess_bad_file_exits_2_and_creates_no_artifacts(three_mistakes_file, tmp_path):
    result = subprocess.run(
        [CONVFLOW, "run", "tiny", "-f", str(three_mistakes_file), "--artifacts", "out", "--json"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    assert THREE_MISTAKES[0] in result.stderr
    assert not (tmp_path / "out").exists()


def test_help():
    result = subprocess.run([CONVFLOW, "--help"], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert result.returncode == 0
    for word in ("run", "validate", "runs"):
        assert word in result.stdout


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
    assert "usage: convflow" in capsys.readouterr().err


def test_runs_on_an_empty_artifacts_root(tmp_path, capsys):
    assert main(["runs", "--artifacts", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("no runs") and "runs.parquet" in out


COLLECTOR_AT_FLOW_CALL = """
import gc, json, sys
from convflow.cli import flows, main

def record_collector(*args):
    print(json.dumps({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}))
    raise RuntimeError("stopped before the flow")

def load_flow():
    import convflow.flows.train_pipeline  # all that the real loader imports: Prefect, the stages
    return record_collector

flows._load_train_pipeline = load_flow
sys.exit(main(sys.argv[2:], exits_after=sys.argv[1] == "console-script"))
"""


@pytest.mark.parametrize("caller", ["console-script", "in-process"])
def test_run_freezes_its_imports_only_in_a_process_that_ends_with_it(caller, pipelines_file, tmp_path):
    # The console script pauses the collector while `run` imports Prefect and the stages (~0.17 s
    # of a cached run), then freezes them; main() called in-process (tests) leaves it alone.
    env = {**subprocess_env(), "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # no temporary server
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            COLLECTOR_AT_FLOW_CALL,
            caller,
            "run",
            "tiny",
            "-f",
            str(pipelines_file),
            "--artifacts",
            str(tmp_path / "artifacts"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "convflow run tiny failed: RuntimeError: stopped before the flow" in result.stderr
    collector = last_json_line(result.stdout)
    assert collector["enabled"] is True
    if caller == "console-script":
        assert collector["frozen"] > 100_000, collector
    else:
        assert collector["frozen"] == 0


IN_PROCESS_RUN_AFTER_PREFECT = """
import sys
import prefect  # imported before main(), as in a notebook or a script that uses Prefect itself
from convflow.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.e2e
def test_run_from_python_after_prefect_was_imported_uses_convflows_server(pipelines_file, tmp_path):
    # An empty PREFECT_API_URL (`export PREFECT_API_URL=` to clear it) means no server to convflow,
    # which starts its own; Prefect, imported before, kept the empty address and started another
    # temporary server for the flow, and its events worker failed against it. The flow now runs
    # with the address of convflow's server in its Prefect settings.
    env = {**subprocess_env(), "PREFECT_API_URL": ""}
    run = run_convflow(
        ["run", "tiny", "-f", str(pipelines_file), "--artifacts", str(tmp_path / "artifacts"), "--json"],
        program=[sys.executable, "-c", IN_PROCESS_RUN_AFTER_PREFECT],
        env=env,
        timeout=300,
    )
    output = run.output
    assert run.summary["status"] in ("completed", "not-promoted")
    assert "Starting temporary server" not in output, output[-4000:]
    assert "failed with" not in output, output[-4000:]


FLOW_CALLED_FROM_PYTHON = """
import sys
from convflow.flows.train_pipeline import train_pipeline

summary = train_pipeline("tiny", sys.argv[1], sys.argv[2])
print(summary.status)
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_flow_called_from_python_caches_beside_the_artifacts(pipelines_file, tmp_path):
    """No CLI, no settings: the stages' results still go to <artifacts>/.prefect-results, where a
    `convflow run` on the same artifacts finds them, and not to Prefect's default storage."""
    home = tmp_path / "prefect-home"
    env = {**subprocess_env(), "PREFECT_HOME": str(home)}
    artifacts = tmp_path / "artifacts"
    result = subprocess.run(
        [sys.executable, "-c", FLOW_CALLED_FROM_PYTHON, str(pipelines_file), str(artifacts)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    stored = sorted(path.name.rsplit("-", 1)[0] for path in (artifacts / ".prefect-results").iterdir())
    assert set(stored) == set(STAGES), stored
    assert not (home / "storage").exists() or not any((home / "storage").iterdir())

    rerun = run_convflow(
        ["run", "tiny", "-f", str(pipelines_file), "--artifacts", str(artifacts), "--json"], env=env, cwd=tmp_path
    )
    assert [stage["cached"] for stage in rerun.summary["stages"]] == [True] * (len(STAGES) - 1) + [False]


def test_version_is_the_installed_package_version():
    from importlib.metadata import version

    result = subprocess.run([CONVFLOW, "--version"], capture_output=True, text=True, env=subprocess_env(), timeout=60)

    assert result.returncode == 0
    assert result.stdout.strip() == f"convflow {version('convflow')}"
    assert version("convflow").count(".") >= 1
