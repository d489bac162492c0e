"""onnxruntime execution providers: what was asked, what is installed, what actually runs."""

from __future__ import annotations

import importlib.metadata
import logging

from ..common.face_engine import PROVIDERS
from .errors import ProviderError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")

GPU_FIX = (
    "onnxruntime and onnxruntime-gpu cannot be installed together (insightface pulls in the CPU one). "
    "Fix, in the Python that runs ComfyUI: `python -m pip uninstall -y onnxruntime onnxruntime-gpu` "
    "then `python -m pip install onnxruntime-gpu`."
)


def installed_onnxruntime() -> list[str]:
    """onnxruntime distributions installed side by side (more than one breaks GPU use)."""
    found = []
    for dist in ORT_DISTRIBUTIONS:
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def requested_providers(provider: str) -> list[str]:
    """Provider list to give onnxruntime for 'auto', 'cuda' or 'cpu'."""
    provider = provider.lower()
    if provider not in PROVIDERS:
        raise ProviderError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
    if provider == "cpu":
        return [CPU]
    installed = installed_onnxruntime()
    if len(installed) > 1:
        log.warning("several onnxruntime packages installed (%s). %s", ", ".join(installed), GPU_FIX)
    has_cuda = CUDA in available_providers()
    if provider == "cuda" and not has_cuda:
        raise ProviderError(
            f"CUDA was requested but onnxruntime offers no CUDAExecutionProvider "
            f"(installed: {', '.join(installed) or 'no onnxruntime'}). {GPU_FIX} "
            "Or choose provider 'cpu'."
        )
    return [CUDA, CPU] if has_cuda else [CPU]


def check_running_provider(provider: str, requested: list[str], running: str) -> str | None:
    """Raise if an explicit CUDA request fell back to CPU; return a note for a silent auto fallback."""
    if requested[0] == CUDA and running != CUDA:
        message = (
            f"onnxruntime could not start CUDA and fell back to {running}: the CUDA/cuDNN libraries "
            f"onnxruntime-gpu needs are missing or do not match ({', '.join(installed_onnxruntime())}). "
            "See the onnxruntime CUDA requirements for your version."
        )
        if provider.lower() == "cuda":
            raise ProviderError(message)
        log.warning(message)
        return message
    return None
