"""Every trick that makes a convflow command start and end fast, in one place: they lean on
Prefect's and CPython's internals, so an upgrade of either is checked here and nowhere else.

- A temporary local Prefect server (when PREFECT_API_URL is unset), started before the CLI imports
  its flow. Prefect's own ephemeral mode starts the same server, but only after importing Prefect's
  whole server package in the client and only once the flow is called, so its start-up adds to
  every run; started first, it overlaps the imports and a fully cached run takes a few seconds.
- `FlowCommand`, the CLI's one entry: while that server starts it imports the flow, TensorFlow (in
  a thread, when the run will train) and what a flow run imports once started; in a process that
  ends with the command it pauses the garbage collector during those imports and freezes them.
- `prestarted`/`take_prestarted`: a helper process (the export check's) started a stage early.
- `exit_process`: the console script's exit without the interpreter's final collection.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import importlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_SECONDS = 60
# Services a lasting server runs (schedules, late and crashed runs, automations, clean-ups); a
# server that lives for one flow run does not need them, and starts sooner without them.
# Event persistence and the task-run recorder stay on: they record the run's task runs, which
# `prefect server start` on the same PREFECT_HOME shows later.
LONG_RUNNING_SERVICES = (
    "SCHEDULER",
    "LATE_RUNS",
    "FOREMAN",
    "CANCELLATION_CLEANUP",
    "PAUSE_EXPIRATIONS",
    "REPOSSESSOR",
    "TRIGGERS",
    "DB_VACUUM",
    "CLEANUP_RECONCILER",
    "EVENT_LOGGER",
)
# Nor does it register block types: to see whether any changed, Prefect first imports every
# installed collection, and convflow uses no blocks. A lasting
# `prefect server start` on the same PREFECT_HOME registers them as it starts.
NO_BLOCK_REGISTRATION = {
    "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
    "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",
}


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _lock_startup() -> int:
    """Wait for, then hold, the start-up lock of this PREFECT_HOME's temporary servers.

    Each temporary server creates or migrates the same SQLite database as it starts; two doing
    so at once (two `convflow run` started together on a fresh machine) collide ("table ...
    already exists") and one exits. Returns the locked file descriptor.
    """
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(home / ".convflow-server-start.lock", os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    return descriptor


def wait_until_healthy(api_url: str, process: subprocess.Popen, timeout: float, poll: float = 0.05) -> None:
    """Block until the Prefect API at `api_url`, served by `process`, answers its health check.

    Raises:
        RuntimeError: the process exited, or the API did not answer within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Prefect server at {api_url} exited with code {process.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{api_url}/health", timeout=max(1.0, poll)) as response:
                if response.status == 200:
                    return
        time.sleep(poll)
    raise RuntimeError(f"the Prefect server at {api_url} did not answer within {timeout:.0f} s")


class TemporaryServer:
    """A Prefect API server on 127.0.0.1 that lives as long as this object's `with` block."""

    def __init__(self) -> None:
        self._startup_lock: int | None = _lock_startup()  # released once the server answers
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        # Not PREFECT__SERVER_FINAL, which Prefect's own ephemeral server sets: with the FastAPI that
        # Prefect installs, all it does is one full garbage collection (benchmarks/RESULTS.md).
        environment = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **{f"PREFECT_SERVER_SERVICES_{service}_ENABLED": "false" for service in LONG_RUNNING_SERVICES},
            **NO_BLOCK_REGISTRATION,
        }
        command = [sys.executable, "-m", "convflow.runtime.fast_start", "--port", str(self.port)]
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL)

    def wait_until_ready(self) -> None:
        """Block until the server answers its health check.

        Raises:
            RuntimeError: the server exited or did not answer within STARTUP_TIMEOUT_SECONDS.
        """
        try:
            self._wait_for_health()
        finally:
            self._release_startup_lock()

    def _wait_for_health(self) -> None:
        wait_until_healthy(self.api_url, self.process, STARTUP_TIMEOUT_SECONDS)

    def _release_startup_lock(self) -> None:
        if self._startup_lock is not None:
            os.close(self._startup_lock)  # closing the descriptor releases its flock
            self._startup_lock = None

    def stop(self) -> None:
        """Flush Prefect's queued logs and events to the server, then stop it."""
        self._release_startup_lock()
        _drain_prefect_workers()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _drain_prefect_workers() -> None:
    # Logs and events are sent by background workers; stopping the server under them makes
    # them retry against a dead address for over a minute at exit.
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


@contextlib.contextmanager
def prefect_api() -> Iterator[TemporaryServer | None]:
    """Point Prefect at PREFECT_API_URL when set, else at a temporary server started now."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    server = TemporaryServer()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield server
    finally:
        server.stop()
        os.environ.pop("PREFECT_API_URL", None)


def serve(port: int) -> None:
    """The temporary server's process: Prefect's API app under uvicorn on 127.0.0.1:`port`, as
    `uvicorn --factory prefect.server.api.server:create_app` runs it, but with the garbage
    collector paused while Prefect's server package is imported.

    That import builds hundreds of thousands of objects; the collections it set off walked them
    again and again, a fifth of the start (benchmarks/RESULTS.md), to free few of them. Frozen
    afterwards, the later collections skip them too, and the first request, which builds every
    route's FastAPI models, is no slower for them.
    """
    gc.disable()
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app()
    gc.freeze()
    gc.enable()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", lifespan="on")


# ----------------------------------------------------------------------------- the CLI's flow commands

# What a flow run imports only once it has started: Prefect's flow and task engines, the encoder
# its parameters go through (FastAPI's), its artifacts and graph helpers. The temporary server
# answers seconds after the CLI has imported the flow, so imported in that wait they cost nothing.
FLOW_RUN_MODULES = (
    "prefect.flow_engine",
    "prefect.task_engine",
    "fastapi.encoders",
    "prefect.artifacts",
    "prefect.utilities.visualization",
)


def import_tensorflow_in_background() -> None:
    """TensorFlow, scikit-learn's metrics and matplotlib take seconds to import, and TensorFlow's
    runtime more to start on its first operation; a process that trains or evaluates pays that
    anyway, so it is paid in a thread while the process waits for something else (the temporary
    server's start, the Prefect engine's start of a flow run) instead of in the stages."""

    def load() -> None:
        with contextlib.suppress(Exception):  # a broken install fails loudly in the stage that needs it
            import keras  # noqa: F401
            import matplotlib
            import sklearn.metrics  # noqa: F401
            import tensorflow

            tensorflow.constant(0.0) + 1.0  # starts the runtime: devices, thread pools
            matplotlib.use("Agg")  # as convflow/reporting/figures.py sets it, before pyplot is imported
            import matplotlib.pyplot  # noqa: F401

    threading.Thread(target=load, name="import-tensorflow", daemon=True).start()


def in_flow_run_process() -> bool:
    """Whether this process was started by a Prefect worker or runner to run one flow run (they
    hand it the run's id in PREFECT__FLOW_RUN_ID)."""
    return bool(os.environ.get("PREFECT__FLOW_RUN_ID"))


def _import_flow_run_modules() -> None:
    for name in FLOW_RUN_MODULES:
        with contextlib.suppress(ImportError):  # one a later Prefect moved is imported when needed
            importlib.import_module(name)


class FlowCommand:
    """`convflow run` or `compare` from start to end: the Prefect API (PREFECT_API_URL, or a
    temporary server started on entering the block) and one flow call.

    `exits_after`: the process ends with the command (the console script). The flow's imports
    then build objects that live as long as the process, and the collections they set off walk
    them again and again; the collector is paused while they are imported, then they are frozen
    and collection resumes. Tests call main() in-process, where freezing would keep every later
    test's garbage alive: there the collector is left alone. A command that returns early leaves
    it paused: its process then ends.
    """

    def __init__(self, exits_after: bool):
        self.exits_after = exits_after
        self.server: TemporaryServer | None = None
        self._open = contextlib.ExitStack()

    def __enter__(self) -> FlowCommand:
        if self.exits_after:
            gc.disable()
        self.server = self._open.enter_context(prefect_api())
        return self

    def __exit__(self, *exc_info) -> None:
        self._open.__exit__(*exc_info)

    def call(self, load_flow: Callable[[], Callable], *args: Any, settings: dict, warm_tensorflow: bool) -> Any:
        """Import the flow `load_flow` returns (and TensorFlow meanwhile, when `warm_tensorflow`) while
        the server starts, then call it with `args` under Prefect `settings`."""
        if self.server is not None and warm_tensorflow:
            import_tensorflow_in_background()
        flow = load_flow()
        if self.exits_after:
            gc.freeze()  # the imported modules: later collections skip them
            gc.enable()
        if self.server is not None:
            _import_flow_run_modules()
            self.server.wait_until_ready()
        from prefect.settings import temporary_settings

        with temporary_settings(updates=settings):
            return flow(*args)


def exit_process(code: int) -> None:
    """Exit without the interpreter's final garbage collection: after a flow it walks every object
    Prefect and pydantic made, a tenth of a fully cached run; the operating system frees them
    anyway. Files and streams are closed as usual."""
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A temporary Prefect API server for one convflow run.")
    parser.add_argument("--port", type=int, required=True)
    serve(parser.parse_args().port)
