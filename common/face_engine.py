"""The face engine's settings (faceid/model.py): one name, one default and one set of choices each.

Every surface takes them from here. The command lines keep their own spellings (the seed guide's flags, and
the node inputs saved workflows link by name):

| setting | `train` | `evaluate` | `packs` | Load Face Model | Train LoRA |
| --- | --- | --- | --- | --- | --- |
| `pack` | `--face_model_name` | `--model_name` | `--load` | `pack` | `face_model_name` |
| `models_roots` | `--face_models_root` | `--models_root` | `--models_root` | (1) | (1) |
| `provider` | `--face_device` | `--device` | `--device` | `provider` | `face_device` |
| `det_size` | `--face_det_size` (2) | `--det_size` | | `det_size` | `face_det_size` (2) |
| `det_thresh` | | `--det_thresh` | | `det_thresh` | |
| `allow_download` | not `--offline` | not `--offline` | not `--offline` | (3) | (3) |

(1) ComfyUI's `insightface` model folders. (2) A number of pixels, 640 by default: the trainer detects at one
size. (3) ComfyUI's setting "download model packs on first use".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROVIDERS = ("auto", "cuda", "cpu")
DET_SIZES = ("auto", 320, 640, 1024)  # the choices offered; any multiple of 32 from 64 to 2048 is accepted

PACK_HELP = "InsightFace model pack: a name (buffalo_l, antelopev2, any installed pack) or a pack's folder"
MODELS_ROOT_HELP = "folder holding models/<pack>/ (~/.insightface is always searched)"
PROVIDER_HELP = (
    "onnxruntime provider of the face engine: auto (CUDA when onnxruntime-gpu works, else the CPU), "
    "cuda (fails instead of falling back to the CPU) or cpu"
)
DET_SIZE_HELP = "face detector input size: auto (follows the image size, 160..640) or a multiple of 32"
DET_THRESH_HELP = "face detection score threshold; lower finds more (and falser) faces"


@dataclass(frozen=True)
class FaceEngineSettings:
    """How the face engine is loaded: which pack, from where, on which provider, detecting at which size."""

    pack: str = "buffalo_l"
    models_roots: tuple[Path, ...] = ()  # searched in order, then ~/.insightface
    provider: str = "auto"
    det_size: str | int = "auto"
    det_thresh: float = 0.5
    allow_download: bool = True  # a missing standard pack is downloaded on first use


DEFAULTS = FaceEngineSettings()
