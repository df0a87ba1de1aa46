"""A small, dependency-free reader/writer for the safetensors format, with FP8 support.

Why not ``safetensors.numpy``/``safetensors.flax``: they cannot read ``F8_E4M3`` (numpy has no float8 dtype), and
the released DeepSeek-V3 weights are FP8. ``ml_dtypes`` supplies bfloat16/float8 numpy dtypes, and the format is
simple enough to read directly (https://github.com/huggingface/safetensors, "Format"):

    8 bytes      N, unsigned little-endian 64-bit: size of the header
    N bytes      JSON: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}
                 (offsets are relative to the start of the byte buffer; padded with spaces to 8-byte alignment)
    rest         the byte buffer: every tensor little-endian, row-major, entirely covered without holes or overlap

Reading is lazy: :class:`SafeTensorsFile` memory-maps the file, validates the whole header up front (errors name the
file) and hands out one tensor at a time as a read-only view into the map, so a 700 GB checkpoint is never
resident at once. Untrusted files are data only: nothing is ever unpickled or executed.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import stat
import struct
import sys
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np

# safetensors dtype tag <-> numpy dtype (little-endian on disk).
DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _native(dt: np.dtype) -> np.dtype:
    return dt.newbyteorder("=") if dt.byteorder in "<>" else dt


_TAGS: Dict[np.dtype, str] = {_native(v): k for k, v in DTYPES.items()}

# The reference implementation refuses headers above 100 MB; a header that large is corrupt or hostile.
MAX_HEADER_BYTES = 100_000_000
_LITTLE = sys.byteorder == "little"


# JSON deeper than this is refused before parsing (a header of 200,000 "[" used to raise RecursionError);
# a safetensors header is 3 levels deep, an index or config.json a few more.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(raw: bytes) -> int:
    """Deepest nesting of [ and { in a JSON text, string literals ignored (a linear scan, no recursion)."""
    a = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    if not a.size:
        return 0
    step = ((a == ord("[")) | (a == ord("{"))).astype(np.int64) - ((a == ord("]")) | (a == ord("}")))
    return int(np.cumsum(step).max(initial=0))


def load_json_bytes(raw: bytes, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads for untrusted bytes: ValueError naming ``where`` for bad UTF-8, bad JSON or nesting deeper than
    ``max_depth``; the message never quotes the content."""
    if json_depth(raw) > max_depth:
        raise ValueError(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply") from None


def check_regular_file(path: str, what: str = "file") -> None:
    """ValueError unless ``path`` is a regular file (symlinks followed, as in the Hugging Face cache): a FIFO,
    device or directory is refused before it is opened (opening a FIFO blocks)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"{path}: {what} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: {what} is not a regular file")


def read_json_file(path: str, what: str = "JSON file", max_bytes: int = 100_000_000) -> Any:
    """A small untrusted JSON file: regular file, at most ``max_bytes``, bounded nesting."""
    check_regular_file(path, what)
    if os.path.getsize(path) > max_bytes:
        raise ValueError(f"{path}: {what} is larger than {max_bytes} bytes")
    with open(path, "rb") as f:
        return load_json_bytes(f.read(), path)


def _kind(x) -> str:
    """A value's JSON type, for messages that must not echo file content."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number" if isinstance(x, (int, float)) else type(x).__name__)


def _name(name: str) -> str:
    r = repr(name)
    return r if len(r) <= 80 else r[:77] + "..."


def dtype_tag(dtype) -> str:
    """numpy dtype (incl. ml_dtypes bfloat16/float8) -> safetensors tag, e.g. 'BF16'."""
    dt = np.dtype(dtype)
    if _native(dt) not in _TAGS:
        raise ValueError(f"safetensors: dtype {dt} has no safetensors equivalent (supported: {sorted(DTYPES)})")
    return _TAGS[_native(dt)]


class SafeTensorsError(ValueError):
    """A malformed safetensors file. Subclass of ValueError; the message names the file."""


class SafeTensorsFile:
    """Lazy, memory-mapped view of one ``.safetensors`` file.

    ``keys()``, ``shape(k)``, ``dtype(k)`` read only the (validated) header; ``get(k)`` returns that one tensor as a
    read-only numpy view into the map (``copy=True`` for an owned, writable copy). Use as a context manager, or
    call :meth:`close` (views handed out keep the map alive until they are dropped).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            check_regular_file(self.path, "safetensors file")
        except ValueError as e:
            raise SafeTensorsError(str(e)) from None
        self._file = open(self.path, "rb")
        try:
            self._entries, self.metadata, self._data_start = self._read_header()
            size = os.fstat(self._file.fileno()).st_size
            # mmap of a zero-length region is an error; such a file can only hold empty tensors.
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            self._file.close()
            raise

    # ----- header -----
    def _fail(self, msg: str):
        raise SafeTensorsError(f"{self.path}: {msg}")

    def _read_header(self):
        f = self._file
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            self._fail(f"file is {size} bytes, too short for the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        # (the length is file content: not quoted, so a non-safetensors file is not echoed)
        if n > MAX_HEADER_BYTES:
            self._fail(f"header length exceeds the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)")
        if 8 + n > size:
            self._fail(f"header length runs past the end of the file ({size} bytes; not a safetensors file?)")
        raw = f.read(n)
        try:
            header = load_json_bytes(raw, "header")
        except ValueError as e:
            self._fail(str(e))
        if not isinstance(header, dict):
            self._fail(f"header must be a JSON object, got {_kind(header)}")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            self._fail("__metadata__ must be a JSON object of string -> string")
        data_start = 8 + n
        data_len = size - data_start
        entries: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
                self._fail(f"tensor {_name(name)}: entry must be an object with dtype, shape and data_offsets")
            tag, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(tag, str) or tag not in DTYPES:
                self._fail(f"tensor {_name(name)}: dtype must be one of {sorted(DTYPES)}, got "
                           + (_name(tag) if isinstance(tag, str) else _kind(tag)))
            if not (isinstance(shape, list) and len(shape) <= 64 and all(_is_int(s) and s >= 0 for s in shape)):
                self._fail(f"tensor {_name(name)}: shape must be a list of at most 64 non-negative ints, got "
                           f"{_kind(shape) if not isinstance(shape, list) else 'other values'}")
            if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
                self._fail(f"tensor {_name(name)}: data_offsets must be a list [begin, end] of two ints")
            begin, end = offs
            if not 0 <= begin <= end <= data_len:
                self._fail(f"tensor {_name(name)}: data_offsets {offs} outside the {data_len}-byte data buffer")
            dt = DTYPES[tag]
            need = math.prod(shape) * dt.itemsize
            if end - begin != need:
                self._fail(f"tensor {_name(name)}: {end - begin} bytes at data_offsets {offs}, but {tag}{shape} "
                           f"needs {need}")
            entries[name] = (dt, tuple(shape), begin, end)
        # The buffer must be covered exactly: no overlap (two tensors sharing bytes), no holes.
        pos, prev = 0, None
        for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin < pos:
                self._fail(f"tensor {name!r}: data_offsets [{begin}, {end}] overlap tensor {prev!r} "
                           f"(which ends at {pos})")
            if begin > pos:
                self._fail(f"tensor {name!r}: hole in the data buffer between byte {pos} and {begin}")
            prev, pos = name, end
        if pos != data_len:
            self._fail(f"data buffer is {data_len} bytes but tensors cover only {pos}")
        return entries, metadata, data_start

    # ----- access -----
    def keys(self) -> list:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name):
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return self._entries[name]

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def nbytes(self, name: str) -> int:
        _, _, b, e = self._entry(name)
        return e - b

    def get(self, name: str, copy: bool = False) -> np.ndarray:
        """The tensor ``name`` (native byte order). A read-only view into the map unless ``copy``."""
        dt, shape, begin, end = self._entry(name)
        if self._mm is None or end == begin:
            arr = np.zeros(shape, dt)
            arr.flags.writeable = copy
            return arr
        if _LITTLE or dt.itemsize == 1:
            arr = np.frombuffer(self._mm, dtype=dt, count=math.prod(shape), offset=self._data_start + begin)
        else:  # big-endian host: read the raw little-endian words and swap
            raw = np.frombuffer(self._mm, dtype=np.dtype(f"<u{dt.itemsize}"), count=math.prod(shape),
                                offset=self._data_start + begin)
            arr = raw.astype(raw.dtype.newbyteorder("=")).view(_native(dt))
        arr = arr.reshape(shape)
        return arr.copy() if copy else arr

    def items(self) -> Iterator[Tuple[str, np.ndarray]]:
        """One tensor at a time (views; nothing is read until a page is touched)."""
        for k in self._entries:
            yield k, self.get(k)

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views still alive: the map is released when they are garbage-collected
                pass
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"SafeTensorsFile({self.path!r}, {len(self)} tensors)"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_file(path) -> Dict[str, np.ndarray]:
    """All tensors of a file as owned numpy arrays (convenience for small files and tests)."""
    with SafeTensorsFile(path) as f:
        return {k: f.get(k, copy=True) for k in f.keys()}


# ---------------------------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------------------------
def write_file(path, specs: Sequence[Tuple[str, Any, Sequence[int]]], fetch: Callable[[str], np.ndarray],
               metadata: Optional[Mapping[str, str]] = None) -> int:
    """Stream tensors into ``path`` one at a time: ``specs`` = [(name, dtype, shape)], ``fetch(name)`` returns the
    array (called once per tensor, in ``specs`` order, right before it is written). Returns the file size.

    ``metadata`` defaults to {"format": "pt"}, which transformers requires to accept the file.
    """
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("safetensors metadata must be a mapping of str -> str")
    header: Dict[str, Any] = {"__metadata__": meta} if meta else {}
    offset, plan = 0, []
    for name, dtype, shape in specs:
        if name == "__metadata__" or name in header:
            raise ValueError(f"safetensors: duplicate or reserved tensor name {name!r}")
        dt = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": dtype_tag(dt), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        plan.append((name, dt, shape, nbytes))
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # align the data buffer to 8 bytes, as the reference writer does
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dt, shape, nbytes in plan:
            arr = np.asarray(fetch(name))
            if arr.shape != shape:
                raise ValueError(f"safetensors: tensor {name!r} has shape {arr.shape}, declared {shape}")
            if arr.dtype != dt:
                raise ValueError(f"safetensors: tensor {name!r} has dtype {arr.dtype}, declared {dt}")
            arr = np.ascontiguousarray(arr)
            if not _LITTLE and dt.itemsize > 1:
                arr = arr.view(np.dtype(f"=u{dt.itemsize}")).astype(f"<u{dt.itemsize}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        size = f.tell()
    os.replace(tmp, path)
    return size


def save_file(tensors: Mapping[str, np.ndarray], path, metadata: Optional[Mapping[str, str]] = None) -> int:
    """Write a dict of numpy arrays (bfloat16/float8 via ml_dtypes welcome). Returns the file size."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    return write_file(path, [(k, a.dtype, a.shape) for k, a in arrays.items()], arrays.__getitem__, metadata)
