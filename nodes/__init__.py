"""Node classes: thin adapters from ComfyUI types to the `faceid` library and the trainer.

Each theme module defines its own NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS; they are
merged here. ComfyUI-only wiring (model folder registration, HTTP routes) happens only when
a ComfyUI server is running.
"""

from __future__ import annotations

import importlib

from . import comfy_env
from .inputs import with_checked_inputs

NODE_MODULES: tuple[str, ...] = ("training", "scoring", "judge", "matching", "folder", "gate")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _name in NODE_MODULES:
    _module = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update({key: with_checked_inputs(cls) for key, cls in _module.NODE_CLASS_MAPPINGS.items()})
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

if comfy_env.prompt_server() is not None:
    comfy_env.register_model_folders()
    from .routes import register_with_comfyui

    register_with_comfyui()
