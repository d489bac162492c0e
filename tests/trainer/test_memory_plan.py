"""The memory plan's formulas against measured bytes of the real-width modules (docs/training.md: Memory on a
24 GB GPU).

Parameters: the real architecture on the meta device. Activations: bytes of the tensors autograd
saves (`saved_tensors_hooks`, each storage once, parameters excluded) in a real-width transformer
block and the real-size VAE decoder at small sizes on the CPU.
"""

from __future__ import annotations

import functools

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from face_consistency.trainer.face.loss import FaceIdentityLoss, FrozenFaceRecognizer
from face_consistency.trainer.lora import NetworkArgs
from face_consistency.trainer.memory_plan import (
    BLOCK_SAVED_PER_TOKEN,
    GIB,
    MemoryInputs,
    decode_size,
    decoder_saved_values,
    estimate,
    image_tokens,
    measure_saved_bytes,
    plan_warning,
)
from face_consistency.trainer.models import shipped_config
from face_consistency.trainer.vae_decode import checkpointed_decode, decoder_stages
from torch.utils.checkpoint import checkpoint

pytestmark = pytest.mark.trainer

TRANSFORMER = shipped_config("qwen_image_edit_transformer.json")
VAE = shipped_config("qwen_image_vae.json")


def saved_bytes(module: torch.nn.Module, fn) -> int:
    return measure_saved_bytes(fn, [module])[0]


@pytest.fixture(scope="module")
def real_block() -> torch.nn.Module:
    heads, head_dim = TRANSFORMER["num_attention_heads"], TRANSFORMER["attention_head_dim"]
    with torch.device("meta"):
        block = QwenImageTransformerBlock(dim=heads * head_dim, num_attention_heads=heads, attention_head_dim=head_dim)
    block = block.to_empty(device="cpu").requires_grad_(False)  # values do not change what is saved
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block


@pytest.mark.parametrize("image_tokens, text_tokens", [(64, 16), (192, 40)])
def test_block_activations_match_the_formula(real_block, image_tokens, text_tokens):
    dim = real_block.dim
    img = torch.randn(1, image_tokens, dim, requires_grad=True)
    txt = torch.randn(1, text_tokens, dim, requires_grad=True)
    temb = torch.randn(1, dim, requires_grad=True)
    head_dim = TRANSFORMER["attention_head_dim"]
    freqs = (
        torch.ones(image_tokens, head_dim // 2, dtype=torch.complex64),
        torch.ones(text_tokens, head_dim // 2, dtype=torch.complex64),
    )

    def run(blocks_checkpointed: bool):
        def forward(*tensors):
            return real_block(
                hidden_states=tensors[0],
                encoder_hidden_states=tensors[1],
                encoder_hidden_states_mask=None,
                temb=tensors[2],
                image_rotary_emb=freqs,
            )

        return lambda: (
            checkpoint(forward, img, txt, temb, use_reentrant=False) if blocks_checkpointed else forward(img, txt, temb)
        )

    tokens = image_tokens + text_tokens
    measured = saved_bytes(real_block, run(False))
    assert measured == pytest.approx(BLOCK_SAVED_PER_TOKEN * tokens * dim * 4, rel=0.2)
    kept = saved_bytes(real_block, run(True))
    assert kept == pytest.approx(tokens * dim * 4, rel=0.2)


@pytest.mark.parametrize("latent_size", [(8, 8), (12, 16)])
def test_decoder_activations_match_the_formula(latent_size):
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**VAE).eval().requires_grad_(False)
    latents = torch.randn(1, 16, 1, latent_size[1], latent_size[0], requires_grad=True)
    expected = decoder_saved_values(VAE, latent_size)
    plain = saved_bytes(vae, lambda: checkpointed_decode(vae, latents, use_checkpoint=False))
    assert plain == pytest.approx(expected.total * 4, rel=0.2)
    kept = saved_bytes(vae, lambda: checkpointed_decode(vae, latents))
    assert kept == pytest.approx(expected.boundaries * 4, rel=0.2)
    # the largest single stage, held while it is recomputed in the backward pass
    x, stages = latents, []
    for stage in decoder_stages(vae):
        stages.append(saved_bytes(vae, functools.partial(stage, x)))
        with torch.no_grad():
            x = stage(x).requires_grad_(True)
    assert max(stages) == pytest.approx(expected.largest_stage * 4, rel=0.2)


def test_face_loss_plan_matches_the_decode_warp_and_recognizer(insightface_root, testpack_dir):
    """The plan's face part: the decoder's formula plus the recognizer's bytes measured at plan time,
    against everything the loss saves (checkpointed `face` decode of a 128² target, warp, recognizer)."""
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**VAE).eval().requires_grad_(False)
    recognizer = FrozenFaceRecognizer.from_pack(testpack_dir.name, models_root=insightface_root)
    loss_fn = FaceIdentityLoss(recognizer, weight=1.0)
    inputs = seed_guide(
        compute_bytes=4,
        target_size=(128, 128),
        face_decode="face",
        face_recognizer_saved_bytes=recognizer.saved_bytes_per_sample(),
    )
    side = decode_size(inputs)[0]
    latents = torch.randn(1, 16, 1, side // 8, side // 8, requires_grad=True)
    kps = torch.tensor([[[0.35, 0.4], [0.65, 0.4], [0.5, 0.55], [0.38, 0.7], [0.62, 0.7]]]) * side

    def loss() -> torch.Tensor:
        images = checkpointed_decode(vae, latents)[:, :, 0]
        return loss_fn(images, kps, torch.randn(1, 128), torch.ones(1, dtype=torch.bool), torch.zeros(1)).loss

    measured, _ = measure_saved_bytes(loss, [vae, recognizer])
    values = decoder_saved_values(VAE, (side // 8, side // 8))
    assert measured == pytest.approx(values.after_forward(True) * 4 + inputs.face_recognizer_saved_bytes, rel=0.2)
    assert estimate(inputs).parts["face_loss"] == int(values.peak(True, inputs.face_recognizer_saved_bytes / 4) * 4)


def seed_guide(**changes) -> MemoryInputs:
    values = dict(
        transformer_config=TRANSFORMER,
        vae_config=VAE,
        compute_bytes=2,
        fp8_base=False,
        blocks_to_swap=0,
        gradient_checkpointing=True,
        batch_size=1,
        target_size=(1024, 1024),
        control_sizes=((1024, 1024),),
        text_tokens=300,
        network_dim=16,
        network_args=NetworkArgs(),
        optimizer="AdamW8bit",
        face_decode="face",
    )
    return MemoryInputs(**{**values, **changes})


def test_weights_match_the_real_architectures_parameter_bytes():
    with init_empty_weights():
        dit = QwenImageTransformer2DModel(**TRANSFORMER)
        vae = AutoencoderKLQwenImage(**VAE)
    plan = estimate(seed_guide(face_decode=None))
    assert plan.parts["dit_weights"] == 2 * sum(p.numel() for p in dit.parameters()) == 2 * 20_430_401_088
    assert plan.parts["vae_weights"] == 2 * sum(p.numel() for p in vae.parameters())
    dit.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    fp8 = sum(p.numel() * p.element_size() for p in dit.parameters())
    assert estimate(seed_guide(fp8_base=True, face_decode=None)).parts["dit_weights"] == pytest.approx(fp8, rel=0.2)
    swapped = estimate(seed_guide(fp8_base=True, blocks_to_swap=16))
    block = sum(p.numel() for p in dit.transformer_blocks[0].parameters())
    assert swapped.swapped_bytes == 16 * block


def test_over_the_device_the_warning_names_the_flags_that_fit():
    device = 24 * 10**9
    full = seed_guide(face_decode="full")
    plan = estimate(full, device)
    assert plan.total > device and plan.parts["face_loss"] > estimate(seed_guide(), device).parts["face_loss"]
    warning = plan_warning(full, plan)
    assert warning and "--fp8_base" in warning and "--blocks_to_swap" in warning and "--face_decode face" in warning
    assert "exceeds" in warning and "add" in warning
    recipe = seed_guide(fp8_base=True, blocks_to_swap=16)
    assert plan_warning(recipe, estimate(recipe, device)) is None
    assert plan_warning(full, estimate(full, None)) is None  # no device memory known (CPU): no warning
    assert estimate(recipe, device).total < 24 * GIB


def test_the_plan_follows_the_vaes_scale_and_the_rollouts_forward_passes():
    """A 4x VAE (one downsampling fewer): the face box is a multiple of 4 px and its latents are side / 4, and
    an image is 4x as many DiT tokens (the activations follow). A rollout of N steps keeps N forward passes'
    block inputs for the backward pass."""
    vae_4x = {**VAE, "dim_mult": VAE["dim_mult"][:3], "temperal_downsample": VAE["temperal_downsample"][:2]}
    inputs = seed_guide(vae_config=vae_4x, target_size=(1000, 1000))
    side = 1000 // 2 // 4 * 4  # FACE_BOX_FRACTION of the shorter side, down to the VAE's scale
    assert decode_size(inputs) == (side, side) and side % 8 != 0
    values = decoder_saved_values(vae_4x, (side // 4, side // 4))
    assert estimate(inputs).parts["face_loss"] == int(values.peak(True, 0.0) * 2)
    assert image_tokens((1024, 1024), 4) == 4 * image_tokens((1024, 1024)) == 4 * 64 * 64
    dim = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    per_token = estimate(seed_guide(text_tokens=0)).parts["activations"] / (2 * image_tokens((1024, 1024)))
    assert (
        estimate(seed_guide(vae_config=vae_4x, text_tokens=0)).parts["activations"]
        == pytest.approx(per_token * 2 * image_tokens((1024, 1024), 4))
        and per_token % dim == 0
    )

    one, three = (estimate(seed_guide(face_rollout_steps=n)).parts["activations"] for n in (1, 3))
    tokens = 2 * image_tokens((1024, 1024)) + 300
    stored = (
        TRANSFORMER["num_layers"] * tokens * TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"] * 2
    )
    assert three - one == 2 * stored
