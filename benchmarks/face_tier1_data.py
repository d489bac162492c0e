"""Faces, the known edit and the small pixel-space generator of the tier-1 face-loss benchmark.

Used by `bench_face_loss_tier1.py` (read its docstring first). Nothing here is written into the
repository: generated faces come from `gan-face-generate` (trained on DigiFace-1M, research-only
licence), so they live in memory, in the cache folder outside the repo, or in the output folder
given on the benchmark's command line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Z_SIZE = 100  # the DCGAN's latent size
IMAGE_SIZE = 64
DETECT_SIZE = 128  # the engine detects on a 2x upscale (it misses most faces at 64 px)
ROLE_SEEDS = {"pretrain": 1001, "lora": 2002, "heldout": 3003, "negatives": 4004, "views": 5005, "eval_noise": 6006}
INSTALL_HINT = (
    'the benchmark extra is missing: pip install "comfyui-face-consistency[evidence]" (or '
    "pip install --target DIR gan-face-generate==1.1.1 and put DIR on PYTHONPATH)"
)


# --------------------------------------------------------------------------- the face source


def _generator_weights() -> Path:
    spec = importlib.util.find_spec("gan_face_generate")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(INSTALL_HINT)
    path = Path(next(iter(spec.submodule_search_locations))) / "weights.tar"
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall: {INSTALL_HINT}")
    return path


class FaceSource:
    """The pretrained DCGAN of gan-face-generate: z [N, 100] -> RGB [N, 3, 64, 64] in [-1, 1]."""

    def __init__(self) -> None:
        self.weights = _generator_weights()  # first: a clear message when the extra is missing
        from gan_face_generate.models import Generator

        self.sha256 = hashlib.sha256(self.weights.read_bytes()).hexdigest()
        checkpoint = torch.load(self.weights, map_location="cpu", weights_only=True)
        self.net = Generator(0, 3, Z_SIZE, 64)
        self.net.load_state_dict(checkpoint["netG_state_dict"])
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def render(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(z[i : i + 256].view(-1, Z_SIZE, 1, 1)) for i in range(0, len(z), 256)])


def identities(role: str, count: int, offset: int = 0) -> torch.Tensor:
    """z vectors of `count` people of one role (pretrain / lora / heldout / negatives): a split by identity,
    each role drawn from its own seeded stream, so the roles share no person."""
    generator = torch.Generator().manual_seed(ROLE_SEEDS[role])
    z = torch.randn(offset + count, Z_SIZE, generator=generator)
    return z[offset:]


# --------------------------------------------------------------------------- the edit and the second view


@dataclass(frozen=True)
class Edit:
    """The identity-preserving edit whose right answer is known: a re-pose (rotation about the centre,
    scale, shift) and a colour grade (gamma, then per-channel gains)."""

    angle_deg: float = 12.0
    scale: float = 0.88
    shift_px: tuple[float, float] = (3.0, 2.0)
    gamma: float = 0.85
    gains: tuple[float, float, float] = (1.12, 1.0, 0.82)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        posed = repose(
            images,
            torch.full((n,), self.angle_deg),
            torch.full((n,), self.scale),
            torch.tensor(self.shift_px).expand(n, 2),
        )
        return grade(posed, self.gamma, self.gains)


def repose(images: torch.Tensor, angle_deg: torch.Tensor, scale: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Rotate by angle (counter-clockwise on screen), scale about the centre, then shift (pixels);
    the border is mirrored so no black corners give the pose away."""
    n, _, h, w = images.shape
    a = torch.deg2rad(angle_deg.float())
    cos, sin = torch.cos(a), torch.sin(a)
    # affine_grid maps output -> input coordinates: the inverse of (scale * R(-a) p + d)
    shift = torch.stack([shift_px[:, 0] * 2.0 / w, shift_px[:, 1] * 2.0 / h], dim=1).float()
    inverse = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1) / scale.float().view(n, 1, 1)
    theta = torch.cat([inverse, -(inverse @ shift.unsqueeze(-1))], dim=2)
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def grade(images: torch.Tensor, gamma: float, gains: tuple[float, float, float]) -> torch.Tensor:
    unit = ((images + 1.0) / 2.0).clamp(0.0, 1.0) ** gamma * torch.tensor(gains).view(1, 3, 1, 1)
    return unit.clamp(0.0, 1.0) * 2.0 - 1.0


@dataclass(frozen=True)
class View:
    """A second view of a person: the DCGAN at z + sigma * noise, re-posed at random (rotation, scale, shift
    drawn uniformly within the bounds), no colour grade."""

    sigma: float = 0.3
    max_angle_deg: float = 8.0
    scale_range: float = 0.05
    max_shift_px: float = 2.0

    def render(self, source: FaceSource, z: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        n = len(z)
        jittered = z + self.sigma * torch.randn(z.shape, generator=g)
        angle = (torch.rand(n, generator=g) * 2 - 1) * self.max_angle_deg
        scale = 1.0 + (torch.rand(n, generator=g) * 2 - 1) * self.scale_range
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * self.max_shift_px
        return repose(source.render(jittered), angle, scale, shift)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> RGB uint8 [N, H, W, 3]."""
    return ((images.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def upscale(rgb: np.ndarray, size: int = DETECT_SIZE) -> np.ndarray:
    import cv2

    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_CUBIC)


# --------------------------------------------------------------------------- the generator


@dataclass(frozen=True)
class NetSettings:
    width: int = 32
    pretrain_steps: int = 4000
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    # `shift` timestep sampling of the pre-training: 1 keeps half the samples at t < 0.5, where the final
    # sampling steps (and the face loss) work; 2.2 (the seed guide's, median t 0.69) left noisy samples
    shift: float = 1.0
    ema: float = 0.995


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float().view(-1, 1) * 1000.0 * freqs.view(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class FlowNet(nn.Module):
    """Conditional flow matching in pixels: (x_t, control, t) -> velocity, all [N, 3, 64, 64].

    A small U-Net at 32/16/8 px on a 2x pixel-unshuffle of the 64 px input (no information lost); its
    8 px level sees the whole face, which the re-pose needs.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        w1, w2 = width, 2 * width
        tdim = 4 * width
        self.time = nn.Sequential(nn.Linear(width, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.width = width
        self.inp = nn.Conv2d(6 * 4, w1, 3, padding=1)
        self.enc1 = ResBlock(w1, w1, tdim)
        self.down1 = nn.Conv2d(w1, w2, 3, stride=2, padding=1)
        self.enc2 = ResBlock(w2, w2, tdim)
        self.down2 = nn.Conv2d(w2, w2, 3, stride=2, padding=1)
        self.mid1 = ResBlock(w2, w2, tdim)
        self.mid2 = ResBlock(w2, w2, tdim)
        self.up2 = nn.Conv2d(w2, w2, 3, padding=1)
        self.dec2 = ResBlock(2 * w2, w2, tdim)
        self.up1 = nn.Conv2d(w2, w1, 3, padding=1)
        self.dec1 = ResBlock(2 * w1, w1, tdim)
        self.out_norm = nn.GroupNorm(8, w1)
        self.out = nn.Conv2d(w1, 3 * 4, 3, padding=1)

    def forward(self, x_t: torch.Tensor, control: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(sinusoidal(t, self.width))
        h1 = self.enc1(self.inp(F.pixel_unshuffle(torch.cat([x_t, control], dim=1), 2)), temb)
        h2 = self.enc2(self.down1(h1), temb)
        h = self.mid2(self.mid1(self.down2(h2), temb), temb)
        h = self.dec2(torch.cat([self.up2(F.interpolate(h, scale_factor=2.0)), h2], dim=1), temb)
        h = self.dec1(torch.cat([self.up1(F.interpolate(h, scale_factor=2.0)), h1], dim=1), temb)
        return F.pixel_shuffle(self.out(F.silu(self.out_norm(h))), 2)


def shuffled_batches(count: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices into `count` items: a fresh permutation whenever fewer than a batch are left."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        if len(order) < batch:
            order = torch.randperm(count, generator=generator)
        idx, order = order[:batch], order[batch:]
        yield idx


def sample_t(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """The trainer's `shift` timestep sampling (trainer/flow_matching.py `sample_timesteps`, sigmoid_scale 1)."""
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    return t * shift / (1 + (shift - 1) * t)


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise; the velocity target is noise - x0 and x0_hat = x_t - t v."""
    tt = t.view(-1, 1, 1, 1)
    return (1 - tt) * x0 + tt * noise


def euler(
    model: nn.Module,
    x: torch.Tensor,
    control: torch.Tensor,
    times: list[torch.Tensor] | torch.Tensor,
    first_velocity: torch.Tensor | None = None,
) -> torch.Tensor:
    """Euler steps of dx/dt = v from times[0] down to times[-1] (each [N] or a scalar); differentiable.
    `first_velocity`: v at times[0], already computed by the caller."""
    for i in range(len(times) - 1):
        t_now, t_next = times[i], times[i + 1]
        v = first_velocity if (i == 0 and first_velocity is not None) else model(x, control, t_now.expand(len(x)))
        x = x + (t_next - t_now).view(-1, 1, 1, 1) * v
    return x


def sampling_times(steps: int, shift: float) -> list[torch.Tensor]:
    """The trainer's sampling schedule: linear sigmas from 1 to 0, shifted."""
    s = torch.linspace(1.0, 0.0, steps + 1)
    return list((s * shift / (1 + (shift - 1) * s)).unbind(0))


@torch.no_grad()
def sample(model: nn.Module, control: torch.Tensor, noise: torch.Tensor, steps: int, shift: float) -> torch.Tensor:
    out = []
    for i in range(0, len(control), 32):
        times = [t.expand(len(control[i : i + 32])) for t in sampling_times(steps, shift)]
        out.append(euler(model, noise[i : i + 32], control[i : i + 32], times))
    return torch.cat(out)


def pretrained_base(
    settings: NetSettings, edit: Edit, controls: torch.Tensor, cache: Path, data_key: str, log=print
) -> tuple[FlowNet, bool]:
    """The base generator pre-trained on the pre-training people's (control, edited target) pairs; cached
    under `cache` by a hash of every setting and of the data. Returns (EMA model, fitted now)."""
    key = hashlib.sha256(repr((asdict(settings), asdict(edit), data_key, "flownet-v2")).encode("utf-8")).hexdigest()[
        :16
    ]
    path = cache / f"tier1_flownet_{key}.pt"
    if path.is_file():
        model = FlowNet(settings.width)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval().requires_grad_(False), False
    targets = edit.apply(controls)
    torch.manual_seed(ROLE_SEEDS["pretrain"])
    model = FlowNet(settings.width)
    ema = FlowNet(settings.width)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    generator = torch.Generator().manual_seed(ROLE_SEEDS["pretrain"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, settings.pretrain_lr, total_steps=settings.pretrain_steps, pct_start=0.05
    )
    batches = shuffled_batches(len(controls), settings.pretrain_batch, generator)
    losses = []
    for step in range(settings.pretrain_steps):
        idx = next(batches)
        x0, c = targets[idx], controls[idx]
        t = sample_t(len(x0), settings.shift, generator)
        noise = torch.randn(x0.shape, generator=generator)
        loss = F.mse_loss(model(noised(x0, noise, t), c, t), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1.0 - settings.ema)
        losses.append(loss.item())
        if (step + 1) % 500 == 0 or step + 1 == settings.pretrain_steps:
            log(f"  pre-training step {step + 1}/{settings.pretrain_steps}: MSE {np.mean(losses[-100:]):.4f}")
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(ema.state_dict(), partial)
    os.replace(partial, path)
    return ema.eval(), True
