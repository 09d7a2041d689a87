"""The NumPy image path equals transformers' Qwen2VLImageProcessorPil bit for bit."""

from __future__ import annotations

import io

import ml_dtypes
import numpy as np
import pytest
from PIL import Image
from sample_data import png_bytes
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from vrft_jax.data.image import ImageError, ImageGeometry, PatchEncoder, load_encoded, open_image, to_rgb

MIN_PIXELS, MAX_PIXELS = 56 * 56, 200 * 200
# Sides that are and are not multiples of 28, images needing up- and down-scaling, odd aspect ratios.
SIZES = [(28, 28), (30, 47), (56, 84), (99, 131), (140, 140), (203, 317), (333, 517), (12, 700), (600, 35)]


@pytest.fixture(scope="module")
def hf():
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("height,width", SIZES)
def test_patches_are_bit_identical_to_hf(hf, height, width):
    image = open_image(png_bytes(height, width, seed=height * width))
    ours, grid = PatchEncoder(ImageGeometry(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))(to_rgb(image))
    ref = hf(images=[Image.open(io.BytesIO(png_bytes(height, width, seed=height * width)))], return_tensors="np")
    assert grid == tuple(ref["image_grid_thw"][0])
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref["pixel_values"])


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_transparency_and_grey_convert_like_hf(hf, mode):
    data = png_bytes(75, 90, seed=3, mode=mode)
    ours, _ = PatchEncoder(ImageGeometry(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))(to_rgb(open_image(data)))
    np.testing.assert_array_equal(ours, hf(images=[Image.open(io.BytesIO(data))], return_tensors="np")["pixel_values"])


def test_bfloat16_patches_equal_hf_rounded_to_bfloat16(hf):
    data = png_bytes(99, 131, seed=1)
    ours, _ = PatchEncoder(ImageGeometry(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
                           ml_dtypes.bfloat16)(to_rgb(open_image(data)))
    ref = hf(images=[Image.open(io.BytesIO(data))], return_tensors="np")["pixel_values"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(ours.view(np.uint16), ref.view(np.uint16))


def test_smart_resize_matches_hf_over_many_sizes():
    geometry = ImageGeometry(min_pixels=3136, max_pixels=401408)
    rng = np.random.default_rng(0)
    for height, width in rng.integers(1, 3000, size=(500, 2)):
        if max(height, width) / min(height, width) > 200:
            continue
        assert geometry.resized_hw(int(height), int(width)) == smart_resize(
            int(height), int(width), factor=28, min_pixels=3136, max_pixels=401408)


def test_max_patches_is_max_pixels_over_196_in_whole_tokens():
    assert ImageGeometry(min_pixels=3136, max_pixels=401408).max_patches == 2048
    assert ImageGeometry(min_pixels=3136, max_pixels=160 * 160).max_patches == 132  # 130.6 -> 131 -> 132


def test_corrupt_and_truncated_images_raise_image_error():
    with pytest.raises(ImageError, match="cannot read image"):
        open_image(b"not an image at all")
    truncated = png_bytes(64, 64)[:200]
    with pytest.raises(ImageError, match="cannot decode image"):
        to_rgb(open_image(truncated))
    with pytest.raises(ImageError, match="aspect ratio"):
        ImageGeometry(min_pixels=3136, max_pixels=401408).resized_hw(1, 500)
    with pytest.raises(FileNotFoundError):
        load_encoded("/nonexistent/image.png")


@pytest.mark.parametrize("height,width", [(30, 47), (99, 131), (203, 317)])
def test_qwen3_vl_patches_are_bit_identical_to_its_processor(height, width):
    """Qwen3-VL's geometry from its config (16-pixel patches, 32-pixel tokens, 0.5 / 0.5) equals its processor's."""
    from vrft_jax.models.qwen2_vl import Qwen2VLConfig
    from vrft_jax.models.qwen2_vl.processor import load_image_processor

    geometry = ImageGeometry.from_model(Qwen2VLConfig.qwen3_vl_2b(), min_pixels=64 * 64, max_pixels=256 * 256)
    data = png_bytes(height, width, seed=height + width)
    ours, grid = PatchEncoder(geometry)(to_rgb(open_image(data)))
    ref = load_image_processor(64 * 64, 256 * 256, family="qwen3_vl")(images=[Image.open(io.BytesIO(data))],
                                                                      return_tensors="np")
    assert grid == tuple(ref["image_grid_thw"][0]) and ours.shape[1] == 3 * 2 * 16 * 16
    np.testing.assert_array_equal(ours, ref["pixel_values"])
