"""Embedding files: worker threads decode each file and find and crop its face (on the CPU one
per core), this thread runs the crops through the recognizer in batches; the held-out judge's
descriptors one file at a time. Results go into an `EmbeddingStore`, so a file is embedded once."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ...common.files import file_signature
from ..alignment import aligned_crop, change_view, view_change
from ..errors import ImageLoadError
from ..images import MAX_ANALYSIS_SIDE, load_image_sized
from ..judge import DlibJudge, JudgeResult
from ..model import RECOGNIZER_BATCH, FaceModel
from ..results import DetectedFace, FaceResult
from .embedding_store import EmbeddingStore, FileFaces

# How many files the pipeline workers may run ahead of the recognizer batches (each waits as
# a 112x112 crop; only those being decoded hold a whole image).
LOOKAHEAD = 64
# `fast`: the detector's input side of the first try (a quarter of the work of 640), and JPEGs decoded
# at the detector's scale; see docs/evaluate.md#speed for what it changes in the scores
FAST_DET_SIZE = 320


class ProgressBar(Protocol):
    """tqdm's or ComfyUI's bar; one with a `close()` (tqdm) is closed when its files are done."""

    def update(self, n: int = 1) -> Any: ...


ProgressFactory = Callable[[int], ProgressBar]


@dataclass
class _Located:
    """One file after a pipeline worker: decoded, its largest face found and cropped."""

    signature: tuple[int, int] | None  # None: the file vanished
    error: str | None = None
    result: FaceResult | None = None
    crop: np.ndarray | None = None
    view: np.ndarray | None = None  # the face-change guard's view of the face (`face_change_view`)


# A file's face change view, by (path, size, mtime_ns): what the copy-paste guard compares
ChangeViews = dict[tuple[str, int, int], np.ndarray]


def _decode_and_locate(model: FaceModel, fast: bool, path: Path) -> _Located:
    # The signature is taken before reading: a file still being written gets a newer
    # signature when it is finished, so the next round embeds it again.
    signature = file_signature(path)
    if signature is None:
        return _Located(None, f"file disappeared: {path}")
    # fast: a JPEG no larger than the detector's largest input needs (the crop is cut from it too)
    reduce_to = model.detector_input_size(MAX_ANALYSIS_SIDE, MAX_ANALYSIS_SIDE) if fast else None
    try:
        bgr, original_size = load_image_sized(path, reduce_to=reduce_to)
    except ImageLoadError as exc:
        return _Located(signature, str(exc))
    first_det_size = FAST_DET_SIZE if fast else None
    result = model.locate(bgr, concurrent=True, original_size=original_size, first_det_size=first_det_size)
    crop = aligned_crop(bgr, result.face) if result.face is not None else None
    result.rescale_to(original_size)  # the report gives the file's own pixels
    view = None
    if result.face is not None:  # from the keypoints as the store keeps them: as if decoded again for the guard
        view = face_change_view(bgr, original_size, _stored_kps(result.face.kps))
    return _Located(signature, result=result, crop=crop, view=view)


def _stored_kps(kps: np.ndarray) -> list[list[float]]:
    """Keypoints as `FileFaces` holds them (the file's own pixels, to 0.01 px)."""
    return [[round(float(v), 2) for v in point] for point in kps]


def face_change_view(bgr: np.ndarray, original_size: tuple[int, int], kps: list[list[float]]) -> np.ndarray:
    """The guard's view of the face at stored keypoints `kps`, in `bgr` decoded from a file of `original_size`."""
    # the keypoints are the file's own pixels; a large file is decoded downscaled
    scale = np.array([bgr.shape[1] / original_size[0], bgr.shape[0] / original_size[1]], np.float32)
    face = DetectedFace(np.zeros(4, np.float32), np.asarray(kps, np.float32) * scale, 0.0)
    return change_view(aligned_crop(bgr, face))


def _in_order(function: Callable[[Path], Any], paths: Sequence[Path], workers: int) -> Iterator[tuple[Path, Any]]:
    """`function` over `paths` in a thread pool, at most LOOKAHEAD ahead of the consumer, in order."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="face-evaluate") as pool:
        source = iter(paths)
        pending = deque((p, pool.submit(function, p)) for p in islice(source, LOOKAHEAD))
        try:
            while pending:
                path, future = pending.popleft()
                following = next(source, None)
                if following is not None:
                    pending.append((following, pool.submit(function, following)))
                yield path, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _default_workers(model: FaceModel) -> int:
    """On the CPU one thread per core, each decoding and detecting, plus one so that no core
    idles while a worker waits for the disk or the GIL (pyspng holds it while decoding); on a
    GPU, a few threads decoding for it."""
    if model.parallel_workers > 1:
        return model.parallel_workers + 1
    return max(1, min(4, os.cpu_count() or 1))


def embed_files(
    model: FaceModel,
    paths: Sequence[Path],
    store: EmbeddingStore,
    progress: ProgressBar | None = None,
    workers: int | None = None,
    views: ChangeViews | None = None,
    fast: bool = False,
) -> int:
    """Embed every file not already in `store` (or changed since); returns how many were embedded.

    Worker threads decode each file and find and crop its face; this thread embeds the
    crops in recognizer batches, so detection never waits for a batch to fill. `views` receives
    each face's change view, so that the copy-paste guard need not decode the file again. `fast`:
    detect at FAST_DET_SIZE first (at the engine's size only where no face is found) and decode
    JPEGs at the detector's scale.
    """
    todo = [p for p in dict.fromkeys(paths) if store.get(p) is None]
    waiting: list[tuple[Path, tuple[int, int], _Located, np.ndarray]] = []  # (path, signature, located, crop)

    def embed_waiting() -> None:
        embeddings = model.embed_crops([crop for *_, crop in waiting])
        for (path, signature, located, _), embedding in zip(waiting, embeddings):
            store.put(_file_faces(path, signature, located, embedding))
        waiting.clear()

    locate = partial(_decode_and_locate, model, fast)
    try:
        for path, located in _in_order(locate, todo, workers or _default_workers(model)):
            signature = located.signature
            if signature is None:  # the file vanished: nothing to store
                pass
            elif located.crop is not None:
                if views is not None and located.view is not None:
                    views[(str(path), signature[0], signature[1])] = located.view
                waiting.append((path, signature, located, located.crop))
                if len(waiting) == RECOGNIZER_BATCH:
                    embed_waiting()
            else:
                store.put(_file_faces(path, signature, located, None))
            if progress is not None:
                progress.update(1)
    finally:  # also on Ctrl-C: the faces found so far are kept
        embed_waiting()
    return len(todo)


def _file_faces(path: Path, signature: tuple[int, int], located: _Located, embedding: np.ndarray | None) -> FileFaces:
    result = located.result
    face = result.face if result is not None else None
    return FileFaces(
        path=str(path),
        size=signature[0],
        mtime_ns=signature[1],
        embedding=embedding,
        reason=located.error if result is None else result.reason,
        det_score=round(float(face.det_score), 4) if face is not None else None,
        bbox=[round(float(v), 1) for v in face.bbox] if face is not None else None,
        faces_found=result.faces_found if result is not None else 0,
        image_size=result.image_size if result is not None else None,
        kps=_stored_kps(face.kps) if face is not None else None,
    )


def judge_files(
    judge: DlibJudge, paths: Sequence[Path], store: EmbeddingStore, progress: ProgressBar | None = None
) -> int:
    """The judge's descriptor of every file not already in `store` (or changed since); returns how many."""
    todo = [p for p in dict.fromkeys(paths) if store.get(p) is None]
    for path in todo:
        signature = file_signature(path)
        if signature is not None:
            store.put(_judged_file(path, signature, judge.judge(path)))
        if progress is not None:
            progress.update(1)
    return len(todo)


def _judged_file(path: Path, signature: tuple[int, int], result: JudgeResult) -> FileFaces:
    face = result.face
    return FileFaces(
        path=str(path),
        size=signature[0],
        mtime_ns=signature[1],
        embedding=face.descriptor if face is not None else None,
        reason=result.reason,
        det_score=round(float(face.det_score), 4) if face is not None else None,
        bbox=face.to_dict()["bbox"] if face is not None else None,
        faces_found=result.faces_found,
        image_size=result.image_size,
    )


def face_change(control: FileFaces, sample: FileFaces, views: ChangeViews) -> float | None:
    """1 − SSIM of the two files' faces, from the views their embedding kept, else decoded again (a file
    whose result came from the cache file)."""
    pair = []
    for entry in (control, sample):
        view = views.get((entry.path, entry.size, entry.mtime_ns))
        if view is None:
            if entry.kps is None:
                return None
            try:
                bgr, original_size = load_image_sized(Path(entry.path))
            except ImageLoadError:
                return None
            view = face_change_view(bgr, original_size, entry.kps)
        pair.append(view)
    return view_change(*pair)
