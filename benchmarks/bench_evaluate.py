"""Folder evaluation speed: the seed script's approach vs `face-consistency evaluate`.

In one process, on the same images and the same model files:

1. seed approach: for every (output, control) pair, read both images and run InsightFace
   `FaceAnalysis.get` on each, one at a time (the control is re-extracted for every pair);
2. this command's implementation (`FolderEvaluation.run_round`, no cache file): each file
   embedded once; worker threads decode, detect and crop, the crops are embedded in batches;
   and its opt-in `fast` mode (`evaluate --fast`), with its largest score difference;
3. the bare onnxruntime compute of the same work: the exact detector and recognizer inputs
   of a second command run, recorded and replayed through `session.run` alone, one run at
   a time on all cores; again with the detector runs side by side on one core each (as the
   command runs them); and that once more with each thread decoding one of the image files
   before each run: the bare compute of the work the command still does (decoding and the
   models), without its pipeline.

Prints the times, the two goals (seed/command >= 3.4x; command / the bare compute of the work it
still does <= 1.05x), the command against onnxruntime alone, the time per image beside the only
CPU speed InsightFace publishes, and whether the detector takes a batch.

    python benchmarks/bench_evaluate.py [--outputs 50] [--controls 5] [--size 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

REPO = Path(__file__).resolve().parent.parent
TESTDATA = Path(os.environ.get("FACE_TEST_DATA", REPO.parent / "shared" / "testdata"))
PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "biden.jpg")
TIME = "20250101120000"


def make_images(root: Path, faces: Path, outputs: int, controls: int, size: int) -> tuple[Path, Path]:
    """Controls (the photos, longest side `size`) and outputs (size x size variations of them)."""
    rng = np.random.default_rng(0)
    control_dir, sample_dir = root / "controls", root / "sample"
    control_dir.mkdir()
    sample_dir.mkdir()
    photos = [Image.open(faces / PHOTOS[i % len(PHOTOS)]).convert("RGB") for i in range(controls)]
    lines = []
    for k, photo in enumerate(photos):
        control = photo.copy()
        control.thumbnail((size, size), Image.Resampling.LANCZOS)
        control.save(control_dir / f"control_{k}.png")
        lines.append(f"edit {k} --w {size} --h {size} --d {k} --ci {control_dir / f'control_{k}.png'}")
    (root / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for i in range(outputs):
        k, step = i % controls, (i // controls + 1) * 100
        photo = photos[k]
        # the whole photo, scaled and shifted on a square canvas, maybe mirrored, brightness varied
        scale = size * rng.uniform(0.8, 1.0) / max(photo.size)
        fitted = photo.resize((int(photo.width * scale), int(photo.height * scale)), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            fitted = fitted.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        canvas = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
        canvas.paste(fitted, (int(rng.uniform(0, size - fitted.width)), int(rng.uniform(0, size - fitted.height))))
        ImageEnhance.Brightness(canvas).enhance(rng.uniform(0.8, 1.2)).save(
            sample_dir / f"bench_{step:06d}_{k:02d}_{TIME}_{k}_000.png"
        )
    return sample_dir, root / "prompts.txt"


def seed_approach(app: Any, pairs: list[tuple[Path, Path]]) -> list[float | None]:
    import cv2

    scores: list[float | None] = []
    for output, control in pairs:
        faces = [app.get(cv2.imread(str(path))) for path in (control, output)]
        if not faces[0] or not faces[1]:
            scores.append(None)
            continue
        scores.append(float(np.dot(faces[0][0].normed_embedding, faces[1][0].normed_embedding)))
    return scores


class RunRecorder:
    """Stands in for onnxruntime sessions: records every run's inputs and when it ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, np.ndarray]]] = []
        self.intervals: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def wrap(self, session: Any) -> Any:
        recorder = self

        class Recording:
            def run(self, output_names: Any, feed: dict[str, np.ndarray], *args: Any) -> Any:
                start = time.perf_counter()
                result = session.run(output_names, feed, *args)
                with recorder._lock:
                    recorder.calls.append((output_names, {k: v.copy() for k, v in feed.items()}))
                    recorder.intervals.append((start, time.perf_counter()))
                return result

            def __getattr__(self, name: str) -> Any:
                return getattr(session, name)

        return Recording()


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Wall time during which at least one run was in progress (runs may overlap)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def recorded_round(model: Any, sources: Any) -> tuple[RunRecorder, RunRecorder, dict[str, Any], float]:
    """One timed `run_round` with every detector and recognizer run recorded."""
    from face_consistency.faceid.evaluate import FolderEvaluation

    detector_runs, recognizer_runs = RunRecorder(), RunRecorder()
    detectors = {id(d): d for d in (model.detector(), model.detector(concurrent=True))}.values()
    sessions = {id(d): d.session for d in detectors}
    for detector in detectors:
        if hasattr(detector, "_session_for_input_size"):  # insightface 2.1
            session_for_size = detector._session_for_input_size
            detector._session_for_input_size = lambda size, pick=session_for_size: detector_runs.wrap(pick(size))
        else:  # 0.7.3
            detector.session = detector_runs.wrap(detector.session)
    recognizer_session = model.recognizer.session
    model.recognizer.session = recognizer_runs.wrap(recognizer_session)
    try:
        start = time.perf_counter()
        report = FolderEvaluation(model, sources).run_round().report
        seconds = time.perf_counter() - start
    finally:
        for detector in detectors:
            detector.__dict__.pop("_session_for_input_size", None)
            detector.session = sessions[id(detector)]
        model.recognizer.session = recognizer_session
    return detector_runs, recognizer_runs, report, seconds


def replay(
    detector_session: Any,
    workers: int,
    detector_runs: RunRecorder,
    recognizer_runs: RunRecorder,
    recognizer_session: Any,
    decode: list[Path] | None = None,
) -> float:
    """The recorded runs alone: detector inputs on `workers` threads, then the recognizer's.
    With `decode`, each thread also decodes one of these files before each detector run."""
    from face_consistency.faceid.images import load_image

    def detector_run(index: int) -> None:
        if decode is not None and index < len(decode):
            load_image(decode[index])
        detector_session.run(*detector_runs.calls[index])

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(detector_run, range(len(detector_runs.calls))))
    for call in recognizer_runs.calls:
        recognizer_session.run(*call)
    return time.perf_counter() - start


# What InsightFace publishes (github.com/deepinsight/insightface, detection/scrfd/README.md): Infer(ms) at VGA
# for every SCRFD, a GPU figure; on the CPU only SCRFD-0.5GF's. Nothing for the recognizers' speed.
PUBLISHED_CPU = (
    "InsightFace publishes no CPU speed for this pack's models (SCRFD-2.5GF with keypoints: 4.3 ms at VGA, "
    "SCRFD-10GF of buffalo_l: 5.0 ms, hardware not stated and not among its CPU figures); its one CPU figure is "
    "SCRFD-0.5GF (buffalo_s's detector, 1/5 the FLOPs of 2.5GF): 28.3 ms per 640x480 image on one thread of a "
    "Ryzen 9 3950X (PyTorch)"
)


def detector_batch_check(session: Any) -> str:
    """Whether the detector runs two images in one call, tried: its input shape and onnxruntime's answer."""
    shape = session.get_inputs()[0].shape
    name = session.get_inputs()[0].name
    try:
        session.run(None, {name: np.zeros((2, 3, 64, 64), np.float32)})
    except Exception as exc:  # onnxruntime's InvalidArgument
        return f"input {shape}: a batch of 2 is refused ({' '.join(str(exc).split())[:160]})"
    return f"input {shape}: a batch of 2 runs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=int, default=50)
    parser.add_argument("--controls", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024, help="output image side (musubi samples: --w/--h)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each approach (median reported)")
    parser.add_argument("--pack", default="testpack")
    parser.add_argument(
        "--det_size",
        default="auto",
        help="the command's detection size (the seed approach always runs at 640, as the seed guide set it)",
    )
    parser.add_argument("--models_root", type=Path, default=TESTDATA / "insightface")
    args = parser.parse_args(argv)

    from face_consistency.faceid import load_face_model
    from face_consistency.faceid.evaluate import EvaluationSources, FolderEvaluation
    from face_consistency.faceid.evaluate.pairing import pair_sample_folder
    from face_consistency.musubi_formats.prompts import load_prompt_file
    from insightface.app import FaceAnalysis

    model = load_face_model(args.pack, models_root=args.models_root, provider="cpu", det_size=args.det_size)
    app = FaceAnalysis(
        name=args.pack,
        root=str(args.models_root),
        allowed_modules=["detection", "recognition"],
        providers=["CPUExecutionProvider"],
    )
    app.prepare(ctx_id=-1, det_size=(640, 640))  # the seed guide's setting
    print(
        f"model {model.pack_name} ({model.embedding_size}-d) on {model.provider}; "
        f"command det_size {model.det_size}; {os.cpu_count()} CPU(s); {args.outputs} outputs of "
        f"{args.size}x{args.size} over {args.controls} controls"
    )

    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        sample_dir, prompts = make_images(Path(tmp), TESTDATA / "faces", args.outputs, args.controls, args.size)
        pairing = pair_sample_folder(sample_dir, load_prompt_file(prompts), prompts)
        pairs = [(item.image, item.controls[0]) for item in pairing.items]
        assert len(pairs) == args.outputs, pairing.unpaired
        sources = EvaluationSources(sample_dir=sample_dir, sample_prompts=prompts)

        seed_approach(app, pairs[:1])  # warm-up: first onnxruntime runs allocate
        FolderEvaluation(model, sources).run_round()
        FolderEvaluation(model, sources, fast=True).run_round()

        files = [*dict.fromkeys(c for item in pairing.items for c in item.controls), *(p for p, _ in pairs)]
        times: dict[str, list[float]] = {k: [] for k in ("seed", "command", "fast", "bare", "side", "side+decode")}
        in_run: list[float] = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            seed_scores = seed_approach(app, pairs)
            times["seed"].append(time.perf_counter() - start)

            start = time.perf_counter()
            report = FolderEvaluation(model, sources).run_round().report
            times["command"].append(time.perf_counter() - start)

            start = time.perf_counter()
            fast_report = FolderEvaluation(model, sources, fast=True).run_round().report
            times["fast"].append(time.perf_counter() - start)

            # again with every onnxruntime run recorded (copying the inputs slows it a little)
            detector_runs, recognizer_runs, _, seconds = recorded_round(model, sources)
            in_run.append(seconds / busy_seconds(detector_runs.intervals + recognizer_runs.intervals))
            recognizer, workers = model.recognizer.session, model.parallel_workers
            side_by_side = model.detector(concurrent=True).session
            times["bare"].append(replay(model.detector().session, 1, detector_runs, recognizer_runs, recognizer))
            times["side"].append(replay(side_by_side, workers, detector_runs, recognizer_runs, recognizer))
            times["side+decode"].append(
                replay(side_by_side, workers, detector_runs, recognizer_runs, recognizer, files)
            )
            print(f"  run {len(in_run)}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)

        seed_valid = [s for s in seed_scores if s is not None]
        print(
            f"detector runs: seed {2 * len(pairs)}, command {len(detector_runs.calls)}; "
            f"recognizer runs: seed {2 * len(seed_valid)}, command {len(recognizer_runs.calls)}"
        )
        print(
            f"valid pairs: seed {len(seed_valid)}, command {report['valid_pairs']}, fast {fast_report['valid_pairs']}; "
            f"mean similarity: seed {np.mean(seed_valid):.4f}, command {report['overall_mean']:.4f}, "
            f"fast {fast_report['overall_mean']:.4f}"
        )
        differences = [
            abs(a["score"] - b["score"])
            for a, b in zip(report["pairs"], fast_report["pairs"])
            if a["score"] is not None and b["score"] is not None
        ]
        print(
            f"fast vs command: largest score difference {max(differences):.4f}, mean {np.mean(differences):.4f} "
            f"over {len(differences)} pairs"
        )
        print(f"detector batch: {detector_batch_check(model.detector().session)}")
        # On a shared machine the fastest of the repeats is the one least disturbed by other work.
        fastest = {k: min(v) for k, v in times.items()}
        for label, key, note in (
            ("seed approach         ", "seed", ""),
            ("command               ", "command", ""),
            ("command --fast        ", "fast", ""),
            ("bare onnxruntime      ", "bare", "  (same inputs replayed one run at a time, all cores per run)"),
            ("  detector side by side", "side", f"  (on {workers} threads, one core each, as the command runs them)"),
            (
                "  ... and decoding    ",
                "side+decode",
                f"  (each thread also decodes one of the {len(files)} files per run)",
            ),
        ):
            print(
                f"{label} {fastest[key]:8.3f} s  (fastest of {args.repeat}; median "
                f"{statistics.median(times[key]):.3f}){note}"
            )

        def ratio(label: str, numerator: str, denominator: str, goal: str) -> None:
            # paired: both times of one repeat ran under the same load from other processes
            paired = [n / d for n, d in zip(times[numerator], times[denominator])]
            print(
                f"{label} {statistics.median(paired):8.2f} x   ({goal}median of the {len(paired)} paired runs: "
                f"{', '.join(f'{r:.2f}' for r in paired)}; fastest / fastest "
                f"{fastest[numerator] / fastest[denominator]:.2f})"
            )

        print("goals:")
        ratio("seed loop / command   ", "seed", "command", "goal >= 3.4; ")
        ratio("command / bare work   ", "command", "side+decode", "goal <= 1.05, bare: the models and the decoding; ")
        print("beside them:")
        ratio("seed loop / --fast    ", "seed", "fast", "")
        ratio("--fast / bare work    ", "fast", "side+decode", "bare work of the default; ")
        ratio("command / onnxruntime ", "command", "bare", "one run at a time, no decoding; ")
        ratio("command / side by side", "command", "side", "no decoding; ")
        # Against the time onnxruntime was busy inside each command run: what the pipeline
        # (decode, pre/post-processing, waiting) adds, under the same CPU contention.
        print(f"command/in-run compute {min(in_run):8.2f} x   (per run: {', '.join(f'{r:.2f}' for r in in_run)})")
        per_image = fastest["command"] / len(files) * 1000
        detector_ms = fastest["side"] * workers / len(detector_runs.calls) * 1000
        print(
            f"per image: command {per_image:.1f} ms, --fast {fastest['fast'] / len(files) * 1000:.1f} ms on "
            f"{os.cpu_count()} CPU(s); one detector run on one core {detector_ms:.0f} ms at its input size "
            f"(upper bound: the recognizer's runs included)"
        )
        print(f"  {PUBLISHED_CPU}")
        print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
