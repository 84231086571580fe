"""Where Grad-CAM looks: the share of its mass inside the lesion, from a classical lesion segmentation.

The paper's failure mode is a classifier that attends to the skin around a lesion, bubbles or the dark
corners of the dermatoscope. This measures it per image, without a trained segmenter, on the very pixels
the model saw (its input, a few hundred pixels a side, worked on at `SEGMENT_SIDE`):

1. **Hair** (DullRazor, Lee et al. 1997): dark thin lines are the black top-hat of the luminance with a
   small disk; those pixels take the value of the channel's grey closing (the hair "painted over").
2. **Vignette**: the dark rim a dermatoscope's round field of view leaves in the corners: very dark pixels
   (luminance below `VIGNETTE_LUMINANCE`) connected to the image border. They belong to neither lesion nor
   skin and are left out of the threshold.
3. **Otsu** on the blue channel (melanin absorbs blue; the usual channel for dermoscopy) over the field
   of view: darker than the threshold is lesion.
4. **Clean-up**: holes filled, specks removed, and the one connected component kept that is largest once
   weighted by closeness to the image centre (dermoscopic images centre the lesion; a Gaussian prior) and
   halved where it touches the border (skin shading, a ruler, the edge of the field of view).

A mask covering less than `MIN_AREA` or more than `MAX_AREA` of the field of view is no segmentation (a
featureless image, or a lesion filling the frame): the share is then None and nothing is flagged.

`share_on_lesion` upsamples the Grad-CAM map bilinearly to the mask (as the overlay does) and returns the
fraction of its mass inside the lesion; below `OFF_LESION_BELOW` a case's attention lies mostly off the
lesion (review reason `attention_off_lesion`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import color, filters, morphology

SEGMENT_SIDE = 96  # longest side the segmentation works at (the Grad-CAM map itself is 7x7 to 14x14)
HAIR_RADIUS = 2  # px at SEGMENT_SIDE: lines up to ~4 px wide (a hair at dermoscopic scale); a lesion is far wider
HAIR_CONTRAST = 0.06  # black top-hat response (luminance in [0, 1]) above which a pixel is hair
VIGNETTE_LUMINANCE = 0.12
MIN_AREA, MAX_AREA = 0.01, 0.9
CENTRE_SD = 0.25
OFF_LESION_BELOW = 0.5  # share of Grad-CAM mass inside the lesion under which attention is "off the lesion"


def _small(rgb: np.ndarray) -> np.ndarray:
    """`rgb` (h, w, 3) uint8 as float in [0, 1], longest side at most SEGMENT_SIDE (PIL's antialiased bilinear)."""
    im = Image.fromarray(np.asarray(rgb, np.uint8))
    scale = SEGMENT_SIDE / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR)
    return np.asarray(im, np.float32) / 255.0


def _border_connected(mask: np.ndarray) -> np.ndarray:
    labels, _ = ndimage.label(mask)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, edge[edge > 0])


def lesion_mask(rgb: np.ndarray) -> np.ndarray | None:
    """Boolean lesion mask at SEGMENT_SIDE (module docstring), or None where the image has no segmentable lesion."""
    img = _small(rgb)
    lum = color.rgb2gray(img)
    disk = morphology.disk(HAIR_RADIUS)
    closed = morphology.closing(lum, disk)
    hair = closed - lum > HAIR_CONTRAST  # the black top-hat
    blue = np.where(hair, morphology.closing(img[..., 2], disk), img[..., 2])
    field = ~_border_connected(np.where(hair, closed, lum) < VIGNETTE_LUMINANCE)
    if field.sum() < 16 or np.ptp(blue[field]) < 1e-3:
        return None
    lesion = (blue < filters.threshold_otsu(blue[field])) & field
    lesion = ndimage.binary_opening(ndimage.binary_fill_holes(lesion), iterations=1)
    labels, n = ndimage.label(lesion)
    if n == 0:
        return None
    h, w = lesion.shape
    yy, xx = np.mgrid[:h, :w]
    # area weighted by closeness to the centre (a Gaussian prior, sd a quarter of the side), halved for a
    # component that touches the border (skin shading, a ruler, the edge of the field of view)
    closeness = np.exp(-0.5 * (((yy - (h - 1) / 2) / (h * CENTRE_SD)) ** 2 + ((xx - (w - 1) / 2) / (w * CENTRE_SD)) ** 2))
    score = ndimage.sum(closeness, labels, index=np.arange(1, n + 1))
    touching = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    score[touching[touching > 0] - 1] *= 0.5
    mask = labels == 1 + int(np.argmax(score))
    area = mask.sum() / field.sum()
    return mask if MIN_AREA <= area <= MAX_AREA else None


def share_on_lesion(heatmap: np.ndarray, mask: np.ndarray | None) -> float | None:
    """The fraction of the (non-negative) Grad-CAM map's mass inside `mask`; None without a mask or a map."""
    if mask is None:
        return None
    # upsampled as the overlay upsamples it (PIL bilinear), so the share is of what the reviewer sees
    heat = np.clip(np.asarray(Image.fromarray(np.asarray(heatmap, np.float32), mode="F")
                              .resize(mask.shape[::-1], Image.Resampling.BILINEAR)), 0, None)
    total = float(heat.sum())
    return None if total <= 0 else float(heat[mask].sum() / total)


def attention_on_lesion(rgb: np.ndarray, heatmap: np.ndarray) -> float | None:
    """Share of `heatmap`'s mass inside the lesion segmented on `rgb` (the model's input image)."""
    return share_on_lesion(heatmap, lesion_mask(rgb))


def summary(y: np.ndarray, pred: np.ndarray, shares: dict[int, float | None], off_below: float = OFF_LESION_BELOW) -> dict:
    """Attention on the lesion per true class x right/wrong, over the cases `shares` holds ({index: share,
    None where no lesion was segmented}): cases, cases measured, the mean share and how many lie mostly off."""
    cells = {}
    for label, name in ((1, "MEL"), (0, "NV")):
        for ok in (True, False):
            idx = [i for i in shares if y[i] == label and (pred[i] == y[i]) == ok]
            measured = [shares[i] for i in idx if shares[i] is not None]
            cells[f"{name} {'right' if ok else 'wrong'}"] = {
                "n": len(idx), "n_measured": len(measured),
                "mean_on_lesion": float(np.mean(measured)) if measured else float("nan"),
                "off_lesion": sum(v < off_below for v in measured)}
    return {"off_lesion_below": off_below, "cells": cells}
