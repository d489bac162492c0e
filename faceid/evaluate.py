"""Folder evaluation: pair samples with controls, embed each file once, score, report.

One implementation for the `face-consistency evaluate` command and the
FaceConsistencyScoreFolder node. A `FolderEvaluation` keeps its embeddings between rounds,
so watch mode (and a re-queued node) embeds only new or changed files. Worker threads
decode and detect (on the CPU one per core), and the chosen faces go through the
recognizer in batches.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..common.files import IMAGE_SUFFIXES, file_signature
from ..musubi_formats.prompts import PromptFileError, SamplePrompt, load_prompt_file, resolve_prompt_path
from .alignment import aligned_crop, change_view, view_change
from .embedding_store import EmbeddingStore, FileFaces, model_fingerprint
from .errors import FaceEngineError, ImageLoadError
from .images import UNSUPPORTED_IMAGE_SUFFIXES, load_image_sized
from .judge import DESCRIPTOR_SIZE, DlibJudge, JudgeResult, mean_descriptor, verdict
from .model import RECOGNIZER_BATCH, FaceModel
from .pairing import Pairing, SampleItem, list_images, pair_dirs, pair_sample_folder
from .plot import is_evaluation_plot
from .report import build_report
from .results import DetectedFace, FaceResult, Identity
from .scoring import DEFAULT_COPY_PASTE_THRESHOLD, UNCHANGED_SCORE_FLOOR
from .similarity import Agreement, Bands, embedding_agreement, mean_identity

log = logging.getLogger(__name__)

# How many files the pipeline workers may run ahead of the recognizer batches (each waits as
# a 112x112 crop; only those being decoded hold a whole image).
LOOKAHEAD = 64
NOT_SCORED = "not scored (the evaluation was interrupted, or the file vanished while it ran)"


class EvaluationError(FaceEngineError):
    """Bad evaluation arguments: missing folders, unreadable prompt file, reference without a face."""


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> Any: ...


ProgressFactory = Callable[[int], ProgressBar]


@dataclass
class EvaluationSources:
    """Where samples, controls and references come from (the command's flags)."""

    sample_dir: Path | None = None
    sample_prompts: Path | None = None
    control_dir: Path | None = None
    generated_dir: Path | None = None
    references: list[Path] = field(default_factory=list)
    base_dir: Path | None = None  # musubi's working directory, for relative --ci paths
    exclude: list[Path] = field(default_factory=list)  # our own outputs inside the folders (`check_outputs`)

    def check(self) -> None:
        if self.sample_dir is None and self.generated_dir is None:
            raise EvaluationError("give --sample_dir, or --control_dir with --generated_dir")
        if self.sample_dir is not None and self.generated_dir is not None:
            raise EvaluationError("use either --sample_dir or --control_dir/--generated_dir, not both")
        if (self.control_dir is None) != (self.generated_dir is None) and self.sample_dir is None:
            raise EvaluationError("--control_dir and --generated_dir go together")
        if self.control_dir is not None and self.sample_dir is not None:
            raise EvaluationError("--control_dir pairs with --generated_dir; with --sample_dir use --sample_prompts")
        for label, folder in (
            ("--sample_dir", self.sample_dir),
            ("--control_dir", self.control_dir),
            ("--generated_dir", self.generated_dir),
        ):
            if folder is not None and not folder.is_dir():
                raise EvaluationError(f"{label} {folder} is not a folder")
        if self.sample_prompts is not None and not self.sample_prompts.is_file():
            raise EvaluationError(f"--sample_prompts file not found: {self.sample_prompts}")
        for reference in self.references:
            if not reference.is_file():
                raise EvaluationError(f"--reference image not found: {reference}")

    def check_outputs(self, outputs: dict[str, Path | None]) -> None:
        """Refuse outputs (named as the user gave them) that are one and the same file, or that would
        overwrite a file this evaluation reads (a sample, a control, a reference photo, the prompt
        file), symlinks resolved; a plot an earlier evaluation wrote is its own to replace. The
        outputs are then left out of the samples. Call after `check()`, before any work."""
        given = {what: path for what, path in outputs.items() if path is not None}
        claimed: dict[Path, str] = {}
        for what, path in given.items():
            first = claimed.setdefault(path.resolve(), what)
            if first != what:
                raise EvaluationError(f"{first} and {what} are the same file ({path}): give each output its own path")
        inputs = self._input_files()
        for what, path in given.items():
            read_as = inputs.get(path.resolve())
            if read_as is not None and not is_evaluation_plot(path):
                raise EvaluationError(
                    f"{what} {path} is {read_as} of this evaluation; writing there would overwrite "
                    "it: choose another path for the output"
                )
        self.exclude = list(given.values())

    def _input_files(self) -> dict[Path, str]:
        """Every file the evaluation may read (resolved), with what it is to the user."""
        found: dict[Path, str] = {}
        for reference in self.references:
            found.setdefault(reference.resolve(), "a reference photo")
        if self.sample_prompts is not None:
            found.setdefault(self.sample_prompts.resolve(), "the prompt file")
            try:
                prompts = load_prompt_file(self.sample_prompts)
            except PromptFileError as exc:
                raise EvaluationError(str(exc)) from None
            for raw in (raw for prompt in prompts for raw in prompt.control_images):
                path, _ = resolve_prompt_path(raw, self.sample_prompts, self.base_dir)
                if path is not None:
                    found.setdefault(path.resolve(), "a control image of the prompt file")
        for what, folder in (
            ("an image in the sample folder", self.sample_dir),
            ("a control image in", self.control_dir),
            ("an image in the generated folder", self.generated_dir),
        ):
            if folder is not None:
                for path in list_images(folder, suffixes=IMAGE_SUFFIXES | UNSUPPORTED_IMAGE_SUFFIXES):
                    found.setdefault(path.resolve(), f"{what} {folder}")
        return found


@dataclass
class RoundResult:
    report: dict[str, Any]
    embedded: int  # files run through the engine this round (new or changed)
    reused: int  # files whose stored result was reused


@dataclass
class _Located:
    """One file after a pipeline worker: decoded, its largest face found and cropped."""

    signature: tuple[int, int] | None  # None: the file vanished
    error: str | None = None
    result: FaceResult | None = None
    crop: np.ndarray | None = None
    view: np.ndarray | None = None  # the face-change guard's view of the face (`_change_view`)


# A file's face change view, by (path, size, mtime_ns): what the copy-paste guard compares
ChangeViews = dict[tuple[str, int, int], np.ndarray]


def _decode_and_locate(model: FaceModel, path: Path) -> _Located:
    # The signature is taken before reading: a file still being written gets a newer
    # signature when it is finished, so the next round embeds it again.
    signature = file_signature(path)
    if signature is None:
        return _Located(None, f"file disappeared: {path}")
    try:
        bgr, original_size = load_image_sized(path)
    except ImageLoadError as exc:
        return _Located(signature, str(exc))
    result = model.locate(bgr, concurrent=True, original_size=original_size)
    crop = aligned_crop(bgr, result.face) if result.face is not None else None
    result.rescale_to(original_size)  # the report gives the file's own pixels
    view = None
    if result.face is not None:  # from the keypoints as the store keeps them: as if decoded again for the guard
        view = _change_view(bgr, original_size, _stored_kps(result.face.kps))
    return _Located(signature, result=result, crop=crop, view=view)


def _stored_kps(kps: np.ndarray) -> list[list[float]]:
    """Keypoints as `FileFaces` holds them (the file's own pixels, to 0.01 px)."""
    return [[round(float(v), 2) for v in point] for point in kps]


def _change_view(bgr: np.ndarray, original_size: tuple[int, int], kps: list[list[float]]) -> np.ndarray:
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
) -> int:
    """Embed every file not already in `store` (or changed since); returns how many were embedded.

    Worker threads decode each file and find and crop its face; this thread embeds the
    crops in recognizer batches, so detection never waits for a batch to fill. `views` receives
    each face's change view, so that the copy-paste guard need not decode the file again.
    """
    todo = [p for p in dict.fromkeys(paths) if store.get(p) is None]
    waiting: list[tuple[Path, _Located]] = []

    def embed_waiting() -> None:
        embeddings = model.embed_crops([located.crop for _, located in waiting])
        for (path, located), embedding in zip(waiting, embeddings):
            store.put(_file_faces(path, located, embedding))
        waiting.clear()

    locate = partial(_decode_and_locate, model)
    try:
        for path, located in _in_order(locate, todo, workers or _default_workers(model)):
            if views is not None and located.view is not None:
                views[(str(path), *located.signature)] = located.view
            if located.crop is not None:
                waiting.append((path, located))
                if len(waiting) == RECOGNIZER_BATCH:
                    embed_waiting()
            elif located.signature is not None:
                store.put(_file_faces(path, located, None))
            if progress is not None:
                progress.update(1)
    finally:  # also on Ctrl-C: the faces found so far are kept
        embed_waiting()
    return len(todo)


def _file_faces(path: Path, located: _Located, embedding: np.ndarray | None) -> FileFaces:
    result = located.result
    face = result.face if result is not None else None
    return FileFaces(
        path=str(path),
        size=located.signature[0],
        mtime_ns=located.signature[1],
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


class FolderEvaluation:
    """A folder (or folder pair) under evaluation; `run_round()` scores what is there now."""

    def __init__(
        self,
        model: FaceModel,
        sources: EvaluationSources,
        *,
        reference_identity: Identity | None = None,
        threshold: float | None = None,
        bands: Bands | None = None,
        cache_file: Path | None = None,
        progress: ProgressFactory | None = None,
        workers: int | None = None,
        judge: DlibJudge | None = None,
        judge_cache_file: Path | None = None,
        copy_paste_threshold: float = DEFAULT_COPY_PASTE_THRESHOLD,
    ) -> None:
        sources.check()
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise EvaluationError(f"--threshold must be a cosine similarity between -1 and 1, got {threshold}")
        self.model = model
        self.sources = sources
        self.threshold = threshold
        self.bands = bands or Bands()
        self.progress = progress
        self.workers = workers
        description = model.describe()
        self.store = EmbeddingStore(model_fingerprint(description, model.pack_dir), model.embedding_size, cache_file)
        self.judge = judge
        self.judge_store = (
            EmbeddingStore(judge.fingerprint(), DESCRIPTOR_SIZE, judge_cache_file, unit_norm=False)
            if judge is not None
            else None
        )
        self.copy_paste_threshold = float(copy_paste_threshold)
        self._face_changes: dict[tuple, float | None] = {}
        self._change_views: ChangeViews = {}
        self._prompts: list[SamplePrompt] | None = None
        self._prompts_signature: tuple[int, int] | None = None
        self._pairing: Pairing | None = None
        self.reference = reference_identity
        self.judge_reference: np.ndarray | None = None
        # the reference photos' own agreement: the same-person baseline of real photos (copy-paste gauge)
        self.agreement: Agreement | None = None
        self.judge_agreement: Agreement | None = None
        if sources.references:
            self.reference = self._reference_identity(reference_identity)
            if judge is not None:
                self.judge_reference = self._judge_reference()

    @property
    def prompts(self) -> list[SamplePrompt] | None:
        """The prompt file's prompts the last round paired with (None without a prompt file)."""
        return self._prompts

    # inputs ----------------------------------------------------------------------------

    def _reference_identity(self, extra: Identity | None) -> Identity:
        embed_files(self.model, self.sources.references, self.store, workers=self.workers)
        embeddings = []
        for path in self.sources.references:
            entry = self.store.get(path)
            if entry is None or not entry.ok:
                reason = entry.reason if entry is not None else "file changed while reading"
                raise EvaluationError(f"--reference {path}: {reason}. Give photos with one clear face.")
            embeddings.append(entry.embedding)
        self.agreement = embedding_agreement(embeddings)
        if extra is not None:
            embeddings += [extra.embedding] * extra.count  # weight an identity by its photo count
        return mean_identity(embeddings)

    def _judge_reference(self) -> np.ndarray:
        judge_files(self.judge, self.sources.references, self.judge_store)
        descriptors = []
        for path in self.sources.references:
            entry = self.judge_store.get(path)
            if entry is None or not entry.ok:
                reason = entry.reason if entry is not None else "file changed while reading"
                raise EvaluationError(
                    f"--reference {path}: {reason}. The judge needs every reference photo's face: give photos "
                    "with one clear, frontal face, or leave --judge out."
                )
            descriptors.append(entry.embedding)
        identity = mean_descriptor(descriptors)
        self.judge_agreement = identity.agreement
        return identity.descriptor

    def _current_prompts(self) -> list[SamplePrompt] | None:
        prompt_file = self.sources.sample_prompts
        if prompt_file is None:
            return None
        signature = file_signature(prompt_file)
        if self._prompts is None or signature != self._prompts_signature:
            try:
                self._prompts = load_prompt_file(prompt_file)
            except PromptFileError as exc:
                if self._prompts is None:
                    raise EvaluationError(str(exc)) from None
                # in watch mode the file may be mid-rewrite or replaced: keep its last good
                # contents and read it again next round
                log.warning("%s; pairing with its previous contents this round", exc)
                return self._prompts
            self._prompts_signature = signature
        return self._prompts

    def pair(self) -> Pairing:
        sources = self.sources
        have_reference = self.reference is not None
        if sources.generated_dir is not None:
            return pair_dirs(sources.control_dir, sources.generated_dir, sources.exclude, have_reference)
        return pair_sample_folder(
            sources.sample_dir,
            self._current_prompts(),
            sources.sample_prompts,
            have_reference,
            sources.exclude,
            sources.base_dir,
        )

    # scoring ---------------------------------------------------------------------------

    def run_round(self) -> RoundResult:
        """Pair what is in the folders now, embed new/changed files, return the full report."""
        if self.reference is not None:
            self.model.check_embedding_size(self.reference.embedding)
        pairing = self.pair()
        self._pairing = pairing
        controls = [c for item in pairing.items for c in item.controls]
        samples = [item.image for item in pairing.items]
        paths = list(dict.fromkeys(controls + samples))  # controls first: each is needed by many
        todo = sum(1 for p in paths if self.store.get(p) is None)
        bar = self.progress(todo) if self.progress is not None and todo else None
        try:
            embedded = embed_files(self.model, paths, self.store, bar, self.workers, self._change_views)
        finally:
            if hasattr(bar, "close"):
                bar.close()
        self.store.save()
        if self.judge is not None:
            judged = sum(1 for p in paths if self.judge_store.get(p) is None)
            bar = self.progress(judged) if self.progress is not None and judged else None
            try:
                judge_files(self.judge, paths, self.judge_store, bar)
            finally:
                if hasattr(bar, "close"):
                    bar.close()
            self.judge_store.save()
        return RoundResult(self.report(), embedded, len(paths) - embedded)

    def report(self) -> dict[str, Any]:
        """The report for the latest pairing, from what is embedded so far."""
        pairing = self._pairing or Pairing()
        pairs = [self._score(item) for item in pairing.items]
        meta = {
            "inputs": {
                "sample_dir": _str(self.sources.sample_dir),
                "sample_prompts": _str(self.sources.sample_prompts),
                "control_dir": _str(self.sources.control_dir),
                "generated_dir": _str(self.sources.generated_dir),
                "reference": [str(p) for p in self.sources.references],
                "reference_count": self.reference.count if self.reference is not None else 0,
            },
            "model": self.model.describe(),
            "cache": {
                "file": _str(self.store.cache_file),
                "entries": len(self.store),
                "discarded": self.store.discarded_reason,
            },
            "judge": self.judge.describe() if self.judge is not None else None,
            "copy_paste": {
                "reference_agreement": self.agreement.to_dict() if self.agreement else None,
                "judge_reference_agreement": self.judge_agreement.to_dict() if self.judge_agreement else None,
                "change_threshold": self.copy_paste_threshold,
            },
            "unchanged": {"change_threshold": self.copy_paste_threshold, "score_floor": UNCHANGED_SCORE_FLOOR},
        }
        return build_report(
            pairs,
            [u.to_dict() for u in pairing.unpaired],
            meta,
            primary="reference" if self.reference is not None else "control",
            bands=self.bands,
            threshold=self.threshold,
        )

    def _score(self, item: SampleItem) -> dict[str, Any]:
        pair: dict[str, Any] = {
            "image": str(item.image),
            "step": item.name.step,
            "epoch": item.name.epoch,
            "step_key": item.name.step_key,
            "prompt_index": item.name.prompt_index,
            "seed": item.name.seed,
            "layout": item.name.layout,
            "controls": [str(c) for c in item.controls],
            "score_control": None,
            "score_reference": None,
            "face": None,
            "reason": None,
        }
        if self.judge is not None:
            pair["judge"] = self._judge_pair(item)
        sample = self.store.get(item.image) or self.store.peek(item.image)
        if sample is None:
            pair["reason"] = NOT_SCORED
            return pair
        pair["face"] = sample.face_dict()
        if not sample.ok:
            pair["reason"] = f"sample: {sample.reason}"
            return pair
        if self.reference is not None:
            pair["score_reference"] = round(float(np.dot(sample.embedding, self.reference.embedding)), 6)
        control_embeddings = []
        problems = []
        for control in item.controls:
            entry = self.store.get(control) or self.store.peek(control)
            if entry is None:
                problems.append(f"control {control}: {NOT_SCORED}")
            elif not entry.ok:
                problems.append(f"control {control}: {entry.reason}")
            else:
                control_embeddings.append(entry.embedding)
        if control_embeddings:
            identity = mean_identity(control_embeddings)
            pair["score_control"] = round(float(np.dot(sample.embedding, identity.embedding)), 6)
            self._gauge(pair, item, sample)
        if problems:
            # several --ci: the identity comes from those with a face; the others are noted
            key = "reason" if not control_embeddings and self.reference is None else "control_notes"
            pair[key] = "; ".join(problems)
        return pair

    def _judge_pair(self, item: SampleItem) -> dict[str, Any]:
        """The judge's own verdicts for one pair; its failures are reported here, apart from the engine's."""
        judged: dict[str, Any] = {"face": None, "control": None, "reference": None, "reason": None}
        sample = self.judge_store.get(item.image) or self.judge_store.peek(item.image)
        if sample is None or not sample.ok:
            judged["reason"] = f"sample: {sample.reason if sample is not None else NOT_SCORED}"
            return judged
        judged["face"] = sample.face_dict()
        if self.judge_reference is not None:
            judged["reference"] = verdict(sample.embedding, self.judge_reference).to_dict()
        controls, problems = [], []
        for control in item.controls:
            entry = self.judge_store.get(control) or self.judge_store.peek(control)
            if entry is None or not entry.ok:
                problems.append(f"control {control}: {entry.reason if entry is not None else NOT_SCORED}")
            else:
                controls.append(entry.embedding)
        if controls:
            judged["control"] = verdict(sample.embedding, mean_descriptor(controls).descriptor).to_dict()
        if problems:
            judged["reason"] = "; ".join(problems)
        return judged

    def _gauge(self, pair: dict[str, Any], item: SampleItem, sample: FileFaces) -> None:
        """A sample whose face region is (near-)unchanged from its first control is flagged `unchanged`,
        with or without reference photos: it scores perfect identity without any edit. With references,
        one also closer to its control than the references are to each other is a `copy_paste`. The
        change is measured only where the score makes an unchanged face possible."""
        above = None
        if self.agreement is not None:
            above = pair["above_reference_agreement"] = pair["score_control"] > self.agreement.mean
        if not above and pair["score_control"] < UNCHANGED_SCORE_FLOOR:
            return
        control = self.store.get(item.controls[0]) or self.store.peek(item.controls[0])
        if control is None or not control.ok or control.kps is None or sample.kps is None:
            return
        key = (control.path, control.size, control.mtime_ns, sample.path, sample.size, sample.mtime_ns)
        if key not in self._face_changes:
            self._face_changes[key] = _face_change(control, sample, self._change_views)
        change = self._face_changes[key]
        if change is not None:
            pair["face_change"] = round(change, 6)
            pair["unchanged"] = change < self.copy_paste_threshold
            if above is not None:
                pair["copy_paste"] = above and pair["unchanged"]


def _face_change(control: FileFaces, sample: FileFaces, views: ChangeViews) -> float | None:
    """1 − SSIM of the two files' faces, from the views their embedding kept, else decoded again (a file
    whose result came from the cache file)."""
    pair = []
    for entry in (control, sample):
        view = views.get((entry.path, entry.size, entry.mtime_ns))
        if view is None:
            try:
                bgr, original_size = load_image_sized(Path(entry.path))
            except ImageLoadError:
                return None
            view = _change_view(bgr, original_size, entry.kps)
        pair.append(view)
    return view_change(*pair)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def watch(
    evaluation: FolderEvaluation,
    interval: float,
    on_round: Callable[[RoundResult], None],
    *,
    max_rounds: int | None = None,
    sleep: Callable[[float], None] | None = None,
) -> int:
    """Run rounds every `interval` seconds until interrupted (or `max_rounds`); returns rounds run."""
    sleep = sleep or time.sleep
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        on_round(evaluation.run_round())
        rounds += 1
        if max_rounds is None or rounds < max_rounds:
            sleep(interval)
    return rounds
