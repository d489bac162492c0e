"""Held-out items, the fixed-noise validation loss and checkpoints.json in real tiny runs (issue 23)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from face_consistency.cli import main as cli_main
from face_consistency.musubi_formats.dataset import (
    DatasetConfigError,
    load_dataset_config,
    split_validation,
    write_dataset_config,
)
from face_consistency.trainer.checkpoint_eval import SampleEvidence, ValidationLoss
from face_consistency.trainer.cli import ConfigError, parse_args, validate_args
from face_consistency.trainer.hooks import ExtraLoss, TrainingHook
from face_consistency.trainer.train import epoch_batches, run_training
from face_consistency.training_contract.checkpoint_choice import CHECKPOINTS_FILE, NEAR_COPY_IMAGE_SIMILARITY
from face_consistency.training_contract.protocol import read_metrics, read_status
from PIL import Image
from tiny_qwen import tiny_train_argv, write_tiny_dataset, write_tiny_model_files, write_tiny_prompts

pytestmark = pytest.mark.trainer

SIGMA_KEYS = ["val_loss/sigma_1", "val_loss/sigma_0.75", "val_loss/sigma_0.5", "val_loss/sigma_0.25"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    files = write_tiny_model_files(root / "models")
    dataset = write_tiny_dataset(root / "data", n=4)
    held_out = write_tiny_dataset(root / "held_out", n=2, seed=7)  # other images, the same item names
    prompts = write_tiny_prompts(root / "data", n=1)
    return files, dataset, held_out, prompts


def _argv(setup, out: Path, steps: int, *extra: str) -> list[str]:
    files, dataset, _, _ = setup
    return tiny_train_argv(files, dataset, out, max_train_steps=steps, extra=extra)


def test_a_split_is_fixed_by_its_seed_and_keeps_the_held_out_items_out_of_every_batch(setup):
    _, dataset, _, _ = setup
    group = load_dataset_config(dataset)
    first = split_validation(group, 0.5, seed=3)
    assert [i.key for i in first.validation_items] == [i.key for i in split_validation(group, 0.5, 3).validation_items]
    assert len(first.validation_items) == 2 and len(first.items) == 2
    assert {i.key for i in first.items}.isdisjoint(i.key for i in first.validation_items)
    held = {i.key for i in first.validation_items}
    for epoch in range(5):
        assert not any(item.key in held for batch in epoch_batches(first, epoch, 42, 0, 1) for item in batch)
    assert len(split_validation(group, 0.01, 3).validation_items) == 1  # at least one
    one = write_tiny_dataset(dataset.parent.parent / "one", n=1)
    with pytest.raises(DatasetConfigError, match="too few to hold one out"):
        split_validation(load_dataset_config(one), 0.5, 0)


def test_a_validation_entry_of_the_toml_is_held_out_and_never_a_training_target(setup, tmp_path):
    _, dataset, held_out, _ = setup
    train_entry = load_dataset_config(dataset).datasets[0].items[0].target.parent
    entries = [
        {
            "image_directory": str(train_entry),
            "control_directory": str(train_entry.parent / "controls"),
            "cache_directory": str(tmp_path / "cache"),
        },
        {
            "image_directory": str(held_out.parent / "images"),
            "control_directory": str(held_out.parent / "controls"),
            "cache_directory": str(tmp_path / "held_cache"),
            "validation": True,
        },
    ]
    toml = write_dataset_config(tmp_path / "marked.toml", {"resolution": [64, 64]}, entries)
    group = load_dataset_config(toml)
    assert len(group.items) == 4 and len(group.validation_items) == 2
    entries[1]["image_directory"] = entries[0]["image_directory"]  # the training images held out as well
    entries[1]["control_directory"] = entries[0]["control_directory"]
    with pytest.raises(DatasetConfigError, match="is also a training target"):
        load_dataset_config(write_dataset_config(tmp_path / "same.toml", {"resolution": [64, 64]}, entries))
    only = write_dataset_config(tmp_path / "only.toml", {"resolution": [64, 64]}, entries[1:])
    with pytest.raises(DatasetConfigError, match="nothing is left to train on"):
        load_dataset_config(only)
    (tmp_path / "bad.toml").write_text('[[datasets]]\nimage_directory = "x"\nvalidation = "yes"\n')
    with pytest.raises(DatasetConfigError, match="validation must be true or false"):
        load_dataset_config(tmp_path / "bad.toml")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--validate_every_n_steps", "2"], "--validate_every_n_steps needs held-out items"),
        (["--validation_split", "0.5", "--validation_dataset_config", "HELD"], "use one or the other"),
        (["--likeness_references", "NOWHERE"], "folder not found"),
        (["--likeness_references", "FACES"], "needs --sample_prompts"),
        (["--likeness_references", "TARGETS", "--sample_prompts", "PROMPTS"], "is a training target"),
        (["--likeness_references", "CONTROLS", "--sample_prompts", "PROMPTS"], "is the control of sample prompt 1"),
    ],
)
def test_bad_validation_arguments_are_refused_before_loading(setup, tmp_path, faces_dir, extra, message):
    _, dataset, held_out, prompts = setup
    places = {
        "HELD": str(held_out),
        "NOWHERE": str(tmp_path / "nowhere"),
        "FACES": str(faces_dir),
        "TARGETS": str(dataset.parent / "images"),
        "CONTROLS": str(dataset.parent / "controls"),
        "PROMPTS": str(prompts),
    }
    with pytest.raises(ConfigError, match=message):
        validate_args(parse_args(_argv(setup, tmp_path / "out", 2, *[places.get(a, a) for a in extra])))


def test_the_noise_is_fixed_by_the_seed_and_the_loss_repeats_exactly(setup):
    _, dataset, _, _ = setup
    items = load_dataset_config(dataset).items
    a, b = ValidationLoss(items, (1.0, 0.5), seed=5), ValidationLoss(items, (1.0, 0.5), seed=5)
    shape = torch.Size([1, 16, 1, 8, 8])
    assert torch.equal(a.noise_for(1, shape), b.noise_for(1, shape))
    assert not torch.equal(a.noise_for(0, shape), a.noise_for(1, shape))
    assert not torch.equal(a.noise_for(1, shape), ValidationLoss(items, (1.0,), seed=6).noise_for(1, shape))

    class Batch:
        x0 = torch.linspace(-1, 1, 64).view(1, 16, 1, 2, 2)
        controls: ClassVar[list] = []

    def velocity_of(batch):
        return lambda latents, t: latents * 0.5 + t.view(-1, 1, 1, 1, 1)

    a = ValidationLoss(items, (1.0, 0.5), seed=5)
    rng_before = torch.random.get_rng_state()
    first = a.measure(lambda items: Batch(), velocity_of, torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global generator is not drawn from
    assert first == a.measure(lambda items: Batch(), velocity_of, torch.device("cpu"))
    assert set(first) == {"val_loss", "val_loss/sigma_1", "val_loss/sigma_0.5"}
    assert first["val_loss"] == pytest.approx((first["val_loss/sigma_1"] + first["val_loss/sigma_0.5"]) / 2)


class ItemsSeen(TrainingHook):
    """Records the items of every training micro-step."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def extra_loss(self, state) -> ExtraLoss:
        self.keys.update(item.key for item in state.items)
        return ExtraLoss()


def test_a_run_never_trains_on_its_held_out_items_and_reports_their_loss(setup, tmp_path):
    out = tmp_path / "out"
    args = validate_args(
        parse_args(
            _argv(
                setup, out, 6, "--validation_split", "0.5", "--validate_every_n_steps", "2", "--save_every_n_steps", "3"
            )
        )
    )
    held = {item.key for item in args.dataset_group.validation_items}
    seen = ItemsSeen()
    run_training(args, [seen])
    assert len(held) == 2 and seen.keys and seen.keys.isdisjoint(held)
    validation = [m for m in read_metrics(out) if "val_loss" in m]
    assert [m["step"] for m in validation] == [2, 3, 4, 6]  # every 2 steps and at each checkpoint, once a step
    assert all(set(SIGMA_KEYS) <= set(m) for m in validation)
    status = read_status(out)
    assert status["val_loss"] == validation[-1]["val_loss"] and status["recommended_checkpoint"]
    assert "lowest validation loss" in status["recommendation"]


def test_validation_does_not_change_the_training(setup, tmp_path):
    """The fixed noise comes from its own generator: the training losses are those of a run without it."""
    _, _, held_out, _ = setup
    plain, validated = tmp_path / "plain", tmp_path / "validated"
    assert cli_main(["train", *_argv(setup, plain, 4)]) == 0
    assert (
        cli_main(
            [
                "train",
                *_argv(
                    setup, validated, 4, "--validation_dataset_config", str(held_out), "--validate_every_n_steps", "1"
                ),
            ]
        )
        == 0
    )
    losses = lambda out: [m["loss"] for m in read_metrics(out) if "loss" in m]  # noqa: E731
    assert losses(plain) == losses(validated)
    assert len([m for m in read_metrics(validated) if "val_loss" in m]) == 4


def test_checkpoints_json_has_a_row_per_checkpoint_with_its_samples(setup, tmp_path):
    _, _, held_out, prompts = setup
    out = tmp_path / "out"
    argv = _argv(
        setup,
        out,
        4,
        "--validation_dataset_config",
        str(held_out),
        "--save_every_n_steps",
        "2",
        "--save_every_n_epochs",
        "1",
        "--sample_prompts",
        str(prompts),
        "--validation_sigmas",
        "0.9",
        "0.3",
    )
    assert cli_main(["train", *argv]) == 0
    record = json.loads((out / CHECKPOINTS_FILE).read_text())
    rows = record["checkpoints"]
    # 4 items, batch 1: epoch 1 ends at step 4, where the final checkpoint is saved instead
    assert [(r["name"], r["step"]) for r in rows] == [("tiny-step00000002.safetensors", 2), ("tiny.safetensors", 4)]
    assert record["sigmas"] == [0.9, 0.3] and record["validation_items"] == 2
    for row in rows:
        assert set(row["validation_loss"]) == {"0.9", "0.3"}
        assert row["samples"] == 1 and -1 <= row["nearest_target_image"] <= 1 and row["near_copies"] == 0
        assert row["likeness"] is None  # no --likeness_references
    # every checkpoint has its samples, drawn for it when no sampling round fell on its step
    assert sorted(int(p.name.split("_")[1]) for p in (out / "sample").iterdir()) == [2, 4]
    assert record["recommendation"]["name"] in {r["name"] for r in rows}
    metrics_steps = [m["step"] for m in read_metrics(out) if "val_loss" in m]
    assert metrics_steps == [2, 4]


def _square(path: Path, size: int = 256) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB").resize((size, size))


def test_sample_evidence_on_real_photos(faces_dir, model, tmp_path):
    """Held-out likeness against the references, nearness to the training targets, and a near-copy."""
    from face_consistency.faceid.judge import load_judge

    targets = [faces_dir / "obama.jpg", faces_dir / "biden.jpg"]
    evidence = SampleEvidence(targets, model, [faces_dir / "obama3.jpg"], load_judge())
    sample = faces_dir / "obama2.jpg"
    fields = evidence.score([sample])
    embed = lambda path: model.analyze([path])[0].embedding  # noqa: E731
    assert fields["likeness"] == pytest.approx(float(np.dot(embed(sample), embed(faces_dir / "obama3.jpg"))), abs=1e-5)
    assert fields["nearest_target"] == pytest.approx(float(np.dot(embed(sample), embed(targets[0]))), abs=1e-5)
    assert 0.5 < fields["likeness_dlib"] <= 1.0  # the same person for the judge
    assert fields["likeness_samples"] == 1 and fields["near_copies"] == 0
    assert fields["nearest_target_image"] < NEAR_COPY_IMAGE_SIMILARITY
    copy = tmp_path / "copy.png"
    _square(targets[1]).save(copy)  # a training target again, resized: a near-copy
    fields = evidence.score([copy, sample])
    assert fields["near_copies"] == 1 and fields["nearest_target_image"] > 0.99
    assert SampleEvidence(targets).score([sample]).get("likeness") is None  # image nearness only
