"""Folder evaluation speed: the seed script's approach vs `face-consistency evaluate`.

In one process, on the same images and the same model files:

1. seed approach: for every (output, control) pair, read both images and run InsightFace
   `FaceAnalysis.get` on each, one at a time (the control is re-extracted for every pair);
2. this command's implementation (`FolderEvaluation.run_round`, no cache file): each file
   embedded once, decoding in a thread pool ahead of the detector, crops batched;
3. the bare onnxruntime compute of the same work: the exact detector and recognizer inputs
   of run 2, recorded and replayed through `session.run` alone.

Prints the times, seed/command (target >= 3x) and command/bare (target <= 1.15x).

    python benchmarks/bench_evaluate.py [--outputs 50] [--controls 5] [--size 1024] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
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


class RecordingSession:
    """Stands in for an onnxruntime session: records every run's inputs, times the runs.

    insightface 2.1's SCRFD runs each input resolution on its own session (picked by
    `_session_for_input_size`), so the detector is wrapped there, the recognizer directly.
    """

    def __init__(self, session: Any) -> None:
        self._session = session
        self.calls: list[tuple[Any, dict[str, np.ndarray]]] = []
        self.seconds = 0.0

    def run(self, output_names: Any, feed: dict[str, np.ndarray], *args: Any) -> Any:
        self.calls.append((output_names, {k: v.copy() for k, v in feed.items()}))
        start = time.perf_counter()
        result = self._session.run(output_names, feed, *args)
        self.seconds += time.perf_counter() - start
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def replay(self) -> float:
        start = time.perf_counter()
        for output_names, feed in self.calls:
            self._session.run(output_names, feed)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=int, default=50)
    parser.add_argument("--controls", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024, help="output image side (musubi samples: --w/--h)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each approach (median reported)")
    parser.add_argument("--pack", default="testpack")
    parser.add_argument(
        "--det_size", default="auto",
        help="the command's detection size (the seed approach always runs at 640, as the seed guide set it)",
    )
    parser.add_argument("--models_root", type=Path, default=TESTDATA / "insightface")
    args = parser.parse_args(argv)

    from face_consistency.faceid import load_face_model
    from face_consistency.faceid.evaluate import EvaluationSources, FolderEvaluation
    from face_consistency.faceid.pairing import pair_sample_folder
    from face_consistency.faceid.prompts import load_prompt_file
    from insightface.app import FaceAnalysis

    model = load_face_model(args.pack, models_root=args.models_root, provider="cpu", det_size=args.det_size)
    app = FaceAnalysis(
        name=args.pack, root=str(args.models_root), allowed_modules=["detection", "recognition"],
        providers=["CPUExecutionProvider"],
    )
    app.prepare(ctx_id=-1, det_size=(640, 640))  # the seed guide's setting
    print(f"model {model.pack_name} ({model.embedding_size}-d) on {model.provider}; "
          f"command det_size {model.det_size}; {os.cpu_count()} CPU(s); {args.outputs} outputs of {args.size}x{args.size} over {args.controls} controls")

    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        sample_dir, prompts = make_images(Path(tmp), TESTDATA / "faces", args.outputs, args.controls, args.size)
        pairing = pair_sample_folder(sample_dir, load_prompt_file(prompts), prompts)
        pairs = [(item.image, item.controls[0]) for item in pairing.items]
        assert len(pairs) == args.outputs, pairing.unpaired
        sources = EvaluationSources(sample_dir=sample_dir, sample_prompts=prompts)

        seed_approach(app, pairs[:1])  # warm-up: first onnxruntime runs allocate
        FolderEvaluation(model, sources).run_round()

        seed_times, command_times, bare_times, in_run = [], [], [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            seed_scores = seed_approach(app, pairs)
            seed_times.append(time.perf_counter() - start)

            detector, recognizer = model._detector, model._recognizer
            detector_recorders: dict[int, RecordingSession] = {}
            session_for_size = detector._session_for_input_size

            def recorded_session_for(input_size: Any) -> RecordingSession:
                session = session_for_size(input_size)
                return detector_recorders.setdefault(id(session), RecordingSession(session))

            recognizer_recorder = RecordingSession(recognizer.session)
            detector._session_for_input_size, recognizer.session = recorded_session_for, recognizer_recorder
            try:
                start = time.perf_counter()
                report = FolderEvaluation(model, sources).run_round().report
                command_times.append(time.perf_counter() - start)
            finally:
                del detector._session_for_input_size
                recognizer.session = recognizer_recorder._session
            recorders = [*detector_recorders.values(), recognizer_recorder]
            in_run.append(sum(r.seconds for r in recorders))
            bare_times.append(sum(r.replay() for r in recorders))

            print(f"  run {len(seed_times)}: seed {seed_times[-1]:.2f} s, command {command_times[-1]:.2f} s, "
                  f"bare onnxruntime {bare_times[-1]:.2f} s", flush=True)

        seed_valid = [s for s in seed_scores if s is not None]
        print(f"detector runs: seed {2 * len(pairs)}, command {sum(len(r.calls) for r in recorders[:-1])}; "
              f"recognizer runs: seed {2 * len(seed_valid)}, command {len(recorders[-1].calls)}")
        print(f"valid pairs: seed {len(seed_valid)}, command {report['valid_pairs']}; "
              f"mean similarity: seed {np.mean(seed_valid):.4f}, command {report['overall_mean']:.4f}")
        # On a shared machine the fastest of the repeats is the one least disturbed by other work.
        seed_t, command_t, bare_t = min(seed_times), min(command_times), min(bare_times)
        print(f"seed approach          {seed_t:8.3f} s  (fastest of {args.repeat}; median {statistics.median(seed_times):.3f})")
        print(f"command                {command_t:8.3f} s  (fastest of {args.repeat}; median {statistics.median(command_times):.3f})")
        print(f"bare onnxruntime       {bare_t:8.3f} s  (same inputs replayed; fastest; inside the command run: "
              f"{min(in_run):.3f} s)")
        print(f"speed-up seed/command  {seed_t / command_t:8.2f} x   (target >= 3)")
        print(f"command/bare compute   {command_t / bare_t:8.2f} x   (target <= 1.15; per run: "
              f"{', '.join(f'{c / b:.2f}' for c, b in zip(command_times, bare_times))})")
        # The same ratio against the onnxruntime time spent inside each command run: what the
        # pipeline (decode, pre/post-processing, waiting) adds, under the same CPU contention.
        print(f"command/in-run compute {min(c / r for c, r in zip(command_times, in_run)):8.2f} x   (per run: "
              f"{', '.join(f'{c / r:.2f}' for c, r in zip(command_times, in_run))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
