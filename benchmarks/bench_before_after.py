"""Before and after in one run: the Face Similarity Score node and the evaluate command, old code vs new.

    python benchmarks/bench_before_after.py --old DIR [--new DIR] [--repeat 7] [--cases node evaluate]

DIR is a folder holding the package as `face_consistency` (for example a folder with a symlink
`face_consistency` -> a worktree of the previous commit); `--new` defaults to the package this
Python imports. Each case runs in two worker processes, one per version, set up once (models
loaded, images made); the driver then asks them for one timed run at a time, alternating old and
new, so that load from other processes hits both alike. Prints the median of the per-pair ratios
new/old (below 1: the new code is faster), the medians of each side and the load average: on a
loaded machine the figures are indicative only. The same for CPU time (all of a worker's threads),
which other processes' load moves far less than wall time.

Cases: `node`, bench_nodes.py's (8 photos letterboxed to 1024x1024 against one reference);
`evaluate`, bench_evaluate.py's folder (`--outputs` samples of 1024x1024 over 5 controls), one
`FolderEvaluation.run_round` without a cache file; `evaluate_fast`, the same with the new code's
opt-in `fast` mode (`evaluate --fast`) against the old code's default (a version without the mode
runs its default on both sides).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

BENCHMARKS = Path(__file__).resolve().parent


def node_case(size: int):
    import bench_nodes  # installs ComfyUI's stand-ins
    import folder_paths
    import torch

    folder_paths.add_model_folder_path("insightface", str(bench_nodes.DEFAULT_DATA / "insightface"))
    faces = bench_nodes.DEFAULT_DATA / "faces"
    reference = bench_nodes.image_tensor(faces / "obama.jpg", size)
    photos = bench_nodes.PHOTOS
    images = torch.cat([bench_nodes.image_tensor(faces / photos[i % len(photos)], size) for i in range(8)])
    model = bench_nodes.FaceConsistencyLoadModel().load("testpack", "cpu", "auto", 0.5)["result"][0]
    node = bench_nodes.FaceConsistencySimilarity()
    return lambda: node.score(
        model, images, "largest", 0, "score_zero", 0.75, 0.85, 0.75, 0.65, 0.1, reference_image=reference
    )


def evaluate_case(folder: Path, fast: bool = False):
    import inspect

    import bench_evaluate
    from face_consistency.faceid import load_face_model
    from face_consistency.faceid.evaluate import EvaluationSources, FolderEvaluation

    model = load_face_model("testpack", models_root=bench_evaluate.TESTDATA / "insightface", provider="cpu")
    sources = EvaluationSources(sample_dir=folder / "sample", sample_prompts=folder / "prompts.txt")
    if fast and "fast" in inspect.signature(FolderEvaluation).parameters:
        return lambda: FolderEvaluation(model, sources, fast=True).run_round()
    return lambda: FolderEvaluation(model, sources).run_round()


def worker(case: str, folder: Path) -> None:
    """Set up `case`, then one timed run per line read; answers its seconds of wall time and of CPU time
    (all the worker's threads)."""
    sys.path.insert(0, str(BENCHMARKS))
    run = node_case(1024) if case == "node" else evaluate_case(folder, fast=case == "evaluate_fast")
    run()  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        print(time.perf_counter() - start, time.process_time() - cpu_start, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, help="folder with the old `face_consistency` package (required)")
    parser.add_argument("--new", type=Path, help="folder with the new one (default: this Python's)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--outputs", type=int, default=50)
    parser.add_argument(
        "--cases", nargs="+", default=["node", "evaluate"], choices=["node", "evaluate", "evaluate_fast"]
    )
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options.worker[0], Path(options.worker[1]))
        return
    if options.old is None:
        parser.error("--old is required")

    import face_consistency

    new = options.new or Path(face_consistency.__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="bench-before-after-") as tmp:
        folder = Path(tmp)
        if {"evaluate", "evaluate_fast"} & set(options.cases):
            sys.path.insert(0, str(BENCHMARKS))
            import bench_evaluate

            bench_evaluate.make_images(folder, bench_evaluate.TESTDATA / "faces", options.outputs, 5, 1024)
        for case in options.cases:
            workers: dict[str, tuple[subprocess.Popen[str], IO[str], IO[str]]] = {}  # process, its stdin, its stdout
            for label, package in (("old", options.old), ("new", new)):
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")])}
                process = subprocess.Popen(
                    [sys.executable, __file__, "--worker", case, str(folder)],
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert process.stdin is not None and process.stdout is not None  # both are pipes
                workers[label] = (process, process.stdin, process.stdout)
                if process.stdout.readline().strip() != "ready":
                    raise SystemExit(f"the {label} worker failed to set up the {case} case")
            seconds: dict[str, list[float]] = {"old": [], "new": []}
            cpu_seconds: dict[str, list[float]] = {"old": [], "new": []}
            for i in range(options.repeat):
                for label in ("old", "new") if i % 2 == 0 else ("new", "old"):  # either goes first half the time
                    _, stdin, stdout = workers[label]
                    stdin.write("run\n")
                    stdin.flush()
                    wall, cpu = stdout.readline().split()
                    seconds[label].append(float(wall))
                    cpu_seconds[label].append(float(cpu))
            for process, stdin, _ in workers.values():
                stdin.close()
                process.wait()
            ratios = [n / o for n, o in zip(seconds["new"], seconds["old"])]
            cpu_ratios = [n / o for n, o in zip(cpu_seconds["new"], cpu_seconds["old"])]
            print(
                f"{case}: new/old {statistics.median(ratios):.3f} (median of {len(ratios)} pairs; "
                f"{min(ratios):.3f} to {max(ratios):.3f}); old {statistics.median(seconds['old']):.3f} s, "
                f"new {statistics.median(seconds['new']):.3f} s (medians); CPU time new/old "
                f"{statistics.median(cpu_ratios):.3f} ({min(cpu_ratios):.3f} to {max(cpu_ratios):.3f}; old "
                f"{statistics.median(cpu_seconds['old']):.3f} s, new {statistics.median(cpu_seconds['new']):.3f} s); "
                f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}",
                flush=True,
            )


if __name__ == "__main__":
    main()
