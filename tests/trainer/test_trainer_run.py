"""Real tiny training runs on the CPU: outputs, LoRA format, resume, stop, failure, bad arguments."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from face_consistency.cli import main as cli_main
from face_consistency.musubi_formats.dataset import load_dataset_config
from face_consistency.trainer import models
from face_consistency.trainer.cache import load_cached_item
from face_consistency.trainer.cli import parse_args, validate_args
from face_consistency.trainer.hooks import ExtraLoss, TrainingHook
from face_consistency.trainer.job_status import TrainingDivergedError
from face_consistency.trainer.lora import LORA_PREFIX, add_lora, lora_target_modules, parse_network_args
from face_consistency.trainer.sampling import pack, unpack
from face_consistency.trainer.train import run_training
from face_consistency.training_contract.checkpoint_choice import read_table
from face_consistency.training_contract.protocol import read_metrics, read_status, request_stop
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_qwen import merge_lora, tiny_train_argv, write_tiny_dataset, write_tiny_model_files, write_tiny_prompts

pytestmark = pytest.mark.trainer

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    files = write_tiny_model_files(root / "models")
    dataset = write_tiny_dataset(root / "data", n=2)
    prompts = write_tiny_prompts(root / "data", n=1)
    return files, dataset, prompts


def train(setup, out: Path, steps: int, *extra: str) -> int:
    files, dataset, _ = setup
    return cli_main(["train", *tiny_train_argv(files, dataset, out, max_train_steps=steps, extra=extra)])


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


def test_end_to_end_outputs(setup, tmp_path):
    _, _, tiny_prompts = setup
    prompts = tmp_path / "prompts.txt"
    control = tiny_prompts.read_text().split("--ci ")[-1].strip()
    # A second prompt with true CFG and a negative prompt, without a seed (random, not in the name).
    prompts.write_text(tiny_prompts.read_text() + f"cfg edit --w 32 --h 48 --s 2 --l 3 --n blurry --ci {control}\n")
    out = tmp_path / "out"
    rc = train(
        setup,
        out,
        4,
        "--save_every_n_steps",
        "2",
        "--save_every_n_epochs",
        "1",
        "--sample_prompts",
        str(prompts),
        "--sample_every_n_steps",
        "2",
        "--sample_at_first",
    )
    assert rc == 0
    status = read_status(out)
    assert status["state"] == "completed"
    assert (status["step"], status["total_steps"], status["epoch"]) == (4, 4, 2)
    assert status["last_checkpoint"] == str(out / "tiny.safetensors")
    assert status["last_sample_step"] == 4
    for key in ("pid", "avg_loss", "lr", "steps_per_sec", "eta_sec"):
        assert key in status
    plan = status["memory_plan"]  # printed and recorded before the DiT loads
    assert plan["total_gib"] > 0 and plan["device_gib"] is None and plan["warning"] is None
    assert set(plan["parts_gib"]) == {
        "dit_weights",
        "vae_weights",
        "lora_and_grads",
        "optimizer_state",
        "activations",
        "face_loss",
        "overhead",
    }
    names = sorted(p.name for p in out.glob("*.safetensors"))
    # 2 images, batch 1: an epoch is 2 steps; the epoch-2 and step-4 saves coincide with the final one.
    assert names == ["tiny-000001.safetensors", "tiny-step00000002.safetensors", "tiny.safetensors"]
    samples = sorted(p.name for p in (out / "sample").iterdir())
    seeded = [int(m.group(1)) for s in samples if (m := re.fullmatch(r"tiny_(\d{6})_00_\d{14}_100_000\.png", s))]
    unseeded = [int(m.group(1)) for s in samples if (m := re.fullmatch(r"tiny_(\d{6})_01_\d{14}_000\.png", s))]
    assert seeded == unseeded == [0, 2, 4] and len(samples) == 6
    with Image.open(out / "sample" / samples[-1]) as image:
        assert image.size == (32, 48)
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_steps"] == "4"
    assert metadata["ss_network_module"] == "networks.lora_qwen_image"


def test_lora_file_maps_to_linear_weights_and_reproduces_the_trained_model(setup, tmp_path):
    files, _, _ = setup
    out = tmp_path / "out"
    assert train(setup, out, 3, "--save_state", "--learning_rate", "1e-2") == 0
    comfy = load_file(str(out / "tiny.safetensors"))
    base = models.load_transformer(files.dit, torch.float32)
    linear_by_key = {
        LORA_PREFIX + name.replace(".", "_"): module
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in comfy}
    assert stems and stems <= set(linear_by_key)
    assert not any("_mod_" in s for s in stems), "modulation layers are excluded by default"
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in comfy)

    # The trained model: base + peft adapter with the weights the trainer held (its resumable state).
    trained = models.load_transformer(files.dit, torch.float32)
    add_lora(trained, 4, 4.0, lora_target_modules(trained, parse_network_args([])))
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(trained, load_file(str(out / "tiny-state" / "lora_state.safetensors")))
    # ComfyUI's rule: W += up @ down * alpha / rank.
    merged = models.load_transformer(files.dit, torch.float32)
    merged_linear = {
        LORA_PREFIX + n.replace(".", "_"): m for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear)
    }
    with torch.no_grad():
        for stem in stems:
            down, up = comfy[f"{stem}.lora_down.weight"], comfy[f"{stem}.lora_up.weight"]
            merged_linear[stem].weight += up @ down * (comfy[f"{stem}.alpha"] / down.shape[0])
    torch.manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 32, 64),
        timestep=torch.tensor([0.4]),
        encoder_hidden_states=torch.randn(1, 7, 32),
        encoder_hidden_states_mask=torch.ones(1, 7),
        img_shapes=[[(1, 4, 4), (1, 4, 4)]],
        return_dict=False,
    )
    with torch.no_grad():
        expected = trained(**inputs)[0]
        got = merged(**inputs)[0]
        untouched = base(**inputs)[0]
    assert torch.allclose(got, expected, atol=1e-5)
    assert (expected - untouched).abs().max() > 1e-3, "training changed nothing"


def _flow_matching_loss(transformer, cached, t_values, seed=0):
    """Mean MSE to the velocity target over fixed noise draws and times (deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    x0 = cached["latents"].unsqueeze(0)
    control = cached["control_latents_0"].unsqueeze(0)
    h, w = x0.shape[-2:]
    total = 0.0
    for t in t_values:
        noise = torch.randn(x0.shape, generator=generator)
        x_t = (1 - t) * x0 + t * noise
        with torch.no_grad():
            out = transformer(
                hidden_states=torch.cat([pack(x_t), pack(control)], dim=1),
                timestep=torch.tensor([t]),
                encoder_hidden_states=cached["prompt_embeds"].unsqueeze(0),
                img_shapes=[[(1, h // 2, w // 2), (1, h // 2, w // 2)]],
                return_dict=False,
            )[0]
        v_pred = unpack(out[:, : (h // 2) * (w // 2)], h, w)
        total += torch.mean((v_pred - (noise - x0)) ** 2).item()
    return total / len(t_values)


def test_overfitting_a_tiny_set_lowers_the_loss(setup, tmp_path):
    files, _, _ = setup
    dataset = write_tiny_dataset(tmp_path / "one", n=1, seed=5)
    out = tmp_path / "out"
    argv = tiny_train_argv(
        files, dataset, out, max_train_steps=20, extra=["--learning_rate", "1e-2", "--timestep_sampling", "uniform"]
    )
    assert cli_main(["train", *argv]) == 0
    cached = load_cached_item(load_dataset_config(dataset).items[0])
    base = models.load_transformer(files.dit, torch.float32)
    t_values = [0.1 * k for k in range(1, 10)]
    before = _flow_matching_loss(base, cached, t_values)
    lora = load_file(str(out / "tiny.safetensors"))
    linear = {LORA_PREFIX + n.replace(".", "_"): m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    merge_lora(linear, lora)
    after = _flow_matching_loss(base, cached, t_values)
    assert after < 0.8 * before, (before, after)


def test_resume_continues_at_saved_step_with_identical_losses(setup, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert train(setup, full, 5, "--save_every_n_steps", "2", "--save_state") == 0
    state = full / "tiny-step00000002-state"
    # Saved after the step, before the epoch-end bookkeeping (2 images: step 2 ends epoch 1).
    assert json.loads((state / "trainer_state.json").read_text()) == {"step": 2, "epoch": 0, "batch_in_epoch": 2}
    assert train(setup, resumed, 5, "--resume", str(state)) == 0
    expected, got = losses(full), losses(resumed)
    assert sorted(got) == [3, 4, 5]
    for step in (3, 4, 5):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7)
    status = read_status(resumed)
    assert (status["state"], status["step"], status["epoch"]) == ("completed", 5, 3)
    # Resuming in the run's own folder redoes steps 3-5: their old metrics lines are replaced, not repeated.
    assert train(setup, full, 5, "--resume", str(state)) == 0
    assert [m["step"] for m in read_metrics(full)] == [1, 2, 3, 4, 5]
    assert losses(full)[5] == pytest.approx(expected[5], rel=1e-5, abs=1e-7)


class _StopAt(TrainingHook):
    def __init__(self, output_dir: Path, step: int) -> None:
        self.output_dir, self.step = output_dir, step

    def extra_loss(self, state):
        if state.step == self.step:
            request_stop(self.output_dir)
        return ExtraLoss()


class _StopWhileCaching(TrainingHook):
    """Requests a stop from inside the hooks' caching phase, and records what the next hook is told."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.told_to_stop: bool | None = None

    def on_cached(self, items, accelerator, should_stop):
        if self.told_to_stop is None:
            request_stop(self.output_dir)
            self.told_to_stop = False
        else:
            self.told_to_stop = should_stop()
        return {}


class _FailAt(TrainingHook):
    def extra_loss(self, state):
        if state.step == 2:
            raise RuntimeError("forced failure for the test")
        assert state.v_pred.shape == state.x0.shape == state.x_t.shape and state.v_pred.requires_grad
        assert torch.allclose(state.x0_hat(), state.x_t - state.t.view(-1, 1, 1, 1, 1) * state.v_pred)
        assert state.items[0].target.name.startswith("item_")
        return ExtraLoss(metrics={"extra/seen": 1.0})


def _args(setup, out: Path, steps: int):
    files, dataset, _ = setup
    return validate_args(parse_args(tiny_train_argv(files, dataset, out, max_train_steps=steps)))


def test_stop_request_finishes_the_step_saves_and_ends_stopped(setup, tmp_path):
    out = tmp_path / "out"
    assert run_training(_args(setup, out, 50), [_StopAt(out, 2)]).value == "stopped"
    status = read_status(out)
    assert status["state"] == "stopped" and status["step"] == 2
    assert status["last_checkpoint"] == str(out / "tiny-step00000002.safetensors")
    assert (out / "tiny-step00000002.safetensors").is_file()
    assert (out / "tiny-step00000002-state" / "trainer_state.json").is_file()
    assert not (out / "tiny.safetensors").exists()
    # listed in checkpoints.json without figures (nothing else saved: the checkpoint to keep)
    (row,) = read_table(out).rows
    assert (row.name, row.step, row.validation_loss, row.likeness) == ("tiny-step00000002.safetensors", 2, None, None)
    assert row.note == "saved on stop: not validated or sampled"
    assert status["recommended_checkpoint"] == "tiny-step00000002.safetensors"


def test_stop_during_the_hooks_caching_ends_stopped_before_training(setup, tmp_path):
    """A long on_cached (face targets of a big dataset) sees the stop and the run ends there."""
    out = tmp_path / "out"
    stopper = _StopWhileCaching(out)
    hooks = [stopper, stopper]  # the second call plays the next hook
    assert run_training(_args(setup, out, 50), hooks).value == "stopped"
    status = read_status(out)
    assert stopper.told_to_stop is True
    assert status["state"] == "stopped" and status["stop_reason"] == "STOP file"
    assert status.get("step") in (None, 0) and status["last_checkpoint"] is None
    assert not list(out.glob("*.safetensors"))


def test_exception_ends_failed_with_traceback_tail(setup, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="forced failure"):
        run_training(_args(setup, out, 5), [_FailAt()])
    status = read_status(out)
    assert status["state"] == "failed"
    assert "forced failure for the test" in status["error"]
    assert any("RuntimeError" in line for line in status["log_tail"])
    assert read_metrics(out)[0]["extra/seen"] == 1.0


class _NonFiniteAt(TrainingHook):
    def __init__(self, step: int) -> None:
        self.step = step

    def extra_loss(self, state):
        value = float("nan") if state.step == self.step else 0.0
        return ExtraLoss(loss=state.v_pred.sum() * 0 + value)


def test_a_diverged_run_ends_failed_without_a_checkpoint(setup, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrainingDivergedError, match="diverged at step 3: the extra loss"):
        run_training(_args(setup, out, 6), [_NonFiniteAt(3)])
    status = read_status(out)
    assert status["state"] == "failed" and "Lower --learning_rate" in status["error"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert not list(out.glob("*.safetensors"))


def test_a_diverged_run_is_one_message_and_exit_1(setup, tmp_path, capsys):
    # A finite but absurd learning rate: the first update blows the LoRA up, the next loss is not finite.
    assert train(setup, tmp_path / "out", 4, "--learning_rate", "1e30", "--max_grad_norm", "0") == 1
    status = read_status(tmp_path / "out")
    assert status["state"] == "failed" and "training diverged at step" in status["error"]
    assert not list((tmp_path / "out").glob("*.safetensors"))
    assert "Traceback" not in capsys.readouterr().err


def test_truncated_model_file_fails_with_its_name(setup, tmp_path):
    files, dataset, _ = setup
    broken = tmp_path / "broken_dit.safetensors"
    broken.write_bytes(files.dit.read_bytes()[:3000])
    argv = tiny_train_argv(files, dataset, tmp_path / "out", max_train_steps=2)
    argv[argv.index("--dit") + 1] = str(broken)
    assert cli_main(["train", *argv]) == 2  # found by the checks before any model loads
    status = read_status(tmp_path / "out")
    assert status["state"] == "failed" and "broken_dit.safetensors" in status["error"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--xformers"], r"unknown or unsupported argument\(s\): --xformers \(use --sdpa"),
        (["--edit"], "--edit and --edit_plus conflict"),
        (["--timestep_sampling", "logsnr"], "--timestep_sampling 'logsnr': choose one of"),
        (["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf"),
        (["--discrete_flow_shift", "nan"], "--discrete_flow_shift must be a finite number, got nan"),
        (["--sample_every_n_steps", "5"], "--sample_every_n_steps needs --sample_prompts"),
        (["--network_args", "loraplus_lr_ratio=4"], "unknown key 'loraplus_lr_ratio'"),
        (["--network_module", "networks.lokr"], "this trainer trains LoRA"),
        (["--resume", "/nonexistent"], "not a state folder"),
        (["--save_every_n_steps", "0"], "--save_every_n_steps must be at least 1"),
        (["--network_weights", "/nonexistent.safetensors"], "--network_weights .*file not found"),
        (["--network_dim", "four"], "invalid command-line arguments"),
    ],
)
def test_bad_arguments_fail_before_loading(setup, tmp_path, capsys, change, message):
    assert train(setup, tmp_path / "out", 2, *change) == 2
    assert re.search(message, capsys.readouterr().err)
    status = read_status(tmp_path / "out")
    assert status["state"] == "failed" and re.search(message, status["error"])


def test_config_file_supplies_flags_and_rejects_unknown_keys(setup, tmp_path):
    files, dataset, _ = setup
    config = tmp_path / "train.toml"
    config.write_text(
        f'[model]\ndit = "{files.dit}"\n[train]\nnetwork_dim = 8\ngradient_checkpointing = true\n', encoding="utf-8"
    )
    argv = tiny_train_argv(files, dataset, tmp_path / "out")
    argv = argv[2:]  # drop --dit: it comes from the config file
    args = validate_args(parse_args([*argv, "--config_file", str(config), "--network_dim", "6"]))
    assert (args.dit, args.network_dim, args.gradient_checkpointing) == (str(files.dit), 6, True)
    config.write_text("learning_rat = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown key\\(s\\) learning_rat"):
        parse_args([*argv, "--config_file", str(config)])


def test_face_flags_of_the_seed_guide_parse(setup, tmp_path):
    files, dataset, _ = setup
    args = parse_args(
        [
            *tiny_train_argv(files, dataset, tmp_path),
            "--enable_face_loss",
            "--use_face_as_loss",
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
        ]
    )
    assert (args.enable_face_loss, args.use_face_as_loss, args.face_loss_weight) == (True, True, 0.1)
    assert (args.face_model_name, args.face_det_size, args.face_eval_frequency) == ("buffalo_l", 640, 100)


@pytest.mark.parametrize("cuda, bf16, expected", [(True, True, "bf16"), (True, False, "no"), (False, False, "no")])
def test_mixed_precision_defaults_to_bf16_where_the_gpu_supports_it(setup, tmp_path, monkeypatch, cuda, bf16, expected):
    files, dataset, _ = setup
    argv = tiny_train_argv(files, dataset, tmp_path)
    at = argv.index("--mixed_precision")
    del argv[at : at + 2]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert validate_args(parse_args(argv)).mixed_precision == expected
    assert validate_args(parse_args([*argv, "--mixed_precision", "no"])).mixed_precision == "no"


def test_bootstrap_subprocess_trains_and_stops_on_sigterm(setup, tmp_path):
    files, dataset, _ = setup
    out = tmp_path / "out"
    argv = tiny_train_argv(files, dataset, out, max_train_steps=100000)
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "bootstrap.py"), "train", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            status = read_status(out) or {}
            if status.get("state") == "training" and status.get("step", 0) >= 1:
                break
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    status = read_status(out)
    assert status["state"] == "stopped" and status["stop_reason"] == "SIGTERM"
    assert Path(status["last_checkpoint"]).is_file()
    assert status["last_checkpoint"].endswith(f"tiny-step{status['step']:08d}.safetensors")


def test_memory_options_and_bf16_run_on_cpu(setup, tmp_path):
    """fp8 base weights, swapped blocks, checkpointing, bf16, accumulation and the other optimizer paths."""
    out = tmp_path / "out"
    rc = train(
        setup,
        out,
        2,
        "--fp8_base",
        "--blocks_to_swap",
        "1",
        "--gradient_checkpointing",
        "--mixed_precision",
        "bf16",
        "--gradient_accumulation_steps",
        "2",
        "--optimizer_type",
        "Adafactor",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "1",
        "--timestep_sampling",
        "sigma",
        "--weighting_scheme",
        "cosmap",
        "--logging_dir",
        str(tmp_path / "logs"),
    )
    assert rc == 0
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*")), "TensorBoard events expected"
    status = read_status(out)
    assert status["state"] == "completed" and status["step"] == 2
    assert torch.isfinite(torch.tensor([m["loss"] for m in read_metrics(out)])).all()
    lora = load_file(str(out / "tiny.safetensors"))
    assert next(iter(lora.values())).dtype == torch.bfloat16


def test_two_process_data_parallel_on_cpu(setup, tmp_path):
    files, _, _ = setup
    dataset = write_tiny_dataset(tmp_path / "data", n=4)
    out = tmp_path / "out"
    argv = tiny_train_argv(files, dataset, out, max_train_steps=3)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port for the rendezvous (other suites may run beside this one)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "face_consistency.trainer",
            *argv,
            "--save_state",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    status = read_status(out)
    assert (status["state"], status["num_processes"], status["step"]) == ("completed", 2, 3)
    # 4 images over 2 processes, batch 1: 2 steps per epoch; each process keeps its own noise RNG.
    assert status["steps_per_epoch"] == 2
    assert {p.name for p in (out / "tiny-state").glob("noise_generator_*.pt")} == {
        "noise_generator_0.pt",
        "noise_generator_1.pt",
    }


def test_plain_edit_trains_and_takes_one_control(setup, tmp_path):
    files, _, _ = setup
    one = write_tiny_dataset(tmp_path / "one", n=1)
    argv = tiny_train_argv(files, one, tmp_path / "out", max_train_steps=1)
    argv[argv.index("--edit_plus")] = "--edit"
    assert cli_main(["train", *argv]) == 0
    assert read_status(tmp_path / "out")["state"] == "completed"
    two = write_tiny_dataset(tmp_path / "two", n=1, controls_per_target=2)
    argv = tiny_train_argv(files, two, tmp_path / "out2", max_train_steps=1)
    argv[argv.index("--edit_plus")] = "--edit"
    assert cli_main(["train", *argv]) == 2
    assert "--model_version edit takes exactly one control image" in read_status(tmp_path / "out2")["error"]


def test_the_seed_guides_command_trains(setup, tmp_path):
    """The seed guide's settings as written there: bf16, adamw8bit (bitsandbytes on the CPU), checkpointing."""
    out = tmp_path / "out"
    rc = train(
        setup,
        out,
        4,
        "--mixed_precision",
        "bf16",
        "--optimizer_type",
        "adamw8bit",
        "--learning_rate",
        "5e-5",
        "--gradient_checkpointing",
        "--max_data_loader_n_workers",
        "2",
        "--persistent_data_loader_workers",
        "--network_dim",
        "16",
        "--network_alpha",
        "16",
        "--max_train_epochs",
        "2",
        "--save_every_n_epochs",
        "1",
    )
    assert rc == 0
    status = read_status(out)
    assert status["state"] == "completed" and status["step"] == 4
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["tiny-000001.safetensors", "tiny.safetensors"]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(out).values())
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "16" and float(metadata["ss_network_alpha"]) == 16.0
    assert "AdamW8bit" in metadata["ss_optimizer"]


def test_edit_2511_trains_samples_and_saves_a_lora_comfyui_applies(setup, tmp_path):
    _, dataset, prompts = setup
    files = write_tiny_model_files(tmp_path / "models_2511", edit_2511=True)
    argv = tiny_train_argv(
        files,
        dataset,
        tmp_path / "out",
        max_train_steps=2,
        extra=["--sample_prompts", str(prompts), "--sample_every_n_steps", "2"],
    )
    argv[argv.index("--edit_plus")] = "--model_version"
    argv.insert(argv.index("--model_version") + 1, "edit-2511")
    assert cli_main(["train", *argv]) == 0
    out = tmp_path / "out"
    assert read_status(out)["state"] == "completed"
    assert len(list((out / "sample").glob("tiny_000002_00_*_100_000.png"))) == 1
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["ss_model_version"] == "edit-2511"
    assert metadata["modelspec.architecture"] == "Qwen-Image-Edit-2511/lora"
    # The same keys as for 2509: ComfyUI maps `lora_unet_<module path>` onto diffusion_model weights.
    base = models.load_transformer(files.dit, torch.float32, zero_cond_t=True)
    linear = {LORA_PREFIX + n.replace(".", "_") for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {k.split(".", 1)[0] for k in keys} <= linear

    # The 2511 file is refused as a 2509 model before anything loads, with the flag to pass.
    argv_2509 = tiny_train_argv(files, dataset, tmp_path / "out_2509", max_train_steps=1)
    assert cli_main(["train", *argv_2509]) == 2
    assert "pass --model_version edit-2511" in read_status(tmp_path / "out_2509")["error"]


@pytest.mark.parametrize(
    ("flags", "version"),
    [
        (["--edit_plus"], "edit-2509"),
        (["--edit"], "edit"),
        (["--model_version", "Edit-2511"], "edit-2511"),
        (["--edit_plus", "--model_version", "edit-2509"], "edit-2509"),
    ],
)
def test_model_version_and_its_musubi_aliases(setup, tmp_path, flags, version):
    files, dataset, _ = setup
    argv = tiny_train_argv(files, dataset, tmp_path / "out")
    argv.remove("--edit_plus")
    args = parse_args([*argv, *flags])
    if version == "edit-2511":
        args.dit = str(write_tiny_model_files(tmp_path / "m", edit_2511=True).dit)
    assert validate_args(args).model_version == version


def test_a_musubi_lora_continues_training_with_network_weights(setup, tmp_path):
    from safetensors.torch import save_file
    from test_trainer_lora import musubi_lora_state_dict

    files, _, _ = setup
    start = musubi_lora_state_dict(models.load_transformer(files.dit, torch.float32), rank=4, alpha=4.0)
    path = tmp_path / "musubi.safetensors"
    save_file(start, str(path), metadata={"ss_network_module": "networks.lora_qwen_image"})
    out = tmp_path / "out"
    assert train(setup, out, 2, "--network_weights", str(path), "--learning_rate", "1e-3") == 0, read_status(out)
    trained = load_file(str(out / "tiny.safetensors"))
    assert trained.keys() == start.keys()  # musubi's every layer, under its names
    up = "lora_unet_transformer_blocks_0_img_mod_1.lora_up.weight"
    assert not torch.allclose(trained[up].float(), start[up].float()), "img_mod was not trained on"


def test_an_all_ones_prompt_mask_goes_to_attention_as_none(setup):
    from face_consistency.trainer.flow_matching import attention_mask

    files, _, _ = setup
    transformer = models.load_transformer(files.dit, torch.float32).eval()
    assert attention_mask(torch.ones(2, 7, dtype=torch.long)) is None
    padded = torch.tensor([[1, 1, 1, 0]])
    assert attention_mask(padded) is padded
    torch.manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 32, 64),
        timestep=torch.tensor([0.4]),
        encoder_hidden_states=torch.randn(1, 7, 32),
        img_shapes=[[(1, 4, 4), (1, 4, 4)]],
        return_dict=False,
    )
    with torch.no_grad():
        masked = transformer(**inputs, encoder_hidden_states_mask=torch.ones(1, 7))[0]
        unmasked = transformer(**inputs, encoder_hidden_states_mask=None)[0]
    torch.testing.assert_close(unmasked, masked)
