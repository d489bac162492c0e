"""training_contract/launch.py: a launch from ComfyUI in the trainer's terms, parsed by the trainer's own parser."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from face_consistency.common.face_engine import FaceEngineSettings
from face_consistency.common.values import ValueCheckError
from face_consistency.trainer.cli import parse_args
from face_consistency.training_contract.launch import TRAINER_FACE_ENGINE, LaunchRequest

pytestmark = pytest.mark.trainer


def _request(tmp_path: Path, **changes) -> LaunchRequest:
    fields = dict(
        output_dir=tmp_path / "run",
        output_name="run",
        dit=tmp_path / "dit.safetensors",
        vae=tmp_path / "vae.safetensors",
        text_encoder=tmp_path / "te.safetensors",
        dataset_config=tmp_path / "dataset.toml",
        settings={"learning_rate": 5e-5, "max_train_epochs": 100, "max_train_steps": 0, "sample_every_n_epochs": 10},
    )
    return LaunchRequest(**{**fields, **changes})


def test_steps_replace_epochs_and_off_values_pass_no_flag(tmp_path: Path) -> None:
    args = parse_args(_request(tmp_path).argv())
    assert (args.max_train_epochs, args.max_train_steps, args.learning_rate) == (100, 1600, 5e-5)
    assert args.sample_every_n_epochs is None and args.sample_prompts is None  # no prompts: no sampling flags
    assert not args.enable_face_loss and "--face_model_name" not in _request(tmp_path).argv()
    by_steps = _request(tmp_path, settings={"max_train_epochs": 100, "max_train_steps": 40})
    args = parse_args(by_steps.argv())
    assert (args.max_train_epochs, args.max_train_steps) == (None, 40)


def test_the_face_engines_settings_are_the_trainers_flags(tmp_path: Path) -> None:
    roots = (tmp_path / "packs", tmp_path / "more_packs")  # searched in order by the trainer, as by the loader node
    engine = FaceEngineSettings(pack="antelopev2", models_roots=roots, provider="cpu", det_size=320)
    request = _request(tmp_path, enable_face_loss=True, face_engine=engine)
    args = parse_args(request.argv())
    assert (args.face_model_name, args.face_device, args.face_det_size) == ("antelopev2", "cpu", 320)
    assert args.face_models_root == [str(root) for root in roots] and not args.offline
    # the default engine: the trainer's own defaults (provider auto), no models root, downloads off when asked
    offline = _request(tmp_path, enable_face_loss=True, face_engine=replace(TRAINER_FACE_ENGINE, allow_download=False))
    args = parse_args(offline.argv())
    assert (args.face_model_name, args.face_device, args.face_models_root, args.offline) == (
        "buffalo_l",
        "auto",
        [],
        True,
    )


def test_the_loss_variants_pass_only_with_the_loss(tmp_path: Path) -> None:
    variants = {"face_loss_rollout_steps": 3, "face_loss_reference": "target"}
    metrics_only = _request(tmp_path, enable_face_loss=True, settings=variants)
    assert "--face_loss_rollout_steps" not in metrics_only.argv()
    with_loss = _request(tmp_path, settings={**variants, "use_face_as_loss": True})
    args = parse_args(with_loss.argv())
    assert args.use_face_as_loss and args.enable_face_loss
    assert (args.face_loss_rollout_steps, args.face_loss_reference) == (3, "target")


def test_check_refuses_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extra_args may not set --output_dir"):
        _request(tmp_path, extra_args="--output_dir=/elsewhere").check()
    with pytest.raises(ValueError, match="cannot be split into arguments"):
        _request(tmp_path, extra_args='--fp8_base "unclosed').check()
    with pytest.raises(ValueError, match="needs face_loss_negatives"):
        _request(tmp_path, settings={"use_face_as_loss": True, "face_loss_contrastive_weight": 0.1}).check()
    with pytest.raises(ValueError, match="give sample_prompts too"):
        _request(tmp_path, settings={"likeness_references": tmp_path}).check()
    with pytest.raises(ValueCheckError, match="--face_det_size"):
        _request(tmp_path, enable_face_loss=True, face_engine=FaceEngineSettings(det_size=4096)).check()
    assert not (tmp_path / "run").exists()
    request = _request(tmp_path, sample_prompts="a face --w 64 --h 64", extra_args="--fp8_base")
    request.check()
    assert request.argv()[-1] == "--fp8_base"  # extra flags last: they have the last word
