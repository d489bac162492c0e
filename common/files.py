"""Files: atomic writes (a reader never sees a half-written report, status or checkpoint), a check
that a path can be written, a file's signature, the one text-file reader and the one TOML reader."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# tomllib is re-exported: the one place that knows Python 3.10 reads TOML with tomli
if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # noqa: F401  (re-exported)


# The image files the pack reads, everywhere it lists a folder (samples, datasets, checkpoints' runs).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})

_UMASK_LOCK = threading.Lock()


class OutputPathError(ValueError):
    """A path a report or file cannot be written to, with the reason."""


class TextFileError(ValueError):
    """A text file the pack reads that is not UTF-8 text; the message names the file and the fix."""


_SAVE_AS_UTF8 = (
    "open it in a text editor and save it as UTF-8 (Windows Notepad: File > Save As, Encoding: UTF-8), then run again"
)


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The text of a file the pack reads (dataset TOML, prompt file, caption, config file), in UTF-8
    (a UTF-8 byte-order mark is skipped). Anything else is a TextFileError naming `what`, the file
    and how to save it as UTF-8; OSError (not found, no permission) is left to the caller."""
    data = Path(path).read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise TextFileError(
            f'{what} {path} is saved as UTF-16 (Windows Notepad\'s "Unicode"), not UTF-8: {_SAVE_AS_UTF8}'
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TextFileError(
            f"{what} {path} is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}; "
            f"perhaps Windows-1252 or Latin-1): {_SAVE_AS_UTF8}"
        ) from None
    if "\0" in text:
        raise TextFileError(
            f"{what} {path} holds NUL characters (UTF-16 without a byte-order mark, or not a text "
            f"file at all): {_SAVE_AS_UTF8}"
        )
    return text


def _umask() -> int:
    with _UMASK_LOCK:  # the umask can only be read by setting it
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The mode `open()` gives a new file: 0666 less the process umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode `mkdir()` gives a new folder: 0777 less the process umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600, and writers that replace the file (safetensors) do too: reports and
        # checkpoints get what any new file would get
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def check_writable_file(path: str | os.PathLike, what: str) -> None:
    """Raise OutputPathError unless a file can be written at `path` (its folders created as needed).

    `what` names the path for the user ("--output_json", "save_report"). Tried by creating a
    temporary file where the first missing folder would go, so permissions, read-only file
    systems and ACLs all count as they will for the real write.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"{what} {target} is a folder; give a file path such as {target / 'report.json'}")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(f"{what} {target}: {folder} is a file, not a folder; choose a path inside a folder")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".write-check."):
            pass
    except PermissionError:
        raise OutputPathError(
            f"{what} {target}: no permission to write in {folder}; choose a folder you can write to"
        ) from None
    except OSError as exc:  # EROFS, ENOSPC, ...
        raise OutputPathError(f"{what} {target}: cannot write in {folder} ({exc.strerror or exc})") from None


def file_signature(path: str | os.PathLike) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, or None when it is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns
