"""Where one run writes: its pipeline, its id and the artifacts root."""

from __future__ import annotations

from pathlib import Path

import pydantic


class RunContext(pydantic.BaseModel):
    """Where one run writes. Not part of any cache key except the artifacts root."""

    model_config = pydantic.ConfigDict(frozen=True)

    pipeline: str
    run_id: str
    artifacts_root: str

    @property
    def run_dir(self) -> Path:
        return Path(self.artifacts_root) / self.pipeline / self.run_id

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage
