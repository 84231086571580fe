"""Image bytes for tests: good images in every convertible mode, and every kind of bad file."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def lesion_like(seed: int = 0, size: tuple[int, int] = (300, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) < (min(w, h) / 3) ** 2
    arr = np.empty((h, w, 3), np.float64)
    arr[:] = [220, 170, 140]
    arr[blob] = [90 + seed % 40, 50, 30]
    arr += rng.normal(0, 8, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def jpeg(seed: int = 0, size=(300, 240)) -> bytes:
    return _save(lesion_like(seed, size), "JPEG", quality=90)


def grayscale_png(seed: int = 0) -> bytes:
    return _save(lesion_like(seed).convert("L"), "PNG")


def rgba_png(seed: int = 0) -> bytes:
    im = lesion_like(seed).convert("RGBA")
    im.putalpha(200)
    return _save(im, "PNG")


def cmyk_jpeg(seed: int = 0) -> bytes:
    return _save(lesion_like(seed).convert("CMYK"), "JPEG", quality=90)


def png16(seed: int = 0) -> bytes:
    arr = (np.asarray(lesion_like(seed).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return _save(Image.fromarray(arr), "PNG")  # uint16 -> a 16-bit grayscale PNG


def exif_rotated_jpeg() -> bytes:
    """Stored landscape with the left half black; EXIF orientation 6 means 'rotate 90 CW to display',
    so the displayed image has its black half on top."""
    arr = np.full((200, 300, 3), 255, np.uint8)
    arr[:, :150] = 0
    im = Image.fromarray(arr, "RGB")
    exif = im.getexif()
    exif[0x0112] = 6
    return _save(im, "JPEG", quality=95, exif=exif.tobytes())


def truncated_jpeg() -> bytes:
    data = jpeg(7, (640, 480))
    return data[: len(data) // 2]


def corrupt_png() -> bytes:
    """A PNG whose IHDR checksum is wrong."""
    data = bytearray(_save(lesion_like(3), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR CRC
    return bytes(data)


def bomb_png(side: int = 9000) -> bytes:
    """A tiny file declaring side x side pixels."""
    return _save(Image.new("1", (side, side)), "PNG")


def tiny_png() -> bytes:
    return _save(lesion_like(1, (10, 10)), "PNG")


def sliver_png() -> bytes:
    return _save(lesion_like(1, (1000, 50)), "PNG")


def gif() -> bytes:
    return _save(lesion_like(2, (64, 64)).convert("P"), "GIF")


def multipage_tiff() -> bytes:
    a, b = lesion_like(4), lesion_like(5)
    return _save(a, "TIFF", save_all=True, append_images=[b])


def noisy_png(side: int = 1000) -> bytes:
    """Incompressible: about 3 bytes per pixel."""
    rng = np.random.default_rng(0)
    return _save(Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)), "PNG", compress_level=0)




def unlabelled_drop(root, n: int, seed: int):
    """n small distinct images, no metadata (scored, never trained on)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (48, 48, 3), dtype=np.uint8)
    for i in range(n):
        arr = base.copy()
        arr[i % 48, :, :] = rng.integers(0, 255, (48, 3), dtype=np.uint8)  # distinct bytes per image
        arr[:, (i // 48) % 48, 0] = (i * 7) % 255
        Image.fromarray(arr).save(root / f"ISIC_L{seed}{i:06d}.png", compress_level=1)
    return root
