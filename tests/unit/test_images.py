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


@pytest.mark.parametrize("make", [
    lambda rng: Image.fromarray(rng.integers(0, 65535, (61, 47), dtype=np.uint16)),  # I;16, scaled by its max
    lambda rng: Image.fromarray(rng.integers(-500, 70000, (61, 47), dtype=np.int32), "I"),
    lambda rng: Image.fromarray(rng.normal(size=(61, 47)).astype(np.float32), "F"),  # scaled by its range
    lambda rng: Image.fromarray(rng.integers(0, 255, (61, 47, 4), dtype=np.uint8), "RGBA"),
    lambda rng: Image.fromarray(rng.integers(0, 255, (61, 47, 4), dtype=np.uint8), "CMYK"),
])
def test_conversion_by_strips_gives_the_pixels_of_one_whole_image_conversion(make, monkeypatch):
    """Images are converted to RGB strip by strip (bounded memory): with strips of one to a few rows the
    pixels are those of the whole image converted at once, whole-image scalings included."""
    from lesion_tasks.ingest import images
    im = make(np.random.default_rng(3))
    whole, conversions = images._to_rgb(im)
    for pixels in (47, 3 * 47 + 5):  # one row a strip; strips not dividing the height
        monkeypatch.setattr(images, "STRIP_PIXELS", pixels)
        strips, again = images._to_rgb(im)
        assert again == conversions and np.array_equal(np.asarray(strips), np.asarray(whole)), (im.mode, pixels)


def test_decode_budget_serves_first_come_first_and_never_past_its_capacity():
    """A worker waits while its reservation would pass the budget, and a small reservation queued behind a
    big one does not overtake it (no starvation of big images); one past the budget alone takes all of it."""
    import threading
    from lesion_tasks.ingest.images import DecodeBudget
    budget, order, peak = DecodeBudget(100), [], []
    first = budget.hold(70)
    first.__enter__()

    def worker(name: str, n: int) -> None:
        with budget.hold(n):
            order.append(name)
            peak.append(budget.held)

    big = threading.Thread(target=worker, args=("big", 500))
    big.start()
    _wait_for(lambda: budget._next_ticket == 2)  # big has its ticket before small asks
    small = threading.Thread(target=worker, args=("small", 10))
    small.start()
    _wait_for(lambda: budget._next_ticket == 3)
    assert order == []  # 10 would fit beside 70, but the big reservation is ahead of it
    first.__exit__(None, None, None)
    big.join(30)
    small.join(30)
    assert order == ["big", "small"] and max(peak) <= 100 and budget.held == 0


def _wait_for(condition, deadline_s: float = 30.0) -> None:
    import time
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not met before the deadline"
        time.sleep(0.005)


def test_ingesting_huge_pngs_keeps_peak_memory_bounded(tmp_path):
    """Four 8000 x 7999 RGBA PNGs (1 MB in all) and a 64 MP 16-bit greyscale PNG through `lesion ingest` with
    its worker threads: decoded pixels are bounded across the workers (the decode budget) and returned to the
    system between images. The probe measured 4.6 GB for the four PNGs and 1.73 GB for the 16-bit one."""
    from tests import reliability
    drop = tmp_path / "huge"
    drop.mkdir()
    for i in range(4):
        arr = np.zeros((7999, 8000, 4), np.uint8)
        arr[..., 0], arr[::97, :, 1], arr[..., 3], arr[:, ::89, 3] = 40 * i, 200, 255, 128
        Image.fromarray(arr, "RGBA").save(drop / f"ISIC_97000{i:02d}.png", compress_level=1)
    grey = np.zeros((8000, 8000), np.uint16)
    grey[::50] = 60000
    Image.fromarray(grey).save(drop / "ISIC_9700100.png", compress_level=1)
    del arr, grey
    # the peak of the ingesting process itself (VmHWM of its own address space): a child's ru_maxrss also counts
    # the pages it shared with this (large) test process between fork and exec
    script = ("import sys\nfrom lesion_tasks import cli\ntry:\n    sys.exit(cli.main(sys.argv[1:]))\nfinally:\n"
              "    print('PEAK_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')),"
              " file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script, "ingest", str(drop), "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "LESION_HOME": str(tmp_path / "home")})
    out = done.stdout
    assert done.returncode == 0 and '"accepted": 5' in out, (out, done.stderr[-2000:])
    peak_mb = int(done.stderr.split("PEAK_KB")[-1].split()[0]) / 1024
    reliability.record("Huge PNGs through ingest's worker threads",
                       "four 8000x7999 RGBA PNGs (1 MB in all) and a 64 MP 16-bit greyscale PNG, `lesion ingest` with 4 workers",
                       "all accepted; peak RSS under 1.5 GB", f"5 accepted; peak RSS {peak_mb:.0f} MB", 0, 0)
    assert peak_mb < 1536, f"peak RSS {peak_mb:.0f} MB, expected under 1536 MB"
