"""Training steps of the real trainer at a chosen width, with and without the face loss: one home for
`gpu_check.py` and `bench_face_loss_step.py`.

`write_models` writes random DiTs of a few blocks (the real Qwen-Image width, `REAL_WIDTH`: 24 heads x
128, joint dim 3584, or the tests' tiny one) beside a VAE (the real-size config or the tiny one) and a
tiny text encoder; `write_face_dataset` one face photo cropped square as target and mirrored as
control. `measure_steps` then runs what `TrainingRun.run` runs (the encoders, the latent and face-target
caches, the memory plan, `prepare_training`) and times `TrainingRun.accumulate` (one optimizer step:
forward, backward, optimizer) without and with the face loss, interleaved so other load on the
machine hits both alike; on CUDA it also reads each step's peak allocated memory. `price_at` scales
the DiT part to 60 blocks by the per-block cost measured between two block counts.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))

REAL_WIDTH = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
REAL_BLOCKS = 60  # Qwen-Image-Edit 2509's transformer blocks
# the face loss on every step, whatever t, and no x0 metrics in the timed steps (`--face_eval_frequency`)
FACE_LOSS_FLAGS = [
    "--use_face_as_loss",
    "--face_decode",
    "face",
    "--face_loss_max_t",
    "1",
    "--face_loss_every",
    "1",
    "--face_eval_frequency",
    "1000",
]


def write_models(folder: Path, blocks: int, *, real_width: bool, real_vae: bool, share=None):
    """Random model files (tests/support/tiny_qwen.py's layout) with a DiT of `blocks` blocks. `share`: earlier
    files whose VAE and text encoder to use instead (so their latent and text caches are reused)."""
    from face_consistency.trainer.models import VAE_CONFIG, shipped_config
    from tiny_qwen import TINY_TRANSFORMER_CONFIG, TINY_VAE_CONFIG, write_tiny_model_files

    width = REAL_WIDTH if real_width else TINY_TRANSFORMER_CONFIG
    vae = shipped_config(VAE_CONFIG) if real_vae else TINY_VAE_CONFIG
    files = write_tiny_model_files(folder, transformer_config={**width, "num_layers": blocks}, vae_config=vae)
    if share is None:
        return files
    return replace(files, vae=share.vae, text_encoder=share.text_encoder, tokenizer_dir=share.tokenizer_dir)


def write_face_dataset(folder: Path, photo: Path, engine, size: int) -> Path:
    """One item: the photo cropped square around its face at size², its mirror as the control."""
    from tiny_qwen import write_tiny_dataset

    return write_tiny_dataset(folder, n=1, with_face_photos=[photo], face_model=engine, size=(size, size))


def train_argv(
    files,
    dataset: Path,
    out: Path,
    *,
    pack: str,
    models_root: Path,
    face_device: str,
    mixed_precision: str,
    fp8_base: bool,
) -> list[str]:
    """The seed guide's memory flags (gradient checkpointing) and the face loss (`FACE_LOSS_FLAGS`)."""
    from tiny_qwen import tiny_train_argv

    extra = [
        "--gradient_checkpointing",
        "--mixed_precision",
        mixed_precision,
        "--face_model_name",
        pack,
        "--face_models_root",
        str(models_root),
        "--face_device",
        face_device,
        *FACE_LOSS_FLAGS,
    ]
    return tiny_train_argv(files, dataset, out, max_train_steps=100, extra=extra + (["--fp8_base"] if fp8_base else []))


@dataclass
class StepCosts:
    """Seconds and peak CUDA bytes of each timed step; the memory plan's totals for the same run."""

    seconds: dict[bool, list[float]]  # keyed by "with the face loss"
    face_samples: list[int]  # samples the face loss took per step with it (`face/loss_samples`)
    peak_bytes: dict[bool, int | None]
    plan_bytes: dict[bool, int]
    plan_parts: dict[bool, dict[str, int]]

    def median(self, face: bool) -> float:
        return statistics.median(self.seconds[face])

    @property
    def face_ratio(self) -> float:
        """Median of the per-round ratios (with / without, back to back)."""
        return statistics.median(w / wo for w, wo in zip(self.seconds[True], self.seconds[False]))

    def as_json(self) -> dict[str, Any]:
        peak_with = self.peak_bytes[True]
        return {
            "step_s_without_face_loss": self.median(False),
            "step_s_with_face_loss": self.median(True),
            "face_loss_step_ratio": self.face_ratio,
            "steps_timed": len(self.seconds[False]),
            "face_loss_samples": self.face_samples,
            "peak_cuda_bytes_without": self.peak_bytes[False],
            "peak_cuda_bytes_with": self.peak_bytes[True],
            "plan_bytes_without": self.plan_bytes[False],
            "plan_bytes_with": self.plan_bytes[True],
            "plan_parts_with": self.plan_parts[True],
            "peak_over_plan_with": peak_with / self.plan_bytes[True] if peak_with is not None else None,
        }


def measure_steps(argv: list[str], rounds: int, warmup: int = 1) -> StepCosts:
    """`rounds` timed optimizer steps without and with the face loss, after `warmup` untimed rounds."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from face_consistency.trainer.cli import parse_args, validate_args
    from face_consistency.trainer.face.hook import build_training_hook
    from face_consistency.trainer.flow_matching import collate
    from face_consistency.trainer.job_status import StatusReporter, StopSignal
    from face_consistency.trainer.memory_plan import estimate
    from face_consistency.trainer.train import TrainingRun, memory_inputs

    args = validate_args(parse_args(argv))
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    try:
        hook = build_training_hook(args)
        run = TrainingRun(args, accelerator, StatusReporter(Path(args.output_dir), False, {}), StopSignal(), [hook])
        encoders = run.load_encoders()
        run.cache_dataset(encoders)
        run.prepare_samples_and_hooks(encoders)
        without = replace(args, use_face_as_loss=False)
        plans = {
            False: estimate(memory_inputs(without, run.group, [])),
            True: estimate(memory_inputs(args, run.group, [hook])),
        }
        del encoders  # as TrainingRun.run: the text encoder goes before the DiT loads
        gc.collect()
        cuda = run.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
        run.prepare_training()
        batch = collate(run.group.items)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        face_samples: list[int] = []
        peaks: dict[bool, int | None] = {False: None, True: None}
        for round_ in range(warmup + rounds):  # warm-up: kernel choice, the optimizer's state
            for face in (False, True):
                run.hooks = [hook] if face else []
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                _, extra = run.accumulate(batch)
                if cuda:
                    torch.cuda.synchronize()
                    peaks[face] = max(peaks[face] or 0, torch.cuda.max_memory_allocated())
                if round_ >= warmup:
                    seconds[face].append(time.perf_counter() - start)
                    if face:
                        face_samples.append(int(extra.metrics.get("face/loss_samples", 0)))  # a count in the metrics
        return StepCosts(
            seconds, face_samples, peaks, {k: p.total for k, p in plans.items()}, {k: p.parts for k, p in plans.items()}
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def price_at(costs: dict[int, StepCosts], blocks: int = REAL_BLOCKS) -> dict[str, float]:
    """The face loss's step ratio with the DiT scaled to `blocks` blocks.

    With two block counts a < b: per block = (without(b) - without(a)) / (b - a), the rest of a step
    without the loss = without(a) - a * per block, and the loss's own cost = with - without (the median
    over both counts; it does not depend on the DiT's depth)."""
    a, b = sorted(costs)
    per_block = (costs[b].median(False) - costs[a].median(False)) / (b - a)
    rest = costs[a].median(False) - a * per_block
    face = statistics.median([costs[n].median(True) - costs[n].median(False) for n in (a, b)])
    without = rest + blocks * per_block
    return {
        "blocks": blocks,
        "per_block_s": per_block,
        "rest_of_step_s": rest,
        "face_loss_s": face,
        "step_s_without": without,
        "step_s_with": without + face,
        "ratio": (without + face) / without,
    }
