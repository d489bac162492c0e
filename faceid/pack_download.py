"""Fetch a standard InsightFace model pack on first use: resumable, verified, never half installed.

The release zip is downloaded to `<models>/.<pack>.zip.part` (a Range request continues an
interrupted download), checked against the release's sha256, extracted into a hidden folder
beside the target, validated as a pack, and only then renamed into `<models>/<pack>/`. A lock
file makes a second process wait for the first one's download instead of fetching again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from ..common.files import default_dir_mode
from .errors import ModelPackError
from .pack_files import STANDARD_PACKS, validate_pack

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

RELEASE_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7"
# test and mirror settings: the base URL the zips are fetched from (`<base>/<pack>.zip`), and
# the sha256 expected of a pack's zip (`name=hash,name=hash`)
URL_ENV = "FACE_CONSISTENCY_PACKS_URL"
SHA256_ENV = "FACE_CONSISTENCY_PACKS_SHA256"
OFFLINE_ENV = "FACE_CONSISTENCY_OFFLINE"
OFFLINE_HOW = f"--offline, {OFFLINE_ENV}=1 or the ComfyUI setting 'Face Consistency: download model packs'"

CHUNK = 1 << 20
ATTEMPTS = 4  # one download and three resumes before giving up
RETRY_PAUSE_S = 1.0
SOCKET_TIMEOUT_S = 60
LOCK_WAIT_S = 3600  # a slow 360 MB download by another process
# A pack is .onnx files of float weights, which hardly compress: unpacked, a release zip is about its
# own size. More than this many times the zip's recorded size is not a pack (a zip bomb), whatever
# hash a mirror setting vouches for.
UNPACKED_CEILING_RATIO = 4
MODEL_SUFFIX = ".onnx"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class PackRelease:
    """One zip of InsightFace's v0.7 release."""

    name: str
    sha256: str
    size: int  # bytes

    @property
    def size_label(self) -> str:
        return f"{self.size / 1e6:.0f} MB"


# sha256 and size of each release zip, not computed here (nothing is downloaded in development):
# found quoted, with the same values, in several public projects that pin these zips (a public
# code search; its index names no repository for these hits): a photo library's model list
# (`ML_MODELS` with buffalo_s/m/l and antelopev2 at the v0.7 URLs, shaped like LibrePhotos's
# api/ml_models.py, whose older snapshot has no hashes yet), a model-asset table giving
# buffalo_sc/s/m/l with their byte sizes, a Go downloader pinning buffalo_l (288621354 bytes),
# shell scripts and Makefiles pinning buffalo_sc (14969382 bytes) and buffalo_s, and three
# more quoting antelopev2 at 360662982 bytes. Every hash was seen in at least two of them.
RELEASES: dict[str, PackRelease] = {
    release.name: release
    for release in (
        PackRelease("buffalo_l", "80ffe37d8a5940d59a7384c201a2a38d4741f2f3c51eef46ebb28218a7b0ca2f", 288_621_354),
        PackRelease("buffalo_m", "d98264bd8f2dc75cbc2ddce2a14e636e02bb857b3051c234b737bf3b614edca9", 275_951_529),
        PackRelease("buffalo_s", "d85a87f503f691807cd8bb97128bdf7a0660326cd9cd02657127fa978bab8b5e", 127_607_557),
        PackRelease("buffalo_sc", "57d31b56b6ffa911c8a73cfc1707c73cab76efe7f13b675a05223bf42de47c72", 14_969_382),
        PackRelease("antelopev2", "8e182f14fc6e80b3bfa375b33eb6cff7ee05d8ef7633e738d1c89021dcf0c5c5", 360_662_982),
    )
}
assert tuple(RELEASES) == STANDARD_PACKS


@dataclass(frozen=True)
class Transfer:
    """Where a download stands; what a progress callback receives after every chunk."""

    pack: str
    url: str
    target: Path
    done: int
    total: int | None
    resumed_from: int
    started: float  # time.monotonic() of this attempt

    @property
    def rate(self) -> float:
        """Bytes per second of this attempt."""
        return (self.done - self.resumed_from) / max(time.monotonic() - self.started, 1e-6)

    def __str__(self) -> str:
        total = f" of {self.total / 1e6:.1f}" if self.total else ""
        return f"downloading {self.pack}: {self.done / 1e6:.1f}{total} MB at {self.rate / 1e6:.1f} MB/s"


ProgressCallback = Callable[[Transfer], None]


class TerminalProgress:
    """A tqdm bar (size, speed, time left) as `download_pack`'s progress callback."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None

    def __call__(self, transfer: Transfer) -> None:
        from tqdm import tqdm

        if self._bar is None:
            tqdm.write(
                f"model pack {transfer.pack}: downloading {transfer.url} into {transfer.target}", file=sys.stderr
            )
            self._bar = tqdm(total=transfer.total, unit="B", unit_scale=True, unit_divisor=1000, desc=transfer.pack)
        self._bar.update(transfer.done - self._bar.n)
        if transfer.total is not None and transfer.done >= transfer.total:
            self._bar.close()
            self._bar = None


def downloads_off_by_env() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def pack_url(name: str) -> str:
    base = os.environ.get(URL_ENV, "").strip() or RELEASE_URL
    return f"{base.rstrip('/')}/{name}.zip"


def expected_sha256(name: str) -> str:
    """The recorded sha256 of a pack's zip, or the one `FACE_CONSISTENCY_PACKS_SHA256` gives."""
    for item in filter(None, (part.strip() for part in os.environ.get(SHA256_ENV, "").split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in RELEASES or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ModelPackError(
                f"{SHA256_ENV}: cannot read {item!r}; write name=sha256 pairs separated by commas, "
                f"with names from {', '.join(STANDARD_PACKS)} and 64 hex digits per hash"
            )
        if key == name:
            return value.lower()
    return RELEASES[name].sha256


def manual_install_hint(name: str, models_dir: Path) -> str:
    return (
        f"Download {pack_url(name)} ({RELEASES[name].size_label}) and unzip it so that the .onnx files "
        f"are in {models_dir / name}/ (in ComfyUI: ComfyUI/models/insightface/models/{name}/)"
    )


def models_dir_of(root: Path) -> Path:
    """Where a root keeps its packs (a root may be given as its models/ folder itself)."""
    return root if root.name == "models" else root / "models"


def download_dir(roots: Sequence[Path]) -> Path:
    """The models folder of the first root that can be written to (created if missing)."""
    tried = []
    for root in roots:
        models = models_dir_of(root)
        tried.append(str(models))
        with contextlib.suppress(OSError):
            models.mkdir(parents=True, exist_ok=True)
            if os.access(models, os.W_OK | os.X_OK):
                return models
    raise ModelPackError(f"no model folder can be written to for a download; tried: {', '.join(tried)}")


def download_pack(name: str, models_dir: Path, progress: ProgressCallback | None = None, slim: bool = False) -> Path:
    """Install standard pack `name` into `models_dir/<name>/` and return that folder.

    `slim` keeps only the detector and the recognizer. A pack already there (or installed by
    another process while this one waited for the lock) is returned as it is.
    """
    if name not in RELEASES:
        raise ModelPackError(f"'{name}' is not a standard pack; downloadable: {', '.join(STANDARD_PACKS)}")
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / name
    with _exclusive(models_dir, name):
        if target.exists():
            validate_pack(target, name)
            return target
        part = models_dir / f".{name}.zip.part"
        url = pack_url(name)
        expected = expected_sha256(name)
        have = part.stat().st_size if part.exists() else 0
        # the rest of the zip, then the pack beside it (about the zip's size)
        _check_free_space(models_dir, name, max(RELEASES[name].size - have, 0) + RELEASES[name].size)
        try:
            _fetch(url, part, name, target, progress)
        except OSError as exc:
            if exc.errno not in DISK_FULL:  # a cancel (InterruptedError) keeps what arrived, to resume
                raise
            part.unlink(missing_ok=True)  # the space is needed more than a resume
            raise ModelPackError(_no_space(models_dir, name, exc.strerror or str(exc))) from None
        actual = _sha256(part)
        if actual != expected:
            part.unlink()
            raise ModelPackError(
                f"the download of {url} has sha256 {actual}, but {name}.zip should have {expected}. The file "
                f"is damaged or is not InsightFace's {name}.zip; nothing was installed and it was deleted. "
                f"Run again to download it anew (a mirror set with {URL_ENV} must serve the release zips)."
            )
        try:
            _install(part, name, target, slim)
        finally:
            part.unlink()  # installed, or unusable: a new download must not resume from it
    log.info("model pack %s installed in %s", name, target)
    return target


@contextlib.contextmanager
def _exclusive(models_dir: Path, name: str) -> Iterator[None]:
    lock = FileLock(str(models_dir / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("another process is downloading model pack %s into %s; waiting for it", name, models_dir)
        try:
            lock.acquire(timeout=LOCK_WAIT_S)
        except Timeout:
            raise ModelPackError(
                f"another process has been downloading model pack {name} into {models_dir} for over "
                f"{LOCK_WAIT_S // 60} minutes (it holds {lock.lock_file}); stop it or wait, then run again"
            ) from None
    try:
        yield
    finally:
        lock.release()


class _NetworkError(Exception):
    pass


def _fetch(url: str, part: Path, name: str, target: Path, progress: ProgressCallback | None) -> None:
    """Bring `part` to the whole file at `url`, resuming what an earlier attempt left."""
    reason = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            log.warning("download of %s broke off (%s); resuming", url, reason)
            time.sleep(RETRY_PAUSE_S)
        try:
            if _fetch_once(url, part, name, target, progress):
                return
            reason = "the connection closed before the end of the file"
        except _NetworkError as exc:
            reason = str(exc)
    raise ModelPackError(
        f"could not download model pack '{name}' from {url} ({reason}). What arrived is kept and "
        f"the next run continues from there. If this machine is offline: "
        f"{manual_install_hint(name, target.parent)}."
    )


def _fetch_once(url: str, part: Path, name: str, target: Path, progress: ProgressCallback | None) -> bool:
    """One request; True when `part` holds the whole file. Progress callbacks may raise (Cancel)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "comfyui-face-consistency"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=SOCKET_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the sha256 check decides
            return True
        if 400 <= exc.code < 500:
            raise ModelPackError(
                f"model pack '{name}' is not available at {url} (HTTP {exc.code} {exc.reason}). "
                f"{manual_install_hint(name, target.parent)}."
            ) from None
        raise _NetworkError(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _NetworkError(str(getattr(exc, "reason", exc))) from None
    with response:
        start, total = _range_of(response, part, have)
        started = time.monotonic()
        with open(part, "ab" if start else "wb") as out:
            done = start
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _NetworkError(str(exc) or type(exc).__name__) from None
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(Transfer(name, url, target, done, total, start, started))
    return total is None or done >= total


def _range_of(response: http.client.HTTPResponse, part: Path, have: int) -> tuple[int, int | None]:
    """(offset the body starts at, size of the whole file); a server that ignores Range restarts at 0."""
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range)
        if match and int(match.group(1)) == have:
            return have, None if match.group(2) == "*" else int(match.group(2))
        part.unlink()  # the next attempt starts from the beginning
        raise _NetworkError(f"the server resumed at another offset ({content_range!r} for byte {have})")
    length = response.headers.get("Content-Length")
    return 0, int(length) if length else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_free_space(folder: Path, name: str, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ModelPackError(
            _no_space(folder, name, f"it needs about {needed / 1e6:.0f} MB, {free / 1e6:.0f} MB are free")
        )


def _no_space(folder: Path, name: str, detail: str) -> str:
    return (
        f"not enough free space in {folder} for model pack {name} ({detail}); nothing was installed. Free "
        f"space there, or point the models folder to another disk, then run again."
    )


def _model_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The .onnx files of an archive (nothing else of it is installed); a member that would land
    outside the pack folder makes the archive unusable."""
    members = []
    for info in zf.infolist():
        path = PurePosixPath(info.filename)
        if path.is_absolute() or ".." in path.parts:
            raise zipfile.BadZipFile(f"member {info.filename!r} would land outside the pack folder")
        is_link = stat.S_ISLNK(info.external_attr >> 16)
        hidden = any(part.startswith((".", "__MACOSX")) for part in path.parts)
        if not info.is_dir() and not is_link and not hidden and path.suffix.lower() == MODEL_SUFFIX:
            members.append(info)
    return members


def _extract(zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], staging: Path, ceiling: int) -> None:
    """Write `members` under `staging`, never more bytes than each declares (an archive may lie)."""
    for info in members:
        destination = staging.joinpath(*PurePosixPath(info.filename).parts)
        destination.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with zf.open(info) as source, open(destination, "wb") as out:
            for block in iter(lambda: source.read(CHUNK), b""):
                written += len(block)
                if written > info.file_size or written > ceiling:
                    raise zipfile.BadZipFile(
                        f"{info.filename} unpacks to more than the {info.file_size} bytes it declares"
                    )
                out.write(block)


def _install(archive: Path, name: str, target: Path, slim: bool) -> None:
    """Extract the model files beside `target` (bounded by what a pack can be and by the free
    space), flatten, validate, then rename into place in one step."""
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".extracting", dir=target.parent))
    ceiling = UNPACKED_CEILING_RATIO * RELEASES[name].size
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                members = _model_members(zf)
                unpacked = sum(info.file_size for info in members)
                if unpacked > ceiling:
                    raise ModelPackError(
                        f"{name}.zip would unpack to {unpacked / 1e6:.0f} MB of model files, more than a {name} pack "
                        f"can be ({ceiling / 1e6:.0f} MB at most): it is not InsightFace's {name}.zip (a zip bomb?). "
                        f"Nothing was installed and it was deleted; check the mirror set with {URL_ENV}."
                    )
                _check_free_space(target.parent, name, unpacked)
                damaged = zf.testzip()
                if damaged is not None:
                    raise zipfile.BadZipFile(f"{damaged} fails its CRC check")
                _extract(zf, members, staging, ceiling)
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            raise ModelPackError(_no_space(target.parent, name, exc.strerror or str(exc))) from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
            raise ModelPackError(
                f"{name}.zip is not a usable zip archive ({exc}); nothing was installed and it was deleted. "
                "Run again to download it anew."
            ) from None
        folder = _onnx_folder(staging, name)
        try:
            files = validate_pack(folder, name)
        except ModelPackError as exc:
            raise ModelPackError(f"{name}.zip does not hold a usable pack; nothing was installed. {exc}") from None
        if slim:
            for path in folder.iterdir():
                if path not in (files.detector, files.recognizer):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.chmod(folder, default_dir_mode())  # mkdtemp's 0700 would hide the pack from other accounts
        os.replace(folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _onnx_folder(staging: Path, name: str) -> Path:
    """The one extracted folder holding the .onnx files (antelopev2.zip nests them in antelopev2/)."""
    holders = sorted(
        {
            path.parent
            for path in staging.rglob("*.onnx")
            if not any(part.startswith((".", "__MACOSX")) for part in path.relative_to(staging).parts)
        }
    )
    if len(holders) != 1:
        found = ", ".join(str(h.relative_to(staging)) for h in holders) or "none"
        raise ModelPackError(
            f"{name}.zip should hold its .onnx files in one folder; folders with .onnx files: {found}. "
            "Nothing was installed."
        )
    return holders[0]
