"""Parts of TFRecord shards, written side by side by the data stages' worker processes.

A worker decodes a part's images, frames their records and writes the part file itself, then
returns only the part's digest: the images never cross between processes (pickling 50 KB of
pixels an image, twice through a pipe, cost more than a third of its decode). The stage's process
joins the parts of each shard in order (writer.ShardOfParts). Light enough for worker
processes: no TensorFlow, pydantic or Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass

from convflow.data.imaging import RecordImages
from convflow.tfrecords.writer import ShardFile, encode_example


@dataclass(frozen=True)
class PartJob:
    """One part of a shard: the part file to write and its examples, in order. `shard` and `last`
    tell the stage's process where the part goes and whether the shard is then complete."""

    shard: str
    path: str
    labels: list[int]
    example_ids: list[str]
    sources: list
    last: bool


def write_part(job: PartJob, images: RecordImages, compression: str) -> tuple[bytes, int, list[dict]]:
    """Write the job's part file; the part's sha256 digest, record count, and its images' properties
    for the data checks (a few hundred bytes an image: they cross back, the pixels do not)."""
    measured = []
    with ShardFile(job.path, compression) as part:
        for label, example_id, source in zip(job.labels, job.example_ids, job.sources):
            record, properties = images.measured(source)
            part.write(encode_example(record, label, example_id))
            measured.append(properties)
    return part.part_digests[0], part.records, measured
