"""Errors the engine raises; each message says what is wrong and how to fix it."""


class FaceEngineError(Exception):
    """Base class: a problem the user can act on."""


class ModelPackError(FaceEngineError):
    """A model pack folder is missing, empty, nested, incomplete or unreadable."""


class ProviderError(FaceEngineError):
    """The requested onnxruntime execution provider cannot run."""


class ImageLoadError(FaceEngineError):
    """An input cannot be turned into an image."""


class NoFaceError(FaceEngineError):
    """A reference image has no face (outputs without a face are results, not errors)."""


class OutputWriteError(FaceEngineError):
    """Writing a report, plot or cache failed part way (disk full, the folder removed)."""
