"""Image processor for Dimple.

Dimple's vision tower is Qwen2.5-VL's, fed exactly like Qwen2-VL: dynamic resolution (sides rounded to
multiples of ``patch_size * merge_size`` = 28, total pixels kept in ``[min_pixels, max_pixels]``), CLIP
normalisation and 14x14 patches flattened to rows of ``3 * 2 * 14 * 14 = 1176`` values. We subclass the PIL
backend rather than the torchvision one because the reference resized with PIL bicubic; the torchvision
resize is not bit-identical.

The released ``preprocessor_config.json`` (transformers 4.46 layout) stores ``min_pixels``/``max_pixels``;
the inherited ``__init__`` maps them into ``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}``
(pixel counts, not edge lengths), which is what preprocessing reads in transformers 5.

Every picture is read the same way, whatever form it comes in (file path, URL, base64/data URI, raw bytes or a PIL
image the user opened): ``load_image`` applies the EXIF orientation, scales 16-bit pixels to 8 bits and composites
transparency on white. transformers reads paths and PIL images differently (a path gets its EXIF rotation and loses
its alpha channel, an opened image keeps its sideways orientation and gets a white background; 16-bit pictures come
out white), so the same picture gave different answers by how it was passed.
"""

import base64
import io
import os
import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from transformers.image_processing_utils import BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


@contextmanager
def readable_image_errors() -> Iterator[None]:
    """Turn PIL's decoding failures (``cannot identify image file``, ``image file is truncated``) into one
    ``ValueError`` that says which kind of input is at fault and what to do; PIL's error stays as the cause.

    Missing files and PIL's decompression-bomb error are already clear and pass through unchanged.
    """
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except OSError as err:
        raise ValueError(
            f"Could not decode an image ({err}): the file is corrupt, truncated or not an image. Check that "
            "PIL.Image.open(path).load() succeeds, or re-save / re-download the image."
        ) from err


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=\s]+")
MIN_BASE64_LENGTH = 64  # shorter strings are file names with a typo, not encoded images


def normalized_rgb(image: Image.Image) -> Image.Image:
    """An upright 8-bit RGB copy: EXIF orientation applied, 16-bit values scaled (not clipped), alpha composited on
    white (the background transformers' own RGB conversion uses)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        # 16-bit grey: 65535 is white, so divide by 257 = 65535 / 255. Mode "I" (32-bit) holds 16-bit data (older
        # Pillow reads 16-bit PNGs so) or 8-bit values (e.g. converted from "L"): values up to 255 only are 8-bit.
        values = np.asarray(image, dtype=np.float64)
        eight_bit = image.mode == "I" and values.size > 0 and values.max() <= 255
        image = Image.fromarray(np.clip(np.rint(values if eight_bit else values / 257.0), 0, 255).astype(np.uint8))
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def image_bytes(source: str) -> bytes:
    """The encoded picture a string names: a URL's body, a data URI or base64 text; anything else is a path that
    does not exist (said so, rather than "Invalid base64-encoded string")."""
    if source.startswith(("http://", "https://")):
        # The standard library, not httpx: transformers refuses to load remote code that imports a package the
        # user lacks (anywhere in the file), and httpx is not a dependency of every supported transformers.
        with urllib.request.urlopen(source, timeout=30) as response:
            return response.read()
    if source.startswith("data:image/"):
        source = source.split(",", 1)[-1]
    elif len(source) < MIN_BASE64_LENGTH or not BASE64_TEXT.fullmatch(source):
        raise ValueError(
            f"Image file not found: {source} (relative to {os.getcwd()}); pass an existing image file, a URL, "
            "base64 data or a PIL image."
        )
    try:
        return base64.b64decode(source, validate=False)
    except ValueError as error:
        raise ValueError(f"The image string is neither a file nor valid base64 data ({error}).") from error


def load_image(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """The one way Dimple reads a picture (see the module docstring); returns an upright 8-bit RGB image."""
    if isinstance(source, Image.Image):
        return normalized_rgb(source)
    if isinstance(source, (bytes, bytearray)):
        return normalized_rgb(Image.open(io.BytesIO(source)))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"An image must be a file path, URL, base64 string, bytes or PIL image, got {type(source).__name__}."
        )
    path = Path(source)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image file; pass the image file inside it.")
    if path.is_file():
        with Image.open(path) as image:
            return normalized_rgb(image)
    return normalized_rgb(Image.open(io.BytesIO(image_bytes(str(source)))))


class DimpleImageProcessor(Qwen2VLImageProcessorPil):
    """Qwen2-VL PIL image processor that refuses images smaller than one merged patch or that fail to decode.

    transformers 4.46 (the reference) raised for an image with a side shorter than ``patch_size *
    merge_size`` pixels; transformers 5 silently up-scales it instead, which would change the image tokens
    relative to the reference. We restore the error, with a message that says what to do about it. Images
    above ``max_pixels`` are resized down (never refused); PIL's decompression-bomb limit stays in force.
    """

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Read paths, URLs, bytes and PIL images, in nested lists, through `load_image`; arrays and tensors are
        taken as decoded pixels and passed on unchanged."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike, bytes, bytearray, Image.Image)):
            with readable_image_errors():
                return load_image(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)

    def process_image(self, image: Any, *args, **kwargs) -> np.ndarray:
        """Convert one image to a channels-first array (decoding happens here for lazily opened PIL images)."""
        with readable_image_errors():
            return super().process_image(image, *args, **kwargs)

    def _preprocess(self, images: list[np.ndarray], patch_size: int, merge_size: int, **kwargs) -> BatchFeature:
        """Check every image's size, then run Qwen2-VL preprocessing.

        ``images`` are channels-first arrays at this point (``PilBackend.process_image`` converted them).
        """
        factor = patch_size * merge_size
        for image in images:
            height, width = image.shape[-2:]
            if height < factor or width < factor:
                raise ValueError(
                    f"Image of size {width}x{height} (width x height) is too small: Dimple needs images of at "
                    f"least {factor}x{factor} pixels. Resize or pad the image to at least {factor}x{factor} "
                    "before passing it to the processor."
                )
        return super()._preprocess(images, patch_size=patch_size, merge_size=merge_size, **kwargs)


DimpleImageProcessor.register_for_auto_class()
