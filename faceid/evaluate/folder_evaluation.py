"""Folder evaluation: pair samples with controls, embed each file once, score, report.

One implementation for the `face-consistency evaluate` command and the
FaceConsistencyScoreFolder node. A `FolderEvaluation` keeps its embeddings between rounds,
so watch mode (and a re-queued node) embeds only new or changed files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...common.files import file_signature
from ...musubi_formats.prompts import PromptFileError, SamplePrompt, load_prompt_file
from ..judge import DESCRIPTOR_SIZE, DlibJudge, mean_descriptor, verdict
from ..model import FaceModel
from ..results import Identity
from ..scoring import DEFAULT_COPY_PASTE_THRESHOLD, UNCHANGED_SCORE_FLOOR
from ..similarity import Agreement, Bands, embedding_agreement, mean_identity
from .embedding import ChangeViews, ProgressBar, ProgressFactory, embed_files, face_change, judge_files
from .embedding_store import EmbeddingStore, FileFaces, model_fingerprint
from .pairing import Pairing, SampleItem, pair_dirs, pair_sample_folder
from .report import build_report
from .sources import EvaluationError, EvaluationSources

log = logging.getLogger(__name__)

NOT_SCORED = "not scored (the evaluation was interrupted, or the file vanished while it ran)"


@dataclass
class RoundResult:
    report: dict[str, Any]
    embedded: int  # files run through the engine this round (new or changed)
    reused: int  # files whose stored result was reused


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
        fast: bool = False,
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
        self.fast = fast
        description = self._model_description()
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
            if judge is not None and self.judge_store is not None:
                self.judge_reference = self._judge_reference(judge, self.judge_store)

    @property
    def prompts(self) -> list[SamplePrompt] | None:
        """The prompt file's prompts the last round paired with (None without a prompt file)."""
        return self._prompts

    # inputs ----------------------------------------------------------------------------

    def _reference_identity(self, extra: Identity | None) -> Identity:
        embed_files(self.model, self.sources.references, self.store, workers=self.workers, fast=self.fast)
        embeddings = []
        for path in self.sources.references:
            entry = self.store.get(path)
            if entry is None or entry.embedding is None:
                reason = entry.reason if entry is not None else "file changed while reading"
                raise EvaluationError(f"--reference {path}: {reason}. Give photos with one clear face.")
            embeddings.append(entry.embedding)
        self.agreement = embedding_agreement(embeddings)
        if extra is not None:
            embeddings += [extra.embedding] * extra.count  # weight an identity by its photo count
        return mean_identity(embeddings)

    def _judge_reference(self, judge: DlibJudge, store: EmbeddingStore) -> np.ndarray:
        judge_files(judge, self.sources.references, store)
        descriptors = []
        for path in self.sources.references:
            entry = store.get(path)
            if entry is None or entry.embedding is None:
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
        if sources.sample_dir is not None:
            return pair_sample_folder(
                sources.sample_dir,
                self._current_prompts(),
                sources.sample_prompts,
                have_reference,
                sources.exclude,
                sources.base_dir,
            )
        if sources.control_dir is None or sources.generated_dir is None:  # `EvaluationSources.check` refuses it
            raise EvaluationError("give --sample_dir, or --control_dir with --generated_dir")
        return pair_dirs(sources.control_dir, sources.generated_dir, sources.exclude, have_reference)

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
        with self._progress_bar(paths, self.store) as bar:
            embedded = embed_files(self.model, paths, self.store, bar, self.workers, self._change_views, self.fast)
        self.store.save()
        if self.judge is not None and self.judge_store is not None:
            with self._progress_bar(paths, self.judge_store) as bar:
                judge_files(self.judge, paths, self.judge_store, bar)
            self.judge_store.save()
        return RoundResult(self.report(), embedded, len(paths) - embedded)

    @contextmanager
    def _progress_bar(self, paths: list[Path], store: EmbeddingStore) -> Iterator[ProgressBar | None]:
        """A bar over the files of `paths` that `store` lacks, closed after (also on Ctrl-C); None without any."""
        todo = sum(1 for p in paths if store.get(p) is None)
        bar = self.progress(todo) if self.progress is not None and todo else None
        try:
            yield bar
        finally:
            close = getattr(bar, "close", None)
            if close is not None:
                close()

    def _model_description(self) -> dict[str, Any]:
        """The engine's settings, and whether `fast` detection changed the work."""
        return {**self.model.describe(), "fast": self.fast}

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
            "model": self._model_description(),
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
        if self.judge_store is not None:
            pair["judge"] = self._judge_pair(item, self.judge_store)
        sample = self.store.get(item.image) or self.store.peek(item.image)
        if sample is None:
            pair["reason"] = NOT_SCORED
            return pair
        pair["face"] = sample.face_dict()
        if sample.embedding is None:
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
            elif entry.embedding is None:
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

    def _judge_pair(self, item: SampleItem, store: EmbeddingStore) -> dict[str, Any]:
        """The judge's own verdicts for one pair; its failures are reported here, apart from the engine's."""
        judged: dict[str, Any] = {"face": None, "control": None, "reference": None, "reason": None}
        sample = store.get(item.image) or store.peek(item.image)
        if sample is None or sample.embedding is None:
            judged["reason"] = f"sample: {sample.reason if sample is not None else NOT_SCORED}"
            return judged
        judged["face"] = sample.face_dict()
        if self.judge_reference is not None:
            judged["reference"] = verdict(sample.embedding, self.judge_reference).to_dict()
        controls, problems = [], []
        for control in item.controls:
            entry = store.get(control) or store.peek(control)
            if entry is None or entry.embedding is None:
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
        if control is None or control.embedding is None or control.kps is None or sample.kps is None:
            return
        key = (control.path, control.size, control.mtime_ns, sample.path, sample.size, sample.mtime_ns)
        if key not in self._face_changes:
            self._face_changes[key] = face_change(control, sample, self._change_views)
        change = self._face_changes[key]
        if change is not None:
            pair["face_change"] = round(change, 6)
            pair["unchanged"] = change < self.copy_paste_threshold
            if above is not None:
                pair["copy_paste"] = above and pair["unchanged"]


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
