"""Face-identity engine: InsightFace detection + ArcFace embeddings, knowing nothing of ComfyUI."""

import os
import warnings

# insightface sets this on import, which is too late once onnxruntime is loaded: set it first.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# insightface's norm_crop calls a scikit-image API deprecated in 0.26; the result is unchanged.
warnings.filterwarnings("ignore", message="`estimate` is deprecated", category=FutureWarning)

from .errors import FaceEngineError, ImageLoadError, ModelPackError, NoFaceError, ProviderError  # noqa: E402
from .images import image_list, load_image  # noqa: E402
from .model import FaceModel, load_face_engine, load_face_model  # noqa: E402
from .pack_files import STANDARD_PACKS, validate_pack  # noqa: E402
from .packs import as_roots, list_packs, resolve_pack  # noqa: E402
from .results import DetectedFace, FaceResult, Identity, Selection  # noqa: E402
from .similarity import Bands, cosine_similarity, mean_identity  # noqa: E402

__all__ = [
    "STANDARD_PACKS",
    "Bands",
    "DetectedFace",
    "FaceEngineError",
    "FaceModel",
    "FaceResult",
    "Identity",
    "ImageLoadError",
    "ModelPackError",
    "NoFaceError",
    "ProviderError",
    "Selection",
    "as_roots",
    "cosine_similarity",
    "image_list",
    "list_packs",
    "load_face_engine",
    "load_face_model",
    "load_image",
    "mean_identity",
    "resolve_pack",
    "validate_pack",
]
