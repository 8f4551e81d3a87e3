"""One way from a path or URI to a filesystem.

Every output of lapo_ray (corpus shards, checkpoints, artifacts) goes through here so that a
local folder, ``file://``, ``s3://``, ``gs://`` and any fsspec protocol (``memory://`` in tests)
behave the same. Writes are atomic: a reader never sees a half-written file.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec
import pyarrow.fs as pafs

from lapo_ray import UsageError

_PYARROW_SCHEMES = {"", "file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or a URI.

    pyarrow's native filesystems are preferred (they are what Ray Data and Ray Train use);
    other protocols are served through fsspec.
    """
    uri = os.fspath(uri)
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in _PYARROW_SCHEMES:
        if scheme == "":
            return pafs.LocalFileSystem(), os.path.abspath(uri)
        return pafs.FileSystem.from_uri(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """Join path components of a path or URI without touching the scheme or the query string
    (``s3://bucket/run?endpoint_override=host:9000`` keeps its options)."""
    uri = os.fspath(uri)
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        rest, sep, query = rest.partition("?")
        return f"{scheme}://{posixpath.join(rest, *parts)}{sep}{query}"
    return os.path.join(uri, *parts)


def absolute(uri: str | os.PathLike) -> str:
    """``uri`` with a relative local path made absolute against this process's working folder.
    Anything handed to a Ray worker needs it: workers run in their own working folders."""
    uri = os.fspath(uri)
    return uri if "://" in uri else os.path.abspath(uri)


def is_local(uri: str | os.PathLike) -> bool:
    return isinstance(resolve(uri)[0], pafs.LocalFileSystem)


def local_path(uri: str | os.PathLike) -> str | None:
    """The plain local path behind ``uri`` (also for ``file://`` URIs), or None if it is remote."""
    fs, path = resolve(uri)
    return path if isinstance(fs, pafs.LocalFileSystem) else None


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Sorted file paths (in the filesystem's own form) directly under ``uri``."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such directory")
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(f"{uri}: not a directory")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def list_files_below(uri: str, max_depth: int) -> list[str]:
    """Sorted paths of the files at most ``max_depth`` folders below ``uri`` (depth 0: directly
    in it), relative to ``uri`` with "/" separators."""
    fs, path = resolve(uri)
    base = path.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    rel = (i.path[len(base):].lstrip("/") for i in infos if i.type == pafs.FileType.File)
    return sorted(r for r in rel if r.count("/") <= max_depth)


@contextmanager
def atomic_output(uri: str) -> Iterator[Any]:
    """Open ``uri`` for binary writing; the file appears under its name only on success.

    The data goes to a hidden temporary sibling first and is moved into place at the end, so an
    interrupted writer leaves at most a ``.tmp-*`` file that every reader here ignores.
    """
    fs, path = resolve(uri)
    parent, name = posixpath.split(path) if "://" in os.fspath(uri) else os.path.split(path)
    fs.create_dir(parent, recursive=True)
    tmp = (posixpath if "://" in os.fspath(uri) else os.path).join(
        parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    )
    try:
        with fs.open_output_stream(tmp) as out:
            yield out
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_output(uri) as out:
        out.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such file") from e


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(uri: str) -> Any:
    raw = read_bytes(uri)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        # Every JSON file lapo_ray writes is written whole (atomic_output): one that does not parse
        # was damaged or written by something else, and the fix lies with whoever named it.
        raise UsageError(f"{uri}: not valid JSON ({e})") from e


def append_line(uri: str, line: str) -> None:
    """Append one line to a text file (metrics.jsonl). Local files append in place; object
    stores cannot append, so the file is rewritten whole (metrics files are small)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
        return
    old = read_bytes(uri) if exists(uri) else b""
    write_bytes(uri, old + line.rstrip("\n").encode() + b"\n")


def open_input(uri: str) -> io.RawIOBase:
    fs, path = resolve(uri)
    return fs.open_input_file(path)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy the local folder ``local_dir`` to ``uri``, replacing any folder there.

    The copy lands in a temporary sibling first and is moved into place, so a reader (or a
    resumed run) finds either the old folder or the new one, never a half-written mix.
    """
    fs, path = resolve(uri)
    tag = uuid.uuid4().hex[:8]
    tmp, old = f"{path}.tmp-{tag}", f"{path}.old-{tag}"
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        dest = tmp if rel == "." else posixpath.join(tmp, *rel.split(os.sep))
        fs.create_dir(dest, recursive=True)
        for name in files:
            with open(os.path.join(root, name), "rb") as src, fs.open_output_stream(posixpath.join(dest, name)) as out:
                shutil.copyfileobj(src, out, 1 << 20)
    replaced = fs.get_file_info(path).type != pafs.FileType.NotFound
    if replaced:
        fs.move(path, old)
    fs.move(tmp, path)
    if replaced:
        fs.delete_dir(old)
