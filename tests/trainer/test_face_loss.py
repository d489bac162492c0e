"""The differentiable face-identity loss against InsightFace itself, on the shared real pack and photos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from face_consistency.faceid import ModelPackError, cosine_similarity, load_face_model
from face_consistency.trainer.face.loss import (
    FaceIdentityLoss,
    FrozenFaceRecognizer,
    RecognizerSpec,
    estimate_norm,
    face_region_boxes,
    full_image_region,
    warp_to_arcface,
)
from face_consistency.trainer.face.targets import (
    collate_face_targets,
    compute_face_target,
    load_face_target,
    save_face_target,
)
from safetensors import safe_open
from torch import nn

pytestmark = pytest.mark.trainer

PHOTOS = ("biden.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg")


def to_tensor(bgr: np.ndarray) -> torch.Tensor:
    """BGR uint8 HxWx3 -> RGB [1, 3, H, W] in [-1, 1], the decoded-image convention."""
    return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def to_bgr(image: torch.Tensor) -> np.ndarray:
    rgb = ((image.detach()[0].permute(1, 2, 0).clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()
    return np.ascontiguousarray(rgb[:, :, ::-1])


def cos(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return cosine_similarity(np.asarray(a, dtype=np.float32).ravel(), np.asarray(b, dtype=np.float32).ravel())


@pytest.fixture(scope="module")
def face_model(testpack_dir: Path):
    return load_face_model(testpack_dir, provider="cpu", det_size=640)


@pytest.fixture(scope="module")
def recognizer(insightface_root: Path, testpack_dir: Path) -> FrozenFaceRecognizer:
    # by pack name under a models root, as the trainer's --face_model_name/--face_models_root give it
    return FrozenFaceRecognizer.from_pack(testpack_dir.name, models_root=insightface_root)


@pytest.fixture(scope="module")
def ort_recognizer(recognizer: FrozenFaceRecognizer):
    """InsightFace's own ArcFaceONNX on onnxruntime: the independent reference."""
    from insightface.model_zoo import get_model

    return get_model(str(recognizer.spec.onnx_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def photos(face_model, faces_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (BGR image, keypoints of its largest face) as the engine detects them."""
    images = {name: cv2.imread(str(faces_dir / name)) for name in PHOTOS}
    results = face_model.analyze(list(images.values()))
    assert all(r.ok for r in results), [r.reason for r in results]
    return {name: (images[name], r.face.kps.astype(np.float32)) for name, r in zip(images, results)}


@pytest.fixture(scope="module")
def face_loss(recognizer: FrozenFaceRecognizer) -> FaceIdentityLoss:
    return FaceIdentityLoss(recognizer, weight=1.0, max_t=None)


def test_estimate_norm_matches_insightface(photos) -> None:
    from insightface.utils.face_align import estimate_norm as insightface_estimate_norm

    rng = np.random.default_rng(0)
    kps = [k for _, k in photos.values()] + [rng.uniform(0, 800, size=(5, 2)).astype(np.float32) for _ in range(4)]
    for size in (112, 128, 224):
        ours = estimate_norm(torch.from_numpy(np.stack(kps)), size).numpy()
        for k, m in zip(kps, ours):
            np.testing.assert_allclose(m, insightface_estimate_norm(k, size), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", PHOTOS)
def test_warp_matches_norm_crop(name, photos, recognizer, ort_recognizer) -> None:
    from insightface.utils.face_align import norm_crop

    bgr, kps = photos[name]
    reference_crop = norm_crop(bgr, kps)
    crop = warp_to_arcface(to_tensor(bgr), torch.from_numpy(kps)[None])
    assert crop.shape == (1, 3, 112, 112)
    # pixel-level: mean absolute difference under one grey level (norm_crop rounds to uint8)
    assert np.abs(to_bgr(crop).astype(np.float32) - reference_crop).mean() < 1.0
    reference_embedding = ort_recognizer.get_feat(reference_crop)[0]
    with torch.no_grad():
        torch_embedding = recognizer(crop)[0].numpy()
    assert cos(torch_embedding, reference_embedding) >= 0.999
    assert cos(ort_recognizer.get_feat(to_bgr(crop))[0], reference_embedding) >= 0.999


def test_warp_with_keypoints_from_another_resolution(photos, recognizer, ort_recognizer) -> None:
    """Reduced-resolution decode and face-region decode: keypoints stay in full-image pixels."""
    from insightface.utils.face_align import norm_crop

    bgr, kps = photos["obama.jpg"]
    height, width = bgr.shape[:2]
    reference_embedding = ort_recognizer.get_feat(norm_crop(bgr, kps))[0]
    kps_t = torch.from_numpy(kps)[None]

    half = cv2.resize(bgr, (width // 2, height // 2), interpolation=cv2.INTER_AREA)
    half_crop = warp_to_arcface(to_tensor(half), kps_t, full_image_region(width, height))
    full_crop = warp_to_arcface(to_tensor(bgr), kps_t)
    x0, y0, x1, y1 = 250, 0, 750, 500  # a box around the face (and its whole 112 crop) in full-image pixels
    region_crop = warp_to_arcface(
        to_tensor(bgr[y0:y1, x0:x1]), kps_t, torch.tensor([[x0, y0, x1, y1]], dtype=torch.float64)
    )
    with torch.no_grad():
        assert cos(recognizer(half_crop), reference_embedding) >= 0.99
        torch.testing.assert_close(region_crop, full_crop, atol=1e-3, rtol=0)  # fp32 grid rounding only


def test_face_region_boxes_hold_the_whole_crop(photos) -> None:
    """Decoding only the face region: same-size latent-aligned boxes, warp identical to the full image's."""
    bgr, kps = photos["obama2.jpg"]
    bgr = bgr[: bgr.shape[0] // 16 * 16, : bgr.shape[1] // 16 * 16]  # bucket sizes are multiples of 16
    height, width = bgr.shape[:2]
    kps_t = torch.from_numpy(
        np.stack([kps, kps * 0.5, kps + np.array([200.0, 300.0])])
    ).float()  # incl. a face over the border
    boxes = face_region_boxes(kps_t, (width, height))
    assert boxes.shape == (3, 4) and (boxes % 8 == 0).all()
    sizes = boxes[:, 2:] - boxes[:, :2]
    assert (sizes == sizes[0]).all() and (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    image = to_tensor(bgr)
    full = warp_to_arcface(image.expand(3, -1, -1, -1), kps_t)
    regions = torch.cat([image[:, :, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes.tolist()])
    torch.testing.assert_close(warp_to_arcface(regions, kps_t, boxes), full, atol=1e-3, rtol=0)


def test_converted_recognizer_matches_onnxruntime(photos, recognizer, ort_recognizer) -> None:
    from insightface.data import get_image
    from insightface.utils.face_align import norm_crop

    crops = [norm_crop(bgr, kps) for bgr, kps in photos.values()] + [get_image("Tom_Hanks_54745")]
    reference = ort_recognizer.get_feat(crops)
    with torch.no_grad():
        ours = recognizer(torch.cat([to_tensor(c) for c in crops])).numpy()
    assert ours.shape == reference.shape == (len(crops), 128)
    for a, b in zip(ours, reference):
        assert cos(a, b) >= 0.9999


def test_recognizer_input_convention_follows_insightface() -> None:
    """127.5/127.5 packs get the [-1,1] RGB tensor as is; self-normalising graphs get 0..255."""
    faces = torch.linspace(-1, 1, 2 * 3 * 112 * 112).reshape(2, 3, 112, 112)
    standard = FrozenFaceRecognizer(nn.Flatten(), RecognizerSpec(Path("x.onnx"), 112, 127.5, 127.5))
    raw_pixels = FrozenFaceRecognizer(nn.Flatten(), RecognizerSpec(Path("x.onnx"), 112, 0.0, 1.0))
    torch.testing.assert_close(standard(faces), faces.flatten(1))
    torch.testing.assert_close(raw_pixels(faces), ((faces + 1) * 127.5).flatten(1))


def test_recognizer_is_frozen_and_stays_in_eval(face_loss, photos) -> None:
    parent = nn.ModuleDict({"face": face_loss, "other": nn.BatchNorm1d(4)})
    parent.train()
    assert parent["other"].training
    assert not any(m.training for m in face_loss.recognizer.modules())
    assert not any(p.requires_grad for p in face_loss.recognizer.parameters())
    bgr, kps = photos["obama2.jpg"]
    image = to_tensor(bgr).requires_grad_(True)
    out = face_loss(
        image, torch.from_numpy(kps)[None], torch.randn(1, 128), torch.ones(1, dtype=torch.bool), torch.zeros(1)
    )
    out.loss.backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in face_loss.recognizer.parameters())


def write_batchnorm_recognizer(path: Path, self_normalising: bool = False) -> Path:
    """A tiny ArcFace-shaped ONNX with the ops of the 512-d packs' ResNets: BatchNorm (2-D and 1-D), PRelu, Gemm.

    self_normalising: starts with Sub/Mul nodes like the MXNet-exported ArcFace models, which
    InsightFace then feeds raw 0..255 pixels.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "conv_w": rng.normal(0, 0.2, (4, 3, 3, 3)),
        "prelu": rng.uniform(0, 0.3, (4, 1, 1)),
        "bn_s": rng.uniform(0.5, 1.5, 4),
        "bn_b": rng.normal(0, 0.1, 4),
        "bn_m": rng.normal(0, 0.5, 4),
        "bn_v": rng.uniform(0.5, 2, 4),
        "fc_w": rng.normal(0, 0.01, (8, 4 * 56 * 56)),
        "fc_b": np.zeros(8),
        "bn1_s": rng.uniform(0.5, 1.5, 8),
        "bn1_b": rng.normal(0, 0.1, 8),
        "bn1_m": rng.normal(0, 0.5, 8),
        "bn1_v": rng.uniform(0.5, 2, 8),
    }
    first = "input"
    nodes = []
    if self_normalising:
        weights.update({"mean": np.full(1, 127.5), "scale": np.full(1, 1 / 128)})
        nodes += [
            helper.make_node("Sub", ["input", "mean"], ["centred"], name="_minus0"),
            helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mul0"),
        ]
        first = "scaled"
    nodes += [
        helper.make_node("Conv", [first, "conv_w"], ["conv"], strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["conv", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        helper.make_node("PRelu", ["bn", "prelu"], ["act"]),
        helper.make_node("Flatten", ["act"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc"], transB=1),
        helper.make_node("BatchNormalization", ["fc", "bn1_s", "bn1_b", "bn1_m", "bn1_v"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_batchnorm_recognizer_keeps_running_statistics(tmp_path: Path) -> None:
    """A parent's .train() must not turn BatchNorm to batch statistics (they would drift with every step)."""
    import onnxruntime

    onnx_path = write_batchnorm_recognizer(tmp_path / "tiny_arcface.onnx")
    recognizer = FrozenFaceRecognizer.from_onnx(RecognizerSpec(onnx_path, 112, 127.5, 127.5))
    batchnorms = [m for m in recognizer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(batchnorms) == 2
    statistics = [b.running_mean.clone() for b in batchnorms]
    nn.Sequential(recognizer).train()
    faces = torch.rand(4, 3, 112, 112) * 2 - 1
    embeddings = recognizer(faces.requires_grad_(True))
    embeddings.sum().backward()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": faces.detach().numpy()})[0]
    np.testing.assert_allclose(embeddings.detach().numpy(), expected, atol=1e-4)
    assert all(torch.equal(b.running_mean, s) for b, s in zip(batchnorms, statistics))
    assert faces.grad is not None and all(p.grad is None for p in recognizer.parameters())


def test_self_normalising_pack_gets_raw_pixels(tmp_path: Path, testpack_dir: Path) -> None:
    """A pack routed like InsightFace does; its MXNet-style recognizer is fed 0..255 RGB, as ArcFaceONNX feeds it."""
    import onnxruntime

    pack = tmp_path / "models" / "mxnet_pack"
    pack.mkdir(parents=True)
    (pack / "det_2.5g.onnx").symlink_to(testpack_dir / "det_2.5g.onnx")  # the real detector, not copied
    write_batchnorm_recognizer(pack / "recognizer.onnx", self_normalising=True)
    recognizer = FrozenFaceRecognizer.from_pack("mxnet_pack", models_root=tmp_path)
    assert (recognizer.spec.input_mean, recognizer.spec.input_std) == (0.0, 1.0)
    faces = torch.rand(2, 3, 112, 112) * 2 - 1
    session = onnxruntime.InferenceSession(str(pack / "recognizer.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": ((faces + 1) * 127.5).numpy()})[0]
    np.testing.assert_allclose(recognizer(faces).detach().numpy(), expected, atol=1e-4)


def test_gradient_reaches_lora_through_vae_decode(face_loss, photos) -> None:
    """LoRA on a DiT-like output projection -> tiny Qwen-Image VAE decode -> warp -> recognizer."""
    from diffusers import AutoencoderKLQwenImage
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).requires_grad_(False)
    head = nn.ModuleDict({"proj_out": nn.Linear(4, 4)}).requires_grad_(False)
    head = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["proj_out"]), head)
    lora_params = {n: p for n, p in head.named_parameters() if p.requires_grad}
    assert lora_params

    tokens = torch.randn(2, 16, 16, 4)  # [B, h, w, C] like unpacked target tokens
    latents = head["proj_out"](tokens).permute(0, 3, 1, 2).unsqueeze(2)  # [B, C, 1, h, w]
    decoded = vae.decode(latents).sample[:, :, 0]  # [B, 3, 64, 64]
    bgr, kps = photos["obama.jpg"]
    height, width = bgr.shape[:2]
    # the decoded image stands for the whole photo at 1/14 scale: keypoints stay in photo pixels
    out = face_loss(
        decoded,
        torch.from_numpy(kps)[None].expand(2, 5, 2),
        torch.randn(2, 128),
        torch.ones(2, dtype=torch.bool),
        torch.tensor([0.1, 0.3]),
        full_image_region(width, height, 2),
    )
    out.loss.backward()
    lora_b = [p for n, p in lora_params.items() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_b)
    assert sum(float(p.grad.abs().sum()) for p in lora_b) > 0  # B gets the first gradient (A's is 0 while B is 0)


def test_adam_steps_raise_similarity_measured_by_the_engine(face_loss, face_model, photos) -> None:
    bgr, _ = photos["obama.jpg"]
    small = cv2.resize(bgr, (bgr.shape[1] // 4, bgr.shape[0] // 4), interpolation=cv2.INTER_AREA)
    before = face_model.analyze([small, photos["biden.jpg"][0]])
    assert before[0].ok and before[1].ok
    reference = torch.from_numpy(before[1].embedding)[None]
    kps = torch.from_numpy(before[0].face.kps.astype(np.float32))[None]
    image = to_tensor(small)
    delta = torch.zeros_like(image, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=0.01)
    for _ in range(10):
        optimizer.zero_grad()
        face_loss(image + delta, kps, reference, torch.ones(1, dtype=torch.bool), torch.zeros(1)).loss.backward()
        optimizer.step()
    after = face_model.analyze([to_bgr(image + delta)])[0]
    assert after.ok
    sim_before = cos(before[0].embedding, before[1].embedding)
    sim_after = cos(after.embedding, before[1].embedding)
    assert sim_after > sim_before + 0.3, (sim_before, sim_after)


def test_samples_without_face_or_high_t_are_skipped(face_loss, photos) -> None:
    bgr, kps = photos["obama2.jpg"]
    images = to_tensor(bgr).expand(3, -1, -1, -1).clone().requires_grad_(True)
    kps_t = torch.from_numpy(kps)[None].expand(3, 5, 2).clone()
    kps_t[1] = 0.0  # no face cached: zeros, never warped
    reference = torch.randn(3, 128)
    out = face_loss(images, kps_t, reference, torch.tensor([True, False, True]), torch.tensor([0.2, 0.2, 0.2]))
    assert out.metrics["face/valid"] == 2 and out.metrics["face/no_face"] == 1
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert images.grad[1].abs().sum() == 0 and images.grad[0].abs().sum() > 0

    limited = FaceIdentityLoss(face_loss.recognizer, weight=0.1, max_t=0.5)
    out = limited(images, kps_t, reference, torch.tensor([True, False, True]), torch.tensor([0.2, 0.1, 0.9]))
    assert out.metrics["face/valid"] == 1 and out.metrics["face/t"] == [0.2]
    none = limited(images, kps_t, reference, torch.tensor([False, False, True]), torch.tensor([0.2, 0.2, 0.9]))
    assert none.metrics["face/valid"] == 0 and float(none.loss) == 0.0
    total = (images.mean() ** 2) + none.loss  # the step's MSE term plus an empty face term
    total.backward()

    with pytest.raises(ValueError, match="timestep"):
        FaceIdentityLoss(face_loss.recognizer, max_t=500)  # a 1000-scaled timestep is a mistake, not a limit
    metrics = limited.measure(
        images, kps_t, reference, torch.tensor([True, False, True]), torch.tensor([0.2, 0.1, 0.9])
    )
    assert metrics["face/valid"] == 2 and metrics["face/t"] == [0.2, 0.9]
    assert -1.0 <= metrics["face_sim/x0_min"] <= metrics["face_sim/x0_mean"] <= metrics["face_sim/x0_max"] <= 1.0


def test_linear_t_weighting_weighs_each_term_by_one_minus_t(face_loss, photos) -> None:
    bgr, kps = photos["obama2.jpg"]
    images = to_tensor(bgr).expand(2, -1, -1, -1).clone()
    kps_t = torch.from_numpy(kps)[None].expand(2, 5, 2).clone()
    reference = torch.randn(2, 128)
    valid, t = torch.tensor([True, True]), torch.tensor([0.1, 0.4])
    linear = FaceIdentityLoss(face_loss.recognizer, weight=0.1, max_t=0.5, t_weighting="linear")
    sims = linear.similarity(images, kps_t, reference)
    expected = 0.1 * ((1 - t) * (1 - sims)).mean()
    torch.testing.assert_close(linear(images, kps_t, reference, valid, t).loss, expected)
    plain = FaceIdentityLoss(face_loss.recognizer, weight=0.1, max_t=0.5)
    torch.testing.assert_close(plain(images, kps_t, reference, valid, t).loss, 0.1 * (1 - sims).mean())
    with pytest.raises(ValueError, match="t_weighting"):
        FaceIdentityLoss(face_loss.recognizer, t_weighting="cosine")


def test_bf16_autocast_stays_finite(face_loss, photos) -> None:
    bgr, kps = photos["obama3.jpg"]
    small = cv2.resize(bgr, (bgr.shape[1] // 4, bgr.shape[0] // 4), interpolation=cv2.INTER_AREA)
    images = to_tensor(small).to(torch.bfloat16).expand(2, -1, -1, -1).clone().requires_grad_(True)
    kps_t = torch.from_numpy(kps / 4)[None].expand(2, 5, 2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = face_loss(images, kps_t, torch.randn(2, 128), torch.ones(2, dtype=torch.bool), torch.rand(2))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(images.grad.float()).all() and images.grad.abs().sum() > 0
    assert next(face_loss.recognizer.parameters()).dtype == torch.float32


def test_wrong_embedding_size_is_a_clear_error(face_loss, photos) -> None:
    bgr, kps = photos["obama.jpg"]
    with pytest.raises(ValueError, match="another face model pack"):
        face_loss(
            to_tensor(bgr),
            torch.from_numpy(kps)[None],
            torch.randn(1, 512),
            torch.ones(1, dtype=torch.bool),
            torch.zeros(1),
        )


def test_missing_pack_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelPackError, match="not found"):
        FrozenFaceRecognizer.from_pack("no_such_pack", models_root=tmp_path)


def test_face_targets_cache_roundtrip(face_model, faces_dir: Path, tmp_path: Path, photos, recognizer) -> None:
    with_face = compute_face_target(
        face_model, faces_dir / "obama.jpg", [faces_dir / "obama2.jpg", faces_dir / "obama3.jpg"]
    )
    assert with_face.ok and with_face.kps.shape == (5, 2) and with_face.image_size == (910, 1137)
    assert with_face.control_faces == 2 and with_face.control_embedding.shape == (128,)
    # the engine decoded the path itself (not cv2.imread): the same face within a pixel
    np.testing.assert_allclose(with_face.kps, photos["obama.jpg"][1], atol=1.0)
    assert cos(with_face.target_embedding, with_face.control_embedding) > 0.6  # same person

    blank = np.full((256, 256, 3), 127, dtype=np.uint8)
    no_face = compute_face_target(face_model, blank, [faces_dir / "biden.jpg"])
    assert not no_face.ok and no_face.reason and no_face.skip_reason("control").startswith("target:")
    no_control_face = compute_face_target(face_model, faces_dir / "biden.jpg", [blank])
    assert no_control_face.ok and no_control_face.control_embedding is None
    assert "no face in any control image" in no_control_face.skip_reason("control")
    assert no_control_face.skip_reason("target") is None

    for i, item in enumerate((with_face, no_face, no_control_face)):
        save_face_target(tmp_path / f"{i}.safetensors", item, extra_metadata={"fingerprint": f"fp{i}"})
    loaded = [load_face_target(tmp_path / f"{i}.safetensors") for i in range(3)]
    assert loaded[1].reason == no_face.reason and loaded[1].kps is None
    with safe_open(str(tmp_path / "2.safetensors"), framework="numpy") as handle:
        assert handle.metadata()["fingerprint"] == "fp2"  # the trainer cache's staleness check reads this
    np.testing.assert_array_equal(loaded[0].kps, with_face.kps)
    np.testing.assert_array_equal(loaded[0].control_embedding, with_face.control_embedding)

    batch = collate_face_targets(loaded, reference="control")
    assert batch.valid.tolist() == [True, False, False]
    assert batch.reference.shape == (3, 128) and batch.kps.shape == (3, 5, 2)
    # the cached reference embedding (onnxruntime) equals what the torch recognizer sees on the same face
    image = to_tensor(cv2.imread(str(faces_dir / "obama.jpg")))
    target_batch = collate_face_targets(loaded[:1], reference="target")
    sim = FaceIdentityLoss(recognizer).similarity(
        image, target_batch.kps, target_batch.reference, target_batch.source_region
    )
    assert float(sim) >= 0.999


def test_face_target_file_from_elsewhere_is_rejected(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, dtype=np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a face target file"):
        load_face_target(tmp_path / "other.safetensors")


def test_the_engines_own_recognizer_converts_as_the_packs(face_model, recognizer: FrozenFaceRecognizer) -> None:
    from_engine = FrozenFaceRecognizer.from_face_model(face_model)
    assert from_engine.spec == recognizer.spec
    crops = torch.rand(2, 3, recognizer.input_size, recognizer.input_size) * 2 - 1
    assert torch.allclose(from_engine(crops), recognizer(crops), atol=1e-5)


def test_contrastive_term_is_info_nce_computed_by_hand(face_loss, photos) -> None:
    """weight * (1 - cos) + contrastive_weight * -log(e^(cos+/T) / (e^(cos+/T) + sum e^(cos-/T))), linear in t."""
    bgr, kps = photos["obama2.jpg"]
    images = to_tensor(bgr).expand(2, -1, -1, -1).clone().requires_grad_(True)
    kps_t = torch.from_numpy(kps)[None].expand(2, 5, 2)
    generator = torch.Generator().manual_seed(3)
    reference, negatives = torch.randn(2, 128, generator=generator), torch.randn(5, 128, generator=generator)
    valid, t = torch.tensor([True, True]), torch.tensor([0.2, 0.4])
    loss = FaceIdentityLoss(
        face_loss.recognizer, weight=0.1, max_t=0.5, t_weighting="linear", contrastive_weight=0.3, temperature=0.07
    )
    out = loss(images, kps_t, reference, valid, t, negatives=negatives)

    embeddings = loss.embed(images, kps_t).detach().numpy()
    expected_terms = []
    for e, ref in zip(embeddings, reference.numpy()):
        positive = cos(e, ref)
        others = [cos(e, n) for n in negatives.numpy()]
        logits = np.array([positive, *others]) / 0.07
        info_nce = -(logits[0] - np.log(np.exp(logits).sum()))
        expected_terms.append((positive, info_nce))
    w = 1 - t.numpy()
    expected = 0.1 * np.mean([wi * (1 - p) for wi, (p, _) in zip(w, expected_terms)]) + 0.3 * np.mean(
        [wi * n for wi, (_, n) in zip(w, expected_terms)]
    )
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert out.metrics["loss/face"] + out.metrics["loss/face_contrastive"] == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    assert images.grad.abs().sum() > 0

    # a negative equal to the face itself makes the term larger than with an unrelated one
    own = loss.embed(images, kps_t).detach()[:1]
    near = loss(images, kps_t, reference, valid, t, negatives=own).metrics["loss/face_contrastive"]
    far = loss(images, kps_t, reference, valid, t, negatives=-own).metrics["loss/face_contrastive"]
    assert near > far
    with pytest.raises(ValueError, match="other people"):
        loss(images, kps_t, reference, valid, t)
    with pytest.raises(ValueError, match="temperature"):
        FaceIdentityLoss(face_loss.recognizer, contrastive_weight=0.1, temperature=0.0)
    with pytest.raises(ValueError, match="contrastive_weight"):
        FaceIdentityLoss(face_loss.recognizer, contrastive_weight=float("nan"))
