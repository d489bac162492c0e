"""Face targets for the identity loss, computed once at caching time with the face engine.

For each training item: the target face's 5 keypoints (where the loss warps the decoded
image), the target face's embedding, and the identity of the control images (mean of
their normalised embeddings). An item without a face is a recorded result, not an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ...common.files import atomic_path
from ...faceid import FaceModel, Selection, mean_identity
from ...faceid.evaluate.embedding_store import model_fingerprint
from ...musubi_formats.dataset import DatasetItem
from ..cache import FINGERPRINT_KEY, cached_fingerprint, file_identity, input_fingerprint

FACE_TARGET_FORMAT = "face_target/1"
ReferenceSource = Literal["control", "target"]


@dataclass
class FaceTarget:
    """Face data of one training item. `kps` are pixels of the target image as it was given."""

    pack: str
    embedding_size: int
    image_size: tuple[int, int]  # (width, height) of the target image the keypoints refer to
    kps: np.ndarray | None = None  # [5, 2] float32
    target_embedding: np.ndarray | None = None  # [D] float32, L2-normalised
    control_embedding: np.ndarray | None = None  # [D] float32, mean identity of the controls
    control_count: int = 0  # control images given
    control_faces: int = 0  # control images in which a face was found
    reason: str | None = None  # why the target has no usable face
    control_reasons: list[str | None] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.kps is not None and self.target_embedding is not None

    def reference(self, source: ReferenceSource) -> np.ndarray | None:
        """The embedding the loss pulls towards: the controls' identity or the target face's."""
        if source == "control":
            return self.control_embedding
        if source == "target":
            return self.target_embedding
        raise ValueError(f"reference source must be 'control' or 'target', got {source!r}")

    def skip_reason(self, source: ReferenceSource) -> str | None:
        """Why the loss cannot use this item with that reference (None: it can)."""
        if not self.ok:
            return f"target: {self.reason}"
        if self.reference(source) is None:
            reasons = "; ".join(f"control {i}: {r}" for i, r in enumerate(self.control_reasons) if r)
            return f"no face in any control image ({reasons or 'no control images'})"
        return None


def compute_face_target(face_model: FaceModel, target_image: Any, control_images: Sequence[Any] = ()) -> FaceTarget:
    """Detect the target's face (largest) and the controls' faces once; embed them with the engine.

    Pass the target image exactly as its latents are encoded (after bucket resize/crop) so
    the keypoints match the decoded image. In a control with several people, the face
    closest to the target face is taken as the identity source.
    """
    target_result = face_model.analyze([target_image], selection=Selection.LARGEST)[0]
    face_target = FaceTarget(
        pack=face_model.pack_name,
        embedding_size=int(face_model.embedding_size),
        image_size=(int(target_result.image_size[0]), int(target_result.image_size[1])),
        control_count=len(control_images),
    )
    if target_result.ok and target_result.face is not None:
        face_target.kps = np.asarray(target_result.face.kps, dtype=np.float32).reshape(5, 2)
        face_target.target_embedding = np.asarray(target_result.embedding, dtype=np.float32)
    else:
        face_target.reason = target_result.reason
    if control_images:
        if face_target.ok:
            control_results = face_model.analyze(
                list(control_images), selection=Selection.BEST_MATCH, reference=face_target.target_embedding
            )
        else:
            control_results = face_model.analyze(list(control_images), selection=Selection.LARGEST)
        found = [r.embedding for r in control_results if r.ok and r.embedding is not None]
        face_target.control_reasons = [None if r.ok else r.reason for r in control_results]
        face_target.control_faces = len(found)
        if found:
            face_target.control_embedding = mean_identity(found).embedding.astype(np.float32)
    return face_target


def save_face_target(
    path: str | os.PathLike, face_target: FaceTarget, extra_metadata: Mapping[str, str] | None = None
) -> None:
    """Write one item's face target to a .safetensors file (atomically).

    extra_metadata (e.g. the cache's input fingerprint) is stored beside the target's own.
    """
    tensors = {"image_size": np.asarray(face_target.image_size, dtype=np.int64)}
    for name in ("kps", "target_embedding", "control_embedding"):
        value = getattr(face_target, name)
        if value is not None:
            tensors[name] = np.ascontiguousarray(value, dtype=np.float32)
    metadata = {
        "format": FACE_TARGET_FORMAT,
        "pack": face_target.pack,
        "embedding_size": str(face_target.embedding_size),
        "control_count": str(face_target.control_count),
        "control_faces": str(face_target.control_faces),
        "reason": json.dumps(face_target.reason),
        "control_reasons": json.dumps(face_target.control_reasons),
    }
    metadata = {**dict(extra_metadata or {}), **metadata}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_face_target(path: str | os.PathLike) -> FaceTarget:
    """Read a file written by `save_face_target`."""
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FACE_TARGET_FORMAT:
        raise ValueError(f"{path} is not a face target file ({FACE_TARGET_FORMAT}); rebuild the cache")
    tensors = load_file(str(path))
    width, height = (int(v) for v in tensors["image_size"])
    return FaceTarget(
        pack=metadata["pack"],
        embedding_size=int(metadata["embedding_size"]),
        image_size=(width, height),
        kps=tensors.get("kps"),
        target_embedding=tensors.get("target_embedding"),
        control_embedding=tensors.get("control_embedding"),
        control_count=int(metadata["control_count"]),
        control_faces=int(metadata["control_faces"]),
        reason=json.loads(metadata["reason"]),
        control_reasons=json.loads(metadata["control_reasons"]),
    )


@dataclass
class FaceTargetBatch:
    """Loss inputs for a batch: kps [B,5,2], reference [B,D], valid [B], source_region [B,4]."""

    kps: torch.Tensor
    reference: torch.Tensor
    valid: torch.Tensor
    source_region: torch.Tensor

    def to(self, device: torch.device | str) -> FaceTargetBatch:
        return FaceTargetBatch(
            kps=self.kps.to(device),
            reference=self.reference.to(device),
            valid=self.valid.to(device),
            source_region=self.source_region.to(device),
        )


def collate_face_targets(targets: Sequence[FaceTarget], reference: ReferenceSource = "control") -> FaceTargetBatch:
    """Stack face targets; items the loss cannot use get zeros and valid=False.

    source_region is the whole target image, so the loss works at any decode resolution.
    """
    if not targets:
        raise ValueError("no face targets to collate")
    sizes = {t.embedding_size for t in targets}
    if len(sizes) != 1:
        raise ValueError(f"face targets from different recognizers in one batch (embedding sizes {sorted(sizes)})")
    dim = sizes.pop()
    kps = torch.zeros(len(targets), 5, 2)
    references = torch.zeros(len(targets), dim)
    valid = torch.zeros(len(targets), dtype=torch.bool)
    region = torch.zeros(len(targets), 4, dtype=torch.float64)
    for i, item in enumerate(targets):
        region[i, 2], region[i, 3] = float(item.image_size[0]), float(item.image_size[1])
        if item.skip_reason(reference) is None:
            kps[i] = torch.from_numpy(item.kps)
            references[i] = torch.from_numpy(item.reference(reference))
            valid[i] = True
    return FaceTargetBatch(kps=kps, reference=references, valid=valid, source_region=region)


# --------------------------------------------------------------------------- the trainer's cache


@dataclass
class FaceTargetCache:
    """Face targets of a dataset for one face model pack, keyed like the latent cache."""

    targets: dict[Path, FaceTarget]  # target image path -> face target
    built: int = 0
    reused: int = 0

    def for_items(self, items: Sequence[DatasetItem]) -> list[FaceTarget]:
        return [self.targets[item.target] for item in items]

    def without_face(self, reference: ReferenceSource) -> dict[str, str]:
        """Target file -> why the loss skips it."""
        return {
            str(path): reason
            for path, target in self.targets.items()
            if (reason := target.skip_reason(reference)) is not None
        }


def face_target_path(item: DatasetItem, pack_name: str) -> Path:
    """`{stem}_{W}x{H}_qi_face_{pack}.safetensors` beside the item's latent cache."""
    width, height = item.bucket
    safe_pack = "".join(c if c.isalnum() or c in "-_." else "_" for c in pack_name)
    return item.cache_directory / f"{item.key}_{width:04d}x{height:04d}_qi_face_{safe_pack}.safetensors"


def face_target_fingerprint(item: DatasetItem, face_model: FaceModel) -> str:
    return input_fingerprint(
        {
            "format": FACE_TARGET_FORMAT,
            "target": file_identity(item.target),
            "controls": [file_identity(c) for c in item.controls],
            "bucket": item.bucket,
            "face_model": model_fingerprint(face_model.describe(), face_model.pack_dir),
        }
    )


def bucket_image(item: DatasetItem) -> Image.Image:
    """The target as its latents are encoded (resize to cover the bucket, centre crop)."""
    width, height = item.bucket
    with Image.open(item.target) as image:
        return VaeImageProcessor().resize(image.convert("RGB"), height, width, resize_mode="crop")


def cache_face_targets(
    items: Sequence[DatasetItem],
    face_model: FaceModel,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> FaceTargetCache:
    """Compute missing or outdated face targets of `items` (fingerprinted like the latents) and load them all."""
    cache = FaceTargetCache(targets={})
    for item in items:
        if should_stop():
            break
        path = face_target_path(item, face_model.pack_name)
        fingerprint = face_target_fingerprint(item, face_model)
        if cached_fingerprint(path) == fingerprint:
            cache.reused += 1
        else:
            controls = []
            for control in item.controls:
                with Image.open(control) as image:
                    controls.append(image.convert("RGB"))
            face_target = compute_face_target(face_model, bucket_image(item), controls)
            save_face_target(path, face_target, extra_metadata={FINGERPRINT_KEY: fingerprint})
            cache.built += 1
        cache.targets[item.target] = load_face_target(path)
    return cache
