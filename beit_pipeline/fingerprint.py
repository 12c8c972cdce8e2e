"""What an output was made from, as short digests: file contents, image sets, tool versions.

A step is redone exactly when one of these changes.  File contents are hashed
(SHA-256) and the digest is cached by (device, inode, size, mtime, ctime) so a
rerun over a 350 MB checkpoint stays instant; writing the file in place changes
its ctime even when its mtime is put back, so the cache never hands out a stale
digest.  Only the standard library is imported here: run_all.sh asks this
module for every step, and torch's import alone takes seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterable
from typing import Any

from beit_pipeline import files

CACHE_ENV = "BEIT_PIPELINE_HASH_CACHE"
_CHUNK = 4 << 20
_memory = {}


def default_cache_path() -> str:
    """``$BEIT_PIPELINE_HASH_CACHE``, else ``$XDG_CACHE_HOME/beit_pipeline/hashes.json`` (``~/.cache``)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "beit_pipeline", "hashes.json")


def _stat_key(st):
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def digest(data: bytes | str) -> str:
    """The hex SHA-256 of ``data`` (bytes or str), shortened to 16 hex digits."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return hashlib.sha256(data).hexdigest()[:16]


def digest_json(value: Any) -> str:
    """digest() of a JSON value with sorted keys: the same value always gives the same digest."""
    return digest(json.dumps(value, sort_keys=True, ensure_ascii=True))


def file_digest(path: str | os.PathLike[str], cache_path: str | None = None) -> str:
    """SHA-256 (16 hex digits) of a file's content, from the cache when the file is unchanged.

    ``cache_path`` None: the default cache; "" : no cache file (in-process memory only).
    Raises OSError naming the file when it cannot be read.
    """
    path = os.path.realpath(os.fspath(path))
    st = os.stat(path)
    key = _stat_key(st)
    cache_path = default_cache_path() if cache_path is None else cache_path
    cache = _load_cache(cache_path)
    entry = cache.get(path)
    if isinstance(entry, dict) and entry.get("stat") == key and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    value = h.hexdigest()[:16]
    if os.stat(path).st_mtime_ns == st.st_mtime_ns:  # not rewritten while we read it
        cache[path] = {"stat": key, "sha256": value}
        _save_cache(cache_path, cache)
    return value


def _load_cache(cache_path):
    if not cache_path:
        return _memory
    return files.read_json(cache_path) or {}


def _save_cache(cache_path, cache):
    if not cache_path:
        return
    # A cache is an optimisation: a read-only home or a full disk must not stop the pipeline.
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        live = {p: e for p, e in cache.items() if os.path.exists(p)}
        files.write_json_atomic(cache_path, live)


def image_set_digest(folder: str, names: Iterable[str]) -> str:
    """A digest of an image set: each relative name with its size and mtime.

    Adding, removing, renaming or rewriting an image changes it; reading 50,000
    stats takes well under a second, hashing 6.4 GB of JPEGs would take minutes.
    """
    h = hashlib.sha256()
    for name in names:
        path = os.path.join(folder, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:  # a dangling symlink: preprocessing reports it as a bad image (or skips it)
            st = os.lstat(path)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """{distribution: version or None} without importing the packages (importlib.metadata)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_digest(paths: Iterable[str]) -> str:
    """A digest of source files' contents: the pipeline's own code is a tool version too."""
    h = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()[:16]
