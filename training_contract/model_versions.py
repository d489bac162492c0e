"""The Qwen-Image models this trainer knows, as musubi-tuner's `--model_version` names them (and
ComfyUI and the community name Qwen-Image 2.1).

| version        | controls | prompt template            | conditioning                                   |
| -------------- | -------- | -------------------------- | ---------------------------------------------- |
| edit           | one      | Edit (control at ~1 MP)    | one timestep for all tokens                    |
| edit-2509      | 1 or more| Edit-Plus (controls ~384²) | one timestep for all tokens                    |
| edit-2511      | 1 or more| Edit-Plus (controls ~384²) | `zero_cond_t`: reference tokens get timestep 0 |
| qwen-image-2.1 | 1 to 10  | Qwen3-VL, images inline    | causal condition: prefix tokens get timestep 0 |

`--edit` and `--edit_plus` are musubi's older spellings of `edit` and `edit-2509`. Qwen-Image 2.1 is
another architecture (Qwen3-VL text encoder, single-stream DiT, 64-channel 16x VAE): its own
`family`, and newer diffusers/transformers (`libraries.MODEL_VERSION_FLOORS`).
"""

from __future__ import annotations

from dataclasses import dataclass

QWEN_IMAGE_EDIT = "qwen_image_edit"  # Edit, 2509, 2511: Qwen2.5-VL, the dual-stream DiT, the 16-channel VAE
QWEN_IMAGE_21 = "qwen_image_2.1"  # as ComfyUI names the model (`image_model`)


@dataclass(frozen=True)
class ModelVersion:
    name: str
    several_controls: bool  # Edit-Plus: 1+ controls and its prompt template
    zero_cond_t: bool  # reference tokens conditioned on timestep 0 (Edit-2511)
    architecture: str  # `modelspec.architecture` of a LoRA, as musubi writes it
    family: str = QWEN_IMAGE_EDIT  # the architecture its files hold: files of one family fit no other

    @property
    def lora_metadata(self) -> dict[str, str]:
        return {
            "ss_base_model_version": self.family,
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
        ModelVersion(
            "qwen-image-2.1",
            several_controls=True,
            zero_cond_t=False,
            architecture="Qwen-Image-2.1",
            family=QWEN_IMAGE_21,
        ),
    )
}
ALIAS_FLAGS = {"edit": "edit", "edit_plus": "edit-2509"}  # flag (dest) -> version
