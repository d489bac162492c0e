"""FaceConsistencySimilarity on a batch vs the bare onnxruntime compute of the same work.

    python benchmarks/bench_nodes.py [--batch 8] [--size 1024] [--repeat 5] [--parts]
                                     [--models_root DIR] [--pack NAME] [--provider cpu|auto|cuda]

A batch of `batch` real photos letterboxed to size x size is scored against one reference
photo of the same size, through the node exactly as ComfyUI calls it (IMAGE tensors in,
scores, report, annotated images, face change and previews out; ComfyUI's modules replaced
by the test stand-ins), against the bare onnxruntime compute of the same detector inputs and
recognizer inputs, two ways: one run at a time, each on every core, the recognizer image by image
(how the node ran them before it detected side by side); and as the node runs them now, the outputs'
detector runs side by side on one thread per core (each run on one core) and the recognizer in the
node's batches. Prints each per run (median of `repeat`) and the ratios node/bare (target <= 1.1x):
the median of the ratios of paired (back-to-back) runs, which is the figure least moved by other
processes, and the same of CPU time (all threads). `--parts` then prints the CPU time of each part of
what the node adds to the models' compute (conversions, detector pre- and post-processing,
alignment, the change guard, drawing, previews, report), each on this one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime
import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))  # the ComfyUI stand-ins
from comfy_stubs import install_comfy_stubs  # noqa: E402

install_comfy_stubs(Path(tempfile.mkdtemp(prefix="bench-nodes-")))

from bench_engine import letterbox_blob  # noqa: E402
from face_consistency.faceid import FaceModel  # noqa: E402
from face_consistency.faceid.alignment import aligned_crop, face_region_change  # noqa: E402
from face_consistency.nodes import imaging  # noqa: E402
from face_consistency.nodes.imaging import save_previews, to_bgr_list, to_image_batch  # noqa: E402
from face_consistency.nodes.scoring import (  # noqa: E402
    FaceConsistencyLoadModel,
    FaceConsistencySimilarity,
    annotate_scores,
    score_images,
)

DEFAULT_DATA = Path(os.environ.get("FACE_TEST_DATA", REPO.parent / "shared" / "testdata"))
PHOTOS = ("obama2.jpg", "biden.jpg", "obama3.jpg", "obama_partial_face.jpg")


def image_tensor(path: Path, size: int) -> torch.Tensor:
    with Image.open(path) as img:
        square = ImageOps.pad(img.convert("RGB"), (size, size), Image.Resampling.BICUBIC, color=(128, 128, 128))
    return torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0)[None]


# seconds inside InferenceSession.run since the last reset: wall time, and this thread's CPU time
in_onnxruntime = [0.0, 0.0]
session_run = onnxruntime.InferenceSession.run


def timed_run(self: onnxruntime.InferenceSession, *args: Any, **kwargs: Any) -> Any:
    start, cpu_start = time.perf_counter(), time.thread_time()
    try:
        return session_run(self, *args, **kwargs)
    finally:
        in_onnxruntime[0] += time.perf_counter() - start
        in_onnxruntime[1] += time.thread_time() - cpu_start


def print_parts(model: FaceModel, images: torch.Tensor, reference: torch.Tensor, repeat: int) -> None:
    """This thread's CPU time outside onnxruntime of each part of the node's work, OpenCV on one thread
    so that all of it is on this thread: a breakdown that other processes' load moves little."""
    cv2.setNumThreads(1)
    bgrs = to_bgr_list(reference) + to_bgr_list(images)
    faces = [model.analyze([b], channel_order="bgr")[0].face for b in bgrs]
    pairs = [(b, f) for b, f in zip(bgrs, faces) if f is not None]
    crops = [aligned_crop(b, f) for b, f in pairs]
    outputs, batch, _ = score_images(model, images, reference, None, None, copy_paste_threshold=0.1)
    to_bgr_and_batch = getattr(imaging, "to_bgr_list_and_batch", None)  # not in the code before issue 25

    def conversions() -> None:
        to_bgr_list(reference)
        if to_bgr_and_batch is not None:
            to_bgr_and_batch(images)
        else:  # the whole drawn images converted back
            to_image_batch(to_bgr_list(images))

    floats = to_image_batch(outputs)

    def drawing() -> None:  # (over the last round's drawing: the same work)
        for bgr, image, row in zip(outputs, floats, batch.rows):
            drawn = annotate_scores(bgr, row)
            if to_bgr_and_batch is not None:
                imaging.copy_regions(image, bgr, drawn)

    parts: dict[str, Callable[[], Any]] = {
        "node, all of it": lambda: FaceConsistencySimilarity().score(
            model, images, "largest", 0, "score_zero", 0.75, 0.85, 0.75, 0.65, 0.1, reference_image=reference
        ),
        "conversions (in, annotated)": conversions,
        "detector pre/post-processing": lambda: [model.detect(b) for b in bgrs],
        "aligned crops (2 per output)": lambda: [aligned_crop(b, f) for b, f in pairs + pairs[1:]],
        "recognizer blobs": lambda: [model.embed_crops([c]) for c in crops],
        "change guard (SSIM)": lambda: [face_region_change(crops[0], c) for c in crops[1:]],
        "drawing (+ copy back)": drawing,
        "previews": lambda: save_previews(outputs, "bench"),
        "report": lambda: batch.report(["bench"]),
    }
    cpu: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeat):
        for name, part in parts.items():
            in_onnxruntime[1] = 0.0
            start = time.thread_time()
            part()
            cpu[name].append(time.thread_time() - start - in_onnxruntime[1])
    print("CPU time of this thread outside onnxruntime, OpenCV on one thread (median, min):")
    for name, seconds in cpu.items():
        print(f"  {name:30s} {statistics.median(seconds) * 1000:7.1f} ms  {min(seconds) * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--models_root", type=Path, default=DEFAULT_DATA / "insightface")
    parser.add_argument("--pack", default="testpack")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--parts", action="store_true", help="then the CPU time of each part of the node's work")
    args = parser.parse_args()

    import folder_paths

    folder_paths.add_model_folder_path("insightface", str(args.models_root))
    faces = DEFAULT_DATA / "faces"
    reference = image_tensor(faces / "obama.jpg", args.size)
    images = torch.cat([image_tensor(faces / PHOTOS[i % len(PHOTOS)], args.size) for i in range(args.batch)])
    model = FaceConsistencyLoadModel().load(args.pack, args.provider, "auto", 0.5)["result"][0]
    node = FaceConsistencySimilarity()

    def run_node() -> None:
        node.score(model, images, "largest", 0, "score_zero", 0.75, 0.85, 0.75, 0.65, 0.1, reference_image=reference)

    # the same detector inputs and recognizer crops the node makes
    bgrs = to_bgr_list(reference) + to_bgr_list(images)
    results = [model.analyze([b], all_faces=True, channel_order="bgr")[0] for b in bgrs]
    det_sizes = [model.detector_input_size(*b.shape[:2]) for b in bgrs]
    det_blobs = [letterbox_blob(b, size) for b, size in zip(bgrs, det_sizes)]
    # the session SCRFD itself runs for each input size (insightface 2.1 keeps one per size)
    det_sessions = [model.detector()._session_for_input_size((size, size)) for size in det_sizes]
    crops_per_image = [[aligned_crop(b, f) for f in r.faces] for b, r in zip(bgrs, results)]
    rec_blobs = [
        cv2.dnn.blobFromImages(crops, 1.0 / 127.5, (112, 112), (127.5,) * 3, swapRB=True)
        for crops in crops_per_image
        if crops
    ]
    recognizer = model.recognizer.session
    det_input, rec_input = model.detector().input_name, recognizer.get_inputs()[0].name
    # the recognizer inputs as the node batches them: the reference's faces, then all the outputs'
    node_rec_blobs = [rec_blobs[0], np.concatenate(rec_blobs[1:])] if len(rec_blobs) > 1 else rec_blobs
    workers = model.parallel_workers
    side_by_side = [model.detector(concurrent=True)._session_for_input_size((size, size)) for size in det_sizes]

    def run_bare() -> None:  # one detector run at a time on every core, the recognizer image by image
        for session, blob in zip(det_sessions, det_blobs):
            session.run(None, {det_input: blob})
        for blob in rec_blobs:
            recognizer.run(None, {rec_input: blob})

    def run_bare_side_by_side() -> None:  # the runs as the node makes them: the outputs' detector runs
        # on one thread per core, each run on one core; the recognizer in the node's batches
        side_by_side[0].run(None, {det_input: det_blobs[0]})
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda i: side_by_side[i].run(None, {det_input: det_blobs[i]}), range(1, len(bgrs))))
        for blob in node_rec_blobs:
            recognizer.run(None, {rec_input: blob})

    onnxruntime.InferenceSession.run = timed_run
    runs = {"node": run_node, "bare": run_bare, "bare side by side": run_bare_side_by_side}
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}  # CPU seconds of all the process's threads
    node_onnx_times: list[float] = []  # the node's wall time inside onnxruntime runs (summed over threads)
    for _ in range(args.repeat):  # interleaved, so load from other processes hits all alike
        for name, fn in runs.items():
            in_onnxruntime[:] = [0.0, 0.0]
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            if name == "node":
                node_onnx_times.append(in_onnxruntime[0])
    n_faces = sum(len(c) for c in crops_per_image)
    print(
        f"pack {args.pack} on {model.provider}; {args.batch} images of {args.size}x{args.size} + 1 reference, "
        f"{n_faces} faces; median of {args.repeat} runs; {workers} worker thread(s); load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    labels = {
        "node": "node FaceConsistencySimilarity",
        "bare": "bare, one run at a time",
        "bare side by side": "bare, side by side as the node",
    }
    for name, label in labels.items():
        print(f"{label:31s}: {statistics.median(times[name]) * 1000:8.1f} ms/run (min {min(times[name]) * 1000:.1f})")
    print(
        f"node: in onnxruntime {statistics.median(node_onnx_times) * 1000:.1f} ms of runs (summed over threads; "
        f"{statistics.median(cpu_times['node']) * 1000:.1f} ms of CPU in all)"
    )
    # each node run is paired with the bare runs right after it, so load from other processes
    # that drifts over the benchmark cancels out of the paired ratio
    for name in ("bare side by side", "bare"):
        paired = statistics.median(n / b for n, b in zip(times["node"], times[name]))
        # CPU time moves far less with other processes' load than wall time; it counts onnxruntime's threads
        # together, so where onnxruntime runs on several cores its ratio is below the wall-time one
        cpu_paired = statistics.median(n / b for n, b in zip(cpu_times["node"], cpu_times[name]))
        print(
            f"ratio node/{name:19s}: {paired:.2f}x median of paired runs, "
            f"{statistics.median(times['node']) / statistics.median(times[name]):.2f}x of medians, "
            f"{min(times['node']) / min(times[name]):.2f}x of minima (target <= 1.1x); CPU time {cpu_paired:.2f}x"
        )
    if args.parts:
        print_parts(model, images, reference, args.repeat)


if __name__ == "__main__":
    main()
