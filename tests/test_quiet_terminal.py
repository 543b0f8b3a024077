"""A convflow command's terminal: TensorFlow's native start-up log is hidden unless --verbose (or a
TF_CPP_MIN_LOG_LEVEL of the user's own), and what TensorFlow really says, its errors, still shows."""

from __future__ import annotations

import argparse
import os
import re
import subprocess

import pytest
from tf_error_convflow import MESSAGE

from conftest import PYTHON, REPO, TinyRunner, start_convflow, subprocess_env
from convflow.cli.app import _tensorflow_log
from convflow.runtime import native_log
from convflow.runtime.native_log import NativeLogFilter

# What `import tensorflow` and its first op print on this CPU-only machine (TensorFlow 2.21).
STARTUP_LOG = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1795917936.940837   25629 port.cc:153] oneDNN custom operations are on. You may see slightly "
    b"different numerical results due to floating-point round-off errors from different computation orders.",
    b"I0000 00:00:1795917936.943043   25629 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
    b"will not be used.",
    b"I0000 00:00:1795917953.782513   25876 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    b"available CPU instructions in performance-critical operations.",
    b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    b"appropriate compiler flags.",
    b"E0000 00:00:1795917940.844750   25629 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    b"Failed call to cuInit: UNKNOWN ERROR (303)",
]
KEPT = [
    b"02:05:43.033 | INFO    | Flow run 'smoke' - Beginning flow run 'smoke' for flow 'convflow-train'",
    b"W0000 00:00:1795917940.844750   25629 loader.cc:10] a warning TensorFlow means",
    b"E0000 00:00:1795917940.844750   25629 op_kernel.cc:1830] OP_REQUIRES failed at check_numerics_op.cc:71",
    b"Traceback (most recent call last):",
    b"tensorflow.python.framework.errors_impl.InvalidArgumentError: boom : Tensor had NaN values",
]
NATIVE_OR_BANNER = re.compile(
    r"^([IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\]|WARNING: All log messages before absl)", re.MULTILINE
)


def quiet_env() -> dict[str, str]:
    """A user's environment: no TF_CPP_MIN_LOG_LEVEL of their own."""
    env = subprocess_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL")
    return env


def test_the_startup_log_is_dropped_and_the_rest_kept():
    decide = NativeLogFilter()

    assert [line for line in STARTUP_LOG + KEPT if decide.keep(line)] == KEPT


def test_a_cuinit_failure_is_kept_where_tensorflow_found_a_cuda_driver():
    assert NativeLogFilter().keep(STARTUP_LOG[-1])


def test_the_filter_passes_partial_lines_and_everything_after_the_noise(tmp_path):
    read_end, write_end = os.pipe()
    noise_then_output = b"\n".join(STARTUP_LOG) + b"\nstage lines\n" + KEPT[2] + b"\nPassword: "
    os.write(write_end, noise_then_output)
    os.close(write_end)
    shown = tmp_path / "terminal"
    with open(shown, "wb") as terminal:
        native_log._forward(read_end, terminal.fileno())
    os.close(read_end)

    assert shown.read_bytes() == b"stage lines\n" + KEPT[2] + b"\nPassword: "


def test_the_filter_stops_at_the_end_of_the_command_though_a_child_still_holds_stderr(tmp_path):
    """A child that outlives the command (multiprocessing's resource tracker) keeps the pipe open:
    the filter passes on what came before the command's end marker and stops there."""
    read_end, write_end = os.pipe()
    os.write(write_end, STARTUP_LOG[0] + b"\nlast words, then a prompt: " + native_log.END_OF_COMMAND + b"\nlater\n")
    shown = tmp_path / "terminal"
    with open(shown, "wb") as terminal:
        native_log._forward(read_end, terminal.fileno())  # returns though write_end is still open
    os.close(write_end)
    os.close(read_end)

    assert shown.read_bytes() == b"last words, then a prompt: "


@pytest.mark.parametrize(
    ("user_level", "verbose", "level"), [(None, True, "0"), ("3", True, "3"), ("2", False, "2"), (None, False, "1")]
)
def test_tensorflows_log_level(monkeypatch, user_level, verbose, level):
    if user_level is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", user_level)

    _tensorflow_log(argparse.Namespace(command="run", verbose=verbose), exits_after=False)

    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == level


@pytest.mark.e2e
@pytest.mark.slow
def test_convflow_run_digits_cnn_shows_no_native_log_line(tmp_path):
    process = start_convflow(
        ["run", "digits-cnn", "-f", str(REPO / "pipelines.yaml"), "--artifacts", str(tmp_path / "artifacts")],
        env=quiet_env(),
    )
    stdout, stderr = process.communicate(timeout=900)

    assert process.returncode == 0, stderr[-3000:]
    assert NATIVE_OR_BANNER.findall(stdout + stderr) == []
    assert "Task run 'train" in stderr and "digits-cnn run " in stdout  # stage lines and the summary
    assert re.search(r"^  train +[\d.]+  miss", stdout, re.MULTILINE)  # it trained: TensorFlow ran here


@pytest.mark.e2e
@pytest.mark.slow
def test_verbose_shows_the_native_log(tmp_path):
    runner = TinyRunner(tmp_path)
    process = start_convflow(
        ["run", "tiny", "--verbose", "--artifacts", str(runner.artifacts)], cwd=tmp_path, env=quiet_env()
    )
    stdout, stderr = process.communicate(timeout=600)

    assert process.returncode == 0, stderr[-3000:]
    # Which native lines come depends on the CPU (oneDNN's notice only where it is on by default,
    # cpu_feature_guard's list) and on the CUDA driver; every machine prints absl's banner before
    # the first of them, and native lines that a run without --verbose drops.
    lines = [line.encode() for line in stderr.splitlines()]
    assert native_log.STARTUP_BANNER in lines
    assert [line for line in lines if native_log.NATIVE_LINE.match(line) and not NativeLogFilter().keep(line)]


@pytest.mark.e2e
@pytest.mark.slow
def test_an_error_tensorflow_raises_during_a_run_reaches_the_user(tmp_path):
    runner = TinyRunner(tmp_path)
    result = subprocess.run(
        [PYTHON, str(REPO / "tests" / "tf_error_convflow.py"), "run", "tiny", "--artifacts", str(runner.artifacts)],
        cwd=tmp_path,
        env=quiet_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("convflow run tiny failed: InvalidArgumentError: ")
    assert MESSAGE in last_line
    assert "Traceback (most recent call last)" in result.stderr  # Prefect's log of the failed stage
    for startup_line in ("absl::InitializeLog", "oneDNN custom operations", "cuda drivers", "cuInit"):
        assert startup_line not in result.stdout + result.stderr
