"""The checkpointed single-frame decode equals `vae.decode` (values and gradients) and keeps fewer tensors."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from face_consistency.trainer.memory_plan import measure_saved_bytes
from face_consistency.trainer.models import shipped_config
from face_consistency.trainer.vae_decode import checkpointed_decode
from tiny_qwen import TINY_VAE_CONFIG

pytestmark = pytest.mark.trainer


@pytest.mark.parametrize("config", [TINY_VAE_CONFIG, "real"], ids=["tiny", "real-width"])
def test_checkpointed_decode_equals_vae_decode_with_gradients(config):
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**(shipped_config("qwen_image_vae.json") if config == "real" else config)).eval()
    vae.requires_grad_(False)
    size = 4 if config == "real" else 6
    latents = torch.randn(2, 16, 1, size, size + 2)
    weights = torch.randn(2, 3, 1, size * 8, (size + 2) * 8)

    plain_in = latents.clone().requires_grad_(True)
    plain = vae.decode(plain_in, return_dict=False)[0]
    (plain * weights).sum().backward()
    ours_in = latents.clone().requires_grad_(True)
    ours = checkpointed_decode(vae, ours_in)
    (ours * weights).sum().backward()
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(ours_in.grad, plain_in.grad)
    kept = measure_saved_bytes(lambda: checkpointed_decode(vae, latents.clone().requires_grad_(True)), [vae])[0]
    everything = measure_saved_bytes(
        lambda: checkpointed_decode(vae, latents.clone().requires_grad_(True), use_checkpoint=False), [vae]
    )[0]
    assert kept < everything / 5


def test_checkpointed_decode_refuses_several_frames():
    vae = AutoencoderKLQwenImage(**TINY_VAE_CONFIG)
    with pytest.raises(ValueError, match="one-frame"):
        checkpointed_decode(vae, torch.zeros(1, 16, 2, 4, 4))
