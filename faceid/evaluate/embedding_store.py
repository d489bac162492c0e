"""Face results of image files, keyed by path + size + mtime, optionally kept in a file.

Folder evaluation embeds each file once: a control shared by many samples, a sample seen in
an earlier watch round. The file beside the report is a JSON document (no pickle) holding a
fingerprint of the model and detection settings; a cache written by another model, another
version, or a corrupt or partial file is discarded and rebuilt, never trusted. Each entry also
carries a checksum of its content, and its embedding must be plausible (finite, non-zero,
unit length for ArcFace): an entry failing either is embedded again, the others are kept.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...common.files import atomic_write_text, file_signature
from ..errors import OutputWriteError

log = logging.getLogger(__name__)

CACHE_FORMAT = "face-consistency-embeddings/3"
# An L2-normalised float32 embedding is of unit length to about 1e-7; anything further off was altered.
UNIT_NORM_TOLERANCE = 1e-3
# Rejected entries named in the message about them (the count covers all).
NAMED_REJECTIONS = 3


class CacheEntryError(ValueError):
    """One cache entry fails its checksum or holds an implausible embedding."""


@dataclass
class FileFaces:
    """What the engine found in one image file (the largest face, as the engine selects it)."""

    path: str
    size: int
    mtime_ns: int
    embedding: np.ndarray | None = None  # (D,) float32, L2-normalised
    reason: str | None = None  # why there is no embedding
    det_score: float | None = None
    bbox: list[float] | None = None
    faces_found: int = 0
    image_size: tuple[int, int] | None = None  # (width, height)
    kps: list[list[float]] | None = None  # the face's 5 keypoints (for the face-region change)

    @property
    def ok(self) -> bool:
        return self.embedding is not None

    def face_dict(self) -> dict[str, Any] | None:
        if self.det_score is None:
            return None
        return {"bbox": self.bbox, "det_score": self.det_score, "faces_found": self.faces_found}

    def to_json(self) -> dict[str, Any]:
        content = self._content()
        return {**content, "checksum": _checksum(content)}

    def _content(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "embedding": None
            if self.embedding is None
            else base64.b64encode(self.embedding.astype("<f4").tobytes()).decode("ascii"),
            "reason": self.reason,
            "det_score": self.det_score,
            "bbox": self.bbox,
            "faces_found": self.faces_found,
            "image_size": list(self.image_size) if self.image_size else None,
            "kps": self.kps,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], embedding_size: int, unit_norm: bool = True) -> FileFaces:
        """The entry of a cache file; CacheEntryError when its checksum or its embedding is off."""
        content = {k: v for k, v in data.items() if k != "checksum"}
        if data.get("checksum") != _checksum(content):
            raise CacheEntryError("its checksum does not match its content (the file was altered)")
        embedding = None
        if data["embedding"] is not None:
            embedding = np.frombuffer(base64.b64decode(data["embedding"], validate=True), dtype="<f4").astype(
                np.float32
            )
            _check_plausible(embedding, embedding_size, unit_norm)
        return cls(
            path=str(data["path"]),
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            embedding=embedding,
            reason=data["reason"],
            det_score=data["det_score"],
            bbox=data["bbox"],
            faces_found=int(data["faces_found"]),
            image_size=tuple(data["image_size"]) if data["image_size"] else None,
            kps=data["kps"],
        )


def _checksum(content: dict[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_plausible(embedding: np.ndarray, embedding_size: int, unit_norm: bool) -> None:
    if embedding.shape != (embedding_size,):
        raise CacheEntryError(f"its embedding has {embedding.size} values, not {embedding_size}")
    if not np.all(np.isfinite(embedding)):
        raise CacheEntryError("its embedding holds NaN or infinite values")
    norm = float(np.linalg.norm(embedding))
    if norm == 0.0:
        raise CacheEntryError("its embedding is all zeros")
    if unit_norm and abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
        raise CacheEntryError(f"its embedding has length {norm:.4g}, not 1")


def model_fingerprint(description: dict[str, Any], pack_dir: str | os.PathLike) -> str:
    """Identify the models and settings that produced embeddings (pack files, det size/thresh, fast mode)."""
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in Path(pack_dir).iterdir()
        if p.suffix.lower() == ".onnx"
    )
    keyed = {k: description[k] for k in ("pack", "det_size", "det_thresh", "embedding_size")}
    if description.get("fast"):  # other keypoints: not the default mode's results (whose caches stay valid)
        keyed["fast"] = True
    payload = json.dumps([CACHE_FORMAT, keyed, files], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class EmbeddingStore:
    """In-memory map path -> FileFaces, valid while the file's size and mtime are unchanged."""

    def __init__(
        self, fingerprint: str, embedding_size: int, cache_file: Path | None = None, unit_norm: bool = True
    ) -> None:
        """`unit_norm`: the embeddings are L2-normalised (ArcFace), so a cached one must be of unit length."""
        self.fingerprint = fingerprint
        self.embedding_size = embedding_size
        self.cache_file = cache_file
        self.unit_norm = unit_norm
        self._entries: dict[str, FileFaces] = {}
        self.discarded_reason: str | None = None  # why an existing cache file (or some entries) was not used
        if cache_file is not None:
            self._load(cache_file)

    def _load(self, cache_file: Path) -> None:
        if not cache_file.exists():
            return
        try:
            data = json.loads(cache_file.read_text(encoding="utf-8"))
            if data.get("format") != CACHE_FORMAT:
                raise ValueError(f"unknown cache format {data.get('format')!r}")
            if data.get("fingerprint") != self.fingerprint:
                raise ValueError("made with another model pack or other detection settings")
            items = list(data["entries"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.discarded_reason = f"embedding cache {cache_file} not used ({exc}); rebuilding it"
            log.warning(self.discarded_reason)
            return
        rejected = []
        for number, item in enumerate(items):
            try:
                entry = FileFaces.from_json(item, self.embedding_size, self.unit_norm)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:  # binascii.Error is a ValueError
                where = item.get("path") if isinstance(item, dict) else None
                rejected.append(f"{where or f'entry {number}'}: {exc}")
                continue
            self._entries[entry.path] = entry
        if rejected:
            named = "; ".join(rejected[:NAMED_REJECTIONS]) + ("; ..." if len(rejected) > NAMED_REJECTIONS else "")
            self.discarded_reason = (
                f"{len(rejected)} of {len(items)} entries of embedding cache {cache_file} failed their checks "
                f"and are embedded again ({named})"
            )
            log.warning(self.discarded_reason)

    def get(self, path: str | os.PathLike) -> FileFaces | None:
        """The stored result for `path` if the file is unchanged since it was embedded."""
        entry = self._entries.get(str(path))
        if entry is None or file_signature(path) != (entry.size, entry.mtime_ns):
            return None
        return entry

    def peek(self, path: str | os.PathLike) -> FileFaces | None:
        """The stored result without checking the file (for reports of an interrupted round)."""
        return self._entries.get(str(path))

    def put(self, entry: FileFaces) -> None:
        self._entries[entry.path] = entry

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> None:
        if self.cache_file is None:
            return
        live = [e for e in self._entries.values() if file_signature(e.path) == (e.size, e.mtime_ns)]
        document = {
            "format": CACHE_FORMAT,
            "fingerprint": self.fingerprint,
            "entries": [e.to_json() for e in live],
        }
        try:
            atomic_write_text(self.cache_file, json.dumps(document, separators=(",", ":")))
        except OSError as exc:
            raise OutputWriteError(
                f"cannot write the embedding cache {self.cache_file}: {exc.strerror or exc}; the previous "
                "cache (if any) is unchanged. Free space or choose another --output_json folder."
            ) from None
