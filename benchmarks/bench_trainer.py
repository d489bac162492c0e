"""Training speed and peak memory of the tiny Qwen-Image-Edit config, with and without gradient checkpointing.

    /work/venv/bin/python benchmarks/bench_trainer.py [--size 128] [--steps 30] [--repeats 3] [--mixed_precision no]

Each configuration runs the real trainer (`face-consistency train`) in a fresh child process on
the tiny random models of tests/support/tiny_qwen.py; printed per configuration: steps/s (the trainer's
own figure, over its last 20 steps), the child's peak resident memory, and on CUDA the peak
allocated GPU memory; the best of `--repeats` interleaved runs. Caching happens once, before the
timed runs. On a CPU the peak RSS is dominated by the libraries (torch, diffusers, transformers),
not by the tiny model's activations. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))


def child(argv_file: str) -> None:
    """Run one training job and print its figures as JSON (in the child process)."""
    import torch
    from face_consistency.cli import main
    from face_consistency.training_contract.protocol import read_status

    argv = json.loads(Path(argv_file).read_text())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rc = main(["train", *argv])
    status = read_status(argv[argv.index("--output_dir") + 1]) or {}
    print(
        json.dumps(
            {
                "rc": rc,
                "state": status.get("state"),
                "steps_per_sec": status.get("steps_per_sec"),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            }
        )
    )


def run(argv: list[str], work: Path, name: str) -> dict:
    argv_file = work / f"{name}.json"
    argv_file.write_text(json.dumps(argv))
    result = subprocess.run([sys.executable, __file__, "--child", str(argv_file)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="training image side in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (best is printed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options.child)
        return

    from tiny_qwen import tiny_train_argv, write_tiny_dataset, write_tiny_model_files

    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        work = Path(tmp)
        files = write_tiny_model_files(work / "models")
        dataset = write_tiny_dataset(work / "data", n=4, size=(options.size, options.size))
        common = ["--mixed_precision", options.mixed_precision]
        run(tiny_train_argv(files, dataset, work / "warmup", max_train_steps=1, extra=common), work, "warmup")
        print(
            f"tiny Qwen-Image-Edit, {options.size}x{options.size} target + control, batch 1, "
            f"{options.steps} steps, mixed precision {options.mixed_precision}"
        )
        configurations = {"plain": [], "gradient checkpointing": ["--gradient_checkpointing"]}
        best: dict[str, dict] = {}
        # Interleaved repeats, best of each: a shared machine's load only ever slows a run down.
        for repeat in range(options.repeats):
            for label, extra in configurations.items():
                name = f"{label.replace(' ', '_')}_{repeat}"
                argv = tiny_train_argv(
                    files, dataset, work / name, max_train_steps=options.steps, extra=[*common, *extra]
                )
                figures = run(argv, work, name)
                if label not in best or figures["steps_per_sec"] > best[label]["steps_per_sec"]:
                    best[label] = figures
        print(
            f"{'configuration':<28}{'steps/s':>10}{'peak RSS MiB':>15}{'peak CUDA MiB':>15}   (best of "
            f"{options.repeats})"
        )
        for label, figures in best.items():
            cuda = f"{figures['cuda_peak_mib']:.1f}" if figures["cuda_peak_mib"] is not None else "-"
            print(f"{label:<28}{figures['steps_per_sec']:>10.2f}{figures['peak_rss_mib']:>15.1f}{cuda:>15}")


if __name__ == "__main__":
    main()
