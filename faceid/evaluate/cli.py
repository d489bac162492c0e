"""`face-consistency evaluate`: score sample folders against their controls/references.

Exit codes: 0 report written with at least one scored pair; 1 nothing could be paired or
scored (the report is still written, listing why), or a write failed (disk full); 2 bad
arguments, output paths or model pack; 130 interrupted before the model was loaded.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...common.cli_help import ChoicesAndDefaultsFormatter
from ...common.files import atomic_write_json, check_writable_file
from ...common.values import Bounds, check_number, check_text
from ..engine_flags import add_engine_flags, engine_settings
from ..errors import FaceEngineError, OutputWriteError
from ..judge import DETECTORS, JUDGE_CHOICES, load_judge
from ..model import load_face_engine
from ..pack_download import TerminalProgress
from ..scoring import DEFAULT_COPY_PASTE_THRESHOLD
from ..similarity import Bands
from .embedding import FAST_DET_SIZE
from .folder_evaluation import FolderEvaluation, RoundResult, watch
from .plot import write_plot
from .report import summary_table
from .sources import EvaluationError, EvaluationSources

DEFAULT_WATCH_SECONDS = 30.0
# The values each numeric flag may take, checked before anything is read (every float or int flag
# of the parser has its entry here; a test holds them to it).
FLAG_BOUNDS = {
    "det_thresh": Bounds(0, 1, low_open=True, high_open=True),
    "threshold": Bounds(-1, 1),
    "bands": Bounds(-1, 1),
    "copy_paste_threshold": Bounds(0, 2),  # a change of 1 - SSIM
    "watch": Bounds(0, 7 * 24 * 3600, low_open=True),
}
# tqdm bars only for runs long enough to need one
PROGRESS_MIN_FILES = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        formatter_class=ChoicesAndDefaultsFormatter,
        prog="face-consistency evaluate",
        description=(
            "Score generated images against the identity in their control images (and/or reference "
            "photos): ArcFace cosine similarity per training step, a JSON report and a plot."
        ),
    )
    where = parser.add_argument_group("what to score")
    where.add_argument(
        "--sample_dir", type=Path, help="musubi-tuner sample folder (output_dir/sample) or the seed guide's layout"
    )
    where.add_argument(
        "--sample_prompts", type=Path, help="musubi prompt file: the --ci paths of line k are the controls of prompt k"
    )
    where.add_argument("--control_dir", type=Path, help="folder of control images (with --generated_dir)")
    where.add_argument("--generated_dir", type=Path, help="folder of generated images named like their controls")
    where.add_argument(
        "--reference",
        type=Path,
        nargs="+",
        default=[],
        metavar="IMAGE",
        help="photo(s) of the person; scored instead of the control when no control is known, beside it otherwise",
    )
    where.add_argument(
        "--ci_base_dir",
        type=Path,
        help="folder relative --ci paths are resolved from (musubi's working directory; default: the current "
        "directory, then the prompt file's folder)",
    )
    model = parser.add_argument_group("face model")
    add_engine_flags(model)
    model.add_argument(
        "--fast",
        action="store_true",
        help=f"detect at {FAST_DET_SIZE} first (at --det_size only where no face is found there) and decode JPEGs "
        "at the detector's scale: less work; scores move by up to about 0.05 (docs/evaluate.md#speed)",
    )
    model.add_argument(
        "--judge",
        choices=JUDGE_CHOICES,
        help="also score every pair with a held-out recognizer from another family (dlib; needs "
        'pip install "comfyui-face-consistency[judge]"); its own detector locates the faces',
    )
    model.add_argument(
        "--judge_detector",
        choices=DETECTORS,
        default="hog",
        help="the judge's face detector: hog (fast) or cnn (finds more faces, slow on the CPU)",
    )
    scoring = parser.add_argument_group("scoring and output")
    scoring.add_argument("--threshold", type=float, help="count samples at or above this similarity")
    scoring.add_argument(
        "--bands",
        type=float,
        nargs=3,
        metavar=("EXCELLENT", "GOOD", "MODERATE"),
        help="band lower bounds (default 0.85 0.75 0.65; tuned for 512-d ArcFace packs)",
    )
    scoring.add_argument(
        "--output_json",
        type=Path,
        default=Path("face_consistency_results.json"),
        help="report path",
    )
    scoring.add_argument(
        "--copy_paste_threshold",
        type=float,
        default=DEFAULT_COPY_PASTE_THRESHOLD,
        help="face change (1 - SSIM) below which a sample is flagged UNCHANGED (its control's face handed "
        "back), and, scoring above the --reference photos' own agreement, as a copy of its control",
    )
    scoring.add_argument("--plot", type=Path, metavar="PATH", help="also write the plot as PNG here")
    scoring.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=DEFAULT_WATCH_SECONDS,
        metavar="SECONDS",
        help=f"keep polling for new samples every SECONDS (default {DEFAULT_WATCH_SECONDS:g}); Ctrl-C stops",
    )
    scoring.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


def cache_path_for(output_json: Path) -> Path:
    return output_json.with_name(output_json.name + ".embeddings.json")


def judge_cache_path_for(output_json: Path) -> Path:
    return output_json.with_name(output_json.name + ".judge.json")


class _Interrupts:
    """SIGINT and SIGTERM (how services and job control stop a watcher): the first stops the run
    like Ctrl-C; any later one waits, so that the final write of report and cache completes."""

    def __init__(self) -> None:
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: object) -> None:
        if self.stopping:
            print("face-consistency evaluate: writing the report and cache; one moment", file=sys.stderr, flush=True)
            return
        self.stopping = True
        raise KeyboardInterrupt

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _error(text: object) -> None:
    print(f"face-consistency evaluate: error: {text}", file=sys.stderr, flush=True)


def _check_arguments(args: argparse.Namespace, outputs: dict[str, Path | None]) -> None:
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if name in FLAG_BOUNDS and item is not None:
                check_number(item, FLAG_BOUNDS[name], f"--{name}")
            elif isinstance(item, (str, Path)):
                check_text(str(item), f"--{name}")
    if not args.model_name.strip():
        raise ValueError("--model_name is empty: give a pack name such as buffalo_l, or the path of a pack folder")
    for what, path in outputs.items():
        if path is not None:
            check_writable_file(path, what)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s: %(message)s")
    with _Interrupts() as interrupts:
        try:
            return _evaluate(args, interrupts)
        except KeyboardInterrupt:  # before the model was loaded: nothing to write yet
            print("\nface-consistency evaluate: interrupted", file=sys.stderr)
            return 130


def _evaluate(args: argparse.Namespace, interrupts: _Interrupts) -> int:
    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    cache_file = cache_path_for(args.output_json) if args.watch is not None else None
    judge_cache = judge_cache_path_for(args.output_json) if args.watch is not None and args.judge else None
    try:
        outputs = {
            "--output_json": args.output_json,
            "--plot": args.plot,
            "the embedding cache (beside --output_json)": cache_file,
            "the judge's cache (beside --output_json)": judge_cache,
        }
        _check_arguments(args, outputs)
        bands = Bands(*args.bands) if args.bands else Bands()
        sources = EvaluationSources(
            sample_dir=args.sample_dir,
            sample_prompts=args.sample_prompts,
            control_dir=args.control_dir,
            generated_dir=args.generated_dir,
            references=list(args.reference),
            base_dir=args.ci_base_dir,
        )
        sources.check()
        sources.check_outputs(outputs)
        model = load_face_engine(engine_settings(args), progress=None if args.quiet else TerminalProgress())
        say(
            f"model {model.pack_name} ({model.embedding_size}-d) on {model.provider}, det_size {model.det_size}"
            + (f", fast (detecting at {FAST_DET_SIZE} first)" if args.fast else "")
        )
        judge = load_judge(args.judge, args.judge_detector) if args.judge else None
        if judge is not None:
            say(f"held-out judge {judge.name}: {judge.describe()['detector']}")
        evaluation = FolderEvaluation(
            model,
            sources,
            threshold=args.threshold,
            bands=bands,
            cache_file=cache_file,
            progress=None if args.quiet else _tqdm_factory,
            judge=judge,
            judge_cache_file=judge_cache,
            copy_paste_threshold=args.copy_paste_threshold,
            fast=args.fast,
        )
    except (FaceEngineError, ValueError) as exc:
        _error(exc)
        return 2

    def write(result: RoundResult) -> None:
        writers = [("--output_json", args.output_json, lambda: atomic_write_json(args.output_json, result.report))]
        if args.plot is not None:
            writers.append(("--plot", args.plot, lambda: write_plot(result.report, args.plot)))
        for flag, path, write_file in writers:
            try:
                write_file()
            except OSError as exc:
                raise OutputWriteError(
                    f"cannot write {flag} {path}: {exc.strerror or exc}; the previous file (if any) is unchanged. "
                    "Free space or choose another location."
                ) from None

    last: list[RoundResult] = []

    def on_round(result: RoundResult) -> None:
        write(result)
        last.append(result)
        if args.watch is not None:
            report = result.report
            say(
                f"round {len(last)}: {result.embedded} new file(s) embedded, {report['valid_pairs']} of "
                f"{report['total_pairs']} pairs scored, mean {_fmt(report['overall_mean'])}; report {args.output_json}"
            )

    try:
        try:
            if args.watch is None:
                on_round(evaluation.run_round())
            else:
                say(f"watching every {args.watch:g} s; Ctrl-C to stop")
                watch(evaluation, args.watch, on_round)
        except KeyboardInterrupt:
            interrupts.stopping = True  # from here on a signal waits for the writes below
            evaluation.store.save()
            if evaluation.judge_store is not None:
                evaluation.judge_store.save()
            final = RoundResult(evaluation.report(), 0, 0)
            write(final)
            last.append(final)
            say("\nstopped; report written with everything scored so far")
    except EvaluationError as exc:
        _error(exc)
        return 2
    except OutputWriteError as exc:
        _error(exc)
        return 1
    report = last[-1].report
    say(summary_table(report))
    say(f"report: {args.output_json}" + (f"; plot: {args.plot}" if args.plot else ""))
    if report["total_pairs"] == 0:
        print("face-consistency evaluate: nothing could be paired (see failures in the report)", file=sys.stderr)
        return 1
    if report["valid_pairs"] == 0:
        print("face-consistency evaluate: no pair could be scored (see failures in the report)", file=sys.stderr)
        return 1
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _tqdm_factory(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="embedding", disable=total < PROGRESS_MIN_FILES, leave=False)
