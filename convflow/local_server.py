"""A temporary local Prefect server for one CLI run, started while the CLI imports its flow.

Prefect's own ephemeral mode starts the same server, but only after importing Prefect's whole
server package in the client (about 2 s here) and only once the flow is called, so its start-up
(about 3 s) adds to every run. Starting the server process first and importing the flow
meanwhile hides most of that: a fully cached run is then a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

STARTUP_TIMEOUT_SECONDS = 60
# Services a lasting server runs (schedules, late and crashed runs, automations, clean-ups); a
# server that lives for one flow run does not need them, and starts ~0.3 s sooner without them.
# Event persistence and the task-run recorder stay on: they record the run's task runs, which
# `prefect server start` on the same PREFECT_HOME shows later.
LONG_RUNNING_SERVICES = (
    "SCHEDULER", "LATE_RUNS", "FOREMAN", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS", "REPOSSESSOR",
    "TRIGGERS", "DB_VACUUM", "CLEANUP_RECONCILER", "EVENT_LOGGER",
)
# Nor does it register block types: to see whether any changed, Prefect first imports every
# installed collection (~0.35 s of each start here), and convflow uses no blocks. A lasting
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


class TemporaryServer:
    """A Prefect API server on 127.0.0.1 that lives as long as this object's `with` block."""

    def __init__(self) -> None:
        self._startup_lock: int | None = _lock_startup()  # released once the server answers
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        # Not PREFECT__SERVER_FINAL, which Prefect's own ephemeral server sets: since FastAPI 0.137
        # all it does is one full garbage collection (~0.12 s of each start).
        environment = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **{f"PREFECT_SERVER_SERVICES_{service}_ENABLED": "false" for service in LONG_RUNNING_SERVICES},
            **NO_BLOCK_REGISTRATION,
        }
        command = [sys.executable, "-m", "convflow.local_server", "--port", str(self.port)]
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
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"temporary Prefect server exited with code {self.process.returncode}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            time.sleep(0.05)
        raise RuntimeError(f"temporary Prefect server on port {self.port} did not start in {STARTUP_TIMEOUT_SECONDS} s")

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

    That import builds ~430,000 objects; the collections it set off walked them again and again,
    ~0.6 s of a ~2.7 s start here, to free a third of them (~11 MB, left in place now). Frozen
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A temporary Prefect API server for one convflow run.")
    parser.add_argument("--port", type=int, required=True)
    serve(parser.parse_args().port)
