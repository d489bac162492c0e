"""Turn anything a user hands us into the BGR uint8 array InsightFace expects.

Accepted: file paths, PIL images, numpy arrays (RGB unless told `channel_order="bgr"`),
and ComfyUI IMAGE tensors (`[B,H,W,C]` / `[H,W,C]` float 0..1, RGB). RGBA is composited
on white, grayscale and 16-bit are expanded to 8-bit RGB, EXIF orientation is applied.
Files longer than MAX_ANALYSIS_SIDE are decoded downscaled to it, in 8 bits: a 13000 x 13000
RGBA PNG then never exists as a float copy (that took 9 GB), only as its decoded pixels.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..common.files import IMAGE_SUFFIXES
from .errors import ImageLoadError

try:  # libspng decodes 8-bit PNGs (training samples) twice as fast as Pillow's decoder
    import pyspng
except ImportError:  # no wheel for the platform (Intel macOS): Pillow decodes them instead
    pyspng = None

# Images larger than this (longest side) are analysed downscaled: detection runs at <= 1024
# anyway and an aligned 112x112 crop gains nothing from more pixels.
MAX_ANALYSIS_SIDE = 4096
# Image formats users meet that the engine cannot read: listed as failures, never skipped silently.
UNSUPPORTED_IMAGE_SUFFIXES = frozenset(
    {".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".ico", ".psd", ".svg", ".dng", ".cr2", ".nef", ".arw"}
)
# Files with more pixels than this decode one at a time (each holds its full-size 8-bit
# pixels until shrunk), so that worker threads decoding side by side cannot add up several.
LARGE_DECODE_PIXELS = MAX_ANALYSIS_SIDE * MAX_ANALYSIS_SIDE
_large_decode = threading.Lock()
# A float image with values above this is 0..255 data handed over as if it were 0..1 (not the small
# overshoot of an upscaler, which is clipped).
FLOAT_RANGE_LIMIT = 2.0
# Alpha compositing works through this many rows at a time, bounding its 16-bit temporaries.
COMPOSITE_ROWS = 256
# The images the face detectors (SCRFD, dlib's) can take. SCRFD letterboxes an image into its square
# input and both shrink large ones, so a side more than this many times the other falls below a
# pixel (OpenCV's resize then fails); a face needs some pixels too. Others are a per-image status,
# as an unreadable file is.
MAX_ASPECT_RATIO = 32
MIN_IMAGE_SIDE = 8


def list_images(folder: Path, exclude: Iterable[Path] = (), suffixes: frozenset[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files directly in `folder` (not recursive), sorted by name; hidden and temp files skipped."""
    excluded = {p.resolve() for p in exclude}
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".") and p.resolve() not in excluded
    )


def unsupported_format_reason(path: Path) -> str:
    return (
        f"unsupported image format {path.suffix.lower()}: convert it to PNG or JPEG "
        f"(readable: {', '.join(sorted(IMAGE_SUFFIXES))})"
    )


def undetectable_reason(width: int, height: int) -> str | None:
    """Why a face detector cannot take an image of this size, or None when it can."""
    short, long = sorted((width, height))
    if short < MIN_IMAGE_SIDE:
        return f"image {width}x{height} is too small to hold a face (at least {MIN_IMAGE_SIDE} pixels a side)"
    if long > MAX_ASPECT_RATIO * short:
        return (
            f"image {width}x{height} is too elongated for the face detector (about {long // short}:1; at most "
            f"{MAX_ASPECT_RATIO}:1): crop it around the face"
        )
    return None


def check_float_range(peak: float, what: str) -> None:
    """Raise ImageLoadError when a float image's largest value shows it holds 0..255, not 0..1."""
    if peak > FLOAT_RANGE_LIMIT:
        raise ImageLoadError(
            f"{what} has values up to {peak:.4g}, but float images (ComfyUI's IMAGE) hold 0..1; it looks like "
            "0..255 data: divide it by 255, or produce it with a node that outputs a standard IMAGE"
        )


def _pil_to_rgb_array(img: Image.Image, max_side: int | None = None) -> np.ndarray:
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if max_side is not None and max(img.size) > max_side:
        if img.mode in ("P", "PA"):  # palette images resize by nearest neighbour: expand them first
            img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            peak = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        else:
            peak = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _array_to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ImageLoadError(f"expected an image array shaped (H, W), (H, W, 1|3|4); got {tuple(array.shape)}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageLoadError(f"image has no pixels: shape {tuple(array.shape)}")
    if array.dtype == np.uint8 and array.shape[2] == 3:
        return array  # already 8-bit colour: the float round trip below would give it back unchanged
    if array.dtype == np.uint8 and array.shape[2] == 4:
        return _composite_on_white(array.copy())[..., :3]
    if array.dtype == np.uint8:
        values = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        values = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.floating) or array.dtype == np.bool_:
        values = array.astype(np.float32)
    else:
        raise ImageLoadError(f"unsupported image dtype {array.dtype}; use uint8, uint16 or float 0..1")
    if not np.all(np.isfinite(values)):
        raise ImageLoadError("image contains NaN or infinite values")
    if np.issubdtype(array.dtype, np.floating):
        check_float_range(float(values.max()), "the image")
    values = np.clip(values, 0.0, 1.0)
    channels = values.shape[2]
    if channels in (2, 4):  # gray+alpha / RGBA: composite on white
        alpha = values[..., -1:]
        values = values[..., :-1] * alpha + (1.0 - alpha)
    if values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    return (values * 255.0 + 0.5).astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite 8-bit RGBA on white in place, in integers (the float formula's exact rounding)."""
    for start in range(0, rgba.shape[0], COMPOSITE_ROWS):
        block = rgba[start : start + COMPOSITE_ROWS]
        alpha = block[..., 3:].astype(np.uint16)
        # rgb * a/255 + 255 * (1 - a/255), rounded: at most 255 * 255, so it fits 16 bits
        block[..., :3] = (block[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
    return rgba


def _fit_analysis_side(array: np.ndarray) -> np.ndarray:
    height, width = array.shape[:2]
    scale = MAX_ANALYSIS_SIDE / max(height, width)
    if scale >= 1.0:
        return array
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA)


def load_image(source: Any, channel_order: str = "rgb") -> np.ndarray:
    """Return an (H, W, 3) BGR uint8 array from a path, PIL image, array or ComfyUI tensor."""
    return load_image_sized(source, channel_order)[0]


def load_image_sized(
    source: Any, channel_order: str = "rgb", reduce_to: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """`load_image`, and the (width, height) of the original: a file longer than MAX_ANALYSIS_SIDE
    comes downscaled, and face geometry found in it is scaled back to this size for the user.

    `reduce_to`: a JPEG file may come decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's scaled
    decoding, several times faster), as long as its longest side stays at least this long."""
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    if isinstance(source, (str, os.PathLike)):
        rgb, original_size = _load_file(Path(source), reduce_to)
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), original_size
    if isinstance(source, Image.Image):
        rgb = _pil_to_rgb_array(source)
    elif isinstance(source, np.ndarray):
        rgb = _array_to_rgb_uint8(source)
        if channel_order == "bgr":
            return np.ascontiguousarray(rgb), (rgb.shape[1], rgb.shape[0])
    elif _is_torch_tensor(source):
        tensor = source.detach().to("cpu")
        if tensor.ndim == 4:
            if tensor.shape[0] != 1:
                raise ImageLoadError(
                    f"expected one image, got a batch of {tensor.shape[0]}; use image_list() for batches"
                )
            tensor = tensor[0]
        rgb = _array_to_rgb_uint8(tensor.float().numpy())
    else:
        raise ImageLoadError(
            f"cannot read an image from {type(source).__name__}; pass a file path, PIL image, "
            "numpy array or ComfyUI IMAGE tensor"
        )
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), (rgb.shape[1], rgb.shape[0])


def image_list(source: Any, channel_order: str = "rgb") -> list[np.ndarray]:
    """Split a batch (IMAGE tensor `[B,H,W,C]`, list, single image) into BGR uint8 arrays."""
    if _is_torch_tensor(source) and source.ndim == 4:
        return [load_image(source[i]) for i in range(source.shape[0])]
    if isinstance(source, np.ndarray) and source.ndim == 4:
        return [load_image(source[i], channel_order) for i in range(source.shape[0])]
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return [load_image(item, channel_order) for item in source]
    return [load_image(source, channel_order)]


def _load_file(path: Path, reduce_to: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    if not path.exists():
        raise ImageLoadError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageLoadError(f"expected an image file, got a folder: {path}")
    try:
        with Image.open(path) as img, _decode_slot(img):  # reads the header only, and refuses decompression bombs
            width, height = img.size
            if pyspng is not None and img.format == "PNG" and img.mode in ("RGB", "RGBA") and "exif" not in img.info:
                decoded = _decode_png(path, img.mode)
                if img.mode == "RGBA":  # the decoder's buffer is ours: composite in place, then shrink
                    decoded = _composite_on_white(decoded)
                return _fit_analysis_side(decoded)[..., :3], (width, height)
            if img.format == "JPEG":
                img.draft("RGB", _draft_box(width, height, reduce_to))
            rgb = _pil_to_rgb_array(img, MAX_ANALYSIS_SIDE)
            # EXIF rotation by 90 degrees swaps the sides: the original is as the user sees it
            rotated = (rgb.shape[0] > rgb.shape[1]) != (height > width)
            return rgb, (height, width) if rotated else (width, height)
    except MemoryError:
        raise ImageLoadError(f"not enough memory to decode image {path}; free memory or downscale it") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"image too large to decode safely: {path} ({exc})") from None
    except UnidentifiedImageError:
        if path.suffix.lower() in UNSUPPORTED_IMAGE_SUFFIXES:
            raise ImageLoadError(f"{path}: {unsupported_format_reason(path)}") from None
        raise ImageLoadError(f"not an image file (or corrupt): {path}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"cannot decode image {path}: {exc}") from None


def _draft_box(width: int, height: int, reduce_to: int | None) -> tuple[int, int]:
    """The size Pillow's JPEG `draft` may reduce to: it picks the largest scale that keeps both sides at least this."""
    if reduce_to is None:
        return MAX_ANALYSIS_SIDE, MAX_ANALYSIS_SIDE
    longest = min(reduce_to, MAX_ANALYSIS_SIDE)
    return -(-width * longest // max(width, height)), -(-height * longest // max(width, height))


def _decode_slot(img: Image.Image) -> contextlib.AbstractContextManager:
    return _large_decode if img.width * img.height > LARGE_DECODE_PIXELS else contextlib.nullcontext()


def _decode_png(path: Path, mode: str) -> np.ndarray:
    try:
        return pyspng.load(path.read_bytes(), format=mode)
    except RuntimeError as exc:  # libspng's message names the broken part ("invalid IDAT", ...)
        raise ImageLoadError(f"cannot decode image {path}: {exc}") from None


def _is_torch_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach")
