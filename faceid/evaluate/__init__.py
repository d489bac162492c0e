"""The `evaluate` room: score folders of generated images against the identity of their control
images and/or reference photos, as the `face-consistency evaluate` command (`cli.py`) and the
FaceConsistencyScoreFolder node do.

- `sources.py`: what an evaluation reads (`EvaluationSources`), checked, kept apart from the outputs;
- `pairing.py`: which sample is scored against which control (musubi, seed guide, two folders);
- `embedding.py`: decoding, detecting and embedding files in a thread pipeline (and the judge's descriptors);
- `embedding_store.py`: each file's result, keyed by its signature, optionally kept in a checked file;
- `folder_evaluation.py`: `FolderEvaluation`, one round after another (`watch`), scored into a report;
- `report.py`: the JSON report, its schema and the summary table; `plot.py`: the plot of the report.
"""

from .folder_evaluation import FolderEvaluation, RoundResult, watch
from .sources import EvaluationError, EvaluationSources

__all__ = ["EvaluationError", "EvaluationSources", "FolderEvaluation", "RoundResult", "watch"]
