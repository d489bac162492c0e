"""The model versions the trainer knows and the library versions each needs, named when too old."""

from __future__ import annotations

import pytest
from face_consistency.training_contract import libraries
from face_consistency.training_contract.model_versions import MODEL_VERSIONS, QWEN_IMAGE_21, QWEN_IMAGE_EDIT

# run again by CI under the minimum library versions, with the trainer's checks that read them
pytestmark = pytest.mark.trainer


def test_version_floors_name_the_versions_needed():
    assert libraries.too_old_for("edit-2509", {}) is None
    message = libraries.too_old_for(
        "qwen-image-2.1", {"diffusers": {"version": "0.39.0"}, "transformers": {"version": "4.52.1"}}
    )
    assert "needs diffusers>=0.41.0 and transformers>=4.57.1" in message
    assert "diffusers 0.39.0, transformers 4.52.1" in message
    message = libraries.too_old_for("qwen-image-2.1", {"diffusers": {"version": "0.42.1"}})
    assert "transformers not installed" in message and "diffusers 0.42.1" not in message


def test_model_version_21_is_its_own_family():
    version = MODEL_VERSIONS["qwen-image-2.1"]
    assert version.family == QWEN_IMAGE_21 and version.several_controls
    assert version.lora_metadata["ss_base_model_version"] == "qwen_image_2.1"
    assert version.lora_metadata["modelspec.architecture"] == "Qwen-Image-2.1/lora"
    assert all(v.family == QWEN_IMAGE_EDIT for name, v in MODEL_VERSIONS.items() if name != "qwen-image-2.1")
