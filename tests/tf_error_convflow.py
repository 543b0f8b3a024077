"""`convflow` whose build_base stage meets a real TensorFlow error, for the quiet-terminal tests:

    python tests/tf_error_convflow.py run tiny -f pipelines.yaml ...

wraps `convflow.core.storage.publish` so that build_base, its model built, runs an op TensorFlow
refuses (check_numerics on a NaN: InvalidArgumentError) instead of publishing. The seam is
installed here, in the test process, so convflow's own code reads no test setting.
"""

from __future__ import annotations

from pathlib import Path

from convflow.cli import app as cli
from convflow.core import storage

STAGE = "build_base"
MESSAGE = "a NaN the test put in build_base"


def fail_in_tensorflow() -> None:
    publish = storage.publish

    def failing_publish(staged: Path, final_dir: Path) -> None:
        if final_dir.name == STAGE:
            import tensorflow as tf

            tf.debugging.check_numerics(tf.constant(float("nan")), message=MESSAGE)
        return publish(staged, final_dir)

    storage.publish = failing_publish


if __name__ == "__main__":
    fail_in_tensorflow()
    cli.run_command()
