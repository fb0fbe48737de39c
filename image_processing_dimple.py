"""Image processor for Dimple.

Dimple's vision tower is Qwen2.5-VL's, fed exactly like Qwen2-VL: dynamic resolution (sides rounded to
multiples of ``patch_size * merge_size`` = 28, total pixels kept in ``[min_pixels, max_pixels]``), CLIP
normalisation and 14x14 patches flattened to rows of ``3 * 2 * 14 * 14 = 1176`` values. We subclass the PIL
backend rather than the torchvision one because the reference resized with PIL bicubic; the torchvision
resize is not bit-identical.

The released ``preprocessor_config.json`` (transformers 4.46 layout) stores ``min_pixels``/``max_pixels``;
the inherited ``__init__`` maps them into ``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}``
(pixel counts, not edge lengths), which is what preprocessing reads in transformers 5.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
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


class DimpleImageProcessor(Qwen2VLImageProcessorPil):
    """Qwen2-VL PIL image processor that refuses images smaller than one merged patch or that fail to decode.

    transformers 4.46 (the reference) raised for an image with a side shorter than ``patch_size *
    merge_size`` pixels; transformers 5 silently up-scales it instead, which would change the image tokens
    relative to the reference. We restore the error, with a message that says what to do about it. Images
    above ``max_pixels`` are resized down (never refused); PIL's decompression-bomb limit stays in force.
    """

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Load paths/URLs to PIL images (decoding happens here for files)."""
        with readable_image_errors():
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
