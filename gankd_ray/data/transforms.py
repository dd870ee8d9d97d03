"""Detection transforms that keep boxes consistent with the pixels.

Two coordinate frames: the *original* image (``orig_size = (h, w)``, what the prepared dataset and
COCOeval use) and *S-space*, the square ``S x S`` model input. An image is resized to ``S x S``
without keeping its aspect (as SSD does), so ``x_S = x * S / w`` and ``y_S = y * S / h``; torchvision's
``resize_boxes(boxes, original_size, new_size)`` maps both ways (``SSDDetector.decode`` maps detections
back with it). Flip and jitter happen in S-space.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.models.detection.transform import resize_boxes

from gankd_ray.utils import first_line, short_repr

# ITU-R 601 luma weights, as PIL's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def decode_rgb(data: bytes) -> Image.Image:
    """The encoded image file ``data`` as an RGB PIL image (grey, palette and alpha converted)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def decode_failure(err: Exception) -> str:
    """Why ``decode_rgb`` failed, in one line that is the same in every process: PIL's "cannot identify image
    file" names the in-memory buffer by its address."""
    if isinstance(err, UnidentifiedImageError):
        return "not in an image format PIL recognises"
    return first_line(err)


def undecodable_image(where: str, image_id: int, file_name: str, err: Exception) -> str:
    """The one line for a row whose image ``decode_rgb`` could not decode: where the rows are (a split's
    parquet folder), the image's id and file name, and why. The loader and TorchScript evaluation both use it,
    so a damaged image reads the same whichever path met it."""
    culprit = f"{where}: image {image_id} ({short_repr(file_name)})"
    return f"{culprit}: corrupt or unsupported image file: {decode_failure(err)}"


def hflip_boxes(boxes: torch.Tensor, width: int | float) -> torch.Tensor:
    """Boxes of an image mirrored left-right: ``x1' = width - x2``, ``x2' = width - x1``.

    Args:
        boxes: FloatTensor[N, 4] xyxy.
    """
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def photometric_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and saturation, each a factor in ``[1 - strength, 1 + strength]``.

    Args:
        image: float32[H, W, 3] in [0, 1] (numpy: single-threaded and cheap inside loader workers).

    Returns:
        float32[H, W, 3] in [0, 1]; boxes are unaffected.
    """
    if strength <= 0:
        return image
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3).astype(np.float32)
    image = image * brightness
    mean = (image @ _LUMA).mean()
    image = mean + (image - mean) * contrast
    grey = (image @ _LUMA)[..., None]
    image = grey + (image - grey) * saturation
    return np.clip(image, 0.0, 1.0, out=image)


def resize_square(picture: Image.Image, size: int) -> Image.Image:
    """The model input's resize: PIL bilinear to ``size x size``, aspect ratio not kept (what ``student.onnx``
    expects too)."""
    if (picture.height, picture.width) == (size, size):
        return picture
    return picture.resize((size, size), Image.BILINEAR)


class DetectionTransform:
    """Decode, resize to ``S x S``, optionally flip and jitter; boxes follow the pixels.

    Args:
        image_size: S.
        hflip: mirror with probability 0.5 (training only).
        jitter: photometric strength, 0 = off (training only).
    """

    def __init__(self, image_size: int, hflip: bool = False, jitter: float = 0.0) -> None:
        self.image_size = image_size
        self.hflip = hflip
        self.jitter = jitter

    def __call__(
        self, data: bytes, boxes: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Transform one image.

        Args:
            data: the encoded image file.
            boxes: float[N, 4] xyxy in original pixels.
            rng: source of the random choices; ``None`` = deterministic (no flip, no jitter).

        Returns:
            ``(image FloatTensor[3, S, S] in [0, 1], boxes FloatTensor[N, 4] in S-space, orig_size (h, w))``.
        """
        return self.apply(decode_rgb(data), boxes, rng)

    def apply(
        self, picture: Image.Image, boxes: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``__call__`` on an image already decoded (``decode_rgb``): callers that report a corrupt file
        themselves decode first."""
        orig_size = (picture.height, picture.width)
        size = self.image_size
        picture = resize_square(picture, size)
        # Pixels stay in numpy until the end: torch's intra-op threads only cost time on images this small.
        image = np.asarray(picture, dtype=np.float32) / np.float32(255.0)
        boxes_s = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        boxes_s = resize_boxes(boxes_s, list(orig_size), [size, size])
        if rng is not None and self.hflip and rng.random() < 0.5:
            image = image[:, ::-1]
            boxes_s = hflip_boxes(boxes_s, size)
        if rng is not None and self.jitter > 0:
            image = photometric_jitter(image, self.jitter, rng)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), boxes_s, orig_size
