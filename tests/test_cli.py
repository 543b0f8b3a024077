"""The `convflow` command: validate, run's refusal of bad files, runs, help."""

from __future__ import annotations

import copy
import subprocess

import pytest

from conftest import CONVFLOW, REPO, TINY_PIPELINES, subprocess_env, write_yaml
from convflow.cli import EXIT_BAD_CONFIG, main


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
        [CONVFLOW, "validate", str(three_mistakes_file)], capture_output=True, text=True, env=subprocess_env(), timeout=60
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
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=60,
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
