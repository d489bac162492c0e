"""The face engine: one loaded detector + recognizer per (pack, provider, detection settings)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..common.face_engine import DEFAULTS, FaceEngineSettings
from .alignment import aligned_crop
from .errors import FaceEngineError, ImageLoadError, NoFaceError
from .images import MAX_ANALYSIS_SIDE, image_list, load_image_sized, undetectable_reason
from .pack_download import ProgressCallback
from .packs import PackFiles, as_roots, resolve_pack
from .providers import check_running_provider, requested_providers
from .results import DetectedFace, FaceResult, Identity, Selection
from .similarity import mean_identity, normalize

log = logging.getLogger(__name__)

AUTO_DET_SIZE_RANGE = (160, 640)
RECOGNIZER_BATCH = 32
# A face that fills the whole frame (an aligned crop) is missed by SCRFD: pad it with this
# fraction of the image size on every side and look again.
SMALL_IMAGE_PADDING = 0.5
IDENTITY_CACHE_SIZE = 256


@dataclass(frozen=True)
class _ModelKey:
    folder: str
    provider: str
    det_size: str | int
    det_thresh: float


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class FaceModel:
    """Detect, select and embed faces. Thread-safe; create through `load_face_model`."""

    def __init__(
        self,
        pack: PackFiles,
        provider: str = DEFAULTS.provider,
        det_size: str | int = DEFAULTS.det_size,
        det_thresh: float = DEFAULTS.det_thresh,
    ) -> None:
        from insightface.model_zoo import get_model

        self.pack_name = pack.name
        self.pack_dir = pack.folder
        self.det_size = det_size
        self.det_thresh = float(det_thresh)
        providers = requested_providers(provider)
        try:
            self._detector = _load_detector(str(pack.detector), providers, self.det_thresh)
            self._recognizer = get_model(str(pack.recognizer), providers=providers, sess_options=_session_options())
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise FaceEngineError(f"onnxruntime could not load model pack {pack.folder}: {exc}") from None
        if self._detector is None or self._recognizer is None:
            raise FaceEngineError(f"InsightFace did not recognise the models in {pack.folder}")
        self._recognizer.prepare(0)
        self.provider = self._recognizer.session.get_providers()[0]
        self.provider_note = check_running_provider(provider, providers, self.provider)
        self.embedding_size = int(self._recognizer.session.get_outputs()[0].shape[1])
        self._lock = threading.Lock()
        self._identity_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        # threads that may detect side by side (`detect(concurrent=True)`): one per CPU core
        self.parallel_workers = _usable_cpus() if self.provider == "CPUExecutionProvider" else 1
        self._concurrent_detector: Any = None
        self._concurrent_detector_lock = threading.Lock()

    @property
    def recognizer(self) -> Any:
        """InsightFace's ArcFaceONNX this engine embeds with (its file and input convention)."""
        return self._recognizer

    def describe(self) -> dict[str, Any]:
        return {
            "pack": self.pack_name,
            "pack_dir": str(self.pack_dir),
            "provider": self.provider,
            "provider_note": self.provider_note,
            "det_size": self.det_size,
            "det_thresh": self.det_thresh,
            "embedding_size": self.embedding_size,
        }

    def check_embedding_size(self, embedding: np.ndarray, what: str = "the reference identity") -> None:
        """Raise ValueError naming `what` when `embedding` comes from a recognizer of another size."""
        if embedding.shape[-1] != self.embedding_size:
            raise ValueError(
                f"{what} has {embedding.shape[-1]}-d embeddings but model pack '{self.pack_name}' makes "
                f"{self.embedding_size}-d ones: build it with the same face model that scores"
            )

    # detection -------------------------------------------------------------------------

    def detector_input_size(self, height: int, width: int) -> int:
        """The square side the detector runs at for an image of this size (`det_size`, or fitted to it)."""
        if self.det_size != "auto":
            return int(self.det_size)
        low, high = AUTO_DET_SIZE_RANGE
        return int(min(high, max(low, _round_up(max(height, width), 32))))

    def _run_detector(self, detector: Any, bgr: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        boxes, kpss = detector.detect(bgr, input_size=(size, size), max_num=0)
        if kpss is None:
            raise FaceEngineError(f"the detector of pack {self.pack_name} gives no keypoints")
        return boxes, kpss

    def detect(self, bgr: np.ndarray, concurrent: bool = False, det_size: int | None = None) -> list[DetectedFace]:
        """All faces in an image, left to right, in original pixel coordinates, not embedded;
        `det_size`: the detector's input side for this run instead of the engine's own.

        `concurrent=True` when several threads detect at once (`parallel_workers` of them):
        on the CPU each run then keeps to one core. Spread over two cores a 640x640 SCRFD run
        is 1.85x faster than on one; two runs side by side, 2x; and single-core runs leave
        no straggling thread for other work (image decoding) to hold up.
        """
        reason = undetectable_reason(bgr.shape[1], bgr.shape[0])
        if reason is not None:
            raise ImageLoadError(reason)
        detector = self.detector(concurrent)
        scale = 1.0
        if max(bgr.shape[:2]) > MAX_ANALYSIS_SIDE:
            scale = MAX_ANALYSIS_SIDE / max(bgr.shape[:2])
            bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        size = det_size or self.detector_input_size(*bgr.shape[:2])
        boxes, kpss = self._run_detector(detector, bgr, size)
        if len(boxes) == 0 and max(bgr.shape[:2]) < size * 0.75:
            pad = round(max(bgr.shape[:2]) * SMALL_IMAGE_PADDING)
            padded = cv2.copyMakeBorder(bgr, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
            boxes, kpss = self._run_detector(detector, padded, det_size or self.detector_input_size(*padded.shape[:2]))
            boxes = boxes.copy()
            boxes[:, :4] -= pad
            kpss = kpss - pad
        faces = [
            DetectedFace(bbox=box[:4] / scale, kps=kps / scale, det_score=float(box[4]))
            for box, kps in zip(boxes, kpss)
        ]
        return sorted(faces, key=lambda f: (float(f.bbox[0]), float(f.bbox[1])))

    def _detect_each(self, images: Sequence[np.ndarray | None]) -> list[list[DetectedFace]]:
        """`detect` of each image (no faces for None). On the CPU the images are detected side by side,
        one core each (see `detect`), so that the detector's pre- and post-processing use every core too."""
        todo = [bgr for bgr in images if bgr is not None]
        if self.parallel_workers < 2 or len(todo) < 2:
            found = [self.detect(bgr) for bgr in todo]
        else:
            with ThreadPoolExecutor(min(self.parallel_workers, len(todo)), thread_name_prefix="face-detect") as pool:
                found = list(pool.map(lambda bgr: self.detect(bgr, concurrent=True), todo))
        each = iter(found)
        return [next(each) if bgr is not None else [] for bgr in images]

    def detector(self, concurrent: bool = False) -> Any:
        """InsightFace's SCRFD that `detect` runs; with `concurrent`, the single-threaded one that
        threads detecting side by side share (the same one where there are no such threads)."""
        if not concurrent or self.parallel_workers < 2:
            return self._detector
        with self._concurrent_detector_lock:
            if self._concurrent_detector is None:
                self._concurrent_detector = _load_detector(
                    self._detector.model_file, ["CPUExecutionProvider"], self.det_thresh, threads=1
                )
            return self._concurrent_detector

    def locate(
        self,
        bgr: np.ndarray,
        concurrent: bool = False,
        original_size: tuple[int, int] | None = None,
        first_det_size: int | None = None,
    ) -> FaceResult:
        """The largest face of a BGR image, chosen as `analyze` chooses it, not embedded yet:
        for pipelines that detect on several threads and embed in batches (`embed_crops`).
        `original_size`: the (width, height) of the file `bgr` was decoded from, downscaled.
        `first_det_size`: detect at this smaller input side first, at the engine's own only where
        that finds no face (less detector work, keypoints a little less exact)."""
        reason = undetectable_reason(*(original_size or (bgr.shape[1], bgr.shape[0])))
        faces: list[DetectedFace] = []
        if reason is None:
            if first_det_size is not None and first_det_size < self.detector_input_size(*bgr.shape[:2]):
                faces = self.detect(bgr, concurrent, first_det_size)
            if not faces:
                faces = self.detect(bgr, concurrent)
        return _result(bgr, reason, faces, Selection.LARGEST, 0, None, False)

    # recognition -----------------------------------------------------------------------

    def embed_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised embeddings `(len(crops), embedding_size)`, the recognizer run in batches."""
        if not crops:
            return np.empty((0, self.embedding_size), np.float32)
        raw = np.concatenate(
            [
                self._recognizer.get_feat(list(crops[start : start + RECOGNIZER_BATCH]))
                for start in range(0, len(crops), RECOGNIZER_BATCH)
            ]
        ).astype(np.float32)
        return raw / np.linalg.norm(raw, axis=1, keepdims=True).clip(min=1e-12)

    def analyze(
        self,
        images: Any,
        selection: Selection | str = Selection.LARGEST,
        index: int = 0,
        reference: np.ndarray | Identity | None = None,
        all_faces: bool = False,
        channel_order: str = "rgb",
    ) -> list[FaceResult]:
        """One result per image; on the CPU the images are detected side by side, and all chosen faces
        go through the recognizer in one batched run.

        `images` is a batch (IMAGE tensor, list of paths/arrays/PIL) or a single image; numpy
        arrays are RGB unless `channel_order="bgr"` (OpenCV). An image that cannot be read
        gives a result with the reason instead of an exception.
        """
        selection = Selection(selection)
        ref = _reference_embedding(reference)
        if selection is Selection.BEST_MATCH and ref is None:
            raise ValueError("selection 'best_match' needs a reference identity")
        embed_all = all_faces or selection is Selection.BEST_MATCH
        loaded = [_detectable(item) for item in _load_each(images, channel_order)]
        with self._lock:
            detected = self._detect_each([bgr if error is None else None for bgr, error, _ in loaded])
            to_embed: list[tuple[np.ndarray, DetectedFace]] = []
            for (bgr, _, _), faces in zip(loaded, detected):
                if bgr is None:  # nothing detected in it
                    continue
                if embed_all:
                    to_embed += [(bgr, face) for face in faces]
                elif faces and _index_valid(selection, index, faces):
                    to_embed.append((bgr, faces[_choose(faces, selection, index)]))
            if to_embed:
                embeddings = self.embed_crops([aligned_crop(bgr, face) for bgr, face in to_embed])
                for (_, face), embedding in zip(to_embed, embeddings):
                    face.embedding = embedding
        results = []
        for (bgr, error, original_size), faces in zip(loaded, detected):
            result = _result(bgr, error, faces, selection, index, ref, all_faces)
            if bgr is not None and original_size is not None:
                result.rescale_to(original_size)
            results.append(result)
        return results

    def identity(self, images: Any) -> Identity:
        """Identity of one person from one or more reference photos (largest face of each).

        Embeddings are cached by image content, so a reference reused across calls is
        embedded once. Raises NoFaceError naming the first image without a face.
        """
        bgrs = image_list(images)
        keys = [(hashlib.blake2b(b.tobytes(), digest_size=16).hexdigest(), b.shape) for b in bgrs]
        missing = [i for i, key in enumerate(keys) if key not in self._identity_cache]
        if missing:
            for i, result in zip(missing, self.analyze([bgrs[i] for i in missing], channel_order="bgr")):
                if result.embedding is None:
                    raise NoFaceError(f"reference image {i}: {result.reason}")
                self._identity_cache[keys[i]] = result.embedding
                while len(self._identity_cache) > IDENTITY_CACHE_SIZE:
                    self._identity_cache.popitem(last=False)
        return mean_identity(self._identity_cache[key] for key in keys)


def _load_detector(path: str, providers: list[str], det_thresh: float, threads: int = 0) -> Any:
    from insightface.model_zoo import get_model

    # static_shape_sessions=False: insightface 2.1 would otherwise build one more session per
    # detector input size, without our options (0.7.3 ignores both keywords)
    detector = get_model(path, providers=providers, sess_options=_session_options(threads), static_shape_sessions=False)
    if detector is not None:
        detector.prepare(0, input_size=(640, 640), det_thresh=det_thresh)
    return detector


def _session_options(threads: int = 0) -> Any:
    """No spin-waiting in onnxruntime's thread pools: detector and recognizer runs alternate,
    and each idle pool spinning steals the cores the other (and ComfyUI's torch) needs. Measured
    on 2 shared cores: the scoring node ran twice as fast. `threads` 0: one per core."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    return options


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_Loaded = tuple[np.ndarray | None, str | None, tuple[int, int] | None]  # image, why not, original size


def _load_each(images: Any, channel_order: str) -> list[_Loaded]:
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        else:
            try:
                return [(bgr, None, (bgr.shape[1], bgr.shape[0])) for bgr in image_list(images, channel_order)]
            except ImageLoadError as exc:
                return [(None, str(exc), None)]
    loaded: list[_Loaded] = []
    for item in images:
        try:
            bgr, original_size = load_image_sized(item, channel_order)
        except ImageLoadError as exc:
            loaded.append((None, str(exc), None))
        else:
            loaded.append((bgr, None, original_size))
    return loaded


def _detectable(loaded: _Loaded) -> _Loaded:
    """A loaded image the detector cannot take gets the reason as its error (and is not detected in)."""
    bgr, _, original_size = loaded
    reason = undetectable_reason(*original_size) if bgr is not None and original_size is not None else None
    return loaded if reason is None else (bgr, reason, original_size)


def _reference_embedding(reference: np.ndarray | Identity | None) -> np.ndarray | None:
    if reference is None:
        return None
    vector = reference.embedding if isinstance(reference, Identity) else reference
    return normalize(vector)


def _result(
    bgr: np.ndarray | None,
    error: str | None,
    faces: list[DetectedFace],
    selection: Selection,
    index: int,
    reference: np.ndarray | None,
    all_faces: bool,
) -> FaceResult:
    size = (bgr.shape[1], bgr.shape[0]) if bgr is not None else (0, 0)
    result = FaceResult(image_size=size, faces_found=len(faces), faces=faces if all_faces else [])
    if bgr is None or error is not None:
        result.reason = error
    elif not faces:
        result.reason = "no face detected"
    elif not _index_valid(selection, index, faces):
        result.reason = f"face index {index} requested but {len(faces)} face(s) found"
    else:
        result.face_index = _choose(faces, selection, index, reference)
        result.face = faces[result.face_index]
    return result


def _index_valid(selection: Selection, index: int, faces: list[DetectedFace]) -> bool:
    return selection is not Selection.INDEX or 0 <= index < len(faces)


def _choose(faces: list[DetectedFace], selection: Selection, index: int, reference: np.ndarray | None = None) -> int:
    """Index (in left-to-right order) of the face a policy picks; ties resolve to the leftmost."""
    if selection is Selection.INDEX:
        return index
    if selection is Selection.LARGEST:
        keys = [f.area for f in faces]
    elif selection is Selection.HIGHEST_SCORE:
        keys = [f.det_score for f in faces]
    else:  # best match: every face embedded, against the reference
        keys = [
            float(np.dot(f.embedding, reference)) if f.embedding is not None and reference is not None else -np.inf
            for f in faces
        ]
    return int(np.argmax(keys))


_MODELS: dict[_ModelKey, FaceModel] = {}
_MODELS_LOCK = threading.Lock()


def load_face_engine(settings: FaceEngineSettings, progress: ProgressCallback | None = None) -> FaceModel:
    """`load_face_model` with the engine's settings as one value (common/face_engine.py)."""
    return load_face_model(
        settings.pack,
        models_root=settings.models_roots,
        provider=settings.provider,
        det_size=settings.det_size,
        det_thresh=settings.det_thresh,
        allow_download=settings.allow_download,
        progress=progress,
    )


def load_face_model(
    pack: str | os.PathLike = DEFAULTS.pack,
    *,
    models_root: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    provider: str = DEFAULTS.provider,
    det_size: str | int = DEFAULTS.det_size,
    det_thresh: float = DEFAULTS.det_thresh,
    allow_download: bool = DEFAULTS.allow_download,
    progress: ProgressCallback | None = None,
) -> FaceModel:
    """Validate and load a pack (or return the already loaded one for the same settings).

    A missing standard pack is downloaded on first use (`progress` sees the transfer) unless
    `allow_download` is False or FACE_CONSISTENCY_OFFLINE is set.
    """
    det_size = _check_det_size(det_size)
    if not 0.0 < float(det_thresh) < 1.0:
        raise ValueError(f"det_thresh must be between 0 and 1, got {det_thresh}")
    files = resolve_pack(pack, as_roots(models_root), allow_download=allow_download, progress=progress)
    key = _ModelKey(str(Path(files.folder).resolve()), provider.lower(), det_size, float(det_thresh))
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = FaceModel(files, provider=provider, det_size=det_size, det_thresh=det_thresh)
            _MODELS[key] = model
            log.info("loaded face model %s on %s", files.folder, model.provider)
        return model


def _check_det_size(det_size: str | int) -> str | int:
    if isinstance(det_size, str) and det_size.strip().lower() == "auto":
        return "auto"
    try:
        size = int(det_size)
    except (TypeError, ValueError):
        raise ValueError(f"det_size must be 'auto' or a number of pixels, got {det_size!r}") from None
    if size < 64 or size > 2048 or size % 32:
        raise ValueError(f"det_size must be a multiple of 32 between 64 and 2048, got {size}")
    return size
