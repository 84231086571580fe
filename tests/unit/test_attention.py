"""The lesion segmentation that Grad-CAM attention is measured against, on synthetic dermoscopic images
whose lesion is known: skin with texture, a dark irregular lesion off-centre, hairs across it and the skin,
the dark corners of a round field of view; and the share of Grad-CAM mass it puts inside the lesion."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lesion_tasks.model import attention

SIDE = 224


def _scene(seed: int, hair: int = 12, vignette: float = 0.55, centre=(120, 100), radii=(48, 36)):
    """(rgb uint8 (SIDE, SIDE, 3), true lesion mask at SIDE)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    skin = np.array([214, 170, 150], np.float32) + rng.normal(0, 6, (SIDE, SIDE, 1))
    # an irregular border: the radius wobbles with the angle
    angle = np.arctan2(yy - centre[1], xx - centre[0])
    wobble = 1 + 0.12 * np.sin(3 * angle + rng.uniform(0, 6)) + 0.06 * np.sin(7 * angle)
    r = np.hypot((xx - centre[0]) / radii[0], (yy - centre[1]) / radii[1])
    truth = r <= wobble
    lesion = np.array([95, 60, 45], np.float32) + rng.normal(0, 8, (SIDE, SIDE, 1))
    img = np.where(truth[..., None], lesion, skin)
    if vignette:  # the round field of view: black beyond it
        img = np.where((np.hypot(xx - SIDE / 2, yy - SIDE / 2) > SIDE * vignette)[..., None], 8.0, img)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(hair):  # dark, thin, long, across lesion and skin
        x0, y0 = rng.uniform(0, SIDE, 2)
        a = rng.uniform(0, np.pi)
        draw.line([(x0 - 150 * np.cos(a), y0 - 150 * np.sin(a)), (x0 + 150 * np.cos(a), y0 + 150 * np.sin(a))],
                  fill=(40, 28, 22), width=2)
    return np.asarray(im), truth


def _at_segment_side(mask: np.ndarray, shape) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1], Image.Resampling.NEAREST)) > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("seed,vignette", [(0, 0.55), (1, 0.5), (2, 0.45), (3, 0.0)])
def test_segments_the_lesion_through_hair_and_dark_corners(seed, vignette):
    rgb, truth = _scene(seed, vignette=vignette)
    mask = attention.lesion_mask(rgb)
    assert mask is not None and max(mask.shape) == attention.SEGMENT_SIDE
    assert _iou(mask, _at_segment_side(truth, mask.shape)) > 0.8


def test_without_hair_and_vignette_handling_otsu_fails():
    """The hair and vignette steps are what keep a thick hair mat and a wide dark rim out: plain Otsu on
    the blue channel takes them for lesion."""
    rgb, truth = _scene(7, hair=40, vignette=0.45)
    mask = attention.lesion_mask(rgb)
    assert mask is not None and _iou(mask, _at_segment_side(truth, mask.shape)) > 0.75
    plain = attention._small(rgb)[..., 2]
    naive = plain < attention.filters.threshold_otsu(plain)
    assert _iou(naive, _at_segment_side(truth, mask.shape)) < 0.6  # the dark corners and hairs swamp it


def test_no_lesion_no_segmentation():
    flat = np.full((SIDE, SIDE, 3), (214, 170, 150), np.uint8)
    assert attention.lesion_mask(flat) is None
    assert attention.attention_on_lesion(flat, np.ones((7, 7))) is None


def test_share_of_grad_cam_mass_on_the_lesion():
    rgb, truth = _scene(1)
    on = np.zeros((7, 7))
    on[3, 3] = 1.0  # the lesion's centre (120, 100) lies in cell (3, 3) of a 7x7 map over 224 px
    corner = np.zeros((7, 7))
    corner[6, 0] = 1.0  # the dark corner
    assert attention.attention_on_lesion(rgb, on) > 0.8
    assert attention.attention_on_lesion(rgb, corner) < 0.1
    assert attention.attention_on_lesion(rgb, np.zeros((7, 7))) is None  # no map, no share
    even = attention.attention_on_lesion(rgb, np.ones((14, 14)))
    assert even == pytest.approx(_at_segment_side(truth, attention.lesion_mask(rgb).shape).mean(), abs=0.05)
