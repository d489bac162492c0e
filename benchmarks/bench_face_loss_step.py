"""The face loss's price in a real-size training step, on the CPU (issue 25, item 3).

    python benchmarks/bench_face_loss_step.py [--blocks 1 2] [--size 1024] [--rounds 1] [--warmup 0]
                                              [--mixed_precision no] [--threads 2] [--work DIR]

Optimizer steps of the real trainer (`training_step.py`, shared with `gpu_check.py`) with DiTs of
`--blocks` real-width blocks (24 heads x 128, joint dim 3584; random weights), the real-size VAE, one
face photo as a `--size`² target with its mirror as the control, gradient checkpointing, without and
with `--use_face_as_loss --face_decode face` (the loss on every step). The DiT part is scaled to
Qwen-Image-Edit 2509's 60 blocks by the per-block cost between the two block counts, and the ratio
a real step would have is printed (goal: 1.25x or less). Each step at 1024² takes minutes on 2 CPU
cores; `gpu_check.py` measures the same on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_step import measure_steps, price_at, train_argv, write_face_dataset, write_models

DEFAULT_DATA = Path(os.environ.get("FACE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "testdata"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs=2, default=[1, 2], help="the two DiT depths measured")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=1, help="timed steps of each kind per depth")
    parser.add_argument("--warmup", type=int, default=0, help="untimed rounds first")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--test_data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--pack", default="testpack")
    parser.add_argument("--work", type=Path)
    options = parser.parse_args()

    import torch
    from face_consistency.faceid import load_face_model

    torch.set_num_threads(options.threads)
    models_root = options.test_data / "insightface"
    engine = load_face_model(options.pack, models_root=models_root, provider="cpu", allow_download=False)
    costs, first = {}, None
    with tempfile.TemporaryDirectory(prefix="bench_face_step_", dir=options.work) as tmp:
        work = Path(tmp)
        dataset = write_face_dataset(work / "data", options.test_data / "faces" / "obama.jpg", engine, options.size)
        for blocks in options.blocks:
            files = write_models(work / f"models_{blocks}", blocks, real_width=True, real_vae=True, share=first)
            first = first or files
            argv = train_argv(
                files,
                dataset,
                work / f"out_{blocks}",
                pack=options.pack,
                models_root=models_root,
                face_device="cpu",
                mixed_precision=options.mixed_precision,
                fp8_base=False,
            )
            costs[blocks] = measure_steps(argv, options.rounds, options.warmup)
            figures = costs[blocks].as_json()
            print(
                f"{blocks} block(s): step {figures['step_s_without_face_loss']:.1f} s without the face loss, "
                f"{figures['step_s_with_face_loss']:.1f} s with it (samples in the loss: "
                f"{figures['face_loss_samples']}), ratio {figures['face_loss_step_ratio']:.3f}",
                flush=True,
            )
    price = price_at(costs)
    print(
        json.dumps(
            {
                "size": options.size,
                "mixed_precision": options.mixed_precision,
                "threads": options.threads,
                "load_average": os.getloadavg(),
                **price,
            },
            indent=1,
        )
    )
    print(
        f"a real 2509 step ({price['blocks']} blocks) at {options.size}²: {price['step_s_without']:.0f} s without, "
        f"{price['step_s_with']:.0f} s with the face loss: {price['ratio']:.3f}x (goal 1.25x or less)"
    )


if __name__ == "__main__":
    main()
