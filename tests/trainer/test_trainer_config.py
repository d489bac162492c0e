"""The trainer's configuration is the options, typed and frozen; `train --help` shows each default and choice.
Both are read from `training_contract/options.py`, so an option declared later is covered by declaring it."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from face_consistency.trainer.cli import ConfigError, build_parser, parse_args
from face_consistency.trainer.config import DERIVED_FIELDS, TrainingConfig
from face_consistency.training_contract.options import BY_NAME, OPTIONS

pytestmark = pytest.mark.trainer


def test_the_configuration_has_one_field_per_option_and_the_values_read_from_files():
    assert [field.name for field in dataclasses.fields(TrainingConfig)] == [
        *(option.name for option in OPTIONS),
        *DERIVED_FIELDS,
    ]
    assert TrainingConfig.__dataclass_params__.frozen  # type: ignore[attr-defined]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_each_field_has_its_options_type(option):
    hint = typing.get_type_hints(TrainingConfig)[option.name]
    if option.many:
        assert hint == tuple[option.kind, ...]
    else:  # an optional flag may be absent; the checks settle the version, the precision and the seed
        assert hint in (option.kind, option.kind | None)


def test_help_shows_every_default_and_every_choice(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag's help
    parser = build_parser()
    text = parser.format_help()
    usage = parser.format_usage()
    helps: dict[str, str] = {}  # flag -> its lines of help, joined
    for line in text[len(usage) :].splitlines():
        if line.startswith("  --"):
            flag = line.split()[0]
            helps[flag] = line
        elif line.startswith("    ") and helps:
            helps[flag] += " " + line.strip()
    for option in OPTIONS:
        if option.default not in (None, ()) and option.kind is not bool:
            assert "default" in helps[option.flag], option.flag
        if option.choices:
            assert f"{option.flag} {{{','.join(option.choices)}}}" in usage, option.flag
    # the two the issue names
    assert "--face_decode {full,half,face}" in usage
    options_part = text[len(usage) :]
    max_t = options_part[options_part.index("--face_loss_max_t") : options_part.index("--face_loss_t_weighting")]
    assert "(default: 0.5)" in " ".join(max_t.split())
    assert "(default: 2e-06)" in helps["--learning_rate"]  # a help of its own, then the default


def test_a_choice_is_checked_with_the_bounds_and_names_the_flag():
    with pytest.raises(ConfigError, match=r"--face_decode 'whole': choose one of full, half, face"):
        parse_args(["--face_decode", "whole"])
    assert BY_NAME["optimizer_type"].choice("adamw8BIT") == "AdamW8bit"  # musubi's spellings in any case
    assert BY_NAME["model_version"].choice("Edit-2509") == "edit-2509"
