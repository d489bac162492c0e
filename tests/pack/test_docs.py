"""The pages against the code, so they cannot drift: every flag table names each flag of its command
once, with the code's default and choices; every link between the pages reaches a page and a heading
that exist; docs/nodes.md lists every node under its type and display name.

A flag table is a Markdown table whose first header cell is `flag` and which has a `default` column.
Its first cell names one or more flags in backticks: `--name`, `--name METAVAR`, or `--name a\\|b\\|c`
for a flag with choices (all of them, none more). The default cell: `off` for a switch; the code's
value (numbers compared as numbers, lists word by word) where the code has one; where the code has
none, what happens without the flag in words (never a bare number or choice the code does not
default to).
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import pytest
from face_consistency.cli import SUBCOMMANDS
from face_consistency.faceid.similarity import Bands
from face_consistency.training_contract.options import OPTIONS

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = sorted([REPO / "README.md", *DOCS.glob("*.md")])


@dataclass(frozen=True)
class Flag:
    name: str
    default: Any  # None: the flag has no value unless given
    choices: tuple[str, ...] | None
    switch: bool = False
    const: Any = None  # the value of a flag given without one (nargs="?")


def training_flags() -> dict[str, Flag]:
    return {
        o.name: Flag(o.name, False if o.kind is bool else o.default, o.choices, switch=o.kind is bool) for o in OPTIONS
    }


def evaluate_flags() -> dict[str, Flag]:
    command = importlib.import_module(SUBCOMMANDS["evaluate"][0], "face_consistency")
    flags = {}
    for action in command.build_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0].removeprefix("--")
        switch = isinstance(action, argparse._StoreTrueAction)
        default = None if action.default in ([], None) else action.default
        choices = tuple(map(str, action.choices)) if action.choices else None
        flags[name] = Flag(name, False if switch else default, choices, switch, None if switch else action.const)
    return flags


# What a command does without a flag whose code default is None, where the page states it as a value.
FALLBACKS = {("evaluate", "bands"): " ".join(f"{bound:g}" for bound in astuple(Bands()))}
# The pages whose flag tables document each command, between them every flag once.
COMMANDS = {
    "train": (training_flags, ("training.md", "face-loss.md")),
    "evaluate": (evaluate_flags, ("evaluate.md",)),
}


@dataclass(frozen=True)
class Row:
    where: str  # page:line
    flags: tuple[tuple[str, tuple[str, ...] | None], ...]  # (name, the choices the cell lists)
    default: str


def cells(line: str) -> list[str]:
    """A table row's cells (a `\\|` inside a cell is part of it)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def flag_rows(page: Path) -> Iterator[Row]:
    lines = page.read_text(encoding="utf-8").splitlines()
    header: list[str] | None = None
    for number, line in enumerate(lines, 1):
        if not line.startswith("|"):
            header = None
            continue
        row = cells(line)
        if header is None:
            header = row
            continue
        if header[0] != "flag" or set(row) <= {"---"}:
            continue
        where = f"{page.name}:{number}"
        assert "default" in header, f"{where}: a flag table needs a default column"
        named = []
        for span in re.findall(r"`([^`]+)`", row[0]):
            flag, _, rest = span.partition(" ")
            if flag.startswith("--"):
                listed = tuple(rest.replace("\\|", "|").split("|")) if "|" in rest else None
                named.append((flag.removeprefix("--"), listed if listed else (rest,) if rest else None))
        assert named, f"{where}: the first cell names no flag: {row[0]!r}"
        yield Row(where, tuple(named), row[header.index("default")])


def rows_of(pages: tuple[str, ...]) -> list[Row]:
    return [row for page in pages for row in flag_rows(DOCS / page)]


def plain(text: str) -> str:
    return text.replace("`", "").strip()


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def default_problem(command: str, flag: Flag, cell: str) -> str | None:
    """Why the page's default `cell` disagrees with the code's (None: it agrees)."""
    text = plain(cell)
    if flag.switch:
        return None if text == "off" else f"a switch: write off, not {cell!r}"
    expected = flag.default if flag.default is not None else FALLBACKS.get((command, flag.name))
    if expected is None:
        words = text.split()
        if words and (all(map(is_number, words)) or text in (flag.choices or ())):
            return f"the code has no default, the page says {cell!r}"
        if flag.const is not None and f"{flag.const:g}" not in text:
            return f"given without a value it is {flag.const:g}, which the page does not say"
        return None
    if isinstance(expected, (list, tuple)):
        expected_words, words = [str(v) for v in expected], text.split()
    else:
        expected_words, words = [str(expected)], [text]
    if len(words) == len(expected_words) and all(
        float(w) == float(e) if is_number(w) and is_number(e) else w == e for w, e in zip(words, expected_words)
    ):
        return None
    return f"the code's default is {' '.join(expected_words)}, the page says {cell!r}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_is_in_one_table_row_and_every_row_names_a_flag(command: str) -> None:
    flags_of, pages = COMMANDS[command]
    flags = flags_of()
    seen: dict[str, str] = {}
    for row in rows_of(pages):
        for name, _ in row.flags:
            assert name in flags, f"{row.where}: --{name} is no flag of `face-consistency {command}`"
            assert name not in seen, f"{row.where}: --{name} is documented at {seen[name]} already"
            seen[name] = row.where
    missing = sorted(set(flags) - set(seen))
    assert not missing, f"flags of `face-consistency {command}` in no table of {', '.join(pages)}: {missing}"


@pytest.mark.parametrize("command", COMMANDS)
def test_table_defaults_and_choices_are_the_codes(command: str) -> None:
    flags_of, pages = COMMANDS[command]
    flags = flags_of()
    problems = []
    for row in rows_of(pages):
        defaults = [row.default] if len(row.flags) == 1 or not row.default else row.default.split(",")
        assert len(defaults) in (1, len(row.flags)), f"{row.where}: one default per flag, or one for all"
        for (name, listed), cell in zip(row.flags, defaults * len(row.flags) if len(defaults) == 1 else defaults):
            flag = flags[name]
            problem = default_problem(command, flag, cell)
            if problem:
                problems.append(f"{row.where}: --{name}: {problem}")
            if flag.choices and set(listed or ()) != set(flag.choices):
                problems.append(f"{row.where}: --{name} takes {'|'.join(flag.choices)}; the page lists {listed}")
            if not flag.choices and listed and len(listed) > 1:
                problems.append(f"{row.where}: --{name} has no choices; the page lists {'|'.join(listed)}")
    assert not problems, "\n".join(problems)


def test_a_changed_default_or_choice_is_caught() -> None:
    """The checks above, on flags that disagree with their rows."""
    assert default_problem("train", Flag("x", 0.5, None), "0.5") is None
    assert default_problem("train", Flag("x", 0.5, None), "`0.50`") is None
    assert default_problem("train", Flag("x", 0.4, None), "0.5")
    assert default_problem("train", Flag("x", "cuda", ("cuda", "auto")), "auto")
    assert default_problem("train", Flag("x", None, ("cuda", "auto")), "auto")
    assert default_problem("train", Flag("x", None, None), "1600")
    assert default_problem("train", Flag("x", None, None), "random") is None
    assert default_problem("train", Flag("x", False, None, switch=True), "on")
    assert default_problem("train", Flag("x", (1.0, 0.5), None), "`1 0.5`") is None
    assert default_problem("train", Flag("x", (1.0, 0.5), None), "`1 0.25`")
    assert default_problem("evaluate", Flag("watch", None, None, const=30.0), "off (20 when given alone)")


# --- links between the pages ---------------------------------------------------------------------------


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces as -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def links(page: Path) -> Iterator[tuple[int, str]]:
    text = page.read_text(encoding="utf-8")
    in_code = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        if not in_code:
            for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
                yield number, target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_between_the_pages_reaches_a_page_and_heading(page: Path) -> None:
    broken = []
    for number, target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{page.name}:{number}: {target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{page.name}:{number}: {target} (no such heading in {linked.name})")
    assert not broken, "\n".join(broken)


def test_anchor_follows_github() -> None:
    assert anchor("GPU: onnxruntime vs onnxruntime-gpu") == "gpu-onnxruntime-vs-onnxruntime-gpu"
    assert anchor("The trainer's libraries (training from ComfyUI)") == "the-trainers-libraries-training-from-comfyui"
    assert anchor("In ComfyUI: FaceConsistencyScoreFolder") == "in-comfyui-faceconsistencyscorefolder"
    assert anchor("Qwen-Image 2.1 (in progress)") == "qwen-image-21-in-progress"


# --- the node reference ---------------------------------------------------------------------------------


def test_nodes_page_lists_every_node_with_its_display_name() -> None:
    from face_consistency.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    listed = {}
    for line in (DOCS / "nodes.md").read_text(encoding="utf-8").splitlines():
        row = cells(line) if line.startswith("| `FaceConsistency") else []
        if len(row) >= 2:
            listed[plain(row[0])] = row[1]
    assert set(listed) == set(NODE_CLASS_MAPPINGS)
    for name, shown in listed.items():
        assert shown == NODE_DISPLAY_NAME_MAPPINGS.get(name, name), name
