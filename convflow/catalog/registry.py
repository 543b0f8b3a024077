"""The model registry: promoted SavedModels in TF-Serving layout and each pipeline's production pointer.

```
artifacts/models/<pipeline>/<version>/   saved_model.pb, variables/, convflow.json,
                                         image_properties.parquet (its data, the next run's baseline),
                                         reference/ (its test split's TFRecord shards and reference.json)
artifacts/models/<pipeline>/production.json
```
The pointer is replaced atomically (write, then os.replace), so a reader sees the old or the new
production model, never half of one; promoting never touches an existing version's files.

On object storage (an s3://, gs://, ... root) there is no rename and no lock: a version number is
claimed by a conditional write (`models/<pipeline>/claims/<version>`, created only if absent), its
folder is uploaded with its convflow.json last, and each change of production writes the next
`models/<pipeline>/pointers/<sequence>.json`, also only if absent; the newest pointer is
production. Two promotions at once get two versions and two pointers, one after the other.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pydantic

from convflow.catalog import tables
from convflow.checks.schemas import IMAGE_PROPERTIES
from convflow.core.object_store import ObjectStore, is_remote, local_copy, store_for
from convflow.core.records import TFRecordSet
from convflow.core.storage import atomic_write_text, locked, staged_output

POINTER = "production.json"
VERSION_RECORD = "convflow.json"
# The folder in a version that keeps the test split it was judged on, and the file describing it.
REFERENCE_SET = "reference"
REFERENCE_RECORD = "reference.json"
# On object storage: each change of production is a new pointer object; version numbers are claimed.
POINTERS = "pointers"
CLAIMS = "claims"


class ReferenceSet(pydantic.BaseModel):
    """The test examples that made a production model, kept with its version: every later
    evaluate scores them with both models, so a new, easier or broken test split cannot hide a
    worse model. They are the promoting run's test shards, copied as written (raw, JPEG or PNG
    records; read back with convflow.tfrecords.features.read_dataset); their content hashes are
    the version's image_properties.parquet rows of split test."""

    model_config = pydantic.ConfigDict(frozen=True)

    shards: list[str] = pydantic.Field(description="The shard files (in the version's folder: their paths there).")
    label_names: list[str] = pydantic.Field(description="Class names, by the labels the records hold.")
    image_size: tuple[int, int] = pydantic.Field(description="Height and width of the images in the records.")
    channels: int
    examples: int = pydantic.Field(description="How many test examples the shards hold.")

    @classmethod
    def of_test_split(cls, tfrecords: TFRecordSet) -> ReferenceSet | None:
        """The test split of `tfrecords`, as a version keeps it (None when it has no test shards)."""
        if not tfrecords.shards.get("test"):
            return None
        return cls(
            shards=tfrecords.shards["test"],
            label_names=tfrecords.label_names,
            image_size=tfrecords.image_size,
            channels=tfrecords.channels,
            examples=tfrecords.counts.get("test", 0),
        )

    def in_folder(self, folder: Path) -> ReferenceSet:
        """This set with its shards' paths in `folder` (kept by file name only: the folder can move)."""
        return self.model_copy(update={"shards": [str(folder / Path(shard).name) for shard in self.shards]})


def load_reference_set(folder: str | Path) -> ReferenceSet:
    """The reference set kept in a version's `reference/` folder, its shards' paths in that folder
    (a local copy's, for a folder on object storage)."""
    folder = local_copy(folder)
    return ReferenceSet.model_validate_json((folder / REFERENCE_RECORD).read_text()).in_folder(folder)


class Production(pydantic.BaseModel):
    """One promoted model version."""

    model_config = pydantic.ConfigDict(frozen=True)

    pipeline: str
    version: int
    run_id: str
    saved_model: str
    model: str = pydantic.Field(description="The run's trained Keras model, for run: transfer.")
    test_accuracy: float
    promoted_at: str
    config_hash: str | None = pydantic.Field(None, description="Config hash of the pipeline that made the model.")
    data_fingerprint: str | None = pydantic.Field(None, description="Fingerprint of the data it was trained on.")
    image_properties: str | None = pydantic.Field(
        None,
        description="The per-image table of the data it was made from (check_data's baseline for the next runs); "
        "None for versions promoted before the data checks, or by hand from a run without one.",
    )
    reference_set: str | None = pydantic.Field(
        None,
        description="The folder of its test split's shards (load_reference_set), scored by both models in every "
        "later evaluate; None for versions promoted before the reference set was kept, or by hand.",
    )


class RegistryError(ValueError):
    """A promotion or rollback that cannot be done; the message says why."""


def models_dir(artifacts_root: str | Path, pipeline: str) -> Path:
    return Path(artifacts_root) / "models" / pipeline


def models_location(artifacts_root: str | Path, pipeline: str) -> str:
    """Where the pipeline's versions are, for messages: a folder, or an object store's URL."""
    if is_remote(artifacts_root):
        return f"{str(artifacts_root).rstrip('/')}/models/{pipeline}"
    return str(models_dir(artifacts_root, pipeline))


def current(artifacts_root: str | Path, pipeline: str) -> Production | None:
    """The pipeline's production model, or None before its first promotion."""
    if is_remote(artifacts_root):
        return _StoredRegistry(artifacts_root, pipeline).current()
    pointer = models_dir(artifacts_root, pipeline) / POINTER
    if not pointer.exists():
        return None
    return Production.model_validate_json(pointer.read_text())


def rival(artifacts_root: str | Path, pipeline: str, model: str) -> Production | None:
    """The production model a new `model` must beat: None when there is none, or when it is
    `model` itself (a cached rerun neither competes with nor re-promotes its own model)."""
    production = current(artifacts_root, pipeline)
    return None if production is None or production.model == model else production


def versions(artifacts_root: str | Path, pipeline: str) -> list[Production]:
    """Every promoted version still on disk, oldest first."""
    if is_remote(artifacts_root):
        return _StoredRegistry(artifacts_root, pipeline).versions()
    root = models_dir(artifacts_root, pipeline)
    records = [path / VERSION_RECORD for path in root.iterdir() if path.name.isdigit()] if root.exists() else []
    found = [Production.model_validate_json(record.read_text()) for record in records if record.exists()]
    return sorted(found, key=lambda production: production.version)


def _switch_pointer(production: Production, artifacts_root: Path) -> None:
    atomic_write_text(models_dir(artifacts_root, production.pipeline) / POINTER, production.model_dump_json(indent=2))


def promote(
    artifacts_root: str | Path,
    pipeline: str,
    run_id: str,
    saved_model: str,
    model: str,
    test_accuracy: float,
    config_hash: str | None = None,
    data_fingerprint: str | None = None,
    image_properties: str | None = None,
    reference_set: ReferenceSet | None = None,
) -> Production:
    """Copy `saved_model` in as the next version and make it production; `config_hash` and
    `data_fingerprint` say what made it (scheduled runs skip training while both are unchanged).
    `image_properties`, the per-image table of its data, is copied in beside it: the data checks
    of later runs compare with it. So are `reference_set`'s shards (its test split): the gate of
    later runs scores them too."""
    if is_remote(artifacts_root):
        return _StoredRegistry(artifacts_root, pipeline).promote(
            run_id, saved_model, model, test_accuracy, config_hash, data_fingerprint, image_properties, reference_set
        )
    root = models_dir(artifacts_root, pipeline)
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / POINTER):
        version = max((existing.version for existing in versions(artifacts_root, pipeline)), default=0) + 1
        production = Production(
            pipeline=pipeline,
            version=version,
            run_id=run_id,
            saved_model=str(root / str(version)),
            model=model,
            test_accuracy=test_accuracy,
            promoted_at=datetime.datetime.now(datetime.UTC).isoformat(),
            config_hash=config_hash,
            data_fingerprint=data_fingerprint,
            image_properties=str(root / str(version) / IMAGE_PROPERTIES) if image_properties else None,
            reference_set=str(root / str(version) / REFERENCE_SET) if reference_set else None,
        )
        with staged_output(root / str(version)) as staging:
            shutil.copytree(saved_model, staging, dirs_exist_ok=True)
            if image_properties:
                shutil.copyfile(image_properties, staging / IMAGE_PROPERTIES)
            if reference_set:
                _keep_reference_set(reference_set, staging / REFERENCE_SET)
            (staging / VERSION_RECORD).write_text(production.model_dump_json(indent=2))
        _switch_pointer(production, artifacts_root)
    return production


def _keep_reference_set(reference_set: ReferenceSet, folder: Path) -> None:
    """Copy the reference set's shards into `folder` and describe them there (reference.json)."""
    folder.mkdir()
    for shard in reference_set.shards:
        shutil.copyfile(local_copy(shard), folder / Path(shard).name)
    (folder / REFERENCE_RECORD).write_text(reference_set.in_folder(Path(".")).model_dump_json(indent=2))


def record_lineage(
    artifacts_root: str | Path, pipeline: str, model: str, config_hash: str, data_fingerprint: str
) -> Production | None:
    """Note on the production version which config and data made it, when `model` is production's
    model; returns the updated record, or None when production is another model (or none)."""
    if is_remote(artifacts_root):
        return _StoredRegistry(artifacts_root, pipeline).record_lineage(model, config_hash, data_fingerprint)
    root = models_dir(artifacts_root, pipeline)
    if not (root / POINTER).exists():
        return None
    with locked(root / POINTER):
        production = current(artifacts_root, pipeline)
        if production is None or production.model != model:
            return None
        production = production.model_copy(update={"config_hash": config_hash, "data_fingerprint": data_fingerprint})
        atomic_write_text(root / str(production.version) / VERSION_RECORD, production.model_dump_json(indent=2))
        _switch_pointer(production, artifacts_root)
    return production


def rollback(artifacts_root: str | Path, pipeline: str) -> Production:
    """Point production at the newest version older than the current one.

    Raises:
        RegistryError: nothing is in production, or no older version is on disk.
    """
    if is_remote(artifacts_root):
        return _StoredRegistry(artifacts_root, pipeline).rollback()
    root = models_dir(artifacts_root, pipeline)
    if not root.is_dir():
        raise RegistryError(f"pipeline {pipeline!r} has no production model under {root}")
    with locked(root / POINTER):
        production = current(artifacts_root, pipeline)
        if production is None:
            raise RegistryError(f"pipeline {pipeline!r} has no production model under {root}")
        older = [v for v in versions(artifacts_root, pipeline) if v.version < production.version]
        if not older:
            raise RegistryError(f"pipeline {pipeline!r}: version {production.version} is the oldest on disk")
        _switch_pointer(older[-1], artifacts_root)
    return older[-1]


def promote_run(artifacts_root: str | Path, run_id: str) -> Production:
    """Promote a finished run from the catalog by hand (`convflow promote RUN_ID`).

    Raises:
        RegistryError: no such run in runs.parquet, or a run that trained no model of its own
            (blocked by its data checks, or unchanged).
    """
    rows = [row for row in tables.read_catalog(artifacts_root).to_pylist() if row["run_id"] == run_id]
    if not rows:
        raise RegistryError(f"run {run_id!r} is not in {tables.catalog_location(artifacts_root)}")
    row = rows[-1]
    if row["status"] in ("blocked", "unchanged"):
        raise RegistryError(f"run {run_id!r} is {row['status']}: it trained no model to promote ({row['gate_reason']})")
    return promote(
        artifacts_root,
        row["pipeline"],
        run_id,
        row["saved_model"],
        row["model"],
        row["test_accuracy"],
        config_hash=row["config_hash"],
        data_fingerprint=row["data_fingerprint"],
        # The run's per-image table, as the data checks' baseline (None in rows written before it was kept).
        image_properties=row.get("image_properties_parquet"),
    )


class _StoredRegistry:
    """One pipeline's registry on object storage: claimed versions and a sequence of pointers."""

    def __init__(self, artifacts_root: str | Path, pipeline: str) -> None:
        self.store: ObjectStore = store_for(artifacts_root)
        self.pipeline = pipeline
        self.base = models_location(artifacts_root, pipeline)

    def _pointers(self) -> list[int]:
        return sorted(int(name.split(".")[0]) for name in self.store.list_names(f"{self.base}/{POINTERS}"))

    def current(self) -> Production | None:
        pointers = self._pointers()
        if not pointers:
            return None
        return Production.model_validate_json(self.store.read_text(f"{self.base}/{POINTERS}/{pointers[-1]:08d}.json"))

    def versions(self) -> list[Production]:
        found = []
        for name in self.store.list_names(self.base):
            if name.isdigit() and self.store.exists(f"{self.base}/{name}/{VERSION_RECORD}"):
                found.append(
                    Production.model_validate_json(self.store.read_text(f"{self.base}/{name}/{VERSION_RECORD}"))
                )
        return sorted(found, key=lambda production: production.version)

    def switch(self, production: Production) -> None:
        """Make `production` the newest pointer; a writer that lost the race for a sequence number
        takes the next one."""
        data = production.model_dump_json(indent=2).encode()
        while True:
            sequence = (self._pointers() or [0])[-1] + 1
            if self.store.write_bytes(f"{self.base}/{POINTERS}/{sequence:08d}.json", data, exclusive=True):
                return

    def _claim_version(self) -> int:
        version = max([p.version for p in self.versions()] + self._claimed(), default=0) + 1
        while not self.store.write_bytes(f"{self.base}/{CLAIMS}/{version}", b"", exclusive=True):
            version += 1
        return version

    def _claimed(self) -> list[int]:
        return [int(name) for name in self.store.list_names(f"{self.base}/{CLAIMS}") if name.isdigit()]

    def promote(
        self,
        run_id: str,
        saved_model: str,
        model: str,
        test_accuracy: float,
        config_hash: str | None,
        data_fingerprint: str | None,
        image_properties: str | None,
        reference_set: ReferenceSet | None,
    ) -> Production:
        version = self._claim_version()
        folder = f"{self.base}/{version}"
        production = Production(
            pipeline=self.pipeline,
            version=version,
            run_id=run_id,
            saved_model=folder,
            model=model,
            test_accuracy=test_accuracy,
            promoted_at=datetime.datetime.now(datetime.UTC).isoformat(),
            config_hash=config_hash,
            data_fingerprint=data_fingerprint,
            image_properties=f"{folder}/{IMAGE_PROPERTIES}" if image_properties else None,
            reference_set=f"{folder}/{REFERENCE_SET}" if reference_set else None,
        )
        # Server-side copies: the run's files are in the store already, and none passes through here.
        self.store.copy(saved_model, folder)
        if image_properties:
            self.store.copy(image_properties, f"{folder}/{IMAGE_PROPERTIES}")
        if reference_set:
            for shard in reference_set.shards:
                self.store.copy(shard, f"{folder}/{REFERENCE_SET}/{shard.rsplit('/', 1)[-1]}")
            described = reference_set.in_folder(Path(".")).model_dump_json(indent=2)
            self.store.write_bytes(f"{folder}/{REFERENCE_SET}/{REFERENCE_RECORD}", described.encode())
        # The version record last: a version folder without it is an interrupted upload, never listed.
        self.store.write_bytes(f"{folder}/{VERSION_RECORD}", production.model_dump_json(indent=2).encode())
        self.switch(production)
        return production

    def record_lineage(self, model: str, config_hash: str, data_fingerprint: str) -> Production | None:
        production = self.current()
        if production is None or production.model != model:
            return None
        if (production.config_hash, production.data_fingerprint) == (config_hash, data_fingerprint):
            return production  # a cached rerun: nothing new to note
        production = production.model_copy(update={"config_hash": config_hash, "data_fingerprint": data_fingerprint})
        data = production.model_dump_json(indent=2).encode()
        self.store.write_bytes(f"{self.base}/{production.version}/{VERSION_RECORD}", data)
        self.switch(production)
        return production

    def rollback(self) -> Production:
        production = self.current()
        if production is None:
            raise RegistryError(f"pipeline {self.pipeline!r} has no production model under {self.base}")
        older = [v for v in self.versions() if v.version < production.version]
        if not older:
            raise RegistryError(
                f"pipeline {self.pipeline!r}: version {production.version} is the oldest in {self.base}"
            )
        self.switch(older[-1])
        return older[-1]
