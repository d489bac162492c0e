"""Host memory and time of loading a real-width DiT: the marginal bytes of RAM per byte of model.

    /work/venv/bin/python benchmarks/bench_model_loading.py [--blocks 6] [--pack_dir DIR] [--work DIR]

Writes synthetic DiTs in ComfyUI's single-file layout (`model.diffusion_model.` names) at the real
Qwen-Image width (24 heads x 128, joint dim 3584), with 1 block and with `--blocks` blocks, each as
bf16 and as an `_fp8_e4m3fn` copy (matrices float8, vectors bf16), then runs one short training
step (bf16, gradient checkpointing: the seed guide's flags) of the real `face-consistency train`
command (bootstrap.py of `--pack_dir`, default this
checkout: point it at a checkout of an older commit to measure that code) on each, in a fresh
process, and reads the process's peak RSS. The text encoder and VAE are tiny (the text encoder's
hidden size is the DiT's joint dim), so they are part of the fixed share that the ratio removes:

    marginal RAM per model byte = (peak_N - peak_1) / (bytes_N - bytes_1)

bytes are those of the bf16 files for a bf16 run, of the float8 files for `--fp8_base` (what
float8 storage holds). Targets (issue 11): <= 1.15 for a bf16 run from the bf16 file, and for
`--fp8_base` from either file. Also printed: loading time of the bf16 and fp8 files in this
process against a plain read of the same file. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import gc
import json
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from training_step import REAL_WIDTH  # noqa: E402 - the benchmarks folder is not a package

DIT_PREFIX = "model.diffusion_model."
# The seed guide's precision and memory flags. Without gradient checkpointing, layerwise casting
# (--fp8_base) keeps every layer's upcast weight alive for the backward pass.
COMMON_FLAGS = ["--mixed_precision", "bf16", "--gradient_checkpointing"]
# (label, which file, extra flags, which bytes the ratio is taken against)
RUNS: tuple[tuple[str, str, list[str], str], ...] = (
    ("bf16 file, bf16 run", "bf16", [], "bf16"),
    ("fp8 file, bf16 run", "fp8", [], "bf16"),
    ("bf16 file, --fp8_base", "bf16", ["--fp8_base"], "fp8"),
    ("fp8 file, --fp8_base", "fp8", ["--fp8_base"], "fp8"),
)


def write_dits(folder: Path, blocks: int) -> dict[str, Path]:
    """Random real-width DiTs of `blocks` blocks as ComfyUI bf16 and `_fp8_e4m3fn` single files."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    config = {**REAL_WIDTH, "num_layers": blocks}
    with init_empty_weights():
        shapes = {k: v.shape for k, v in QwenImageTransformer2DModel(**config).state_dict().items()}
    generator = torch.Generator().manual_seed(blocks)
    bf16 = {DIT_PREFIX + k: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    paths = {
        "bf16": folder / f"qwen_image_edit_{blocks}blocks_bf16.safetensors",
        "fp8": folder / f"qwen_image_edit_{blocks}blocks_fp8_e4m3fn.safetensors",
    }
    save_bf16_and_fp8(bf16, paths, {"config": json.dumps(config)})
    return paths


def save_bf16_and_fp8(bf16: dict, paths: dict[str, Path], metadata: dict[str, str]) -> None:
    """Write `bf16` to paths["bf16"] and an `_fp8_e4m3fn` copy (matrices float8, vectors bf16) to
    paths["fp8"]; `bf16` is emptied once the float8 copy exists (the caller keeps no bf16 tensors)."""
    import torch
    from safetensors.torch import save_file

    save_file(bf16, str(paths["bf16"]), metadata=metadata)
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in bf16.items()}
    bf16.clear()
    save_file(fp8, str(paths["fp8"]), metadata=metadata)
    del fp8
    gc.collect()


def child(pack_dir: str, peak_file: str, argv: list[str]) -> None:
    """Run `train` through the pack's bootstrap.py, then record this process's peak RSS.

    VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss starts at its parent's at fork."""
    sys.argv = [str(Path(pack_dir) / "bootstrap.py"), "train", *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        status = Path("/proc/self/status").read_text()
        peak_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        Path(peak_file).write_text(str(peak_kib * 1024))


def peak_rss_of_training(pack_dir: Path, argv: list[str], peak_file: Path) -> float:
    """Peak RSS in bytes of one `train` run in a fresh process."""
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(pack_dir), str(peak_file), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"training failed:\n{result.stderr[-3000:]}")
    return float(peak_file.read_text())


def plain_read_seconds(path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(64 * 2**20):
            pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=6, help="blocks of the larger DiT (the smaller has 1)")
    parser.add_argument("--pack_dir", type=Path, default=REPO_ROOT, help="pack checkout whose trainer runs")
    parser.add_argument("--work", type=Path, help="folder for the files (default: a temporary one, removed)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options.child[0], options.child[1], options.child[2:])
        return

    from tiny_qwen import tiny_train_argv, write_tiny_dataset, write_tiny_model_files

    with tempfile.TemporaryDirectory(prefix="bench_loading_", dir=options.work) as tmp:
        work = Path(tmp)
        tiny = write_tiny_model_files(work / "tiny", transformer_config={**REAL_WIDTH, "num_layers": 1})
        dataset = write_tiny_dataset(work / "data", n=1, size=(64, 64))
        dits = {n: write_dits(work, n) for n in (1, options.blocks)}
        sizes = {n: {kind: path.stat().st_size for kind, path in files.items()} for n, files in dits.items()}
        print(f"real-width DiT files (24 x 128 heads, joint dim 3584), 1 and {options.blocks} blocks:")
        for n in dits:
            print(f"  {n} block(s): bf16 {sizes[n]['bf16'] / 2**30:.2f} GiB, fp8 {sizes[n]['fp8'] / 2**30:.2f} GiB")
        print(f"trainer: {options.pack_dir}")
        print(f"{'run':<26}{'peak 1 (GiB)':>14}{f'peak {options.blocks} (GiB)':>14}{'per byte':>10}  against")
        for label, kind, flags, against in RUNS:
            peaks = {}
            for n in (1, options.blocks):
                argv = tiny_train_argv(
                    tiny,
                    dataset,
                    work / f"out_{kind}_{n}_{len(flags)}",
                    max_train_steps=1,
                    extra=[*COMMON_FLAGS, "--dit", str(dits[n][kind]), *flags],
                )
                peaks[n] = peak_rss_of_training(options.pack_dir, argv, work / "peak")
            ratio = (peaks[options.blocks] - peaks[1]) / (sizes[options.blocks][against] - sizes[1][against])
            print(
                f"{label:<26}{peaks[1] / 2**30:>14.2f}{peaks[options.blocks] / 2**30:>14.2f}{ratio:>10.2f}"
                f"  {against} bytes"
            )

        import torch
        from face_consistency.trainer import models

        print(
            f"loading the {options.blocks}-block files in this process with this checkout's loader (page cache warm):"
        )
        for kind, fp8_base in (("bf16", False), ("fp8", False), ("bf16", True)):
            path = dits[options.blocks][kind]
            read = plain_read_seconds(path)
            started = time.perf_counter()
            model = models.load_transformer(path, torch.bfloat16, fp8_base=fp8_base)
            load = time.perf_counter() - started
            del model
            gc.collect()
            label = f"{kind} file" + (", --fp8_base" if fp8_base else "")
            print(f"  {label:<24} load {load:6.2f} s, plain read {read:6.2f} s: {load / read:5.2f}x")


if __name__ == "__main__":
    main()
