"""Image conversion to InsightFace's BGR uint8, without a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from face_consistency.faceid import ImageLoadError, image_list, load_image
from PIL import Image


def test_rgb_array_becomes_bgr():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # red
    bgr = load_image(rgb)
    assert bgr.shape == (4, 5, 3) and bgr.dtype == np.uint8
    assert bgr[0, 0].tolist() == [0, 0, 200]
    assert load_image(bgr, channel_order="bgr")[0, 0].tolist() == [0, 0, 200]


def test_comfy_tensor_float_to_uint8():
    tensor = torch.zeros(1, 2, 3, 3)
    tensor[..., 1] = 1.0
    assert load_image(tensor)[0, 0].tolist() == [0, 255, 0]


def test_batches_split_into_images():
    assert len(image_list(torch.rand(3, 8, 8, 3))) == 3
    assert len(image_list([np.zeros((8, 8, 3), np.uint8)] * 2)) == 2
    with pytest.raises(ImageLoadError, match="batch of 3"):
        load_image(torch.rand(3, 8, 8, 3))


def test_rgba_composited_on_white_and_gray_expanded():
    rgba = np.zeros((2, 2, 4), np.float32)  # fully transparent black
    assert load_image(rgba)[0, 0].tolist() == [255, 255, 255]
    gray = np.full((2, 2), 0.5, np.float32)
    assert load_image(gray)[0, 0].tolist() == [128, 128, 128]
    gray16 = np.full((2, 2, 1), 65535, np.uint16)
    assert load_image(gray16)[0, 0].tolist() == [255, 255, 255]


def test_16bit_png_file(tmp_path):
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png")[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize(
    "bad,message",
    [
        (np.zeros((2, 2, 5), np.uint8), "expected an image array"),
        (np.zeros((0, 4, 3), np.uint8), "no pixels"),
        (np.zeros((2, 2, 3), np.int64), "unsupported image dtype"),
        (np.full((2, 2, 3), np.nan, np.float32), "NaN"),
        (12345, "cannot read an image from int"),
    ],
)
def test_bad_arrays_get_clear_errors(bad, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(bad)


def test_bad_files_get_clear_errors(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ImageLoadError, match=str(tmp_path / "x.png")):
        load_image(tmp_path / "x.png")
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ValueError, match="channel_order"):
        load_image(np.zeros((2, 2, 3), np.uint8), channel_order="rbg")


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_png_decoders_agree(tmp_path, monkeypatch, faces_dir, mode):
    """8-bit RGB(A) PNGs go through libspng (pyspng); Pillow decodes every other image and
    is the fallback where pyspng has no wheel: both must give the same pixels."""
    from face_consistency.faceid import images

    if images.pyspng is None:
        pytest.skip("pyspng is not installed (no wheel for this platform): Pillow decodes PNGs")
    photo = Image.open(faces_dir / "obama.jpg").convert(mode)
    if mode == "RGBA":
        alpha = np.linspace(0, 255, photo.width, dtype=np.uint8)[None, :].repeat(photo.height, axis=0)
        photo.putalpha(Image.fromarray(alpha))
    photo.save(tmp_path / "photo.png")
    with_spng = load_image(tmp_path / "photo.png")
    monkeypatch.setattr(images, "pyspng", None)
    with_pillow = load_image(tmp_path / "photo.png")
    assert with_spng.shape == with_pillow.shape
    assert np.abs(with_spng.astype(int) - with_pillow.astype(int)).max() <= 1  # alpha compositing rounding


def test_truncated_png_gets_a_clear_error(tmp_path, faces_dir):
    Image.open(faces_dir / "obama.jpg").convert("RGB").save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=f"cannot decode image {tmp_path / 'cut.png'}"):
        load_image(tmp_path / "cut.png")
