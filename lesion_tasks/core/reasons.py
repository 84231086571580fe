"""Quarantine reason codes. Every file or row that is not accepted carries exactly one of these."""

from enum import StrEnum


class Reason(StrEnum):
    # the bytes
    EMPTY_FILE = "empty_file"  # zero bytes
    FILE_TOO_LARGE = "file_too_large"  # more bytes than Limits.max_bytes
    NOT_AN_IMAGE = "not_an_image"  # no image format recognised
    UNSUPPORTED_FORMAT = "unsupported_format"  # an image, but not JPEG/PNG/TIFF/BMP/WebP
    TRUNCATED_IMAGE = "truncated_image"  # the pixel data ends early
    CORRUPT_IMAGE = "corrupt_image"  # the decoder rejects the data
    DECOMPRESSION_BOMB = "decompression_bomb"  # more pixels than Limits.max_pixels
    TOO_SMALL = "too_small"  # a side shorter than Limits.min_side
    EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"  # long side / short side above Limits.max_aspect
    MULTI_FRAME = "multi_frame"  # animations and multi-page files: which frame is the lesion?
    UNSUPPORTED_MODE = "unsupported_mode"  # a pixel mode that cannot be converted to RGB
    # the name and the archive
    INVALID_IMAGE_ID = "invalid_image_id"  # file name unusable as an image id
    UNSAFE_PATH = "unsafe_path"  # zip entry or link escaping the drop (absolute, '..', symlink)
    ZIP_BOMB = "zip_bomb"  # compression ratio or total expanded size above the limits
    NESTED_ARCHIVE = "nested_archive"  # a zip/gzip/tar/7z/rar inside the drop: never expanded
    WRITE_BUDGET = "write_budget"  # the drop already wrote Limits.write_budget: recorded, bytes left in the raw drop
    # the labels and metadata
    MISSING_IMAGE = "missing_image"  # a metadata / ground-truth row without its image
    MULTI_HOT_LABEL = "multi_hot_label"  # more than one class set in a one-hot ground truth row
    INVALID_LABEL = "invalid_label"  # a ground-truth row with no class or values other than 0/1
    CONFLICTING_LABEL = "conflicting_label"  # sources (rows, CSVs, sidecars) disagree on the class
    INVALID_METADATA = "invalid_metadata"  # values rejected by the ISIC metadata schema
    INVALID_SIDECAR = "invalid_sidecar"  # a JSON sidecar that is not valid ISIC JSON
    # identity
    DUPLICATE = "duplicate"  # same bytes (sha256) as an image already accepted
    IMAGE_ID_CONFLICT = "image_id_conflict"  # id already used by an image with different bytes


DUPLICATE_REASONS = frozenset({Reason.DUPLICATE})
