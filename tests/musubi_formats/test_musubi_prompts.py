"""musubi-tuner's sample prompt files as the evaluation reads them: its numbering and options, odd lines,
JSON and TOML files."""

from __future__ import annotations

import json

from face_consistency.musubi_formats.prompts import load_prompt_file, parse_prompt_line


def test_prompt_file_follows_musubi_numbering_and_options(run):
    prompts = load_prompt_file(run["prompts"])
    assert [p.index for p in prompts] == [0, 1, 2, 3]
    assert [p.line_number for p in prompts] == [2, 4, 6, 7]
    first = prompts[0]
    assert (first.prompt, first.width, first.height, first.sample_steps, first.seed) == (
        "make him smile",
        1024,
        1024,
        20,
        42,
    )
    assert first.control_images == ["controls/obama.png"]
    assert (prompts[1].discrete_flow_shift, prompts[1].cfg_scale) == (2.2, 4.0)
    assert prompts[2].control_images == ["controls/obama.png", "controls/obama2.png"]
    assert prompts[2].negative_prompt == "blurry"


def test_prompt_line_oddities():
    parsed = parse_prompt_line("a cat --W 512 --s 5000 --zz what --ci  a b.png ")
    assert parsed.width == 512 and parsed.sample_steps == 1000  # musubi clamps steps to 1..1000
    assert parsed.control_images == ["a b.png"]
    assert parsed.unknown_options == ["--zz what"]


def test_json_and_toml_prompt_files(tmp_path):
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps([{"prompt": "x", "control_image_path": ["c.png"], "width": 512}, "y --ci d.png"]))
    prompts = load_prompt_file(as_json)
    assert [p.control_images for p in prompts] == [["c.png"], ["d.png"]] and prompts[0].width == 512
    as_toml = tmp_path / "p.toml"
    as_toml.write_text(
        '[prompt]\nwidth = 640\n[[prompt.subset]]\nprompt = "a"\ncontrol_image_path = ["e.png"]\n'
        '[[prompt.subset]]\nprompt = "b"\n'
    )
    prompts = load_prompt_file(as_toml)
    assert [(p.index, p.prompt, p.width, p.control_images) for p in prompts] == [
        (0, "a", 640, ["e.png"]),
        (1, "b", 640, []),
    ]
