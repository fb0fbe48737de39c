"""How a picture becomes pixels: a path, a URL, bytes, an opened image and the command line read a file alike
(EXIF orientation, alpha, 16-bit), oversized pictures are resized down, and a missing, corrupt, too small or
miscounted picture gets one clear error."""

import contextlib
import functools
import http.server
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from prompts import chat, encode, picture


@pytest.mark.parametrize(("placeholders", "images"), [(1, 0), (0, 1), (1, 2), (2, 1), (2, 3)])
def test_processor_refuses_image_count_mismatch(processor, placeholders, images):
    prompt = processor.apply_chat_template(chat("Look.", placeholders), add_generation_prompt=True)
    with pytest.raises(ValueError, match=f"text has {placeholders} image placeholders but {images} images"):
        processor(text=[prompt], images=[picture(56, 56, i) for i in range(images)] or None, return_tensors="pt")


def encoded_png(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    picture(width, height).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "truncated_opened"])
def test_corrupt_or_truncated_image_file(processor, tmp_path, damage):
    data = encoded_png()
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not an image" if damage == "not_an_image" else data[: len(data) // 2])
    image = Image.open(path) if damage == "truncated_opened" else str(path)
    with pytest.raises(ValueError, match="Could not decode an image .*corrupt, truncated or not an image"):
        encode(processor, [("Look.", [image])])


@pytest.mark.parametrize(("width", "height"), [(0, 0), (1, 1), (1, 200), (200, 27)])
def test_zero_size_or_one_pixel_image(processor, width, height):
    with pytest.raises(ValueError, match=f"{width}x{height} .* too small.*at least 28x28"):
        encode(processor, [("Look.", [Image.new("RGB", (width, height))])])


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.png", r"Image file not found: .*missing.png"), (".", "is a folder, not an image file")],
)
def test_missing_path_or_folder_as_image(processor, tmp_path, name, message):
    with pytest.raises(ValueError, match=message):
        encode(processor, [("Look.", [str(tmp_path / name)])])


def test_images_above_max_pixels_are_resized_down(model, processor):
    inputs = encode(processor, [("Look.", [picture(3000, 2000)])])
    patches = int(inputs["image_grid_thw"].prod())
    max_pixels = processor.image_processor.size["longest_edge"]  # a pixel count (see image_processing_dimple)
    assert inputs["pixel_values"].shape[0] == patches
    assert patches * 14 * 14 <= max_pixels
    out = model.generate(**inputs, max_new_tokens=4)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


# --- one way to read a picture ---------------------------------------------------------------------------------


def sideways_jpeg(path) -> None:
    """A 84x56 picture stored sideways with EXIF orientation 6 (rotate 90° clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(84, 56).save(path, exif=exif, quality=95)


def transparent_png(path) -> None:
    """Opaque shapes on a fully transparent background whose hidden colour is black."""
    pixels = np.zeros((56, 84, 4), dtype=np.uint8)
    pixels[10:40, 20:60] = (200, 30, 30, 255)
    pixels[30:50, 50:80] = (20, 40, 210, 128)
    Image.fromarray(pixels, mode="RGBA").save(path)


def sixteen_bit_png(path) -> None:
    ramp = (np.arange(56 * 84, dtype=np.uint32).reshape(56, 84) * 65535 // (56 * 84 - 1)).astype(np.uint16)
    Image.fromarray(ramp).save(path)


@contextlib.contextmanager
def served_folder(folder):
    """An HTTP server for `folder` on 127.0.0.1 (a free port), stopped on exit."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def pixels_by_every_route(processor, path) -> list[torch.Tensor]:
    """pixel_values for the same file as a path, a URL, bytes, a user-opened PIL image, and the CLI."""
    from dimple.cli import load_images

    with served_folder(path.parent) as url:
        routes = [str(path), f"{url}/{path.name}", path.read_bytes(), Image.open(path), load_images([str(path)])[0]]
        return [processor.image_processor(images=[route], return_tensors="pt")["pixel_values"] for route in routes]


@pytest.mark.parametrize("make", [sideways_jpeg, transparent_png, sixteen_bit_png])
def test_a_picture_reads_the_same_by_every_route(processor, tmp_path, make):
    path = tmp_path / f"picture.{'jpg' if make is sideways_jpeg else 'png'}"
    make(path)
    first, *others = pixels_by_every_route(processor, path)
    assert all(torch.equal(first, other) for other in others)


def test_exif_orientation_alpha_and_16_bit_are_applied(tmp_path):
    from dimple.image_processing_dimple import load_image

    sideways_jpeg(tmp_path / "sideways.jpg")
    assert load_image(tmp_path / "sideways.jpg").size == (56, 84)  # upright: width and height swapped
    transparent_png(tmp_path / "transparent.png")
    rgb = np.asarray(load_image(tmp_path / "transparent.png"))
    assert tuple(rgb[0, 0]) == (255, 255, 255)  # transparent background composited on white, not black
    assert tuple(rgb[20, 30]) == (200, 30, 30)
    assert tuple(rgb[45, 70]) == (137, 147, 232)  # half-transparent blue over white
    sixteen_bit_png(tmp_path / "grey16.png")
    grey = np.asarray(load_image(tmp_path / "grey16.png"))[..., 0]
    assert grey[0, 0] == 0 and grey[-1, -1] == 255 and 120 <= grey[28, 42] <= 135  # scaled, not clipped to white


def test_a_mode_i_picture_keeps_its_brightness_whether_its_values_are_8_or_16_bit():
    """Mode "I" (32-bit integers) holds 8-bit values when converted from "L", 16-bit ones when older Pillow reads a
    16-bit PNG: the first must not be divided down to black, the second must still be scaled."""
    from dimple.image_processing_dimple import load_image

    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (56, 1))  # 56 x 64, black to near white
    eight_bit = Image.fromarray(ramp)
    assert np.array_equal(np.asarray(load_image(eight_bit.convert("I"))), np.asarray(load_image(eight_bit)))
    sixteen_bit = Image.fromarray(ramp.astype(np.int32) * 257, mode="I")
    assert np.array_equal(np.asarray(load_image(sixteen_bit)), np.asarray(load_image(eight_bit)))
