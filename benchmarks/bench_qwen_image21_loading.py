"""Host memory of loading a real-width Qwen-Image 2.1 DiT: the marginal bytes of RAM per byte of model.

    /work/venv/bin/python benchmarks/bench_qwen_image21_loading.py [--blocks 6] [--work DIR]

Writes synthetic 2.1 DiTs in ComfyUI's single-file layout (`model.diffusion_model.` names, each
block's gate and up projections fused into `img_mlp.gate_up`) at the real width (32 heads x 128,
text dim 4096, SwiGLU 3 x 4096), with 1 block and with `--blocks` blocks, as bf16 and as an
`_fp8_e4m3fn` copy (matrices float8, vectors bf16). Each is loaded by
`trainer/qwen_image21_loading.load_transformer` (bf16, and with `--fp8_base`) in a fresh process
that first sets the trainer's allocator setting (`trainer/host_memory.py`), and the process's peak
RSS is read:

    marginal RAM per model byte = (peak_N - peak_1) / (bytes_N - bytes_1)

bytes are those of the bf16 files for a bf16 load, of the float8 files for `--fp8_base`. Target
(issue 24): <= 1.15, as for 2509 (`bench_model_loading.py`, which measures the whole `train`
command: 2.1 cannot be trained yet, so this measures the loader alone). Not a test: figures only.
"""

from __future__ import annotations

import argparse
import json
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))

DIT_PREFIX = "model.diffusion_model."
# (label, which file, --fp8_base, which bytes the ratio is taken against)
RUNS = (
    ("bf16 file, bf16", "bf16", False, "bf16"),
    ("fp8 file, bf16", "fp8", False, "bf16"),
    ("bf16 file, --fp8_base", "bf16", True, "fp8"),
    ("fp8 file, --fp8_base", "fp8", True, "fp8"),
)
CHILD = """
import runpy, sys, time
from pathlib import Path
runpy.run_path(sys.argv[1] + "/bootstrap.py")["load_pack"](Path(sys.argv[1]))  # this checkout as the package
from face_consistency.trainer.host_memory import map_large_allocations
map_large_allocations()
import torch
from face_consistency.trainer import qwen_image21_loading
started = time.perf_counter()
model = qwen_image21_loading.load_transformer(sys.argv[2], torch.bfloat16, fp8_base=sys.argv[3] == "1")
seconds = time.perf_counter() - started
status = Path("/proc/self/status").read_text()
peak_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
print(peak_kib * 1024, seconds)
"""


def write_dits(folder: Path, blocks: int) -> dict[str, Path]:
    """Random real-width 2.1 DiTs of `blocks` blocks as ComfyUI bf16 and `_fp8_e4m3fn` single files."""
    import torch
    from accelerate import init_empty_weights
    from bench_model_loading import save_bf16_and_fp8
    from diffusers import QwenImage21Transformer2DModel
    from face_consistency.trainer import models, qwen_image21_loading  # this checkout's (main() loads it)
    from tiny_qwen_image21 import fuse_gate_up

    config = {**models.shipped_config(qwen_image21_loading.TRANSFORMER_CONFIG), "num_layers": blocks}
    with init_empty_weights():
        shapes = {k: v.shape for k, v in QwenImage21Transformer2DModel(**config).state_dict().items()}
    generator = torch.Generator().manual_seed(blocks)
    bf16 = {k: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    bf16 = {DIT_PREFIX + k: v for k, v in fuse_gate_up(bf16).items()}
    paths = {
        "bf16": folder / f"qwen_image_2.1_{blocks}blocks_bf16.safetensors",
        "fp8": folder / f"qwen_image_2.1_{blocks}blocks_fp8_e4m3fn.safetensors",
    }
    save_bf16_and_fp8(bf16, paths, {"config": json.dumps(config)})
    return paths


def load_in_fresh_process(path: Path, fp8_base: bool) -> tuple[float, float]:
    """(peak RSS in bytes, loading seconds) of one load in a new Python."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO_ROOT), str(path), "1" if fp8_base else "0"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"loading failed:\n{result.stderr[-3000:]}")
    peak, seconds = result.stdout.split()[-2:]
    return float(peak), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=6, help="blocks of the larger DiT (the smaller has 1)")
    parser.add_argument("--work", type=Path, help="folder for the files (default: a temporary one, removed)")
    options = parser.parse_args()
    runpy.run_path(str(REPO_ROOT / "bootstrap.py"))["load_pack"](REPO_ROOT)

    with tempfile.TemporaryDirectory(prefix="bench_q21_loading_", dir=options.work) as tmp:
        work = Path(tmp)
        dits = {n: write_dits(work, n) for n in (1, options.blocks)}
        sizes = {n: {kind: path.stat().st_size for kind, path in files.items()} for n, files in dits.items()}
        print(f"real-width Qwen-Image 2.1 DiT files (32 x 128 heads, fused gate_up), 1 and {options.blocks} blocks:")
        for n in dits:
            print(f"  {n} block(s): bf16 {sizes[n]['bf16'] / 2**30:.2f} GiB, fp8 {sizes[n]['fp8'] / 2**30:.2f} GiB")
        print(
            f"{'load':<24}{'peak 1 (GiB)':>14}{f'peak {options.blocks} (GiB)':>14}{'per byte':>10}"
            f"{f'{options.blocks} blocks (s)':>16}  against"
        )
        for label, kind, fp8_base, against in RUNS:
            peaks, seconds = {}, {}
            for n in (1, options.blocks):
                peaks[n], seconds[n] = load_in_fresh_process(dits[n][kind], fp8_base)
            ratio = (peaks[options.blocks] - peaks[1]) / (sizes[options.blocks][against] - sizes[1][against])
            print(
                f"{label:<24}{peaks[1] / 2**30:>14.2f}{peaks[options.blocks] / 2**30:>14.2f}{ratio:>10.2f}"
                f"{seconds[options.blocks]:>16.1f}  {against} bytes"
            )
        started = time.perf_counter()
        with open(dits[options.blocks]["bf16"], "rb") as f:
            while f.read(64 * 2**20):
                pass
        print(f"plain read of the {options.blocks}-block bf16 file: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
