"""Transforms keep boxes on the pixels they describe, and map back to original coordinates."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.transform import resize_boxes

from gankd_ray.data.transforms import DetectionTransform, hflip_boxes, photometric_jitter

ORIG_W, ORIG_H, S = 200, 120, 160
BOX = np.array([[30.0, 20.0, 90.0, 100.0]], dtype=np.float32)  # a white rectangle on black, in original pixels


def _rectangle_png() -> bytes:
    pixels = np.zeros((ORIG_H, ORIG_W, 3), dtype=np.uint8)
    x1, y1, x2, y2 = BOX[0].astype(int)
    pixels[y1:y2, x1:x2] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _bright_extent(image: torch.Tensor) -> list[float]:
    """xyxy pixel-edge box of the pixels brighter than half, in the image's own frame."""
    ys, xs = torch.nonzero(image.mean(dim=0) > 0.5, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


class _AlwaysFlip(np.random.Generator):
    """A generator whose first draw (the flip coin) is always heads."""

    def __init__(self) -> None:
        super().__init__(np.random.PCG64(0))

    def random(self, *args, **kwargs):  # type: ignore[override]
        return 0.0


@pytest.mark.parametrize("flip", [False, True])
def test_resized_and_flipped_boxes_cover_the_same_pixels(flip: bool) -> None:
    transform = DetectionTransform(S, hflip=flip)
    image, boxes, orig_size = transform(_rectangle_png(), BOX, _AlwaysFlip() if flip else None)
    assert image.shape == (3, S, S) and image.dtype == torch.float32
    assert orig_size == (ORIG_H, ORIG_W)
    expected = [30 * S / ORIG_W, 20 * S / ORIG_H, 90 * S / ORIG_W, 100 * S / ORIG_H]
    if flip:
        expected = [S - expected[2], expected[1], S - expected[0], expected[3]]
    assert boxes[0].tolist() == pytest.approx(expected, abs=1e-4)
    assert _bright_extent(image) == pytest.approx(boxes[0].tolist(), abs=1.0)  # bilinear edges: within a pixel


def test_s_space_boxes_map_back_to_the_original_image() -> None:
    boxes = torch.tensor([[30.0, 20.0, 90.0, 100.0], [0.0, 0.0, 200.0, 120.0]])
    in_s = resize_boxes(boxes, [ORIG_H, ORIG_W], [S, S])  # the transform's mapping
    assert in_s[1].tolist() == [0.0, 0.0, S, S]
    assert torch.allclose(resize_boxes(in_s, [S, S], [ORIG_H, ORIG_W]), boxes)  # and the detector's way back


def test_flipping_twice_is_the_identity_and_keeps_x1_below_x2() -> None:
    boxes = torch.tensor([[10.0, 5.0, 40.0, 30.0]])
    once = hflip_boxes(boxes, 160)
    assert once.tolist() == [[120.0, 5.0, 150.0, 30.0]]
    assert torch.equal(hflip_boxes(once, 160), boxes)


def test_jitter_changes_pixels_within_range_and_not_the_boxes() -> None:
    transform = DetectionTransform(S, jitter=0.4)
    plain, plain_boxes, _ = transform(_rectangle_png(), BOX, None)
    jittered, jittered_boxes, _ = DetectionTransform(S, jitter=0.4)(_rectangle_png(), BOX, np.random.default_rng(3))
    assert not torch.equal(plain, jittered)
    assert 0.0 <= jittered.min() and jittered.max() <= 1.0
    assert torch.equal(plain_boxes, jittered_boxes)
    pixels = plain.permute(1, 2, 0).numpy()
    assert np.array_equal(photometric_jitter(pixels, 0.0, np.random.default_rng(0)), pixels)
