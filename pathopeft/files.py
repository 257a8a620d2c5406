"""Crash-safe file writing and content hashing.

Every output is written under a hidden temporary name in its final folder and renamed into place
when complete: a killed run never leaves a file that looks finished, and readers that glob for
``*.h5`` or ``*.png`` never see a partial file (the temporary name does not end in the extension).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "PARTIAL_MARKER",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "remove_stale_partials",
    "sha256_bytes",
    "sha256_file",
]

PARTIAL_MARKER = ".partial-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    On any exception the temporary file is removed and ``path`` is left untouched (an older
    complete version, if any, survives).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}{PARTIAL_MARKER}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{final}: the writer did not create its temporary file {tmp.name}")
        tmp.replace(final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int = 2) -> None:
    """Write JSON; NaN/inf (an undefined metric, say) become ``null`` so the file stays valid JSON."""
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=indent, allow_nan=False) + "\n")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _json_safe(obj.item())
    return obj


def remove_stale_partials(folder: str | Path) -> int:
    """Delete temporary files left by a killed run in ``folder`` (recursively); return how many."""
    count = 0
    root = Path(folder)
    if not root.is_dir():
        return 0
    for p in root.rglob(f".*{PARTIAL_MARKER}*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            count += 1
    return count


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
