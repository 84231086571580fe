"""`inspect_image`: every convertible kind is accepted and normalised; every bad kind is named."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesion_tasks.ingest.images import Accepted, Rejected, inspect_image, phash
from lesion_tasks.core.reasons import Reason
from lesion_tasks.ingest.sources import Limits
from tests import imagegen as g

LIMITS = Limits()
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("make,conversion", [
    (g.jpeg, None),
    (g.grayscale_png, "L->RGB"),
    (g.rgba_png, "RGBA->RGB(alpha on black)"),
    (g.cmyk_jpeg, "CMYK->RGB"),
    (g.png16, "I;16->8bit"),
])
def test_convertible_images_are_normalised(make, conversion):
    result = inspect_image(make(), LIMITS, 224)
    assert isinstance(result, Accepted), result
    im = Image.open(io.BytesIO(result.normalized))
    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (224, 224))
    assert (result.width, result.height) == (300, 240)
    if conversion:
        assert conversion in result.conversions[0]
    # the lesion (dark centre) survives every conversion
    arr = np.asarray(im.convert("L"), dtype=float)
    assert arr[100:124, 100:124].mean() < arr[:20, :20].mean() - 40


def test_exif_orientation_is_applied():
    result = inspect_image(g.exif_rotated_jpeg(), LIMITS, 64)
    assert isinstance(result, Accepted)
    assert "exif-orientation-6" in result.conversions
    arr = np.asarray(Image.open(io.BytesIO(result.normalized)).convert("L"), dtype=float)
    assert arr[:24].mean() < 40 and arr[-24:].mean() > 215  # black half on top once displayed upright


@pytest.mark.parametrize("data,reason", [
    (b"", Reason.EMPTY_FILE),
    (b"id,label\n1,2\n", Reason.NOT_AN_IMAGE),
    (g.truncated_jpeg(), Reason.TRUNCATED_IMAGE),
    (g.corrupt_png(), Reason.CORRUPT_IMAGE),
    (g.bomb_png(), Reason.DECOMPRESSION_BOMB),
    (g.tiny_png(), Reason.TOO_SMALL),
    (g.sliver_png(), Reason.EXTREME_ASPECT_RATIO),
    (g.gif(), Reason.UNSUPPORTED_FORMAT),
    (g.multipage_tiff(), Reason.MULTI_FRAME),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_bytes_are_rejected_with_their_reason(data, reason):
    result = inspect_image(data, LIMITS, 224)
    assert isinstance(result, Rejected)
    assert result.reason == reason, result.detail
    assert result.detail


def test_size_limit():
    result = inspect_image(g.noisy_png(300), Limits(max_bytes=10_000), 224)
    assert isinstance(result, Rejected) and result.reason == Reason.FILE_TOO_LARGE


def test_phash_is_stable_under_reencoding_and_differs_between_lesions():
    a = g.lesion_like(1)
    b = Image.open(io.BytesIO(g.jpeg(1))).convert("RGB")  # same picture, JPEG round trip
    c = g.lesion_like(30, (300, 240)).transpose(Image.Transpose.ROTATE_90).resize((300, 240))
    assert bin(phash(a) ^ phash(b)).count("1") <= 2
    assert bin(phash(a) ^ phash(c)).count("1") > 2


def test_a_bomb_is_rejected_without_pils_warning_from_many_threads():
    """The ingest's worker threads inspect images concurrently: a bomb is rejected by the project's own limit
    and PIL's DecompressionBombWarning never reaches the log (a per-call catch_warnings is not thread-safe:
    it leaked the warning now and then)."""
    script = (
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from tests.imagegen import bomb_png\n"
        "from lesion_tasks.ingest.images import inspect_image\n"
        "from lesion_tasks.ingest.sources import Limits\n"
        "data = bomb_png(10000)  # 100 M pixels: above PIL's warning threshold, under its error\n"
        "with ThreadPoolExecutor(8) as pool:\n"
        "    out = set(pool.map(lambda _: inspect_image(data, Limits(), 224).reason.value, range(20000)))\n"
        "print(sorted(out))\n")
    done = subprocess.run([sys.executable, "-W", "always", "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['decompression_bomb']"
    assert "DecompressionBombWarning" not in done.stderr and "decompression bomb" not in done.stderr, done.stderr
