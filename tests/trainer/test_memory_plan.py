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
    ARCHITECTURES,
    GIB,
    DecoderSaved,
    MemoryInputs,
    decode_size,
    decoder_saved_values,
    estimate,
    image_tokens,
    measure_saved_bytes,
    plan_warning,
)
from face_consistency.trainer.models import shipped_config
from face_consistency.trainer.vae_decode import checkpointed_decode, decoder_stages, vae_scale
from face_consistency.training_contract import libraries
from face_consistency.training_contract.model_versions import QWEN_IMAGE_21, QWEN_IMAGE_EDIT
from torch.utils.checkpoint import checkpoint

pytestmark = pytest.mark.trainer
# CI's run under the declared floors has no 2.1 classes: the 2.1 plan's tests skip there
TOO_OLD_FOR_21 = libraries.too_old_for("qwen-image-2.1")
needs_21_classes = pytest.mark.skipif(TOO_OLD_FOR_21 is not None, reason=str(TOO_OLD_FOR_21))

TRANSFORMER = shipped_config("qwen_image_edit_transformer.json")
VAE = shipped_config("qwen_image_vae.json")
BLOCK_SAVED_PER_TOKEN = ARCHITECTURES[QWEN_IMAGE_EDIT].block_saved_per_token


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


def assert_decoder_matches_the_formula(vae: torch.nn.Module, latents: torch.Tensor, expected: DecoderSaved) -> None:
    """What the decode of `latents` saves, plainly and checkpointed, and its largest stage, against `expected`."""
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


@pytest.mark.parametrize("latent_size", [(8, 8), (12, 16)])
def test_decoder_activations_match_the_formula(latent_size):
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**VAE).eval().requires_grad_(False)
    latents = torch.randn(1, 16, 1, latent_size[1], latent_size[0], requires_grad=True)
    assert_decoder_matches_the_formula(vae, latents, decoder_saved_values(VAE, latent_size))


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


# Qwen-Image 2.1: the same plan on its architecture (single-stream blocks 4096 wide, SwiGLU, patch size 1 on a
# 16x 64-channel VAE whose up blocks are residual)
TRANSFORMER_21 = shipped_config("qwen_image_21_transformer.json")
VAE_21 = shipped_config("qwen_image_21_vae.json")
# published sizes of Comfy-Org's bf16 files, as reported: DiT 14.23 GB, Qwen3-VL-8B 17.53 GB, VAE 675,509,688 bytes
PUBLISHED_VAE_21_BYTES = 675_509_688


def qwen_image21_job(**changes) -> MemoryInputs:
    """The seed guide's flags on 2.1: a 1024² target with one 1024² condition image, ~300 prompt tokens."""
    return seed_guide(
        **{"transformer_config": TRANSFORMER_21, "vae_config": VAE_21, "family": QWEN_IMAGE_21, **changes}
    )


@needs_21_classes
def test_21_block_activations_match_the_formula():
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21TransformerBlock

    heads, head_dim = TRANSFORMER_21["num_attention_heads"], TRANSFORMER_21["attention_head_dim"]
    dim = heads * head_dim
    with torch.device("meta"):
        block = QwenImage21TransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim)
    block = block.to_empty(device="cpu").requires_grad_(False)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    text, image = 16, 64  # one joint sequence: the prompt (a causal segment), then the target's tokens
    tokens = text + image
    hidden = torch.randn(1, tokens, dim, requires_grad=True)
    modulation = torch.randn(2, 4 * dim, requires_grad=True)  # the sample's timestep row and the t = 0 row
    target = torch.arange(tokens) >= text

    def forward(x, mod):
        return block(
            hidden_states=x,
            modulation=mod,
            rotary_emb=torch.ones(tokens, head_dim // 2, dtype=torch.complex64),
            target_token_mask=target,
            segments=[(0, text, True)],
        )

    measured = saved_bytes(block, lambda: forward(hidden, modulation))
    per_token = ARCHITECTURES[QWEN_IMAGE_21].block_saved_per_token
    assert measured == pytest.approx(per_token * tokens * dim * 4, rel=0.2)
    kept = saved_bytes(block, lambda: checkpoint(forward, hidden, modulation, use_reentrant=False))
    assert kept == pytest.approx(tokens * dim * 4, rel=0.2)


@needs_21_classes
def test_21_decoder_activations_match_the_formula():
    """The real-size 2.1 decoder (its up blocks one stage each), decoded stage by stage as `vae.decode` does."""
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage21(**VAE_21).eval().requires_grad_(False)
    latent_size = (8, 8)
    latents = torch.randn(1, 64, 1, latent_size[1], latent_size[0], requires_grad=True)
    with torch.no_grad():
        assert torch.equal(checkpointed_decode(vae, latents), vae.decode(latents).sample)
    assert_decoder_matches_the_formula(vae, latents, decoder_saved_values(VAE_21, latent_size, QWEN_IMAGE_21))


@needs_21_classes
def test_21_weights_are_the_published_files():
    """Built on the meta device from the shipped configs: the DiT and VAE are the bytes of Comfy-Org's bf16
    files (the VAE's file is its tensors plus a header of under 64 KiB)."""
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel

    with init_empty_weights():
        dit = QwenImage21Transformer2DModel(**TRANSFORMER_21)
        vae = AutoencoderKLQwenImage21(**VAE_21)
    vae_params = sum(p.numel() for p in vae.parameters())
    assert 0 < PUBLISHED_VAE_21_BYTES - 2 * vae_params < 64 * 1024
    assert vae.config.z_dim == 64 and vae_scale(VAE_21) == 16
    plan = estimate(qwen_image21_job(face_decode=None))
    assert plan.parts["dit_weights"] == 2 * sum(p.numel() for p in dit.parameters()) == 2 * 7_115_124_736
    assert plan.parts["vae_weights"] == 2 * vae_params == 2 * 337_740_404
    dit.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    fp8 = sum(p.numel() * p.element_size() for p in dit.parameters())
    assert estimate(qwen_image21_job(fp8_base=True, face_decode=None)).parts["dit_weights"] == pytest.approx(
        fp8, rel=0.01
    )
    swapped = estimate(qwen_image21_job(fp8_base=True, blocks_to_swap=8))
    assert swapped.swapped_bytes == 8 * sum(p.numel() for p in dit.transformer_blocks[0].parameters())


@needs_21_classes
def test_21_tokens_are_latents_at_patch_size_one_with_every_condition_image():
    """A 2.1 image is (side / 16)² tokens (16x VAE, no patches): as many as an Edit image at 8x and 2x2 patches.
    Each condition image (1 to 10) adds its own tokens to the one joint sequence."""
    assert image_tokens((1024, 1024), 16, 1) == image_tokens((1024, 1024)) == 64 * 64
    dim = TRANSFORMER_21["num_attention_heads"] * TRANSFORMER_21["attention_head_dim"]
    blocks = TRANSFORMER_21["num_layers"]
    per_token = (blocks + ARCHITECTURES[QWEN_IMAGE_21].block_saved_per_token) * dim * 2  # checkpointed, bf16
    activations = [
        estimate(qwen_image21_job(control_sizes=((1024, 1024),) * n)).parts["activations"] for n in (1, 2, 10)
    ]
    assert activations[0] == (2 * 64 * 64 + 300) * per_token
    assert activations[1] - activations[0] == 64 * 64 * per_token
    assert activations[2] - activations[0] == 9 * 64 * 64 * per_token
    # the face decode: a 512² box is 32 x 32 latents of the 64-channel VAE
    assert decode_size(qwen_image21_job()) == (512, 512)
    face = estimate(qwen_image21_job()).parts["face_loss"]
    assert face == int(decoder_saved_values(VAE_21, (32, 32), QWEN_IMAGE_21).peak(True) * 2)


@needs_21_classes
def test_21_plan_for_24_and_16_gb_cards():
    """The figures docs/training.md prints for 2.1 (bf16, gradient checkpointing, AdamW8bit, rank 16, the
    `face` decode): under a 24 GB card as it is; a 16 GB card needs --fp8_base. Condition tokens add up: ten
    1024² condition images fit no 24 GB card (even every block swapped), ten at 512² fit as they are."""
    job = qwen_image21_job()
    plan = estimate(job, 24 * GIB)
    assert plan.total / GIB == pytest.approx(20.9, abs=0.05)
    assert {k: round(v / GIB, 1) for k, v in plan.parts.items()} == {
        "dit_weights": 13.3,
        "vae_weights": 0.6,
        "lora_and_grads": 0.3,
        "optimizer_state": 0.1,
        "activations": 3.7,
        "face_loss": 1.9,
        "overhead": 1.0,
    }
    assert plan_warning(job, plan) is None
    warning = plan_warning(job, estimate(job, 16 * GIB))
    assert warning == "the memory plan (20.9 GiB) exceeds the device's 16.0 GiB: add --fp8_base (14.3 GiB)"
    ten = qwen_image21_job(control_sizes=((1024, 1024),) * 10)
    warning = plan_warning(ten, estimate(ten, 24 * GIB))
    assert warning and "even with --fp8_base --blocks_to_swap 31" in warning and "lower the resolution" in warning
    ten_small = qwen_image21_job(control_sizes=((512, 512),) * 10)
    assert plan_warning(ten_small, estimate(ten_small, 24 * GIB)) is None
