"""Where one run writes: its pipeline, its id and the artifacts root."""

from __future__ import annotations

from pathlib import Path

import pydantic

from convflow.core.object_store import local_root


class RunContext(pydantic.BaseModel):
    """Where one run writes. Not part of any cache key except the artifacts root."""

    model_config = pydantic.ConfigDict(frozen=True)

    pipeline: str
    run_id: str
    artifacts_root: str

    @property
    def local_root(self) -> Path:
        """Where this process reads and writes the root's files: the root, or for an object
        store's URL its local mirror (core/object_store.py)."""
        return local_root(self.artifacts_root)

    @property
    def run_dir(self) -> Path:
        return self.local_root / self.pipeline / self.run_id

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage
