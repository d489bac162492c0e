"""Differentiable face-identity loss: ArcFace alignment warp + frozen torch recognizer.

The pieces reproduce what InsightFace does when it embeds a face, but in torch so a
gradient reaches the pixels of a decoded image:

- `estimate_norm` is `insightface.utils.face_align.estimate_norm` (the least-squares
  similarity transform of the 5 keypoints onto the ArcFace template), batched;
- `warp_to_arcface` applies it like `face_align.norm_crop` (`cv2.warpAffine`, bilinear,
  black border) with `affine_grid` + `grid_sample`;
- `FrozenFaceRecognizer` is the pack's recognizer ONNX converted by onnx2torch, fed the
  exact blob `ArcFaceONNX.get_feat` builds, frozen and locked in eval mode;
- `FaceIdentityLoss` combines them into `weight * mean(1 - cos)` over the samples that
  have a face and a low enough timestep, plus optionally WithAnyone's InfoNCE term, which
  also pushes each face away from other people's identities (`contrastive_weight`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...faceid.errors import ModelPackError
from ...faceid.packs import as_roots, resolve_pack
from ...training_contract.options import FACE_LOSS_T_WEIGHTINGS
from ..memory_plan import measure_saved_bytes

# insightface/utils/face_align.py: arcface_dst (for a 112x112 crop).
ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)


class RecognizerLoadError(ModelPackError):
    """The pack has no usable recognizer, or it cannot be converted to torch."""


def arcface_template(image_size: int = 112, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 5 destination points `estimate_norm` uses for an `image_size` crop, shape [5, 2]."""
    if image_size % 112 == 0:
        ratio, shift_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio = image_size / 128.0
        shift_x = 8.0 * ratio
    else:
        raise ValueError(f"ArcFace alignment needs a crop size divisible by 112 or 128, got {image_size}")
    # insightface builds the template in float32 before scaling; keep that rounding.
    template = torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float32).to(dtype) * ratio
    template[:, 0] += shift_x
    return template


def estimate_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transform (rotation, uniform scale, translation) src -> dst.

    src [B, N, 2], dst [N, 2] or [B, N, 2]; returns [B, 2, 3] in src's dtype. This is the
    Umeyama estimate skimage's `SimilarityTransform.estimate` computes: in 2-D the matrix
    [[a, -b], [b, a]] spans exactly scale x proper rotation, so the linear least-squares
    solution for (a, b) is the same optimum.
    """
    dst = dst.to(src).expand_as(src)
    src_mean = src.mean(dim=1, keepdim=True)
    dst_mean = dst.mean(dim=1, keepdim=True)
    p = src - src_mean
    q = dst - dst_mean
    norm = (p * p).sum(dim=(1, 2))
    a = (p * q).sum(dim=(1, 2)) / norm
    b = (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]).sum(dim=1) / norm
    linear = torch.stack([torch.stack([a, -b], dim=-1), torch.stack([b, a], dim=-1)], dim=-2)
    translation = dst_mean.squeeze(1) - (linear @ src_mean.transpose(1, 2)).squeeze(-1)
    return torch.cat([linear, translation.unsqueeze(-1)], dim=-1)


def estimate_norm(kps: torch.Tensor, image_size: int = 112) -> torch.Tensor:
    """Batched `face_align.estimate_norm`: kps [B, 5, 2] (pixels) -> M [B, 2, 3] (float64)."""
    if kps.ndim != 3 or kps.shape[1:] != (5, 2):
        raise ValueError(f"keypoints must have shape [B, 5, 2], got {tuple(kps.shape)}")
    return estimate_similarity(kps.detach().to(torch.float64), arcface_template(image_size))


def _homogeneous(matrix: torch.Tensor) -> torch.Tensor:
    bottom = matrix.new_tensor([0.0, 0.0, 1.0]).expand(matrix.shape[0], 1, 3)
    return torch.cat([matrix, bottom], dim=1)


def norm_crop_theta(
    kps: torch.Tensor,
    source_region: torch.Tensor,
    image_size: int = 112,
) -> torch.Tensor:
    """`affine_grid` theta [B, 2, 3] (float64) that reproduces `norm_crop`.

    kps [B, 5, 2] are pixel coordinates (InsightFace convention: pixel i has its centre at
    i) in some reference image. source_region [B, 4] = (x0, y0, x1, y1) is the part of
    that reference image, in pixel-edge coordinates, which the tensor to be sampled
    shows: (0, 0, W, H) for the whole image at any resolution (a decode at half size
    still shows the whole image), a box for a decoded face region.
    """
    batch = kps.shape[0]
    M = _homogeneous(estimate_norm(kps, image_size))
    region = source_region.detach().to(torch.float64).expand(batch, 4)
    x0, y0, x1, y1 = region.unbind(dim=1)
    width, height = x1 - x0, y1 - y0
    if bool((width <= 0).any() or (height <= 0).any()):
        raise ValueError("source_region boxes must have x1 > x0 and y1 > y0")
    zeros, ones = torch.zeros_like(x0), torch.ones_like(x0)
    # reference pixel centre -> grid_sample's normalised coordinate (align_corners=False)
    to_source = torch.stack(
        [
            torch.stack([2.0 / width, zeros, (1.0 - 2.0 * x0) / width - 1.0], dim=-1),
            torch.stack([zeros, 2.0 / height, (1.0 - 2.0 * y0) / height - 1.0], dim=-1),
            torch.stack([zeros, zeros, ones], dim=-1),
        ],
        dim=1,
    )
    # normalised output coordinate -> crop pixel centre
    half = image_size / 2.0
    from_output = kps.new_tensor(
        [[half, 0.0, half - 0.5], [0.0, half, half - 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64
    ).expand(batch, 3, 3)
    return (to_source @ torch.linalg.inv(M) @ from_output)[:, :2, :]


def full_image_region(width: int | float, height: int | float, batch: int = 1) -> torch.Tensor:
    """source_region [batch, 4] for a tensor that shows the whole `width` x `height` image."""
    return torch.tensor([[0.0, 0.0, float(width), float(height)]], dtype=torch.float64).expand(batch, 4)


def face_region_boxes(
    kps: torch.Tensor,
    image_size: tuple[int, int],
    crop_size: int = 112,
    multiple: int = 8,
    margin: float = 0.125,
) -> torch.Tensor:
    """Same-size pixel boxes [B, 4] (x0, y0, x1, y1) holding each face's whole ArcFace crop.

    For decoding only the face region: slice the latents at box / vae_scale (boxes are
    multiples of `multiple`, the VAE's 8 by default), decode the stack, and pass the boxes
    as `source_region`. `margin` (a fraction of the crop's extent on each side) keeps the
    decoder's border effects away from the face. Boxes share one size so they batch; they
    are shifted, never shrunk, to stay inside the image (capped at the image size).
    """
    width, height = image_size
    M = _homogeneous(estimate_norm(kps, crop_size))
    corners = kps.new_tensor(
        [
            [-0.5, -0.5, 1.0],
            [crop_size - 0.5, -0.5, 1.0],
            [-0.5, crop_size - 0.5, 1.0],
            [crop_size - 0.5, crop_size - 0.5, 1.0],
        ],
        dtype=torch.float64,
    )
    footprint = (torch.linalg.inv(M) @ corners.T)[:, :2, :]  # [B, 2, 4] crop corners in image pixels
    low, high = footprint.amin(dim=2) + 0.5, footprint.amax(dim=2) + 0.5  # pixel-edge coordinates
    extent = float((high - low).max()) * (1.0 + 2.0 * margin)
    side = int(math.ceil(extent / multiple) * multiple)
    box_w = min(side, width // multiple * multiple)
    box_h = min(side, height // multiple * multiple)
    centre = (low + high) / 2.0
    x0 = torch.round((centre[:, 0] - box_w / 2.0) / multiple) * multiple
    y0 = torch.round((centre[:, 1] - box_h / 2.0) / multiple) * multiple
    x0 = x0.clamp(0, (width - box_w) // multiple * multiple)
    y0 = y0.clamp(0, (height - box_h) // multiple * multiple)
    return torch.stack([x0, y0, x0 + box_w, y0 + box_h], dim=1).to(torch.int64)


def warp_to_arcface(
    images: torch.Tensor,
    kps: torch.Tensor,
    source_region: torch.Tensor | None = None,
    image_size: int = 112,
) -> torch.Tensor:
    """Differentiable `norm_crop`: images [B, 3, H, W] in [-1, 1] -> crops [B, 3, S, S] (fp32).

    Without source_region the keypoints are taken to be in the pixels of `images`.
    Outside the image the crop is black (-1), as `cv2.warpAffine(borderValue=0)` leaves it.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    if kps.shape[0] != images.shape[0]:
        raise ValueError(f"{kps.shape[0]} keypoint sets for {images.shape[0]} images")
    batch, _, height, width = images.shape
    if source_region is None:
        source_region = full_image_region(width, height, batch)
    theta = norm_crop_theta(kps, source_region.to(kps.device), image_size)
    with torch.autocast(device_type=images.device.type, enabled=False):
        pixels = images.float()
        grid = F.affine_grid(
            theta.to(device=images.device, dtype=torch.float32),
            [batch, 3, image_size, image_size],
            align_corners=False,
        )
        # sample (x + 1) with zero padding so the border becomes -1 (black)
        crops = F.grid_sample(pixels + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return crops - 1.0


@dataclass(frozen=True)
class RecognizerSpec:
    """What InsightFace's `ArcFaceONNX` knows about a recognizer: file and input convention."""

    onnx_path: Path
    input_size: int
    input_mean: float
    input_std: float


def find_recognizer(
    pack: str | os.PathLike,
    models_root: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> RecognizerSpec:
    """The recognizer of a face model pack (a name under the roots, or a folder), as the engine finds it.

    The engine's pack resolution picks the file; InsightFace's `ArcFaceONNX` reads its
    input convention (127.5/127.5, or none when the graph normalises itself), so the
    torch module is fed exactly what the engine's recognizer is fed.
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    from insightface.model_zoo import get_model

    files = resolve_pack(pack, as_roots(models_root))
    return recognizer_spec(get_model(str(files.recognizer), providers=["CPUExecutionProvider"]), Path(files.recognizer))


def recognizer_spec(recognizer: Any, onnx_path: Path) -> RecognizerSpec:
    """The spec of an InsightFace ArcFaceONNX already loaded (the engine's own, say)."""
    if recognizer is None or getattr(recognizer, "taskname", None) != "recognition":
        raise RecognizerLoadError(f"InsightFace does not route {onnx_path} to its ArcFace recognizer")
    width, height = recognizer.input_size
    if width != height:
        raise RecognizerLoadError(f"{onnx_path} has a non-square input {width}x{height}")
    return RecognizerSpec(
        onnx_path=onnx_path,
        input_size=int(width),
        input_mean=float(recognizer.input_mean),
        input_std=float(recognizer.input_std),
    )


class FrozenFaceRecognizer(nn.Module):
    """The pack's ArcFace recognizer as a frozen torch module: fp32, eval mode, no weight grads.

    Input: aligned RGB crops [B, 3, S, S] in [-1, 1]; output: raw embeddings [B, D].
    Gradients flow to the input only.
    """

    def __init__(self, network: nn.Module, spec: RecognizerSpec) -> None:
        super().__init__()
        self.network = network.float()
        self.spec = spec
        self.network.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_onnx(cls, spec: RecognizerSpec) -> FrozenFaceRecognizer:
        from onnx2torch import convert

        try:
            network = convert(str(spec.onnx_path))
        except Exception as error:  # onnx2torch raises bare NotImplementedError/KeyError for unknown ops
            raise RecognizerLoadError(f"cannot convert {spec.onnx_path} to torch with onnx2torch: {error}") from error
        return cls(network, spec)

    @classmethod
    def from_pack(
        cls,
        pack: str | os.PathLike,
        models_root: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    ) -> FrozenFaceRecognizer:
        """Convert the recognizer of `pack` (resolved like `load_face_model(pack, models_root=...)`)."""
        return cls.from_onnx(find_recognizer(pack, models_root))

    @classmethod
    def from_face_model(cls, model: Any) -> FrozenFaceRecognizer:
        """Convert the recognizer a loaded `faceid.FaceModel` embeds with (no second pack lookup or session)."""
        return cls.from_onnx(recognizer_spec(model.recognizer, Path(model.recognizer.model_file)))

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def saved_bytes_per_sample(self) -> int:
        """Bytes autograd keeps for the backward pass of one face (for the memory plan)."""
        device = next(self.parameters()).device
        faces = torch.zeros(1, 3, self.input_size, self.input_size, device=device, requires_grad=True)
        saved, _ = measure_saved_bytes(lambda: self(faces), [self])
        return saved

    def train(self, mode: bool = True) -> FrozenFaceRecognizer:
        # A parent's .train() must not reach BatchNorm here: a train-mode pass would
        # normalise with batch statistics and overwrite the running ones.
        return super().train(False)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        # ArcFaceONNX.get_feat: blobFromImages(bgr, 1/std, mean, swapRB=True) -> an RGB blob
        # (pixel - mean) / std with pixel in 0..255; our RGB input is pixel/127.5 - 1.
        with torch.autocast(device_type=faces.device.type, enabled=False):
            pixels = (faces.float() + 1.0) * 127.5
            blob = (pixels - self.spec.input_mean) / self.spec.input_std
            return self.network(blob)


@dataclass
class FaceLossOutput:
    """loss: weighted scalar to add to the training loss; metrics: plain numbers for logs."""

    loss: torch.Tensor
    metrics: dict[str, Any]


class FaceIdentityLoss(nn.Module):
    """`weight * mean(w(t) * (1 - cos(e, reference))) + contrastive_weight * mean(w(t) * InfoNCE)`
    over qualifying samples, e = embed(warp(image)).

    A sample qualifies when it has a face (`valid`) and its timestep is at most `max_t`
    (the one-step estimate x0_hat = x_t - t * v is only sharp at low noise). `t_weighting`
    `none`: w = 1; `linear`: w = 1 - t, so the blurrier estimates pull less.

    InfoNCE (WithAnyone's contrastive term): `-log softmax(cos(e, [reference, negatives]) / temperature)[0]`,
    the reference as the one positive and other people's embeddings as the negatives.
    """

    def __init__(
        self,
        recognizer: FrozenFaceRecognizer,
        weight: float = 0.1,
        max_t: float | None = None,
        t_weighting: str = "none",
        contrastive_weight: float = 0.0,
        temperature: float = 0.07,
    ) -> None:
        super().__init__()
        if max_t is not None and not 0.0 <= max_t <= 1.0:
            raise ValueError(f"max_t is a flow-matching timestep in [0, 1], got {max_t}")
        if t_weighting not in FACE_LOSS_T_WEIGHTINGS:
            raise ValueError(f"t_weighting must be one of {', '.join(FACE_LOSS_T_WEIGHTINGS)}, got {t_weighting!r}")
        if not (math.isfinite(contrastive_weight) and contrastive_weight >= 0.0):
            raise ValueError(f"contrastive_weight must be 0 or more, got {contrastive_weight}")
        if not (math.isfinite(temperature) and temperature > 0.0):
            raise ValueError(f"the contrastive temperature must be above 0, got {temperature}")
        self.t_weighting = t_weighting
        self.recognizer = recognizer
        self.weight = float(weight)
        self.max_t = 1.0 if max_t is None else float(max_t)  # None: every sample with a face
        self.contrastive_weight = float(contrastive_weight)
        self.temperature = float(temperature)

    def active(self, t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Bool [B]: samples the loss uses. Decode only these to save time and memory."""
        return valid.to(device=t.device, dtype=torch.bool).flatten() & (
            t.detach().flatten().float() <= self.max_t + 1e-6
        )

    def embed(self, images: torch.Tensor, kps: torch.Tensor, source_region: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-length embeddings [B, D] (fp32, differentiable) of each image's face."""
        crops = warp_to_arcface(images.clamp(-1.0, 1.0), kps, source_region, self.recognizer.input_size)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return F.normalize(self.recognizer(crops).float(), dim=-1, eps=1e-6)

    def similarity(
        self,
        images: torch.Tensor,
        kps: torch.Tensor,
        reference: torch.Tensor,
        source_region: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cosine similarity [B] (differentiable) of each image's face to its reference embedding."""
        return cosine_to(self.embed(images, kps, source_region), reference)

    def info_nce(self, embeddings: torch.Tensor, reference: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """[B]: -log of the softmax weight of the positive (the reference) among it and the negatives [N, D]."""
        logits = torch.cat(
            [
                cosine_to(embeddings, reference).unsqueeze(1),
                embeddings @ F.normalize(negatives.to(embeddings), dim=-1, eps=1e-6).T,
            ],
            dim=1,
        )
        return -F.log_softmax(logits / self.temperature, dim=1)[:, 0]

    def forward(
        self,
        images: torch.Tensor,
        kps: torch.Tensor,
        reference: torch.Tensor,
        valid: torch.Tensor,
        t: torch.Tensor,
        source_region: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
    ) -> FaceLossOutput:
        """images [B,3,H,W] in [-1,1], kps [B,5,2], reference [B,D], valid [B], t [B] in [0,1],
        negatives [N,D] (other people's embeddings; needed when `contrastive_weight` > 0).

        The loss is a zero constant (no graph) when no sample qualifies.
        """
        if self.contrastive_weight > 0 and (negatives is None or negatives.shape[0] == 0):
            raise ValueError("the contrastive face loss needs embeddings of other people (negatives)")
        use = self.active(t, valid)
        metrics = self._count_metrics(use, valid)
        if not bool(use.any()):
            return FaceLossOutput(loss=torch.zeros((), device=images.device), metrics=metrics)
        used_images, used_kps, used_reference, region = _select(use, images, kps, reference, source_region)
        embeddings = self.embed(used_images, used_kps, region)
        sims = cosine_to(embeddings, used_reference)
        used_t = t.flatten()[use.to(t.device)]
        step_weight = (1.0 - used_t.detach().to(sims)) if self.t_weighting == "linear" else torch.ones_like(sims)
        distance = (step_weight * (1.0 - sims)).mean()
        loss = self.weight * distance
        metrics.update(similarity_metrics(sims, used_t))
        metrics["loss/face"] = float(loss.detach())
        if self.contrastive_weight > 0:
            if negatives is None:
                raise ValueError("the contrastive face loss needs the negatives' embeddings")
            contrastive = (
                self.contrastive_weight * (step_weight * self.info_nce(embeddings, used_reference, negatives)).mean()
            )
            metrics["loss/face_contrastive"] = float(contrastive.detach())
            loss = loss + contrastive
        return FaceLossOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def measure(
        self,
        images: torch.Tensor,
        kps: torch.Tensor,
        reference: torch.Tensor,
        valid: torch.Tensor,
        t: torch.Tensor,
        source_region: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Metrics only (no graph): similarity of every sample with a face, whatever its t."""
        use = valid.to(torch.bool).flatten()
        metrics = self._count_metrics(use, valid)
        if bool(use.any()):
            sims = self.similarity(*_select(use, images, kps, reference, source_region))
            metrics.update(similarity_metrics(sims, t.flatten()[use.to(t.device)]))
        return metrics

    @staticmethod
    def _count_metrics(use: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
        return {"face/valid": int(use.sum()), "face/no_face": int((~valid.to(torch.bool)).sum())}


def _select(
    use: torch.Tensor,
    images: torch.Tensor,
    kps: torch.Tensor,
    reference: torch.Tensor,
    source_region: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The samples `use` marks, of each per-sample input (a single source_region is broadcast)."""
    region = None if source_region is None else source_region.expand(images.shape[0], 4)[use.to(source_region.device)]
    return images[use.to(images.device)], kps[use.to(kps.device)], reference[use.to(reference.device)], region


def cosine_to(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [B] of unit embeddings [B, D] to raw reference embeddings [B, D]."""
    if embeddings.shape[-1] != reference.shape[-1]:
        raise ValueError(
            f"reference embeddings are {reference.shape[-1]}-d but the recognizer gives "
            f"{embeddings.shape[-1]}-d: the cache was built with another face model pack"
        )
    return (embeddings * F.normalize(reference.to(embeddings), dim=-1, eps=1e-6)).sum(dim=-1)


def similarity_metrics(similarities: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
    """mean/min/max similarity, count and the timesteps they were measured at."""
    sims = similarities.detach().float().cpu()
    return {
        "face_sim/x0_mean": float(sims.mean()),
        "face_sim/x0_min": float(sims.min()),
        "face_sim/x0_max": float(sims.max()),
        "face_sim/x0": [round(float(s), 6) for s in sims],
        "face/t": [round(float(v), 6) for v in t.detach().float().cpu()],
    }
