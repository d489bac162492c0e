"""Does the face loss help? Tier 1 of issue 21: the loss design on a generator that can draw faces.

    python benchmarks/bench_face_loss_tier1.py --out DIR [--seeds 1,2,3] [--arms mse,face,...] [--heldout 64]
           [--lora_steps 200] [--pretrain_steps 4000] [--cache ~/.cache/face_consistency_bench] [--threads 1]

Needs the `[evidence]` extra (gan-face-generate, a DCGAN trained on DigiFace-1M, research-only: its faces
are written only into DIR, which must lie outside the repository, and the cache) and the `[judge]` extra
(dlib). Every stage prints its wall time.

Setup
-----
- People: z vectors of the DCGAN (64x64 RGB), split by identity into pre-training people, LoRA-training
  people and held-out people (each role its own seeded stream). Kept are those in whom the engine
  (test pack, on a 2x upscale) finds a face in control and target, and for held-out people also in the
  second view, and dlib finds one in target and second view.
- The edit, whose right answer is known for everyone: target = grade(re-pose(control)) (rotation
  `--lora_angle` 20 deg, scale `--lora_scale` 0.82, shift (3, 2) px, mirrored border; gamma 0.85, RGB gains
  1.12/1.0/0.82). The model must re-render the face; copying pixels is wrong. The base is pre-trained on a
  milder re-pose (12 deg, scale 0.88, the same shift and grade), so it can draw and re-pose faces and the
  LoRA still has something to learn: with the base pre-trained on the very edit the LoRA trains, neither
  the positive control nor MSE on the held-out people's own pairs moved dlib (the run of 2026-12-06 in
  docs/face-loss.md); with the base on the colour grade only, 200 LoRA steps drew no face dlib finds.
- A second view of a person: the DCGAN at z + 0.3 * noise, re-posed at random (+-8 deg, +-5 % scale,
  +-2 px), no grade. It is the identity reference the judges score against beside the known target.
- The generator: a small U-Net doing conditional flow matching in pixel space (no VAE to cap identity),
  x_t = (1 - t) x0 + t noise, velocity target noise - x0, the trainer's `shift` timestep sampling (shift
  1 for the pre-training, so that low t, where the last sampling steps and the face loss work, is well
  learnt; the seed guide's 2.2 for the LoRA runs); pre-trained on the pre-training people, EMA weights,
  cached by a hash of its settings and data. Judged samples: Euler, 12 steps, linear schedule, the same
  noise per held-out person in every run.
- Arms: per seed a fresh peft LoRA (rank 8, every conv) on the same base, trained on the LoRA-training
  people with the same data order, timesteps and noise in every arm (only the loss differs):
    mse       MSE only
    face      + FaceIdentityLoss at today's defaults: weight 0.1, the control's identity, max_t 0.5, every step
    face_w1   + the same at weight `--high_weight` (1.0)
    target    + weight 0.1 with the target's identity as the reference
    infonce   + weight 0.1 and an InfoNCE term (contrastive_weight 0.1, temperature 0.07) with the
              pre-training people's embeddings as negatives
    rollout   + weight 0.1 on a differentiable `--rollout_steps`-step Euler rollout from x_t to t = 0
              instead of the one-step estimate x0_hat = x_t - t v
    positive  positive control: + `--pc_weight` (16) x the velocity MSE inside the target's face box, every t
    hack      + weight `--hack_weight` (10), the identity-hacking probe, first seed only
    oracle    MSE only, trained on the held-out people's own pairs (train on test): not a candidate, a
              check of how large an identity gain a LoRA of this size can show here (reported only)
  The loss is trainer/face/loss.py called unchanged: keypoints detected by the engine on the known
  target (128 px upscale, then halved), `FrozenFaceRecognizer.from_pack(pack)`, its warp and t-gating.

Judges (each with its own detector)
-----------------------------------
- dlib (faceid/judge.py, never trained through): similarity = 1 - distance / 1.2 of each held-out
  sample to the person's second view (`dlib_view`, the PRIMARY endpoint) and to the known target
  (`dlib_target`). No other recognizer that the loss does not train through is available here (the
  test pack holds only the one the loss uses), so dlib is the only independent judge.
- engine (test pack, onnxruntime; the same network the loss trains through): cosine to the second view
  and to the target (`engine_view`, `engine_target`), reported separately as the HACKABLE score.
- Edit adherence: `landmark_err`, mean distance (px at 64) of the engine's 5 keypoints on the sample to
  those on the known target; `outside_err`, mean |sample - target| (0..255) outside the target's face box.
- `change_vs_mse`: mean |sample - the MSE arm's sample of the same seed| (0..255); `dlib_found`,
  `engine_found`: 1 when that judge finds a face in the sample (reported, not part of the rule).
Calibration before anything is compared: for each judge the ROC-AUC of same-person pairs (known target vs
its second view) against different-person pairs (target vs another held-out person's second view), at 64
px as judged; a judge under 0.95 is reported as failing (its gains are printed but it decides nothing).
Headroom: the gap between the known targets' `dlib_view` (the ceiling) and the MSE arm's must be at
least 0.02 with its interval above 0, else the benchmark says the edit is too easy.

Decision rule (fixed before any run)
-----------------------------------
Per arm and metric the endpoint is the per-face paired difference to the MSE arm (same seed, same
person), averaged over faces and seeds, with a 95% percentile bootstrap interval (2000 resamples of the
held-out people; each resampled person carries all its seeds, so seeds stay blocks). A face a judge does
not find is left out of that judge's pairs.
- The positive control MOVED when its `dlib_view` interval lies above 0. If it did not, or dlib failed
  its calibration, or the headroom check failed, every arm is INCONCLUSIVE (the benchmark could not
  have seen a gain).
- Edit adherence is WORSE when the interval of the increase of `landmark_err` or of `outside_err` lies
  above 0.
- HELPS: `dlib_view` gain >= 0.01 with its interval above 0, and adherence not worse.
  (TRADE-OFF: the same gain, adherence worse.)
- HACKS: `engine_view`'s interval above 0 while `dlib_view`'s is not.
- HURTS: `dlib_view`'s interval below 0.
- SMALL: `dlib_view`'s interval above 0 but the gain under 0.01.
- INERT: none of the above (nothing moves while the positive control does).

Output (re-judgeable): DIR/people/<person>_{control,view,target}.png, DIR/samples/<arm>/seed<s>/<person>.png
and DIR/manifest.json (settings, calibration, every sample's arm, seed, person, file and scores, the
endpoints and verdicts), so anyone can re-score the same images with another recognizer.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from face_consistency.common.files import atomic_write_json
from face_consistency.faceid import FaceResult, load_face_model
from face_consistency.faceid.judge import load_judge, verdict
from face_consistency.trainer.face.loss import FaceIdentityLoss, FrozenFaceRecognizer
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
from bench_face_vae_ceiling import DEFAULT_DATA, fast_cpu  # noqa: E402
from face_tier1_data import (  # noqa: E402
    DETECT_SIZE,
    IMAGE_SIZE,
    ROLE_SEEDS,
    Edit,
    FaceSource,
    NetSettings,
    View,
    euler,
    identities,
    noised,
    pretrained_base,
    sample,
    sample_t,
    shuffled_batches,
    to_uint8,
    upscale,
)

DEFAULT_CACHE = Path.home() / ".cache" / "face_consistency_bench"
HELPS_GAIN = 0.01  # dlib similarity scale
HEADROOM_GAP = 0.02
AUC_FLOOR = 0.95
PRIMARY, HACKABLE = "dlib_view", "engine_view"
ADHERENCE = ("landmark_err", "outside_err")
METRICS = (
    "dlib_view",
    "dlib_target",
    "engine_view",
    "engine_target",
    "landmark_err",
    "outside_err",
    "face_err",
    "dlib_found",
    "engine_found",
    "change_vs_mse",
)


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    weight: float = 0.0  # FaceIdentityLoss weight; 0: no face loss
    reference: str = "control"
    contrastive_weight: float = 0.0
    rollout_steps: int = 0
    face_box_mse: float = 0.0
    first_seed_only: bool = False
    train_on_heldout: bool = False


def make_arms(args: argparse.Namespace) -> list[Arm]:
    return [
        Arm("mse", "MSE only"),
        Arm("face", "face loss, today's defaults (w 0.1, control ref, max_t 0.5)", weight=0.1),
        Arm("face_w1", f"face loss weight {args.high_weight:g}", weight=args.high_weight),
        Arm("target", "face loss w 0.1, target's identity as reference", weight=0.1, reference="target"),
        Arm(
            "infonce",
            f"face loss w 0.1 + InfoNCE (w {args.contrastive_weight:g}, T {args.temperature:g})",
            weight=0.1,
            contrastive_weight=args.contrastive_weight,
        ),
        Arm(
            "rollout",
            f"face loss w 0.1 on a {args.rollout_steps}-step rollout",
            weight=0.1,
            rollout_steps=args.rollout_steps,
        ),
        Arm(
            "positive", f"positive control: + {args.pc_weight:g} x MSE inside the face box", face_box_mse=args.pc_weight
        ),
        Arm(
            "hack",
            f"face loss weight {args.hack_weight:g} (hacking probe)",
            weight=args.hack_weight,
            first_seed_only=True,
        ),
        Arm("oracle", "sensitivity check: MSE only, trained on the held-out people's own pairs", train_on_heldout=True),
    ]


# --------------------------------------------------------------------------- people


@dataclass
class People:
    """One role's people who pass the detectors: images [N, 3, 64, 64] in [-1, 1], engine results at 64 px."""

    role: str
    index: list[int]  # position in the role's seeded stream (the person id)
    control: torch.Tensor
    target: torch.Tensor
    view: torch.Tensor | None
    kps: torch.Tensor  # [N, 5, 2] engine keypoints on the target, 64 px
    box: torch.Tensor  # [N, 4] engine face box on the target, 64 px
    emb_control: torch.Tensor  # [N, D] engine embeddings (unit norm)
    emb_target: torch.Tensor
    emb_view: torch.Tensor | None = None
    dlib_target: np.ndarray | None = None  # [N, 128]
    dlib_view: np.ndarray | None = None
    candidates: int = 0

    def __len__(self) -> int:
        return len(self.index)

    def person_id(self, i: int) -> str:
        return f"{self.role}{self.index[i]:05d}"

    def judged_views(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(emb_view, dlib_target, dlib_view): what the judging needs, found with a view and the judge."""
        if self.emb_view is None or self.dlib_target is None or self.dlib_view is None:
            raise ValueError(f"the {self.role} people were found without second views or without the dlib judge")
        return self.emb_view, self.dlib_target, self.dlib_view


def engine_results(engine, images: torch.Tensor) -> list[FaceResult]:
    """The engine's largest face of each 64 px image, analysed on a 2x upscale, coordinates at 64 px
    (InsightFace's convention: pixel i has its centre at i, so x64 = (x128 + 0.5) / 2 - 0.5)."""
    results = engine.analyze([upscale(a) for a in to_uint8(images)])
    ratio = IMAGE_SIZE / DETECT_SIZE
    for r in results:
        if r.face is not None:
            r.face.kps = (np.asarray(r.face.kps, np.float32) + 0.5) * ratio - 0.5
            r.face.bbox = np.asarray(r.face.bbox, np.float32) * ratio  # box edges: no half-pixel shift
            r.image_size = (IMAGE_SIZE, IMAGE_SIZE)
    return results


def find_people(
    role: str,
    count: int,
    source: FaceSource,
    edit: Edit,
    view: View | None,
    engine,
    judge,
    chunk: int = 256,
    max_candidates: int = 20000,
) -> People:
    """The first `count` people of the role's stream whose faces every needed detector finds."""
    kept: dict[str, list] = {
        k: [] for k in ("index", "control", "target", "view", "kps", "box", "ec", "et", "ev", "dt", "dv")
    }
    offset = 0
    while len(kept["index"]) < count and offset < max_candidates:
        n = min(chunk, max(16, int((count - len(kept["index"])) * 1.5)))
        z = identities(role, n, offset)
        control = source.render(z)
        target = edit.apply(control)
        views = view.render(source, z, ROLE_SEEDS["views"] + offset) if view is not None else None
        rc, rt = engine_results(engine, control), engine_results(engine, target)
        rv: list[FaceResult | None] = [*engine_results(engine, views)] if views is not None else [None] * n
        for i in range(n):
            # `ok` is a face with its embedding
            c, t, v = rc[i].embedding, rt[i].face, rv[i]
            if c is None or t is None or t.embedding is None or (v is not None and v.embedding is None):
                continue
            if judge is not None:
                if views is None:
                    raise ValueError("the judge compares each target with its second view: give a view")
                jt, jv = judge.judge(to_uint8(target[i : i + 1])[0]), judge.judge(to_uint8(views[i : i + 1])[0])
                if not (jt.ok and jv.ok):
                    continue
                kept["dt"].append(jt.descriptor)
                kept["dv"].append(jv.descriptor)
            kept["index"].append(offset + i)
            kept["control"].append(control[i])
            kept["target"].append(target[i])
            if views is not None and v is not None and v.embedding is not None:
                kept["view"].append(views[i])
                kept["ev"].append(torch.from_numpy(v.embedding))
            kept["kps"].append(torch.from_numpy(np.asarray(t.kps, np.float32)))
            kept["box"].append(torch.from_numpy(np.asarray(t.bbox, np.float32)))
            kept["ec"].append(torch.from_numpy(c))
            kept["et"].append(torch.from_numpy(t.embedding))
            if len(kept["index"]) == count:
                break
        offset += n
    if len(kept["index"]) < count:
        raise SystemExit(
            f"only {len(kept['index'])} of {offset} {role} candidates have faces every detector finds; "
            f"asked for {count}"
        )

    def maybe_stack(key: str) -> torch.Tensor | None:  # the views' lists are empty without views
        return torch.stack(kept[key]) if kept[key] else None

    return People(
        role,
        kept["index"],
        torch.stack(kept["control"]),
        torch.stack(kept["target"]),
        maybe_stack("view"),
        torch.stack(kept["kps"]),
        torch.stack(kept["box"]),
        torch.stack(kept["ec"]),
        torch.stack(kept["et"]),
        maybe_stack("ev"),
        np.stack(kept["dt"]) if kept["dt"] else None,
        np.stack(kept["dv"]) if kept["dv"] else None,
        candidates=offset,
    )


# --------------------------------------------------------------------------- calibration


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(a same-person score > a different-person score), ties counting half (Mann-Whitney)."""
    negatives = np.sort(negatives)
    below = np.searchsorted(negatives, positives, side="left")
    equal = np.searchsorted(negatives, positives, side="right") - below
    return float((below + 0.5 * equal).sum() / (len(positives) * len(negatives)))


def calibrate(people: People) -> dict[str, dict[str, float]]:
    """Each judge's ROC-AUC: target vs its own second view against target vs other people's second views."""
    emb_view, dlib_target, dlib_view = people.judged_views()
    e = (people.emb_target @ emb_view.T).numpy()
    d = np.linalg.norm(dlib_target[:, None, :] - dlib_view[None, :, :], axis=-1)
    d = np.clip(1.0 - d / 1.2, 0.0, 1.0)
    same = np.eye(len(people), dtype=bool)
    out = {}
    for name, sims in (("dlib", d), ("engine", e)):
        out[name] = {
            "auc": roc_auc(sims[same], sims[~same]),
            "same_mean": float(sims[same].mean()),
            "different_mean": float(sims[~same].mean()),
            "same_p05": float(np.percentile(sims[same], 5)),
            "different_p95": float(np.percentile(sims[~same], 95)),
        }
    return out


# --------------------------------------------------------------------------- judging


def judge_samples(images: np.ndarray, people: People, engine, judge) -> list[dict[str, float]]:
    """Every score of each held-out sample (RGB uint8 [N, 64, 64, 3]); NaN where a judge finds no face."""
    nan = float("nan")
    tensors = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    engine_found = engine_results(engine, tensors)
    targets = to_uint8(people.target).astype(np.float32)
    emb_view, dlib_target, dlib_view = people.judged_views()
    rows = []
    for i, image in enumerate(images):
        j = judge.judge(image)
        row: dict[str, float] = {"dlib_found": float(j.ok), "engine_found": float(engine_found[i].ok)}
        row["dlib_view"] = verdict(j.descriptor, dlib_view[i]).similarity if j.ok else nan
        row["dlib_target"] = verdict(j.descriptor, dlib_target[i]).similarity if j.ok else nan
        face = engine_found[i].face
        if face is not None and face.embedding is not None:  # the result is `ok`
            row["engine_view"] = float(np.dot(face.embedding, emb_view[i].numpy()))
            row["engine_target"] = float(np.dot(face.embedding, people.emb_target[i].numpy()))
            row["landmark_err"] = float(np.linalg.norm(np.asarray(face.kps) - people.kps[i].numpy(), axis=1).mean())
        else:
            row["engine_view"] = row["engine_target"] = row["landmark_err"] = nan
        inside = face_mask(people.box[i : i + 1])[0, 0].numpy().astype(bool)
        error = np.abs(image.astype(np.float32) - targets[i]).mean(axis=2)
        row["outside_err"] = float(error[~inside].mean())
        row["face_err"] = float(error[inside].mean())
        rows.append(row)
    return rows


def face_mask(boxes: torch.Tensor) -> torch.Tensor:
    """[N, 1, 64, 64] float: 1 inside each (x1, y1, x2, y2) box (pixel centres)."""
    centres = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    x1, y1, x2, y2 = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    inside_x = (centres.view(1, 1, -1) >= x1) & (centres.view(1, 1, -1) <= x2)
    inside_y = (centres.view(1, -1, 1) >= y1) & (centres.view(1, -1, 1) <= y2)
    return (inside_x & inside_y).float().unsqueeze(1)


# --------------------------------------------------------------------------- the arms


def lora_model(base: torch.nn.Module, rank: int, seed: int) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A copy of the base with a fresh peft LoRA on every conv (B = 0: it starts as the base)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(base).requires_grad_(False)
    targets = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    torch.manual_seed(seed)
    model = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0), model
    )
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return model, params


def face_loss_for(arm: Arm, recognizer: FrozenFaceRecognizer, max_t: float, temperature: float) -> FaceIdentityLoss:
    kwargs: dict[str, Any] = {"weight": arm.weight, "max_t": max_t, "t_weighting": "none"}
    if arm.contrastive_weight:
        kwargs.update(contrastive_weight=arm.contrastive_weight, temperature=temperature)
    try:
        return FaceIdentityLoss(recognizer, **kwargs)
    except TypeError as error:
        raise SystemExit(
            f"arm {arm.name} needs FaceIdentityLoss({', '.join(kwargs)}) (issue 21's API), which this "
            f"checkout lacks ({error}); leave the arm out with --arms"
        ) from None


@dataclass
class RunLog:
    seconds_train: float = 0.0
    seconds_sample: float = 0.0
    seconds_judge: float = 0.0
    mse_start: float = 0.0
    mse_end: float = 0.0
    face_loss_start: float | None = None
    face_loss_end: float | None = None
    face_sim_start: float | None = None
    face_sim_end: float | None = None
    face_steps: int = 0


def train_arm(arm: Arm, seed: int, base, lora: People, negatives: torch.Tensor, recognizer, args) -> tuple[Any, RunLog]:
    """One LoRA run; `lora` is the people it trains on."""
    model, params = lora_model(base, args.lora_rank, seed)
    optimizer = torch.optim.AdamW(params, lr=args.lora_lr, weight_decay=0.0)
    face_loss = face_loss_for(arm, recognizer, args.max_t, args.temperature) if arm.weight else None
    reference = lora.emb_target if arm.reference == "target" else lora.emb_control
    valid = torch.ones(len(lora), dtype=torch.bool)
    masks = face_mask(lora.box)
    generator = torch.Generator().manual_seed(seed)  # data order, t and noise: the same in every arm
    batches = shuffled_batches(len(lora), args.lora_batch, generator)
    log, mses, face_losses, face_sims = RunLog(), [], [], []
    start = time.monotonic()
    for _ in range(args.lora_steps):
        idx = next(batches)
        x0, control = lora.target[idx], lora.control[idx]
        t = sample_t(len(idx), args.shift, generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = noised(x0, noise, t)
        v = model(x_t, control, t)
        error = (v - (noise - x0)) ** 2
        mse = error.mean()
        loss = mse
        if arm.face_box_mse:
            m = masks[idx]
            loss = loss + arm.face_box_mse * (error * m).sum() / (m.sum() * 3).clamp(min=1.0)
        if face_loss is not None:
            use = face_loss.active(t, valid[idx])
            if bool(use.any()):
                if arm.rollout_steps:
                    tu = t[use]
                    times = [tu * (1.0 - k / arm.rollout_steps) for k in range(arm.rollout_steps + 1)]
                    images = euler(model, x_t[use], control[use], times, first_velocity=v[use])
                    sel = idx[use]
                    tt = tu
                else:
                    images = (x_t - t.view(-1, 1, 1, 1) * v)[use]
                    sel, tt = idx[use], t[use]
                extra = {"negatives": negatives} if arm.contrastive_weight else {}
                out = face_loss(images, lora.kps[sel], reference[sel], valid[sel], tt, **extra)
                loss = loss + out.loss
                face_losses.append(out.loss.item())
                face_sims.append(out.metrics.get("face_sim/x0_mean", float("nan")))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mses.append(mse.item())
    log.seconds_train = time.monotonic() - start
    k = max(1, min(20, len(mses) // 4))
    log.mse_start, log.mse_end = float(np.mean(mses[:k])), float(np.mean(mses[-k:]))
    if face_losses:
        kf = max(1, min(20, len(face_losses) // 4))
        log.face_steps = len(face_losses)
        log.face_loss_start, log.face_loss_end = float(np.mean(face_losses[:kf])), float(np.mean(face_losses[-kf:]))
        log.face_sim_start, log.face_sim_end = mean_of_found(face_sims[:kf]), mean_of_found(face_sims[-kf:])
    return model.eval(), log


# --------------------------------------------------------------------------- statistics and verdicts


def paired_endpoint(
    scores: dict,
    arm: str,
    base: str,
    metric: str,
    seeds: list[int],
    n_people: int,
    boot: np.random.Generator,
    resamples: int,
) -> dict[str, float]:
    """Mean per-face paired difference arm - base over faces and seeds, 95% bootstrap over faces (seeds as blocks)."""
    diff = np.full((len(seeds), n_people), np.nan)
    for k, s in enumerate(seeds):
        a = np.array([r[metric] for r in scores[(arm, s)]], np.float64)
        b = np.array([r[metric] for r in scores[(base, s)]], np.float64)
        diff[k] = a - b
    pairs = int(np.isfinite(diff).sum())
    if pairs == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "pairs": 0}
    per_face_sum = np.nansum(diff, axis=0)
    per_face_n = np.isfinite(diff).sum(axis=0)
    picks = boot.integers(0, n_people, size=(resamples, n_people))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = per_face_sum[picks].sum(axis=1) / per_face_n[picks].sum(axis=1)
    means = means[np.isfinite(means)] if np.isfinite(means).any() else np.array([np.nan])
    return {
        "mean": float(np.nansum(diff) / pairs),
        "low": float(np.percentile(means, 2.5)),
        "high": float(np.percentile(means, 97.5)),
        "pairs": pairs,
    }


def decide(e: dict[str, dict[str, float]], can_tell: bool) -> str:
    """The docstring's decision rule for one arm's endpoints (`can_tell`: positive control moved, dlib
    calibrated, headroom shown)."""
    if not can_tell:
        return "INCONCLUSIVE"
    primary, hackable = e[PRIMARY], e[HACKABLE]
    worse = any(e[m]["low"] > 0 for m in ADHERENCE)
    if primary["low"] > 0 and primary["mean"] >= HELPS_GAIN:
        return "TRADE-OFF" if worse else "HELPS"
    if hackable["low"] > 0 and not primary["low"] > 0:
        return "HACKS"
    if primary["high"] < 0:
        return "HURTS"
    if primary["low"] > 0:
        return "SMALL"
    return "INERT"


def judge_arms(
    scores: dict,
    ceiling: list[dict[str, float]],
    copy_scores: list[dict[str, float]],
    calibration: dict[str, dict[str, float]],
    arm_names: list[str],
    all_seeds: list[int],
    n: int,
    resamples: int,
) -> tuple[dict, dict, dict[str, str], dict[str, bool]]:
    """The docstring's decision rule over every arm: (headroom, endpoints, verdicts, judge calibrated)."""
    boot = np.random.default_rng(0)
    mse_view = np.array([mean_of_found([scores[("mse", s)][i][PRIMARY] for s in all_seeds]) for i in range(n)])
    gap_diff = np.array([c[PRIMARY] for c in ceiling]) - mse_view
    ok = np.isfinite(gap_diff)
    gaps = np.array([mean_of_found(gap_diff[boot.integers(0, n, n)]) for _ in range(resamples)])
    gaps = gaps[np.isfinite(gaps)] if np.isfinite(gaps).any() else np.array([np.nan])
    headroom = {
        "gap": mean_of_found(gap_diff),
        "low": float(np.percentile(gaps, 2.5)),
        "high": float(np.percentile(gaps, 97.5)),
        "faces": int(ok.sum()),
        "ceiling": mean_of_found([c[PRIMARY] for c in ceiling]),
        "mse": mean_of_found(mse_view),
        "copy_control": mean_of_found([c[PRIMARY] for c in copy_scores]),
    }
    headroom["ok"] = headroom["gap"] >= HEADROOM_GAP and headroom["low"] > 0
    endpoints: dict[str, dict[str, dict[str, float]]] = {}
    for name in arm_names:
        if name == "mse":
            continue
        seeds = [s for s in all_seeds if (name, s) in scores]
        endpoints[name] = {
            m: paired_endpoint(scores, name, "mse", m, seeds, n, boot, resamples)
            for m in METRICS
            if m != "change_vs_mse"
        }
        change = [[r["change_vs_mse"] for r in scores[(name, s)]] for s in seeds]
        endpoints[name]["change_vs_mse"] = {
            "mean": float(np.mean(change)),
            "low": float("nan"),
            "high": float("nan"),
            "pairs": int(np.size(change)),
        }
    positive_moved = endpoints["positive"][PRIMARY]["low"] > 0
    judge_ok = {name: c["auc"] >= AUC_FLOOR for name, c in calibration.items()}
    can_tell = bool(positive_moved and judge_ok["dlib"] and headroom["ok"])
    verdicts = {name: decide(e, can_tell) for name, e in endpoints.items()}
    verdicts["positive"] = "POSITIVE CONTROL " + ("MOVED" if positive_moved else "DID NOT MOVE: benchmark insensitive")
    if "oracle" in verdicts:
        oracle_moved = endpoints["oracle"][PRIMARY]["low"] > 0
        verdicts["oracle"] = "SENSITIVITY CHECK " + ("MOVED" if oracle_moved else "DID NOT MOVE")
    return headroom, endpoints, verdicts, judge_ok


def print_verdicts(
    calibration: dict,
    judge_ok: dict[str, bool],
    headroom: dict,
    scores: dict,
    seeds: list[int],
    endpoints: dict,
    verdicts: dict[str, str],
    labels: dict[str, str],
) -> None:
    """The result table: calibration, headroom, the MSE arm's means, each arm's endpoints and verdict."""
    print(
        "calibration: "
        + "; ".join(f"{k} AUC {c['auc']:.4f} ({'pass' if judge_ok[k] else 'FAIL'})" for k, c in calibration.items())
    )
    print(
        f"headroom (dlib_view): known target {headroom['ceiling']:.3f}, MSE arm {headroom['mse']:.3f}, "
        f"copying the control {headroom['copy_control']:.3f}; gap {headroom['gap']:+.4f} "
        f"[{headroom['low']:+.4f}, {headroom['high']:+.4f}] -> "
        f"{'OK' if headroom['ok'] else 'NO HEADROOM: make the edit harder'}"
    )
    mse_means = {m: mean_of_found([r[m] for s in seeds for r in scores[("mse", s)]]) for m in METRICS[:-1]}
    print("MSE arm means: " + ", ".join(f"{m} {v:.3f}" for m, v in mse_means.items()))
    if not judge_ok.get("dlib", False):
        print("WARNING: dlib failed its calibration: its verdicts below decide nothing")
    print(f"paired difference to the MSE arm, mean [95% bootstrap interval]; primary {PRIMARY}")
    for name, e in endpoints.items():
        print(f"{labels[name]}  ->  {verdicts[name]}")
        print(
            "    " + "; ".join(f"{m} {fmt(e[m])}" for m in ("dlib_view", "dlib_target", "engine_view", "engine_target"))
        )
        print(
            "    "
            + "; ".join(
                f"{m} {fmt(e[m])}" for m in ("landmark_err", "outside_err", "face_err", "dlib_found", "engine_found")
            )
            + f"; change_vs_mse {e['change_vs_mse']['mean']:.2f}/255"
        )


def mean_of_found(values) -> float:
    """Mean over the finite values (faces a judge found); NaN, without a warning, when there are none."""
    array = np.asarray(values, np.float64)
    return float(array[np.isfinite(array)].mean()) if np.isfinite(array).any() else float("nan")


def fmt(e: dict[str, float]) -> str:
    return f"{e['mean']:+.4f} [{e['low']:+.4f}, {e['high']:+.4f}]"


# --------------------------------------------------------------------------- main


@contextmanager
def stage(name: str, times: dict[str, float]) -> Iterator[None]:
    start = time.monotonic()
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    yield
    times[name] = time.monotonic() - start
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {times[name]:.1f} s", flush=True)


def save_png(path: Path, rgb: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return str(path)


def write_people(heldout: People, engine, judge, out: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """Each held-out person's control, second view and known target as PNG under out/people, with the scores
    of the known target (the ceiling) and of the control (copying it): (manifest rows, ceiling, copy scores)."""
    rows = []
    control_u8, view_u8, target_u8 = to_uint8(heldout.control), to_uint8(heldout.view), to_uint8(heldout.target)
    ceiling = judge_samples(target_u8, heldout, engine, judge)
    copy_scores = judge_samples(control_u8, heldout, engine, judge)
    for i in range(len(heldout)):
        pid = heldout.person_id(i)
        rows.append(
            {
                "person": pid,
                "z_index": heldout.index[i],
                "control": save_png(out / "people" / f"{pid}_control.png", control_u8[i]),
                "view": save_png(out / "people" / f"{pid}_view.png", view_u8[i]),
                "target": save_png(out / "people" / f"{pid}_target.png", target_u8[i]),
                "target_scores": ceiling[i],
                "control_scores": copy_scores[i],
                "target_kps_64px": heldout.kps[i].tolist(),
                "target_box_64px": heldout.box[i].tolist(),
            }
        )
    return rows, ceiling, copy_scores


def write_samples(images: dict[tuple[str, int], np.ndarray], scores: dict, heldout: People, out: Path) -> list[dict]:
    """Every judged sample as PNG under out/samples/<arm>/seed<s>/, with its scores and `change_vs_mse`
    (added to `scores` too): the manifest's sample rows."""
    rows = []
    for (name, seed), imgs in images.items():
        base_imgs = images[("mse", seed)].astype(np.float32)
        for i, (row, image) in enumerate(zip(scores[(name, seed)], imgs)):
            row["change_vs_mse"] = float(np.abs(image.astype(np.float32) - base_imgs[i]).mean())
            pid = heldout.person_id(i)
            rows.append(
                {
                    "arm": name,
                    "seed": seed,
                    "person": pid,
                    "file": save_png(out / "samples" / name / f"seed{seed}" / f"{pid}.png", image),
                    **{k: (None if not np.isfinite(v) else round(v, 6)) for k, v in row.items()},
                }
            )
    return rows


def add_common_arguments(parser: argparse.ArgumentParser, cache_help: str) -> None:
    """The judges', the statistics' and the machine's options (tier 1 and tier 2)."""
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--models_root", type=Path, default=DEFAULT_DATA / "insightface")
    parser.add_argument("--pack", default="testpack")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=cache_help)
    parser.add_argument("--threads", type=int, default=1)


def finish_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, known: tuple[str, ...]
) -> argparse.Namespace:
    """--seeds and --arms as lists (mse and positive always first), --out outside the repository."""
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    names = [a for a in args.arms.split(",") if a]
    if set(names) - set(known):
        parser.error(f"--arms: unknown {sorted(set(names) - set(known))}; choose from {', '.join(known)}")
    args.arms = ["mse", "positive", *[a for a in names if a not in ("mse", "positive")]]
    out = args.out.resolve()
    if out == REPO_ROOT or REPO_ROOT in out.parents:
        parser.error("--out must lie outside the repository (the generated faces must never be committed)")
    if not args.seeds:
        parser.error("--seeds: at least one")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    known = ("mse", "face", "face_w1", "target", "infonce", "rollout", "positive", "hack", "oracle")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for the judged images and manifest.json (outside the repository: the faces are research-only)",
    )
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument(
        "--arms",
        default="mse,face,face_w1,target,infonce,rollout,positive,hack,oracle",
        help="comma-separated; mse and positive are always run",
    )
    parser.add_argument("--heldout", type=int, default=64, help="held-out people judged")
    parser.add_argument("--lora_people", type=int, default=128)
    parser.add_argument("--pretrain_people", type=int, default=4096)
    parser.add_argument("--negatives", type=int, default=256, help="pre-training people's embeddings for InfoNCE")
    parser.add_argument("--width", type=int, default=NetSettings.width)
    parser.add_argument("--pretrain_steps", type=int, default=NetSettings.pretrain_steps)
    parser.add_argument("--pretrain_batch", type=int, default=NetSettings.pretrain_batch)
    parser.add_argument("--pretrain_lr", type=float, default=NetSettings.pretrain_lr)
    parser.add_argument(
        "--lora_angle",
        type=float,
        default=20.0,
        help="rotation (deg) of the edit the LoRA learns and the judges score; the base is pre-trained "
        f"on {Edit.angle_deg:g} deg, so the LoRA has a new re-pose to learn",
    )
    parser.add_argument(
        "--lora_scale", type=float, default=0.82, help=f"scale of that edit (the base's: {Edit.scale:g})"
    )
    parser.add_argument("--pretrain_shift", type=float, default=NetSettings.shift)
    parser.add_argument(
        "--shift",
        type=float,
        default=2.2,
        help="the LoRA runs' shift timestep sampling "
        "(the seed guide's --timestep_sampling shift --discrete_flow_shift 2.2)",
    )
    parser.add_argument("--sample_shift", type=float, default=1.0, help="shift of the judged samples' schedule")
    parser.add_argument("--lora_steps", type=int, default=200)
    parser.add_argument("--lora_batch", type=int, default=8)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_lr", type=float, default=1e-3)
    parser.add_argument("--sample_steps", type=int, default=12)
    parser.add_argument("--max_t", type=float, default=0.5, help="face_loss_max_t of every face arm")
    parser.add_argument("--high_weight", type=float, default=1.0)
    parser.add_argument("--hack_weight", type=float, default=10.0)
    parser.add_argument("--contrastive_weight", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--rollout_steps", type=int, default=3)
    parser.add_argument("--pc_weight", type=float, default=16.0, help="the positive control's face-box MSE weight")
    parser.add_argument("--view_sigma", type=float, default=View.sigma, help="z jitter of the second view")
    add_common_arguments(parser, "folder of the pre-trained base")
    return finish_args(parser, parser.parse_args(argv), known)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fast_cpu(args.threads)
    times: dict[str, float] = {}
    start = time.monotonic()
    base_edit, view = Edit(), View(sigma=args.view_sigma)
    edit = replace(base_edit, angle_deg=args.lora_angle, scale=args.lora_scale)
    net = NetSettings(
        width=args.width,
        pretrain_steps=args.pretrain_steps,
        pretrain_batch=args.pretrain_batch,
        pretrain_lr=args.pretrain_lr,
        shift=args.pretrain_shift,
    )
    with stage("load face source, engine, judge, recognizer", times):
        source = FaceSource()
        engine = load_face_model(args.pack, models_root=args.models_root, provider="cpu")
        judge = load_judge()
        recognizer = FrozenFaceRecognizer.from_pack(args.pack, models_root=args.models_root)
    with stage("people (render, edit, detect)", times):
        heldout = find_people("heldout", args.heldout, source, edit, view, engine, judge)
        lora = find_people("lora", args.lora_people, source, edit, None, engine, None)
        negatives = find_people("negatives", args.negatives, source, edit, None, engine, None).emb_control
        pre_controls = source.render(identities("pretrain", args.pretrain_people))
    print(
        f"  people kept / candidates: held-out {len(heldout)}/{heldout.candidates}, LoRA "
        f"{len(lora)}/{lora.candidates}, "
        f"negatives {len(negatives)}; pre-training {len(pre_controls)} (not filtered)"
    )
    with stage("calibration of the judges", times):
        calibration = calibrate(heldout)
    for name, c in calibration.items():
        print(
            f"  {name}: ROC-AUC {c['auc']:.4f} ({'PASS' if c['auc'] >= AUC_FLOOR else 'FAIL'} at >= {AUC_FLOOR}); "
            f"same person mean {c['same_mean']:.3f} (p5 {c['same_p05']:.3f}), different {c['different_mean']:.3f} "
            f"(p95 {c['different_p95']:.3f}); 64 px, second view sigma {args.view_sigma:g}"
        )
    with stage("base generator (pre-train or cache)", times):
        data_key = f"{source.sha256}:{args.pretrain_people}:{ROLE_SEEDS['pretrain']}"
        base, fitted = pretrained_base(net, base_edit, pre_controls, args.cache, data_key)
    print(
        f"  base {'pre-trained now' if fitted else 'loaded from the cache'}: width {net.width}, "
        f"{sum(p.numel() for p in base.parameters()) / 1e6:.2f} M parameters, {net.pretrain_steps} steps on the "
        f"re-pose {base_edit.angle_deg:g} deg x {base_edit.scale:g}; the LoRA learns {edit.angle_deg:g} deg x "
        f"{edit.scale:g}"
    )

    out = args.out
    people_rows, ceiling, copy_scores = write_people(heldout, engine, judge, out)
    eval_noise = torch.randn(heldout.target.shape, generator=torch.Generator().manual_seed(ROLE_SEEDS["eval_noise"]))

    arms = {a.name: a for a in make_arms(args)}
    scores: dict[tuple[str, int], list[dict[str, float]]] = {}
    images: dict[tuple[str, int], np.ndarray] = {}
    logs: dict[tuple[str, int], RunLog] = {}
    with stage("arms (LoRA training, sampling, judging)", times):
        for seed in args.seeds:
            for name in args.arms:
                arm = arms[name]
                if arm.first_seed_only and seed != args.seeds[0]:
                    continue
                model, log = train_arm(
                    arm, seed, base, heldout if arm.train_on_heldout else lora, negatives, recognizer, args
                )
                t0 = time.monotonic()
                imgs = to_uint8(sample(model, heldout.control, eval_noise, args.sample_steps, args.sample_shift))
                log.seconds_sample = time.monotonic() - t0
                t0 = time.monotonic()
                scores[(name, seed)] = judge_samples(imgs, heldout, engine, judge)
                log.seconds_judge = time.monotonic() - t0
                images[(name, seed)], logs[(name, seed)] = imgs, log
                face = (
                    ""
                    if log.face_loss_start is None
                    else (
                        f"; face term {log.face_loss_start:.4f} -> {log.face_loss_end:.4f} on {log.face_steps} steps, "
                        f"x0 sim {log.face_sim_start:.3f} -> {log.face_sim_end:.3f}"
                    )
                )
                mean = {m: mean_of_found([r[m] for r in scores[(name, seed)]]) for m in ("dlib_view", "engine_view")}
                found = {m: sum(np.isfinite(r[m]) for r in scores[(name, seed)]) for m in mean}
                print(
                    f"  {name:>9} seed {seed}: train {log.seconds_train:.1f} s, sample {log.seconds_sample:.1f} s, "
                    f"judge {log.seconds_judge:.1f} s; MSE {log.mse_start:.4f} -> {log.mse_end:.4f}{face}; "
                    f"dlib_view {mean['dlib_view']:.3f} [{found['dlib_view']}/{len(heldout)} found], engine_view "
                    f"{mean['engine_view']:.3f} [{found['engine_view']}/{len(heldout)}]",
                    flush=True,
                )
    sample_rows = write_samples(images, scores, heldout, out)

    with stage("statistics and verdicts", times):
        n = len(heldout)
        headroom, endpoints, verdicts, judge_ok = judge_arms(
            scores, ceiling, copy_scores, calibration, args.arms, args.seeds, n, args.bootstrap
        )

    print()
    print(
        f"held-out people {n}; seeds {args.seeds}; LoRA {args.lora_steps} steps x batch {args.lora_batch} on "
        f"{len(lora)} people; samples {args.sample_steps} Euler steps; 64 px"
    )
    print_verdicts(
        calibration,
        judge_ok,
        headroom,
        scores,
        args.seeds,
        endpoints,
        verdicts,
        {name: arm.label for name, arm in arms.items()},
    )

    manifest = {
        "benchmark": "bench_face_loss_tier1",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "edit": asdict(edit),
        "base_edit": asdict(base_edit),
        "view": asdict(view),
        "net": asdict(net),
        "generator_weights_sha256": source.sha256,
        "judges": {"dlib": judge.describe(), "engine": engine.describe(), "independent_judges_available": ["dlib"]},
        "calibration": calibration,
        "headroom": headroom,
        "people": people_rows,
        "samples": sample_rows,
        "runs": [{"arm": a, "seed": s, **asdict(log)} for (a, s), log in logs.items()],
        "endpoints": endpoints,
        "verdicts": verdicts,
        "decision_rule": __doc__.split("Decision rule")[1].split("Output")[0],
        "stage_seconds": times,
    }
    atomic_write_json(out / "manifest.json", manifest)
    total = time.monotonic() - start
    print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total / 60:.1f} min")
    print(f"images and manifest: {out}; load average {os.getloadavg()[1]:.1f} (5 min) on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
