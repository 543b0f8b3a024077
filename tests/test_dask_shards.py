"""to_tfrecords through a Dask cluster: separate worker processes write the same shards."""

from __future__ import annotations

import distributed  # the dev extra's prefect-dask brings it: missing, the test must fail, not skip
import numpy as np
import pyarrow.parquet as pq
import pytest

from convflow.config.schema import DataConfig
from convflow.tasks.download_and_split import split_dataset
from convflow.tasks.to_tfrecords import write_tfrecords
from convflow.tfrecords import features

FLOAT_PROPERTIES = ["brightness", "contrast", "mean_r", "mean_g", "mean_b", "sharpness"]


def _read_all(tfrecords, split):
    dataset = features.read_dataset(
        tfrecords.shards[split], tfrecords.image_size, tfrecords.channels, 4096, cache=False, with_ids=True
    )
    images, labels, ids = [], [], []
    for batch_images, batch_labels, batch_ids in dataset:
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
        ids += [value.decode() for value in batch_ids.numpy()]
    return np.concatenate(images), np.concatenate(labels), ids


@pytest.mark.slow
def test_dask_workers_write_the_same_shards(tmp_path):
    local = DataConfig(source="sklearn:digits", image_size=(16, 16), channels=1, shard_size=300)
    split_set = split_dataset(local, tmp_path / "split")
    expected = write_tfrecords(split_set, local, tmp_path / "local")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        on_dask = local.model_copy(update={"dask_scheduler": cluster.scheduler_address})
        with distributed.Client(cluster) as client:
            worker_pids = set(client.run(lambda: __import__("os").getpid()).values())
        written = write_tfrecords(split_set, on_dask, tmp_path / "dask")
    assert len(worker_pids) == 2
    assert [p.split("/")[-1] for p in written.required_files()] == [p.split("/")[-1] for p in expected.required_files()]
    # Measured image by image on the workers, many rows at a time here: the same figures.
    on_workers, here = pq.read_table(written.image_properties), pq.read_table(expected.image_properties)
    assert on_workers.drop(FLOAT_PROPERTIES) == here.drop(FLOAT_PROPERTIES)
    for name in FLOAT_PROPERTIES:
        np.testing.assert_allclose(on_workers[name].to_numpy(), here[name].to_numpy(), rtol=1e-5, atol=1e-3)
    assert len(written.shards["train"]) > 1
    for split in ("train", "validation", "test"):
        for ours, theirs in zip(_read_all(written, split), _read_all(expected, split)):
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
