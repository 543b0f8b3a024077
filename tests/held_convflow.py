"""`convflow` with one stage held at its most fragile moment, for the fault tests:

    python tests/held_convflow.py STAGE run tiny -f pipelines.yaml ...

wraps `convflow.core.storage.publish` so that the stage STAGE, with its output complete in a hidden
temporary folder, writes `<run-dir>/<STAGE>.held` instead of renaming that folder into place and
waits to be killed, or for the test to write `<run-dir>/<STAGE>.release`: then it removes both
markers and publishes. Every other stage publishes as usual. The seam is installed here, in the test
process, so convflow's own code reads no test setting.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from convflow.cli import app as cli
from convflow.core import storage


def hold_at(stage: str) -> None:
    publish = storage.publish

    def held_publish(staged: Path, final_dir: Path) -> None:
        if final_dir.name != stage:
            return publish(staged, final_dir)
        held, release = final_dir.parent / f"{stage}.held", final_dir.parent / f"{stage}.release"
        held.touch()
        while not release.exists():  # until the test kills the process group, or releases the stage
            time.sleep(0.2)
        held.unlink()
        release.unlink()
        return publish(staged, final_dir)

    storage.publish = held_publish


if __name__ == "__main__":
    hold_at(sys.argv.pop(1))
    cli.run_command()
