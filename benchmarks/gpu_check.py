"""The prepared check for a machine with one CUDA GPU: one run, one JSON.

    python benchmarks/gpu_check.py --out gpu_check.json            # on the GPU machine, under 8 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/check.json  # the same code on the CPU, tiny sizes

Set-up on the GPU machine (nothing is downloaded at run time; the test data folder, with its
InsightFace-format test pack and photos, travels with the checkout or is named by `--test_data`):

    python3 -m venv /tmp/gpu && . /tmp/gpu/bin/activate
    python -m pip install -e ".[test]"                  # torch with CUDA, the trainer's libraries
    python -m pip uninstall -y onnxruntime && python -m pip install onnxruntime-gpu
    python benchmarks/gpu_check.py --test_data ../shared/testdata --out gpu_check.json

What it measures, each part in `try` so that one failure still leaves the others' figures:

- `scoring`: the face engine (detection + embedding, `FaceModel.analyze`) on the shared photos at
  `--size`² with the CUDA provider and with the CPU provider, interleaved rounds; images/s of each
  and the median of the per-round ratios (cpu / cuda). With `--dry-run` both sides are the CPU
  provider (the same code, no GPU needed).
- `training`: optimizer steps of the real trainer (`benchmarks/training_step.py`) at the real width
  (24 heads x 128, joint dim 3584) at 1024² with gradient checkpointing, bf16 and `--fp8_base`, each
  with and without `--use_face_as_loss` (`--face_decode face`, the real-size VAE): step seconds, the
  step's peak allocated CUDA memory, and the memory plan's estimate (`trainer/memory_plan.py`) for
  the same blocks and sizes; for two block counts, so that `face_loss_at_60_blocks` scales the DiT
  part to the real 60 blocks. `--dry-run`: the tests' tiny width and VAE at 64², on the CPU.

The exit status is 1 when a part failed (its `error` is in the JSON), else 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_step import (
    StepCosts,
    measure_steps,
    price_at,
    train_argv,
    write_face_dataset,
    write_models,
)

DEFAULT_DATA = Path(os.environ.get("FACE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "testdata"))


SIZES = {  # (full run, --dry-run)
    "scoring_size": (1024, 256),
    "scoring_images": (32, 4),
    "scoring_rounds": (5, 2),
    "train_size": (1024, 64),
    "train_blocks": ((1, 3), (1, 2)),
    "train_rounds": (3, 1),
}


def sized(name: str, dry_run: bool) -> Any:
    return SIZES[name][1 if dry_run else 0]


def square_photos(folder: Path, size: int, count: int) -> list:
    """BGR arrays: the photos centre-cropped square at size², cycled to `count`."""
    import cv2
    from face_consistency.faceid import load_image

    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        raise FileNotFoundError(f"no photos in {folder}")
    squares = []
    for path in photos:
        bgr = load_image(path, channel_order="bgr")
        side = min(bgr.shape[:2])
        top, left = (bgr.shape[0] - side) // 2, (bgr.shape[1] - side) // 2
        squares.append(
            cv2.resize(bgr[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_AREA)
        )
    return [squares[i % len(squares)] for i in range(count)]


def scoring(options: argparse.Namespace) -> dict[str, Any]:
    """Images/s of the engine with the accelerated provider and the CPU one, interleaved rounds."""
    import onnxruntime
    from face_consistency.faceid import load_face_model

    dry = options.dry_run
    images = square_photos(options.test_data / "faces", sized("scoring_size", dry), sized("scoring_images", dry))
    providers = {"accelerated": "cpu" if dry else "cuda", "cpu": "cpu"}
    engines = {
        label: load_face_model(
            options.pack, models_root=options.test_data / "insightface", provider=provider, allow_download=False
        )
        for label, provider in providers.items()
    }
    for engine in engines.values():  # warm-up: CUDA kernels and arenas, onnxruntime's first-run allocations
        engine.analyze(images, channel_order="bgr")
    seconds: dict[str, list[float]] = {label: [] for label in engines}
    for _ in range(sized("scoring_rounds", dry)):
        for label, engine in engines.items():
            start = time.perf_counter()
            results = engine.analyze(images, channel_order="bgr")
            seconds[label].append(time.perf_counter() - start)
    faces = sum(r.ok for r in results)
    return {
        "onnxruntime": onnxruntime.__version__,
        "available_providers": onnxruntime.get_available_providers(),
        "pack": options.pack,
        "images": len(images),
        "size": sized("scoring_size", dry),
        "faces_found": faces,
        **{
            label: {
                "provider": engines[label].provider,
                "images_per_s": len(images) / statistics.median(s),
                "seconds_per_round": s,
            }
            for label, s in seconds.items()
        },
        "speedup_cpu_over_accelerated": statistics.median(
            c / a for c, a in zip(seconds["cpu"], seconds["accelerated"])
        ),
    }


def training(options: argparse.Namespace) -> dict[str, Any]:
    """Steps of the real trainer, bf16 and --fp8_base, with and without the face loss, at two block counts."""
    from face_consistency.faceid import load_face_model

    dry = options.dry_run
    size, rounds = sized("train_size", dry), sized("train_rounds", dry)
    models_root = options.test_data / "insightface"
    engine = load_face_model(options.pack, models_root=models_root, provider="cpu", allow_download=False)
    work = options.work
    dataset = write_face_dataset(work / "data", options.test_data / "faces" / "obama.jpg", engine, size)
    result: dict[str, Any] = {
        "size": size,
        "real_width": not dry,
        "real_vae": not dry,
        "rounds": rounds,
        "variants": {},
    }
    files: dict[int, Any] = {}
    for blocks in sized("train_blocks", dry):
        files[blocks] = write_models(
            work / f"models_{blocks}",
            blocks,
            real_width=not dry,
            real_vae=not dry,
            share=next(iter(files.values()), None),
        )
    for variant, fp8_base in (("bf16", False), ("bf16_fp8_base", True)):
        costs: dict[int, StepCosts] = {}
        for blocks in sized("train_blocks", dry):
            argv = train_argv(
                files[blocks],
                dataset,
                work / f"out_{variant}_{blocks}",
                pack=options.pack,
                models_root=models_root,
                face_device="cpu",
                mixed_precision="bf16",
                fp8_base=fp8_base,
            )
            costs[blocks] = measure_steps(argv, rounds)
        result["variants"][variant] = {
            "by_blocks": {str(n): c.as_json() for n, c in costs.items()},
            "face_loss_at_60_blocks": price_at(costs),
        }
    return result


def environment() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def run_part(report: dict[str, Any], name: str, part: Callable[[], dict[str, Any]]) -> bool:
    started = time.perf_counter()
    try:
        report[name] = part()
        ok = True
    except Exception as exc:
        report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        ok = False
    report[name]["seconds"] = time.perf_counter() - started
    print(
        f"{name}: {'done' if ok else 'FAILED: ' + report[name]['error']} in {report[name]['seconds']:.0f} s", flush=True
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON written")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--test_data", type=Path, default=DEFAULT_DATA, help="folder with insightface/ and faces/")
    parser.add_argument("--pack", default="testpack", help="model pack under TEST_DATA/insightface/models")
    parser.add_argument("--work", type=Path, help="folder for the model files (default: a temporary one, removed)")
    options = parser.parse_args(argv)

    from face_consistency.common.files import atomic_write_json

    if not (options.test_data / "insightface").is_dir():
        parser.error(f"--test_data {options.test_data}: no insightface/ folder there (the test data with its pack)")
    import torch

    if not options.dry_run and not torch.cuda.is_available():
        parser.error("torch sees no CUDA GPU here; --dry-run runs the same code on the CPU")
    started = time.perf_counter()
    report: dict[str, Any] = {"dry_run": options.dry_run, "environment": environment()}
    with tempfile.TemporaryDirectory(prefix="gpu_check_", dir=options.work) as tmp:
        options.work = Path(tmp)
        ok = run_part(report, "scoring", lambda: scoring(options))
        ok = run_part(report, "training", lambda: training(options)) and ok
    report["seconds"] = time.perf_counter() - started
    atomic_write_json(options.out, report)
    print(f"wrote {options.out} in {report['seconds']:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
