"""Face Consistency for Qwen-Image-Edit: ComfyUI entry point.

ComfyUI imports this folder as a package (under whatever name the folder has) and reads
NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS and WEB_DIRECTORY. The node mappings are
resolved lazily (PEP 562) so that the command line and the trainer, which import the
`faceid` and `trainer` subpackages, do not pay for loading every node module.
"""

from typing import Any

from .common.version import __version__

WEB_DIRECTORY = "./web"

_NODE_ATTRIBUTES = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")


def __getattr__(name: str) -> Any:
    if name in _NODE_ATTRIBUTES:
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
