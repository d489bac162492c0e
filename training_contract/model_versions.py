"""The Qwen-Image-Edit models this trainer trains, as musubi-tuner's `--model_version` names them.

| version   | controls | prompt template            | conditioning                                   |
| --------- | -------- | -------------------------- | ---------------------------------------------- |
| edit      | one      | Edit (control at ~1 MP)    | one timestep for all tokens                    |
| edit-2509 | 1 or more| Edit-Plus (controls ~384²) | one timestep for all tokens                    |
| edit-2511 | 1 or more| Edit-Plus (controls ~384²) | `zero_cond_t`: reference tokens get timestep 0 |

`--edit` and `--edit_plus` are musubi's older spellings of `edit` and `edit-2509`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelVersion:
    name: str
    several_controls: bool  # Edit-Plus: 1+ controls and its prompt template
    zero_cond_t: bool  # reference tokens conditioned on timestep 0 (Edit-2511)
    architecture: str  # `modelspec.architecture` of a LoRA, as musubi writes it

    @property
    def lora_metadata(self) -> dict[str, str]:
        return {
            "ss_base_model_version": "qwen_image_edit",
            "ss_model_version": self.name,
            "modelspec.architecture": f"{self.architecture}/lora",
            "modelspec.implementation": "https://github.com/QwenLM/Qwen-Image",
        }


MODEL_VERSIONS = {
    version.name: version
    for version in (
        ModelVersion("edit", several_controls=False, zero_cond_t=False, architecture="Qwen-Image-Edit"),
        ModelVersion("edit-2509", several_controls=True, zero_cond_t=False, architecture="Qwen-Image-Edit-Plus"),
        ModelVersion("edit-2511", several_controls=True, zero_cond_t=True, architecture="Qwen-Image-Edit-2511"),
    )
}
ALIAS_FLAGS = {"edit": "edit", "edit_plus": "edit-2509"}  # flag (dest) -> version
