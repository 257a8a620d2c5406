"""Crash-safe file writing and content hashing.

Every output is written under a hidden temporary name in its final folder and renamed into place
when complete: a killed run never leaves a file that looks finished, and readers that glob for
``*.h5`` or ``*.png`` never see a partial file (the temporary name does not end in the extension).

The temporary name records its writer (``.<name>.partial-<host>-<pid>-<random>``), so a clean-up
removes only partial files whose writer is gone (:func:`remove_stale_partials`) and never the
in-flight files of another run writing into the same folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "PARTIAL_MARKER",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "host_name",
    "partial_writer",
    "pid_alive",
    "remove_stale_partials",
    "sha256_bytes",
    "sha256_file",
]

PARTIAL_MARKER = ".partial-"


def host_name() -> str:
    """This machine's name as it appears in file names (path-safe)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname() or "localhost")[:64] or "localhost"


def partial_writer(path: str | Path) -> tuple[str, int] | None:
    """``(host, pid)`` of a partial file's writer from its name; ``None`` when the name has none.

    Names from older versions (``.x.partial-<pid>-<random>``) carry no host: this machine's.
    """
    name = Path(path).name
    if PARTIAL_MARKER not in name:
        return None
    parts = name.split(PARTIAL_MARKER, 1)[1].rsplit("-", 2)
    host, pid = (parts[0], parts[1]) if len(parts) == 3 else (host_name(), parts[0])
    try:
        return host, int(pid)
    except ValueError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:  # a killed child not yet reaped by its parent is a zombie: its work is over
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    On any exception the temporary file is removed and ``path`` is left untouched (an older
    complete version, if any, survives).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}{PARTIAL_MARKER}{host_name()}-{os.getpid()}-{secrets.token_hex(4)}")
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


# a partial file of another machine's writer is left alone unless it has not changed for this long
# (its writer cannot be asked; an in-flight output is being written, so its mtime moves)
FOREIGN_PARTIAL_AGE_S = 24 * 3600.0


def remove_stale_partials(
    folder: str | Path, *, writer_gone: Callable[[str, int], bool | None] | None = None
) -> int:
    """Delete temporary files whose writer is gone in ``folder`` (recursively); return how many.

    ``writer_gone(host, pid)`` decides (``None``: cannot tell). By default, and when it cannot
    tell: a writer on this machine is gone when its process is; a file of another machine's
    writer is removed only after :data:`FOREIGN_PARTIAL_AGE_S` without a change. Files of
    live writers — another run into the same folder — are kept.
    """
    count = 0
    root = Path(folder)
    if not root.is_dir():
        return 0
    me = host_name()
    for p in root.rglob(f".*{PARTIAL_MARKER}*"):
        writer = partial_writer(p)
        gone = writer_gone(*writer) if writer is not None and writer_gone is not None else None
        if gone is None and writer is not None and writer[0] == me:
            gone = writer[1] != os.getpid() and not pid_alive(writer[1])
        if gone is None:
            try:
                gone = time.time() - p.stat().st_mtime > FOREIGN_PARTIAL_AGE_S
            except FileNotFoundError:
                continue
        if gone:
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
