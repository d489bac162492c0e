"""Face-similarity metrics of a training run: names, summaries, and sample images scored like `evaluate`.

Keys (metrics.jsonl, TensorBoard, status.json): `face_sim/x0_mean|min|max` (one-step estimates
against their references, every --face_eval_frequency steps, with `face/valid`, `face/t_mean`
and the per-sample lists `face_sim/x0` and `face/t`), `face_sim/sample_mean|min|max|count`
(sample images against their control images, after each sampling round), and the same keys
with `heldout_` after `face_sim/` for the held-out pack (`--face_eval_model`). With
`--face_eval_model dlib` the held-out figures are the dlib judge's similarity (1 - distance / 1.2,
0.5 at its same-person threshold), with `face_sim/heldout_x0_distance_mean` and
`face_sim/heldout_x0_no_face` (estimates in which the judge's own detector found no face).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...faceid import FaceModel
from ...faceid.evaluate import EvaluationSources, FolderEvaluation
from ...faceid.evaluate.report import summarize
from ...faceid.judge import DlibJudge

HELDOUT = "heldout_"


def heldout_keys(metrics: dict[str, Any]) -> dict[str, Any]:
    """`face_sim/x0_mean` -> `face_sim/heldout_x0_mean`: the held-out pack's figures beside the training pack's."""
    return {
        key.replace("face_sim/", f"face_sim/{HELDOUT}", 1): value
        for key, value in metrics.items()
        if key.startswith("face_sim/")
    }


class SampleScorer:
    """Scores the sample images of a round against their `--ci` control images, as `evaluate` does.

    The folder evaluation (pairing by musubi sample names and the prompt file, one embedding per
    file, mean identity of several controls) is the evaluate command's own; it keeps its
    embeddings between rounds, so each control is embedded once per run.
    """

    def __init__(
        self, model: FaceModel, sample_dir: Path, sample_prompts: Path, prefix: str = "", judge: DlibJudge | None = None
    ) -> None:
        self.model = model
        self.sample_dir = sample_dir
        self.sample_prompts = sample_prompts
        self.prefix = prefix
        self.judge = judge  # also `face_sim/heldout_sample_*` from the judge, in the same round
        self._evaluation: FolderEvaluation | None = None

    def score(self, paths: Sequence[Path]) -> dict[str, float]:
        """`face_sim/{prefix}sample_mean|min|max|count` for the images `paths` (one sampling round)."""
        if self._evaluation is None:  # the sample folder exists once the first round is written
            self._evaluation = FolderEvaluation(
                self.model,
                EvaluationSources(sample_dir=self.sample_dir, sample_prompts=self.sample_prompts),
                judge=self.judge,
            )
        report = self._evaluation.run_round().report
        wanted = {Path(p).resolve() for p in paths}
        pairs = [pair for pair in report["pairs"] if Path(pair["image"]).resolve() in wanted]
        metrics = _sample_stats([p["score_control"] for p in pairs], f"face_sim/{self.prefix}sample")
        if self.judge is not None:
            judged = [p["judge"]["control"]["similarity"] for p in pairs if p["judge"]["control"]]
            metrics.update(_sample_stats(judged, f"face_sim/{HELDOUT}sample"))
        return metrics


def _sample_stats(scores: Sequence[float | None], name: str) -> dict[str, float]:
    stats = summarize(s for s in scores if s is not None)
    metrics: dict[str, float] = {f"{name}_count": stats["count"]}
    if stats["count"]:
        metrics.update({f"{name}_mean": stats["mean"], f"{name}_min": stats["min"], f"{name}_max": stats["max"]})
    return metrics
