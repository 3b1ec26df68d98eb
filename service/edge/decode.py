"""Bytes -> backbone input, with the backbone's own preprocessing and hard limits.

Pillow's ``Image.open`` only reads the header, so the pixel limit is checked before a single
pixel is decoded: a decompression bomb costs a few bytes of parsing, not gigabytes of memory.
Decoding is split in two so the server can read every header on the event loop (cheap) and
decide where the pixel work runs.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2.functional import (
    center_crop_image,
    pil_to_tensor,
    resize_image,
)

from dyce.preprocess import PreprocessSpec

from ..errors import BadRequest, TooLarge, UnsupportedMediaType
from ..settings import Settings

ACCEPTED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
ACCEPTED_MEDIA_TYPES = frozenset(ACCEPTED_FORMATS.values()) | {"image/jpg"}


@contextlib.contextmanager
def _image_errors() -> Iterator[None]:
    """Pillow's many failure modes -> one clear 4xx each."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns below its hard limit; ours is stricter anyway.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except UnidentifiedImageError:
        raise BadRequest("body is not a PNG, JPEG or WebP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise TooLarge(f"image rejected as a decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadRequest(f"image is truncated or corrupt: {err}") from None


class ImageDecoder:
    """Limits, all checked on the header before any pixel is decoded:

    - ``max_pixels`` bounds the decoded image (width x height);
    - ``max_side`` bounds each dimension;
    - ``max_aspect_ratio`` bounds the *resized* image: the preprocessing scales the shorter side
      to ``resize``, so a 1,000,000 x 1 PNG of 1 KB would become a 256,000,000-pixel-wide tensor
      (tens of GB) before the centre crop. The longer side after the resize is at most
      ``resize * max_aspect_ratio``.
    """

    def __init__(self, preprocess: PreprocessSpec, max_pixels: int, max_side: int, max_aspect_ratio: float) -> None:
        # ``preprocess.transform()`` is the definition; ``batch`` calls the same torchvision
        # kernels in the same order without the v2 Compose, whose per-call dispatch cost 6x the
        # kernels themselves on a 28x28 image (~170 of ~200 µs, on the event loop), and skips or
        # batches the rest of that dispatch (a 28x28 PNG: ~110 -> ~75 µs alone, ~40 µs each in a
        # request of 8). Tests check both agree bit for bit.
        self.mode = preprocess.pil_mode
        self.resize = [preprocess.resize]
        self.crop = [preprocess.crop]
        self.interpolation = InterpolationMode(preprocess.interpolation)
        self.mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(preprocess.std, dtype=torch.float32).view(-1, 1, 1)
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.max_aspect_ratio = max_aspect_ratio
        self.shape = (preprocess.channels, preprocess.crop, preprocess.crop)
        # An image already crop x crop, when the resize target is the crop too, is left as it is
        # by both (torchvision returns its input when the size does not change).
        self._untouched_size = (preprocess.crop, preprocess.crop) if preprocess.resize == preprocess.crop else None

    @classmethod
    def from_settings(cls, preprocess: PreprocessSpec, settings: Settings) -> ImageDecoder:
        """The server's decoder: the backbone's preprocessing, under the server's input limits."""
        return cls(preprocess, settings.max_image_pixels, settings.max_image_side, settings.max_image_aspect_ratio)

    def _check_size(self, width: int, height: int) -> None:
        if width == 0 or height == 0:
            raise BadRequest("image has no pixels")
        if width * height > self.max_pixels:
            raise TooLarge(
                f"image is {width}x{height} = {width * height} pixels, more than the limit of "
                f"{self.max_pixels} (decompression bomb protection)"
            )
        if max(width, height) > self.max_side:
            raise TooLarge(f"image is {width}x{height}; each side may be at most {self.max_side} pixels")
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            raise TooLarge(
                f"image is {width}x{height}, an aspect ratio past the limit of {self.max_aspect_ratio:g}:1 "
                "(its resize would need far more memory than the image itself)"
            )

    def open(self, data: bytes) -> Image.Image:
        """Read and check the header only; raises a 4xx ServiceError."""
        if not data:
            raise BadRequest("empty image")
        with _image_errors():
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise UnsupportedMediaType(
                    f"image format {image.format} is not accepted; send one of {', '.join(ACCEPTED_FORMATS)}"
                )
            self._check_size(*image.size)
            return image

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Decode the pixels of opened images -> one normalised (N, C, H, W) float batch.

        Each image's pixels are gathered as uint8 and the batch is converted and normalised at
        once: those steps are elementwise, so every row equals the image decoded alone, bit for
        bit, while the per-call dispatch that dominated a small image's decode is paid once."""
        gathered = np.empty((len(images), *self.shape), dtype=np.uint8)
        with _image_errors():
            for row, image in zip(gathered, images, strict=True):
                row[...] = self._pixels(image)
        # to_dtype_image(scale=True), then normalize_image's sub and div, with the mean and std made once
        return torch.from_numpy(gathered).to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)

    def _pixels(self, image: Image.Image) -> np.ndarray:
        """One image's uint8 pixels, (C, crop, crop): in the backbone's mode, resized and cropped."""
        with image:
            image.load()
            converted = image.convert(self.mode) if image.mode != self.mode else image
            if converted.size == self._untouched_size:  # resize and crop are identities: skip their dispatch
                return np.asarray(converted).reshape(converted.height, converted.width, -1).transpose(2, 0, 1)
            pixels = pil_to_tensor(converted)
        pixels = resize_image(pixels, self.resize, interpolation=self.interpolation, antialias=True)
        return center_crop_image(pixels, self.crop).numpy()

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.batch([self.open(data)])[0]


def pixels(image: Image.Image) -> int:
    return image.size[0] * image.size[1]


def check_media_type(content_type: str | None) -> None:
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in ACCEPTED_MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"content type {media_type or '(none)'} is not accepted; send image/png, image/jpeg, image/webp "
            "as the raw body, or multipart/form-data with a `file` part"
        )
