"""Every numeric training option is range-checked from its declaration (issue 22, rule 3): the trainer's
parser and the launch node's values alike, built from `training_contract/options.py`, so an option
declared later is covered without a new test."""

from __future__ import annotations

import math

import pytest
from face_consistency.common.values import MAX_TEXT_LENGTH, ValueCheckError
from face_consistency.trainer.cli import ConfigError, parse_args
from face_consistency.training_contract import options
from face_consistency.training_contract.options import OPTIONS, Option

NUMERIC = [option for option in OPTIONS if option.kind in (int, float)]
TEXT = [option for option in OPTIONS if option.kind is str]


def _outside(option: Option) -> list[str]:
    """Values just outside the declared bounds, huge ones, and (for floats) the non-finite ones."""
    bounds = option.bounds
    huge = 10**30 if option.kind is int else 1e308
    values = [bounds.low if bounds.low_open else bounds.low - 1, -huge]
    if math.isfinite(bounds.high):  # a float without a ceiling refuses only what is not finite
        step = 1 if option.kind is int else max(abs(bounds.high), 1) * 1e-6
        values += [bounds.high if bounds.high_open else bounds.high + step, huge]
    if option.kind is float:
        values += [math.nan, math.inf, -math.inf]
    return [str(int(v)) if option.kind is int else repr(v) for v in values]


def test_every_numeric_option_declares_its_bounds():
    with pytest.raises(TypeError, match="--later is a number: declare its bounds"):
        Option("later", float, "face")
    assert all(option.bounds is not None for option in NUMERIC)


@pytest.mark.parametrize(
    ("option", "value"),
    [(o, v) for o in NUMERIC for v in _outside(o)],
    ids=lambda x: x.name if isinstance(x, Option) else x,
)
def test_every_numeric_option_refuses_values_outside_its_bounds(option, value):
    with pytest.raises(ConfigError, match=rf"^{option.flag} must be .*got "):
        parse_args([f"{option.flag}={value}"])


@pytest.mark.parametrize("option", NUMERIC, ids=lambda o: o.name)
def test_defaults_and_node_widgets_lie_within_the_bounds(option):
    if option.default is not None:
        option.check(option.default)
    widget = option.node
    if widget is not None:
        for value in (widget.default, widget.min, widget.max):
            if value is not None and value != widget.off:
                option.check(value)  # the node offers nothing the trainer refuses


@pytest.mark.parametrize("option", TEXT, ids=lambda o: o.name)
def test_every_text_option_refuses_nul_and_absurd_lengths(option):
    with pytest.raises(ConfigError, match=rf"^{option.flag} contains a NUL character"):
        parse_args([option.flag, "a\0b"])
    with pytest.raises(ConfigError, match=rf"^{option.flag} is {MAX_TEXT_LENGTH + 1} characters long"):
        parse_args([option.flag, "a" * (MAX_TEXT_LENGTH + 1)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max_train_steps", "-5"], "--max_train_steps must be at least 1 and at most 1000000000, got -5"),
        (
            ["--face_loss_max_t", "nan"],
            "--face_loss_max_t must be a finite number, got nan (give one above 0 and at most 1)",
        ),
        (["--seed", str(2**64)], f"--seed must be at least 0 and at most {2**32 - 1}, got {2**64}"),
        (["--learning_rate", "0"], "--learning_rate must be above 0, got 0"),
        (["--sample_shift_terminal", "1"], "--sample_shift_terminal must be at least 0 and below 1, got 1"),
    ],
)
def test_examples_of_the_battery(argv, message):
    with pytest.raises(ConfigError) as caught:
        parse_args(argv)
    assert str(caught.value) == message


def test_config_file_values_are_checked_as_flags(tmp_path):
    config = tmp_path / "train.toml"
    config.write_text("[training]\nmax_train_epochs = -3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="--max_train_epochs must be at least 1"):
        parse_args(["--config_file", str(config)])


def test_the_launch_nodes_values_are_checked_before_anything_is_written():
    with pytest.raises(ValueCheckError, match="--learning_rate must be a finite number, got nan"):
        options.check_node_values({"learning_rate": math.nan, "max_train_steps": 0})
    options.check_node_values({"max_train_steps": 0, "sample_every_n_epochs": 0})  # 0: the widget's "off"
    with pytest.raises(ValueCheckError, match="--face_model_name contains a NUL character"):
        options.check_node_values({"face_model_name": "buffalo\0l"})
    with pytest.raises(ValueCheckError, match="--face_det_size must be at least 64"):
        options.to_argv("face_det_size", -640)
