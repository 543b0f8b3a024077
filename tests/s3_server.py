"""An S3 endpoint for tests: moto's server on 127.0.0.1, a free port, a bucket in it, and the
environment that points boto3, s3fs and convflow's object store at it.

    with moto_s3("bkt") as s3:          # a module's fixture
        env = {**subprocess_env(), **s3.env}

`refusing_s3()` is a second server, in a process of its own, that checks credentials (moto reads
INITIAL_NO_AUTH_ACTION_COUNT when it is imported, so not in the test process).

Run as a program, it is `convflow` with one stage killed mid-upload, for the fault tests:

    python tests/s3_server.py STAGE run tiny --artifacts s3://bkt/x ...

wraps `ObjectStore.push` so that the first upload of a file of STAGE's folder is the last thing the
process does: SIGKILLed right after it, the stage's record never written. The seam is installed here,
in the test's program, so convflow's own code reads no test setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would point boto3 elsewhere than the test's endpoint.
_AWS_ELSEWHERE = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


@dataclasses.dataclass
class S3Endpoint:
    """A running S3 endpoint and its bucket; `env` for child processes and monkeypatched os.environ."""

    endpoint: str
    bucket: str
    credentials: dict[str, str] = dataclasses.field(default_factory=lambda: dict(CREDENTIALS))

    @property
    def env(self) -> dict[str, str]:
        return {**self.credentials, "AWS_ENDPOINT_URL": self.endpoint}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"],
            region_name=self.credentials["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object's key under `prefix` in the bucket, read fresh (no listing cache)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()


def child_env(base: dict[str, str], endpoint: S3Endpoint, **more: str) -> dict[str, str]:
    """`base` (a subprocess_env()) pointed at `endpoint`, without AWS settings from elsewhere."""
    env = {key: value for key, value in base.items() if key not in _AWS_ELSEWHERE}
    return {**env, **endpoint.env, **more}


def forget_clients() -> None:
    """Drop the clients this process keeps per endpoint (s3fs's instances and listings, convflow's
    stores), for a test that changes the endpoint or the cache folder."""
    import s3fs

    from convflow.core import object_store

    s3fs.S3FileSystem.clear_instance_cache()
    object_store._STORES.clear()


@contextlib.contextmanager
def moto_s3(bucket: str = "bkt") -> Iterator[S3Endpoint]:
    """moto's S3 on 127.0.0.1 (a thread of this process) with `bucket` created; stopped on leaving."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = S3Endpoint(f"http://{host}:{port}", bucket)
        endpoint.client().create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


_REFUSING_SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test closes its end
server.stop()
"""


@contextlib.contextmanager
def refusing_s3(bucket: str = "bkt") -> Iterator[S3Endpoint]:
    """moto's S3 that checks every request's credentials (none are known to it), in a process of
    its own; the endpoint holds keys it refuses."""
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    process = subprocess.Popen(
        [sys.executable, "-c", _REFUSING_SERVER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(process.stdout.readline())
        unknown = {**CREDENTIALS, "AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000", "AWS_SECRET_ACCESS_KEY": "wrong"}
        yield S3Endpoint(f"http://127.0.0.1:{port}", bucket, unknown)
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ----------------------------------------------------------------------------- killed mid-upload


def kill_mid_upload(stage: str) -> None:
    """SIGKILL this process right after the first file of `stage`'s folder reached the store."""
    from convflow.core.object_store import ObjectStore

    push = ObjectStore.push

    def killing_push(self, local, adopt=True):
        if stage not in Path(local).parts:
            return push(self, local, adopt)
        put_file = self.fs.put_file

        def put_then_die(*args, **kwargs):
            put_file(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        self.fs.put_file = put_then_die
        return push(self, local, adopt)

    ObjectStore.push = killing_push


if __name__ == "__main__":
    kill_mid_upload(sys.argv.pop(1))
    from convflow.cli import app

    app.run_command()
