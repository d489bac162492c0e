"""Sample file names read back: musubi-tuner's by step or epoch, with or without a seed, and the seed guide's."""

from __future__ import annotations

import pytest
from evaluate_fixtures import TIME
from face_consistency.musubi_formats.names import parse_sample_name


@pytest.mark.parametrize(
    "name, expected",
    [
        (f"my_lora_v2_001200_03_{TIME}_1234_000.png", (1200, None, 3, 1234, "musubi", "1200")),
        (f"my_lora_001200_03_{TIME}_000.png", (1200, None, 3, None, "musubi", "1200")),
        (f"000050_00_{TIME}_7_000.png", (50, None, 0, 7, "musubi", "50")),  # no --output_name
        (f"lora_e000003_01_{TIME}_000.png", (None, 3, 1, None, "musubi", "e3")),
        (f"lora_000010_01_{TIME}_98765.png", (10, None, 1, 98765, "musubi", "10")),  # older: no image number
        ("sample_step_500_2.png", (500, None, 2, None, "seed_guide", "500")),
        ("holiday.png", (None, None, None, None, "unknown", "none")),
    ],
)
def test_sample_names(name, expected):
    parsed = parse_sample_name(name)
    assert (parsed.step, parsed.epoch, parsed.prompt_index, parsed.seed, parsed.layout, parsed.step_key) == expected
