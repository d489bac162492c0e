"""The pack loads the way ComfyUI loads it, under any folder name, and runs its CLI from there."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFY_MODULES = {"nodes", "server", "folder_paths", "comfy", "comfy_extras", "utils", "app", "execution", "main"}


def test_loads_like_a_comfyui_custom_node_under_a_hyphenated_name(tmp_path):
    folder = tmp_path / "custom_nodes" / "ComfyUI-Face-Consistency"
    folder.parent.mkdir()
    folder.symlink_to(REPO, target_is_directory=True)
    # what ComfyUI's load_custom_node does
    spec = importlib.util.spec_from_file_location(
        "ComfyUI-Face-Consistency", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.WEB_DIRECTORY == "./web"
        assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
        assert set(module.NODE_DISPLAY_NAME_MAPPINGS) <= set(module.NODE_CLASS_MAPPINGS)
        for name, cls in module.NODE_CLASS_MAPPINGS.items():
            assert name.startswith("FaceConsistency"), name
            for attribute in ("INPUT_TYPES", "RETURN_TYPES", "FUNCTION", "CATEGORY"):
                assert hasattr(cls, attribute), (name, attribute)
    finally:
        for key in [k for k in sys.modules if k.startswith("ComfyUI-Face-Consistency")]:
            del sys.modules[key]


def test_bootstrap_runs_the_cli_from_any_folder_name(tmp_path):
    folder = tmp_path / "my-pack copy"
    folder.symlink_to(REPO, target_is_directory=True)
    out = subprocess.run(
        [sys.executable, str(folder / "bootstrap.py"), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "evaluate" in out.stdout and "train" in out.stdout


def test_unknown_command_is_an_error():
    from face_consistency.cli import main

    assert main(["frobnicate"]) == 2


def test_installed_package_shadows_no_comfyui_module():
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    top_level = {p.split(".")[0] for p in config["tool"]["setuptools"]["packages"]}
    assert top_level == {"face_consistency"}
    assert not top_level & COMFY_MODULES


def test_every_package_folder_is_installed():
    """A sub-room (a folder with an __init__.py, such as faceid/evaluate/) is listed in pyproject's packages,
    or the installed pack lacks it."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {
        ".".join(("face_consistency", *init.parent.relative_to(REPO).parts))
        for init in REPO.rglob("__init__.py")
        if init.parent.relative_to(REPO).parts[:1] not in (("tests",), ("benchmarks",), (".git",))
    }
    assert found - listed == set()


@pytest.mark.parametrize("command", ["evaluate", "packs", "demo"])
def test_help_shows_each_flags_choices_and_default(command, monkeypatch):
    """`face-consistency <command> --help` gives every flag's choices and its default where it has one."""
    from face_consistency.cli import SUBCOMMANDS

    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag's help
    parser = importlib.import_module(SUBCOMMANDS[command][0], "face_consistency").build_parser()
    blocks: dict[str, str] = {}
    for line in parser.format_help().splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            blocks[flag] = line
        elif line.startswith("    ") and blocks:
            blocks[flag] += " " + line.strip()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        shown = blocks[action.option_strings[0]]
        help_text = shown.replace(parser._get_formatter()._format_action_invocation(action), "", 1)
        for choice in action.choices or ():
            assert str(choice) in help_text, (shown, choice)  # in the help, not only in the usage's {a,b}
        if action.nargs != 0 and action.default not in (None, []):
            assert re.search(rf"default:? {re.escape(str(action.default))}\b", shown), shown
