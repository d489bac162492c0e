"""The face identity in real tiny training runs: flags, cached face targets, the loss's gradient, metrics, samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from evaluate_fixtures import one_sample_run
from face_consistency.cli import main as cli_main
from face_consistency.common.face_engine import FaceEngineSettings
from face_consistency.faceid import cosine_similarity, load_face_model
from face_consistency.musubi_formats.dataset import load_dataset_config
from face_consistency.trainer import models
from face_consistency.trainer.cli import ConfigError, parse_args, validate_args
from face_consistency.trainer.face.hook import build_training_hook
from face_consistency.trainer.face.metrics import SampleScorer
from face_consistency.trainer.face.targets import face_target_path, load_face_target
from face_consistency.trainer.flow_matching import collate, micro_step
from face_consistency.trainer.train import prepare_transformer
from face_consistency.training_contract.protocol import read_metrics, read_status
from PIL import Image
from tiny_qwen import tiny_train_argv, write_tiny_dataset, write_tiny_model_files, write_tiny_prompts

pytestmark = pytest.mark.trainer

N_ITEMS = 4
NO_FACE_ITEM = "item_3"


@pytest.fixture(scope="module")
def face_setup(tmp_path_factory, insightface_root: Path, faces_dir: Path, testpack_dir: Path):
    root = tmp_path_factory.mktemp("trainer_face")
    files = write_tiny_model_files(root / "models")
    engine = load_face_model(testpack_dir, provider="cpu", det_size=640)
    dataset = write_tiny_dataset(root / "data", n=N_ITEMS, with_face_photos=faces_dir, face_model=engine)
    # one target without a face (a flat colour); its control keeps the face
    Image.new("RGB", (64, 64), (120, 160, 90)).save(root / "data" / "images" / f"{NO_FACE_ITEM}.png")
    prompts = write_tiny_prompts(root / "data", n=2)
    # a second pack folder (links to the test pack's files) to exercise the held-out plumbing
    heldout = root / "insightface" / "models" / "heldout"
    heldout.mkdir(parents=True)
    for onnx in testpack_dir.glob("*.onnx"):
        os.symlink(onnx, heldout / onnx.name)
    return {"files": files, "dataset": dataset, "prompts": prompts, "root": insightface_root, "heldout": str(heldout)}


def face_argv(setup, out: Path, steps: int, *extra: str) -> list[str]:
    return tiny_train_argv(
        setup["files"],
        setup["dataset"],
        out,
        max_train_steps=steps,
        extra=[
            "--face_model_name",
            "testpack",
            "--face_models_root",
            str(setup["root"]),
            "--face_device",
            "cpu",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def full_run(face_setup, tmp_path_factory) -> Path:
    """One run with every face option: the loss, metrics every 2 steps, samples every 2, held-out pack, TensorBoard."""
    out = tmp_path_factory.mktemp("face_run") / "out"
    rc = cli_main(
        [
            "train",
            *face_argv(
                face_setup,
                out,
                4,
                "--use_face_as_loss",
                "--face_loss_max_t",
                "1",
                "--face_eval_frequency",
                "2",
                "--sample_prompts",
                str(face_setup["prompts"]),
                "--sample_every_n_steps",
                "2",
                "--face_eval_model",
                face_setup["heldout"],
                "--logging_dir",
                str(out.parent / "logs"),
            ),
        ]
    )
    assert rc == 0, read_status(out)
    return out


def test_the_face_flags_give_the_one_face_engine_setting(face_setup, tmp_path):
    """The trainer loads its face engine with the same settings type as evaluate and the nodes."""
    files, dataset = face_setup["files"], face_setup["dataset"]
    root = tmp_path / "models_root"
    root.mkdir()
    flags = ["--face_models_root", str(root), "--face_device", "cpu", "--face_det_size", "320", "--offline"]
    config = validate_args(parse_args([*tiny_train_argv(files, dataset, tmp_path), "--enable_face_loss", *flags]))
    assert config.face_engine() == FaceEngineSettings(
        pack="buffalo_l", models_roots=(root,), provider="cpu", det_size=320, allow_download=False
    )
    assert config.face_engine("antelopev2").pack == "antelopev2"


def test_seed_guide_face_flags_parse_with_their_defaults(face_setup, tmp_path):
    files, dataset = face_setup["files"], face_setup["dataset"]
    args = parse_args([*tiny_train_argv(files, dataset, tmp_path), "--enable_face_loss", "--use_face_as_loss"])
    assert (args.face_loss_weight, args.face_model_name, args.face_device) == (0.1, "buffalo_l", "auto")
    assert (args.face_det_size, args.face_eval_frequency, args.face_loss_every) == (640, 100, 1)
    # the defaults that fit a 24 GB card and act where the estimate is sharp (docs/face-loss.md)
    assert (args.face_models_root, args.face_eval_model) == ([], None)
    assert (args.face_loss_max_t, args.face_loss_t_weighting, args.face_decode) == (0.5, "none", "face")
    validated = validate_args(args)
    assert (validated.face_loss_max_t, validated.face_decode) == (0.5, "face")
    explicit = parse_args(
        [
            *tiny_train_argv(files, dataset, tmp_path),
            "--face_loss_weight",
            "0.1",
            "--face_model_name",
            "buffalo_l",
            "--face_device",
            "cuda",
            "--face_det_size",
            "640",
            "--face_eval_frequency",
            "100",
            "--face_loss_max_t",
            "0.5",
            "--face_loss_every",
            "3",
        ]
    )
    assert (explicit.face_loss_max_t, explicit.face_loss_every) == (0.5, 3)
    every_t = validate_args(
        parse_args(
            [
                *tiny_train_argv(files, dataset, tmp_path),
                "--use_face_as_loss",
                "--face_loss_max_t",
                "1",
                "--face_loss_t_weighting",
                "linear",
            ]
        )
    )
    assert (every_t.face_loss_max_t, every_t.face_loss_t_weighting) == (1.0, "linear")
    for flag, value in (("--face_loss_t_weighting", "cosine"), ("--face_loss_max_t", "0")):
        with pytest.raises(ConfigError, match=flag):
            validate_args(parse_args([*tiny_train_argv(files, dataset, tmp_path), "--use_face_as_loss", flag, value]))


def test_face_device_cuda_without_cuda_is_an_actionable_error(face_setup, tmp_path, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has CUDA here")
    out = tmp_path / "out"
    argv = face_argv(face_setup, out, 1, "--enable_face_loss")
    argv[argv.index("--face_device") + 1] = "cuda"
    assert cli_main(["train", *argv]) == 2
    status = read_status(out)
    assert status["state"] == "failed" and "--face_device cpu" in status["error"]


def test_bad_face_pack_is_a_configuration_error(face_setup, tmp_path):
    out = tmp_path / "out"
    assert (
        cli_main(["train", *face_argv(face_setup, out, 1, "--enable_face_loss", "--face_eval_model", "nosuchpack")])
        == 2
    )
    assert "nosuchpack" in read_status(out)["error"]


def test_run_completes_saves_and_counts_targets_without_face(full_run):
    status = read_status(full_run)
    assert status["state"] == "completed" and (full_run / "tiny.safetensors").is_file()
    assert (status["face_targets"], status["face_targets_without_face"]) == (N_ITEMS, 1)
    assert (status["face_targets_built"], status["face_targets_reused"]) == (N_ITEMS, 0)
    assert [Path(p).stem for p in status["face_targets_skipped"]] == [NO_FACE_ITEM]
    assert status["face_targets_heldout_without_face"] == 1
    assert "face_sim/x0_mean" in status and "face_sim/heldout_x0_mean" in status
    # the plan counts what the loaded recognizer saves per face (23 MiB for the test pack)
    assert status["memory_plan"]["parts_gib"]["face_loss"] >= 0.02


def test_caching_stores_keypoints_and_embeddings_and_reuses_them(face_setup, full_run, tmp_path):
    items = load_dataset_config(face_setup["dataset"]).items
    for item in items:
        target = load_face_target(face_target_path(item, "testpack"))
        assert target.control_embedding is not None and target.control_embedding.shape == (128,)
        if item.key == NO_FACE_ITEM:
            assert target.kps is None and target.reason
        else:
            assert target.kps.shape == (5, 2) and target.target_embedding.shape == (128,)
            assert (target.kps >= 0).all() and (target.kps < 64).all()
    out = tmp_path / "out"
    assert cli_main(["train", *face_argv(face_setup, out, 1, "--enable_face_loss")]) == 0
    status = read_status(out)
    assert (status["face_targets_built"], status["face_targets_reused"]) == (0, N_ITEMS)


def test_x0_metrics_at_exactly_the_eval_steps(full_run):
    metrics = read_metrics(full_run)
    step_lines = [m for m in metrics if "loss" in m]
    measured = {m["step"] for m in step_lines if "face_sim/x0_count" in m}
    assert measured == {2, 4}
    for m in step_lines:
        if m["step"] in measured and m["face_sim/x0_count"]:
            assert m["face_sim/x0_count"] == len(m["face_sim/x0"]) == len(m["face/t"]) == m["face/valid"]
            assert -1.0 <= m["face_sim/x0_min"] <= m["face_sim/x0_mean"] <= m["face_sim/x0_max"] <= 1.0
            assert "face_sim/heldout_x0_mean" in m
        # the loss runs every step (t <= 1); items without a face are skipped, not an error
        assert "loss/face" in m or m["face/loss_samples"] == 0
    assert any("loss/face" in m for m in step_lines) and any("face_sim/x0_mean" in m for m in step_lines)


def test_samples_scored_after_each_sampling_round(full_run):
    sample_lines = [m for m in read_metrics(full_run) if "face_sim/sample_count" in m]
    assert [m["step"] for m in sample_lines] == [2, 4]
    for m in sample_lines:
        assert "face_sim/heldout_sample_count" in m
        if m["face_sim/sample_count"]:
            assert m["face_sim/sample_min"] <= m["face_sim/sample_mean"] <= m["face_sim/sample_max"]


def test_sample_scorer_scores_like_evaluate(face_setup, faces_dir, testpack_dir, tmp_path):
    """A sample with a face, paired with its --ci control by the musubi name and prompt file."""
    engine = load_face_model(testpack_dir, provider="cpu", det_size=640)
    sample_dir, sample, prompts = one_sample_run(tmp_path, faces_dir)
    metrics = SampleScorer(engine, sample_dir, prompts, prefix="heldout_").score([sample])
    sample_face, control_face = engine.analyze([Image.open(sample), Image.open(faces_dir / "obama.jpg")])
    expected = cosine_similarity(sample_face.embedding, control_face.embedding)
    assert metrics["face_sim/heldout_sample_count"] == 1
    assert metrics["face_sim/heldout_sample_mean"] == pytest.approx(expected, abs=1e-5)


def test_trainer_reads_sample_controls_like_evaluate(face_setup, tmp_path, monkeypatch):
    """One musubi prompt parser for both: a relative --ci beside the prompt file is found by the trainer too."""
    from face_consistency.musubi_formats.prompts import load_prompt_file as evaluate_prompts
    from face_consistency.trainer.sampling import load_prompt_file as trainer_prompts

    prompts = face_setup["prompts"].parent / "relative_prompts.txt"
    prompts.write_text("# c\nedit --w 40 --s 3 --ci controls/item_0.png --zz ignored-by-musubi\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    parsed = evaluate_prompts(prompts)[0]
    assert parsed.unknown_options == ["--zz ignored-by-musubi"]
    prompts.write_text("# c\nedit --w 40 --s 3 --ci controls/item_0.png\n", encoding="utf-8")
    settings = trainer_prompts(prompts)[0]
    assert (settings.index, settings.width, settings.steps) == (0, 32, 3)
    assert settings.controls == [prompts.parent / "controls" / "item_0.png"]


def test_tensorboard_gets_the_face_scalars(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((full_run.parent / "logs").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"face_sim/x0_mean", "face_sim/heldout_x0_mean", "face_sim/sample_count", "loss/current"} <= tags
    assert [e.step for e in accumulator.Scalars("face_sim/x0_count")] == [2, 4]


def test_bf16_run_with_half_decode_and_loss_every_2(face_setup, full_run, tmp_path):
    out = tmp_path / "out"
    rc = cli_main(
        [
            "train",
            *face_argv(
                face_setup,
                out,
                2,
                "--use_face_as_loss",
                "--face_loss_max_t",
                "1",
                "--face_eval_frequency",
                "1",
                "--mixed_precision",
                "bf16",
                "--face_decode",
                "half",
                "--face_loss_every",
                "2",
            ),
        ]
    )
    assert rc == 0, read_status(out)
    lines = [m for m in read_metrics(out) if "loss" in m]
    assert [m["step"] for m in lines if "face_sim/x0_count" in m] == [1, 2]
    assert [m["step"] for m in lines if "face/loss_samples" in m] == [2]
    values = [m[k] for m in lines for k in ("loss", "loss/face", "face_sim/x0_mean") if k in m]
    assert torch.isfinite(torch.tensor(values)).all()


@pytest.mark.parametrize("decode", ["full", "half", "face"])
def test_face_term_puts_a_gradient_on_the_lora(face_setup, full_run, tmp_path, decode):
    """Through decode, warp and recognizer: the face term alone has a non-zero LoRA gradient."""
    args = validate_args(
        parse_args(
            face_argv(
                face_setup,
                tmp_path / "out",
                1,
                "--use_face_as_loss",
                "--face_loss_max_t",
                "1",
                "--face_loss_weight",
                "1",
                "--face_decode",
                decode,
            )
        )
    )
    accelerator = Accelerator(mixed_precision="no")
    try:
        hook = build_training_hook(args)
        items = load_dataset_config(args.dataset_config).items
        hook.on_cached(items, accelerator, lambda: False)  # face targets were cached by full_run
        transformer, lora_params = prepare_transformer(args, torch.device("cpu"), torch.float32)
        vae = models.load_vae(args.vae, torch.float32)
        batch = collate(items)  # three faces and the faceless item
        generator = torch.Generator().manual_seed(0)
        loss, extra = micro_step(args, transformer, vae, batch, generator, torch.device("cpu"), accelerator, 1, [hook])
        assert extra.metrics["face/loss_samples"] == N_ITEMS - 1
        assert torch.isfinite(loss) and extra.loss.requires_grad
        # the step's LoRA gradient differs from the MSE-only one by exactly this term
        face_grads = torch.autograd.grad(extra.loss, lora_params, allow_unused=True)
        assert any(g is not None and bool(g.abs().sum() > 0) for g in face_grads)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--face_loss_contrastive_weight", "0.1"], "needs --face_loss_negatives"),
        (["--face_loss_negatives", "{negatives}"], "used only by the contrastive term"),
        (["--face_loss_contrastive_weight", "0.1", "--face_loss_negatives", "{missing}"], "folder not found"),
        (["--face_loss_contrastive_weight", "-1", "--face_loss_negatives", "{negatives}"], "at least 0"),
        (["--face_loss_contrastive_weight", "nan", "--face_loss_negatives", "{negatives}"], "finite"),
        (
            [
                "--face_loss_contrastive_weight",
                "0.1",
                "--face_loss_negatives",
                "{negatives}",
                "--face_loss_temperature",
                "0",
            ],
            "above 0",
        ),
        (["--face_loss_rollout_steps", "0"], "at least 1 and at most 8"),
        (["--face_loss_rollout_steps", "9"], "at least 1 and at most 8"),
        (["--face_loss_reference", "mirror"], "--face_loss_reference"),
    ],
)
def test_face_loss_variant_flags_are_checked(face_setup, tmp_path, flags, message):
    (tmp_path / "negatives").mkdir()
    flags = [f.format(negatives=tmp_path / "negatives", missing=tmp_path / "missing") for f in flags]
    with pytest.raises(ConfigError, match=message):
        validate_args(parse_args(face_argv(face_setup, tmp_path / "out", 1, "--use_face_as_loss", *flags)))


def test_contrastive_run_embeds_the_negatives_and_logs_its_term(face_setup, faces_dir, tmp_path, caplog):
    negatives = tmp_path / "others"
    negatives.mkdir()
    os.symlink(faces_dir / "biden.jpg", negatives / "biden.jpg")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(negatives / "blank.png")
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="face_consistency"):
        rc = cli_main(
            [
                "train",
                *face_argv(
                    face_setup,
                    out,
                    2,
                    "--use_face_as_loss",
                    "--face_loss_max_t",
                    "1",
                    "--face_loss_contrastive_weight",
                    "0.1",
                    "--face_loss_negatives",
                    str(negatives),
                ),
            ]
        )
    assert rc == 0, read_status(out)
    assert "blank.png is left out" in caplog.text
    terms = [m["loss/face_contrastive"] for m in read_metrics(out) if "loss/face_contrastive" in m]
    assert terms and all(t > 0 for t in terms)

    only_blank = tmp_path / "blank_only"
    only_blank.mkdir()
    os.symlink(negatives / "blank.png", only_blank / "blank.png")
    rc = cli_main(
        [
            "train",
            *face_argv(
                face_setup,
                tmp_path / "out2",
                1,
                "--use_face_as_loss",
                "--face_loss_contrastive_weight",
                "0.1",
                "--face_loss_negatives",
                str(only_blank),
            ),
        ]
    )
    assert rc == 2 and "no photo there has a face" in read_status(tmp_path / "out2")["error"]


def _one_face_step(face_setup, tmp_path, *flags):
    """The hook and a micro-step's pieces for the tiny run's items (face targets cached by full_run)."""
    args = validate_args(
        parse_args(
            face_argv(
                face_setup,
                tmp_path / "out",
                1,
                "--use_face_as_loss",
                "--face_loss_max_t",
                "1",
                "--face_loss_weight",
                "1",
                *flags,
            )
        )
    )
    hook = build_training_hook(args)
    items = load_dataset_config(args.dataset_config).items
    hook.on_cached(items, Accelerator(mixed_precision="no"), lambda: False)
    transformer, lora_params = prepare_transformer(args, torch.device("cpu"), torch.float32)
    return args, hook, items, transformer, lora_params, models.load_vae(args.vae, torch.float32)


def test_target_reference_pulls_towards_the_targets_identity(face_setup, full_run, tmp_path):
    try:
        args, hook, items, transformer, _, vae = _one_face_step(face_setup, tmp_path, "--face_loss_reference", "target")
        seen = []
        original = hook.training.loss.forward
        hook.training.loss.forward = lambda images, kps, reference, *rest: (
            seen.append(reference) or original(images, kps, reference, *rest)
        )
        micro_step(
            args,
            transformer,
            vae,
            collate(items),
            torch.Generator().manual_seed(0),
            torch.device("cpu"),
            Accelerator(mixed_precision="no"),
            1,
            [hook],
        )
        faces = [load_face_target(face_target_path(item, "testpack")) for item in items if item.key != NO_FACE_ITEM]
        expected = torch.stack([torch.from_numpy(f.target_embedding) for f in faces])
        torch.testing.assert_close(seen[0], expected)
        assert not torch.allclose(expected, torch.stack([torch.from_numpy(f.control_embedding) for f in faces]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_rollout_steps_the_model_and_its_gradient_reaches_the_lora(face_setup, full_run, tmp_path):
    try:
        args, hook, items, transformer, lora_params, vae = _one_face_step(
            face_setup, tmp_path, "--face_loss_rollout_steps", "3"
        )
        calls = []
        transformer.register_forward_hook(lambda *_: calls.append(1))
        _, extra = micro_step(
            args,
            transformer,
            vae,
            collate(items),
            torch.Generator().manual_seed(0),
            torch.device("cpu"),
            Accelerator(mixed_precision="no"),
            1,
            [hook],
        )
        assert len(calls) == 3  # the step's own forward pass and two more for the rollout
        grads = torch.autograd.grad(extra.loss, lora_params, allow_unused=True)
        assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_rollout_is_euler_from_x_t_to_zero():
    """One step is the one-step estimate; with a constant velocity every rollout lands there too; else each
    step asks the model at its own time."""
    from face_consistency.trainer.hooks import StepState

    generator = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(2, 16, 1, 4, 4, generator=generator), torch.randn(2, 16, 1, 4, 4, generator=generator)
    t = torch.tensor([0.3, 0.8])
    times = []

    def velocity(latents, timestep):
        times.append(timestep.clone())
        return latents  # a velocity that depends on the latents: x -> x (1 - dt) per step

    state = StepState(1, x_t, x_t, x_t, t, v, torch.nn.Identity(), [], velocity)
    torch.testing.assert_close(state.x0_rollout(1), state.x0_hat())
    assert times == []
    rolled = state.x0_rollout(3)
    torch.testing.assert_close(torch.stack(times), torch.stack([t * 2 / 3, t / 3]))
    first = x_t - (t / 3).view(-1, 1, 1, 1, 1) * v
    expected = first * (1 - t / 3).view(-1, 1, 1, 1, 1) ** 2
    torch.testing.assert_close(rolled, expected)
    constant = StepState(1, x_t, x_t, x_t, t, v, torch.nn.Identity(), [], lambda latents, timestep: v)
    torch.testing.assert_close(constant.x0_rollout(4), constant.x0_hat())


def test_a_vae_of_another_scale_trains_samples_and_decodes_the_face_region(face_setup, tmp_path, monkeypatch):
    """The VAE's scale comes from its config (2 ** downsamplings), not a constant 8: a 4x VAE's latents are
    twice as wide, and the face-region decode and the samples follow (the plan: test_memory_plan.py)."""
    from face_consistency.trainer.face.loss import FaceIdentityLoss

    decoded = []
    original = FaceIdentityLoss.forward

    def recording_forward(self, images, kps, reference, valid, t, source_region=None, negatives=None):
        decoded.append((tuple(images.shape[-2:]), source_region.tolist()))
        return original(self, images, kps, reference, valid, t, source_region, negatives)

    monkeypatch.setattr(FaceIdentityLoss, "forward", recording_forward)
    files = write_tiny_model_files(
        tmp_path / "models",
        vae_config={
            "base_dim": 8,
            "z_dim": 16,
            "dim_mult": [1, 2, 4],
            "num_res_blocks": 2,
            "attn_scales": [],
            "temperal_downsample": [False, True],
        },
    )
    out = tmp_path / "out"
    argv = tiny_train_argv(
        files,
        face_setup["dataset"],
        out,
        max_train_steps=2,
        extra=[
            "--face_model_name",
            "testpack",
            "--face_models_root",
            str(face_setup["root"]),
            "--face_device",
            "cpu",
            "--use_face_as_loss",
            "--face_loss_max_t",
            "1",
            "--sample_prompts",
            str(face_setup["prompts"]),
            "--sample_every_n_steps",
            "2",
        ],
    )
    assert cli_main(["train", *argv]) == 0, read_status(out)
    # each decoded face region is as large in pixels as the box it stands for
    assert decoded and all(size == (y1 - y0, x1 - x0) for size, boxes in decoded for x0, y0, x1, y1 in boxes)
    samples = sorted((out / "sample").glob("*.png"))
    assert samples and all(Image.open(p).size == (32, 32) for p in samples)  # the tiny prompts' --w 32 --h 32
