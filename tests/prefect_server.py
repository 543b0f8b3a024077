"""A real `prefect server start` for tests: 127.0.0.1, a free port, its own PREFECT_HOME (SQLite
there), analytics off; and long-running child commands (`convflow serve`, workers) beside it.

Each process starts in a session of its own, so stopping it also stops the children it spawned.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from conftest import PYTHON, subprocess_env

PREFECT = str(Path(PYTHON).with_name("prefect"))


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Background:
    """A child process in its own session, its output in a log file."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.log = log
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        """Ask the process to stop (SIGTERM: Prefect's runner and server shut down cleanly; SIGINT
        may be ignored in background jobs), then kill what is left of its session."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log_file.close()


class PrefectServer(Background):
    """`prefect server start --host 127.0.0.1 --port P`; `env` is for clients of this server."""

    def __init__(self, home: Path, port: int | None = None, **settings: str):
        self.home, self.settings = home, settings
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {**subprocess_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api_url}
        if "PREFECT_SERVER_API_AUTH_STRING" in settings:  # behind basic auth: clients send the same
            self.env["PREFECT_API_AUTH_STRING"] = settings["PREFECT_SERVER_API_AUTH_STRING"]
        server_env = {
            **self.env,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": self.api_url,  # the UI's browser calls this API, not the default :4200
            **settings,
        }
        command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(command, server_env, home / f"server-{len(list(home.glob('server*.log')))}.log")

    def restarted(self) -> PrefectServer:
        """The same server started again (port, home, database, settings), once this one stopped."""
        return PrefectServer(self.home, self.port, **self.settings)

    def wait_until_ready(self, timeout: float = 180) -> None:
        from convflow.runtime.fast_start import wait_until_healthy

        try:
            wait_until_healthy(self.api_url, self.process, timeout, poll=0.5)
        except RuntimeError as error:
            raise RuntimeError(f"{error}:\n{self.output()[-3000:]}") from None


@contextlib.contextmanager
def started_server(home: Path, **settings: str) -> Iterator[PrefectServer]:
    """A PrefectServer under `home` with server `settings`, ready, stopped on leaving (a module's
    `server` fixture)."""
    server = PrefectServer(home, **settings)
    try:
        server.wait_until_ready()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def prefect_client(server: PrefectServer):
    """A synchronous Prefect client of `server`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    settings = {PREFECT_API_URL: server.api_url, PREFECT_API_AUTH_STRING: server.env.get("PREFECT_API_AUTH_STRING")}
    with temporary_settings(settings), get_client(sync_client=True) as client:
        yield client
