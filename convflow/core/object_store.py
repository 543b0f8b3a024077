"""An artifacts root on object storage (any fsspec URL: s3://, gs://, az://, ...), reached through
fsspec, with a local mirror that TensorFlow reads and writes.

TensorFlow 2.21 has no working `s3://` file system, so convflow never hands it a URL. A stage reads
local copies of what its input records point at (`localized`) and writes its outputs locally, then
uploads them (`published`); the record, which Prefect writes after the stage returns, is the last
thing written, so an interrupted upload is never a cache hit.

The mirror, `<cache>/roots/<hash of the URL>/`, has the store's layout and holds symbolic links into
a cache of files keyed by their content digest (the store's ETag or MD5), `<cache>/blobs/`: bounded
in size (CONVFLOW_CACHE_MAX_GB, 20 by default), least recently used evicted, its folder
CONVFLOW_CACHE_DIR (default ~/.cache/convflow). A file already held is never downloaded again.
Credentials and endpoints come from each fsspec library's own environment variables and config files
(for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws/...).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydantic

CACHE_DIR_VARIABLE = "CONVFLOW_CACHE_DIR"
CACHE_SIZE_VARIABLE = "CONVFLOW_CACHE_MAX_GB"
DEFAULT_CACHE_GB = 20.0
LOCAL_PROTOCOLS = ("file", "local")
# Connection failures surface in seconds, not after botocore's long default retries.
STORAGE_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}},
}

Record = TypeVar("Record", bound=pydantic.BaseModel)
log = logging.getLogger("convflow.store")


class StoreError(OSError):
    """The artifacts root's object store cannot be used; the message names the URL and what failed."""


def is_remote(root: str | Path) -> bool:
    """Whether `root` is an fsspec URL of an object store rather than a local path."""
    text = str(root)
    return "://" in text and text.split("://", 1)[0] not in LOCAL_PROTOCOLS


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_VARIABLE) or Path.home() / ".cache" / "convflow").expanduser().resolve()


def local_root(root: str | Path) -> Path:
    """The local folder that stands for `root`: the root itself, or its mirror for a URL."""
    if not is_remote(root):
        return Path(str(root).removeprefix("file://")).resolve()
    return cache_dir() / "roots" / hashlib.sha256(str(root).rstrip("/").encode()).hexdigest()[:16]


@dataclass
class Transfers:
    """What a store moved, for logs and benchmarks: files and bytes downloaded, found in the local
    cache, and uploaded."""

    downloaded_files: int = 0
    downloaded_bytes: int = 0
    cached_files: int = 0
    uploaded_files: int = 0
    uploaded_bytes: int = 0

    def since(self, before: Transfers) -> str:
        """What moved since `before`, in words for a stage's log line."""
        downloaded = self.downloaded_files - before.downloaded_files
        megabytes = (self.downloaded_bytes - before.downloaded_bytes) / 1e6
        uploaded = self.uploaded_files - before.uploaded_files
        up_megabytes = (self.uploaded_bytes - before.uploaded_bytes) / 1e6
        return (
            f"downloaded {downloaded} file(s) ({megabytes:.1f} MB), {self.cached_files - before.cached_files} "
            f"already in the local cache; uploaded {uploaded} file(s) ({up_megabytes:.1f} MB)"
        )


@dataclass
class ObjectStore:
    """One artifacts root on object storage and its local mirror."""

    url: str
    transfers: Transfers = field(default_factory=Transfers)

    def __post_init__(self) -> None:
        import fsspec

        self.url = self.url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0]
        self.fs = fsspec.filesystem(self.protocol, **STORAGE_OPTIONS.get(self.protocol, {}))
        self.mirror = local_root(self.url)
        self.blobs = cache_dir() / "blobs"
        self._lock = threading.Lock()

    # -- names ------------------------------------------------------------------------------------
    def to_local(self, path: str) -> str:
        """The mirror path of a URL under this root; other strings unchanged."""
        if path == self.url or path.startswith(self.url + "/"):
            return str(self.mirror) + path[len(self.url) :]
        return path

    def to_url(self, path: str | Path) -> str:
        """The URL of a mirror path under this root; other strings unchanged."""
        text, mirror = str(path), str(self.mirror)
        if text == mirror or text.startswith(mirror + "/"):
            return self.url + text[len(mirror) :]
        return text

    def _key(self, url: str) -> str:
        """The fsspec path of `url` (without its protocol)."""
        return self.fs._strip_protocol(url)

    # -- checks -----------------------------------------------------------------------------------
    def check_reachable(self) -> None:
        """Raise StoreError, one line naming the URL and what failed, unless the root can be listed.

        A missing bucket, refused credentials and an unreachable endpoint each say so."""
        try:
            self.fs.ls(self._key(self.url).split("/", 1)[0], refresh=True)
        except FileNotFoundError as error:
            raise StoreError(f"{self.url}: the bucket does not exist ({_first_line(error)})") from None
        except PermissionError as error:
            raise StoreError(f"{self.url}: access refused; check the credentials ({_first_line(error)})") from None
        except Exception as error:  # endpoint unreachable, DNS, TLS: the libraries raise many kinds
            raise StoreError(f"{self.url}: cannot reach the object store ({_describe(error)})") from None

    def exists(self, url: str) -> bool:
        return self.fs.exists(self._key(url))

    def sizes(self, url: str) -> dict[str, int]:
        """Every file at or under `url`, by URL, with its size; empty when nothing is there."""
        return {f"{self.protocol}://{name}": int(info["size"]) for name, info in self._listing(url).items()}

    def _listing(self, url: str) -> dict[str, dict[str, Any]]:
        key = self._key(url)
        try:
            info = self.fs.info(key, refresh=True)
        except FileNotFoundError:
            return {}
        if info["type"] == "file":
            return {key: info}
        found = self.fs.find(key, detail=True, refresh=True)
        return {name: entry for name, entry in found.items() if entry["type"] == "file"}

    # -- reading ----------------------------------------------------------------------------------
    def pull(self, url: str, copy: bool = False) -> Path:
        """A local copy of the file or folder at `url` (in the mirror); files the cache holds are
        linked, never downloaded again.

        `copy`: plain files rather than links into the cache, for a folder that its reader then
        rewrites in place (a training's checkpoints).

        Raises:
            FileNotFoundError: nothing is at `url`.
        """
        listing = self._listing(url)
        if not listing:
            raise FileNotFoundError(f"{url}: not in the object store")
        linked = set()
        for name, info in listing.items():
            linked.add(self._materialize(f"{self.protocol}://{name}", info))
            if copy:
                local = Path(self.to_local(f"{self.protocol}://{name}"))
                target = local.resolve()
                local.unlink()
                shutil.copyfile(target, local)
        self._evict(keep=linked)
        return Path(self.to_local(url))

    def link(self, url: str, local: Path) -> None:
        """Put the stored file `url` at `local` (a link into the cache, downloaded unless held)."""
        listing = self._listing(url)
        if not listing:
            raise FileNotFoundError(f"{url}: not in the object store")
        self._materialize(url, next(iter(listing.values())), local)

    def _materialize(self, url: str, info: dict[str, Any], local: Path | None = None) -> Path:
        """Link `local` (default: the URL's mirror path) to the file's blob, downloaded unless held;
        returns the blob."""
        local = local or Path(self.to_local(url))
        blob = self.blobs / _digest_key(info)
        if blob.exists():
            self.transfers.cached_files += 1
        else:
            blob.parent.mkdir(parents=True, exist_ok=True)
            part = blob.with_name(f".{blob.name}.part-{uuid.uuid4().hex[:8]}")
            self.fs.get_file(self._key(url), str(part))
            os.replace(part, blob)
            self.transfers.downloaded_files += 1
            self.transfers.downloaded_bytes += blob.stat().st_size
        os.utime(blob)  # least recently used goes first
        _link(blob, local)
        return blob

    # -- writing ----------------------------------------------------------------------------------
    def push(self, local: str | Path, adopt: bool = True) -> str:
        """Upload the mirror file or folder `local` to its URL and keep its files in the cache;
        returns the URL. Files that are already links into the cache came from the store and are
        left alone. `adopt`: move the uploaded files into the cache, links left in their place
        (never for a folder its writer goes on changing in place)."""
        local = Path(local)
        url = self.to_url(local)
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file() or p.is_symlink())
        uploaded = []
        for file in files:
            if file.is_symlink() and Path(os.readlink(file)).parent == self.blobs:
                continue
            target = self.to_url(file)
            self.fs.put_file(str(file), self._key(target))
            self.transfers.uploaded_files += 1
            self.transfers.uploaded_bytes += file.stat().st_size
            uploaded.append((file, target))
        if uploaded and adopt:
            listing = self._listing(url)
            for file, target in uploaded:
                info = listing.get(self._key(target))
                if info is not None:
                    self._adopt(file, info)
        return url

    def _adopt(self, file: Path, info: dict[str, Any]) -> None:
        """Move an uploaded file into the cache and leave a link in its place."""
        blob = self.blobs / _digest_key(info)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if blob.exists():
            file.unlink()
        else:
            os.replace(file, blob)
        _link(blob, file)

    def copy(self, source: str | Path, target: str) -> None:
        """Copy the file or folder `source` to `target`: server-side (S3's CopyObject) when `source`
        is in this store, so that no byte passes through this machine; uploaded when it is local."""
        if not str(source).startswith(self.url + "/"):
            local = Path(source)
            files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
            for file in files:
                relative = "" if file == local else "/" + file.relative_to(local).as_posix()
                self.fs.put_file(str(file), self._key(target + relative))
            return
        listing = self._listing(source)
        if not listing:
            raise FileNotFoundError(f"{source}: not in the object store")
        prefix = self._key(str(source))
        for name in listing:
            self.fs.copy(name, self._key(target) + name[len(prefix) :])

    def remove(self, url: str) -> None:
        """Delete everything at or under `url` (nothing there is not an error)."""
        if self._listing(url):
            self.fs.rm(self._key(url), recursive=True)

    def as_urls(self, record: Record) -> Record:
        """`record` with its mirror paths named by their URLs (its files are in the store already)."""
        return _mapped(record, self.to_url)

    def write_bytes(self, url: str, data: bytes, exclusive: bool = False) -> bool:
        """Write one small object; with `exclusive`, only if nothing is there yet (a conditional
        write): returns False when another writer was first."""
        # pipe_file's mode="create" is the conditional PutObject (If-None-Match: *), empty data
        # included; open(..., "xb") commits an empty file with a plain put.
        try:
            self.fs.pipe_file(self._key(url), data, mode="create" if exclusive else "overwrite")
        except FileExistsError:
            return False
        return True

    def read_text(self, url: str) -> str:
        return self.fs.cat_file(self._key(url)).decode()

    def list_names(self, url: str) -> list[str]:
        """Names directly under `url` (files and folders); empty when there is none."""
        try:
            return sorted(Path(name).name for name in self.fs.ls(self._key(url), detail=False, refresh=True))
        except FileNotFoundError:
            return []

    # -- records ----------------------------------------------------------------------------------
    def localized(self, record: Record) -> Record:
        """`record` with its URLs under this root replaced by local copies' paths, pulled here
        (the record itself when it names none: a config is not validated again)."""
        urls = outermost(self._strings_under(record, self.url + "/"))
        for url in urls:
            self.pull(url)
        return _mapped(record, self.to_local) if urls else record

    def published(self, record: Record) -> Record:
        """`record` with its mirror paths replaced by URLs, once the files it names are uploaded."""
        paths = outermost(self._strings_under(record, str(self.mirror) + "/"))
        for path in paths:
            if Path(path).exists():
                self.push(path)
        return _mapped(record, self.to_url) if paths else record

    def _strings_under(self, record: pydantic.BaseModel, prefix: str) -> list[str]:
        return [text for text in _strings(record) if text.startswith(prefix)]

    # -- the local cache ----------------------------------------------------------------------------
    def _evict(self, keep: set[Path] = frozenset()) -> None:
        """Delete least recently used files of the cache while it is over its size, never one of
        `keep` (what the pull that asks has just linked: a folder larger than the cache is kept
        whole, over the size, rather than left with broken links)."""
        limit = float(os.environ.get(CACHE_SIZE_VARIABLE) or DEFAULT_CACHE_GB) * 1e9
        with self._lock:
            entries = [(status.st_mtime, status.st_size, entry) for entry, status in _stats(self.blobs.glob("[!.]*"))]
            total = sum(size for _, size, _ in entries)
            for _, size, entry in sorted(entries):
                if total <= limit:
                    break
                if entry in keep:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                total -= size


_STORES: dict[str, ObjectStore] = {}


def store_for(root: str | Path) -> ObjectStore:
    """The ObjectStore of a remote artifacts root (one per process and URL)."""
    url = str(root).rstrip("/")
    if url not in _STORES:
        _STORES[url] = ObjectStore(url)
    return _STORES[url]


def store_containing(url: str) -> ObjectStore:
    """The store of the artifacts root that `url` lies under (the longest one this process knows),
    or one for the URL's bucket."""
    known = [root for root in _STORES if url == root or url.startswith(root + "/")]
    if known:
        return _STORES[max(known, key=len)]
    protocol, rest = url.split("://", 1)
    return store_for(f"{protocol}://{rest.split('/', 1)[0]}")


def local_record(record: Record) -> Record:
    """`record` with every object-store URL in it replaced by a pulled local copy's path, for code
    outside a stage that reads a record's files (compare's measurements)."""
    urls = [text for text in _strings(record) if is_remote(text)]
    if not urls:
        return record
    for url in outermost(urls):
        store_containing(url).pull(url)
    return _mapped(record, lambda text: store_containing(text).to_local(text) if is_remote(text) else text)


def local_copy(path: str | Path) -> Path:
    """A local path for `path`: itself, or for a URL on an object store its pulled copy."""
    return store_containing(str(path)).pull(str(path)) if is_remote(path) else Path(path)


def shown_and_linked(path: str | Path, root: str | Path) -> tuple[str, str]:
    """Where people find a file this process wrote under `root`: (its path, its file:// link), or
    for an object store's root its URL twice (the path here is only this machine's cached copy)."""
    if is_remote(root):
        url = store_for(root).to_url(path)
        return url, url
    return str(path), Path(path).resolve().as_uri()


def upload_file(local: str | Path, url: str) -> str:
    """Upload one local file to `url` (any fsspec URL); returns the URL."""
    store = store_containing(url)
    store.fs.put_file(str(local), store._key(url))
    return url


def exists(path: str | Path) -> bool:
    """Whether a local path, or a URL on an object store, exists."""
    return store_containing(str(path)).exists(str(path)) if is_remote(path) else Path(path).exists()


def normalized_root(root: str | Path) -> str:
    """An artifacts root as runs record it: a URL as given (no trailing slash), a path absolute."""
    return str(root).rstrip("/") if is_remote(root) else str(local_root(root))


def localized(record: Record, root: str | Path) -> Record:
    return store_for(root).localized(record) if is_remote(root) else record


def published(record: Record, root: str | Path) -> Record:
    return store_for(root).published(record) if is_remote(root) else record


def _stats(paths: Any) -> list[tuple[Path, os.stat_result]]:
    """Each path with its status, leaving out those another process removed meanwhile."""
    found = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            found.append((path, path.stat()))
    return found


def _digest_key(info: dict[str, Any]) -> str:
    """The cache's name of a stored file: its content digest as the store reports it (S3's ETag,
    GCS's md5Hash, Azure's content MD5) with its size."""
    digest = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("content_md5")
    if isinstance(digest, (bytes, bytearray)):
        digest = digest.hex()
    if not digest:  # a store that reports none: its name and modification time stand in
        digest = f"{info.get('name')}@{info.get('LastModified') or info.get('mtime') or info.get('updated')}"
    return hashlib.sha256(f"{str(digest).strip(chr(34))}:{info['size']}".encode()).hexdigest()


def _link(blob: Path, local: Path) -> None:
    if local.is_symlink() and Path(os.readlink(local)) == blob:
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    temporary = local.with_name(f".{local.name}.link-{uuid.uuid4().hex[:8]}")
    temporary.symlink_to(blob)
    os.replace(temporary, local)


def _strings(record: pydantic.BaseModel) -> list[str]:
    found: list[str] = []
    _walk(record.model_dump(mode="json"), found.append)
    return found


def _walk(value: Any, visit: Any) -> None:
    if isinstance(value, str):
        visit(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(key, visit)
            _walk(item, visit)
    elif isinstance(value, list):
        for item in value:
            _walk(item, visit)


def _mapped_value(value: Any, rename: Any) -> Any:
    if isinstance(value, str):
        return rename(value)
    if isinstance(value, dict):
        return {_mapped_value(key, rename): _mapped_value(item, rename) for key, item in value.items()}
    if isinstance(value, list):
        return [_mapped_value(item, rename) for item in value]
    return value


def _mapped(record: Record, rename: Any) -> Record:
    return type(record).model_validate(_mapped_value(record.model_dump(mode="json"), rename))


def outermost(paths: list[str]) -> list[str]:
    """`paths` without those inside another of them, in order."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(path.startswith(outer + "/") for outer in kept):
            kept.append(path)
    return kept


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {_first_line(error)}"


class CheckpointSync:
    """A training's checkpoint folder kept in the store as it changes, so that an attempt on another
    worker resumes from the last epoch saved: `restore` before training, `send_changes` after each
    epoch's checkpoint, `remove` once training has ended (as the local folder is)."""

    def __init__(self, store: ObjectStore, folder: Path, leave_out: tuple[str, ...] = ("features",)) -> None:
        self.store, self.folder, self.leave_out = store, folder, leave_out
        self.url = store.to_url(folder)
        self._sent: dict[Path, tuple[int, int]] = {}

    def restore(self) -> int:
        """Copy the stored checkpoints into the folder; how many files there were."""
        if not self.store.exists(self.url):
            return 0
        self.store.pull(self.url, copy=True)
        files = [path for path in self.folder.rglob("*") if path.is_file()]
        self._sent = {path: _stamp(path) for path in files}
        return len(files)

    def send_changes(self) -> None:
        for path in sorted(self.folder.rglob("*")):
            if not path.is_file() or path.relative_to(self.folder).parts[0] in self.leave_out:
                continue
            stamp = _stamp(path)
            if self._sent.get(path) != stamp:
                self.store.fs.put_file(str(path), self.store._key(self.store.to_url(path)))
                self.store.transfers.uploaded_files += 1
                self._sent[path] = stamp

    def remove(self) -> None:
        self.store.remove(self.url)


def _stamp(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns
