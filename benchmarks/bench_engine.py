"""Engine throughput on a folder of real photos vs the bare onnxruntime compute of the same work.

    python benchmarks/bench_engine.py [--faces DIR] [--models_root DIR] [--pack NAME] [--repeat N]

Prints images/s and faces/s for the engine (from files, and from decoded arrays), the time
onnxruntime alone spends on the same detector and recognizer inputs, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cv2
import numpy as np
from face_consistency.faceid import load_face_model, load_image

DEFAULT_DATA = Path(os.environ.get("FACE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "testdata"))


def letterbox_blob(bgr: np.ndarray, size: int) -> np.ndarray:
    """The detector input SCRFD builds: aspect-preserving resize into a size x size canvas."""
    height, width = bgr.shape[:2]
    scale = size / max(height, width)
    resized = cv2.resize(bgr, (int(width * scale), int(height * scale)))
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[: resized.shape[0], : resized.shape[1]] = resized
    return cv2.dnn.blobFromImage(canvas, 1.0 / 128, (size, size), (127.5, 127.5, 127.5), swapRB=True)


def bare_onnxruntime_seconds(model, bgrs: list[np.ndarray], crops: list[np.ndarray], repeat: int) -> float:
    detector, recognizer = model.detector().session, model.recognizer.session
    det_input = detector.get_inputs()[0].name
    rec_input = recognizer.get_inputs()[0].name
    det_blobs = [letterbox_blob(b, model.detector_input_size(*b.shape[:2])) for b in bgrs]
    rec_blob = cv2.dnn.blobFromImages(crops, 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True)
    start = time.perf_counter()
    for _ in range(repeat):
        for blob in det_blobs:
            detector.run(None, {det_input: blob})
        recognizer.run(None, {rec_input: rec_blob})
    return (time.perf_counter() - start) / repeat


def timed(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=Path, default=DEFAULT_DATA / "faces")
    parser.add_argument("--models_root", type=Path, default=DEFAULT_DATA / "insightface")
    parser.add_argument("--pack", default="testpack")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from insightface.utils.face_align import norm_crop

    paths = sorted(p for p in args.faces.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    model = load_face_model(args.pack, models_root=args.models_root, provider="cpu")
    bgrs = [load_image(p) for p in paths]
    results = model.analyze(bgrs, channel_order="bgr")  # warm-up, and the faces to embed
    faces = sum(r.ok for r in results)
    crops = [norm_crop(b, r.face.kps) for b, r in zip(bgrs, results) if r.ok and r.face is not None]

    from_files = timed(lambda: model.analyze(paths), args.repeat)
    from_arrays = timed(lambda: model.analyze(bgrs, channel_order="bgr"), args.repeat)
    bare = bare_onnxruntime_seconds(model, bgrs, crops, args.repeat)

    n = len(paths)
    print(f"pack {args.pack} on {model.provider}; {n} photos from {args.faces}, {faces} faces; {args.repeat} runs each")
    for label, seconds in (("engine, from files   ", from_files), ("engine, from arrays  ", from_arrays)):
        print(f"{label}: {seconds * 1000:8.1f} ms/run  {n / seconds:6.1f} images/s  {faces / seconds:6.1f} faces/s")
    print(f"bare onnxruntime     : {bare * 1000:8.1f} ms/run  (same detector inputs and recognizer batch)")
    print(f"ratio engine/bare    : from files {from_files / bare:.2f}x, from arrays {from_arrays / bare:.2f}x")


if __name__ == "__main__":
    main()
