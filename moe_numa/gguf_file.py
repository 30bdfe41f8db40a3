"""Memory-mapped GGUF model files: metadata, the tensor table and zero-copy views.

Owns reading (through `gguf.GGUFReader`, which memory-maps the file), joining split
files (`name-00001-of-00003.gguf`) into one model, and validating what was read so
that a malformed, truncated or unsupported file fails here with an error naming
the file and the problem, before any weight is used.
"""
from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from . import _native, quants
from .errors import GGUFError, UnsupportedError

class _StringArray:
    """The strings of a GGUF string array, located once (natively) and decoded on demand."""

    def __init__(self, data: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.data, self.starts, self.lengths = data, starts, lengths

    def decode(self) -> list[str]:
        return _native.gguf_decode_strings(self.data, self.starts, self.lengths)


class _TruncatedTensor(ValueError):
    """A tensor's data runs past the end of the file (raised inside the reader)."""

    def __init__(self, name: str, offset: int, need: int, have: int):
        super().__init__(f"tensor {name!r} needs {need} bytes from byte {offset} but the file has "
                         f"{max(have - offset, 0)} bytes left there ({have} in all; truncated?)")


class _Reader(GGUFReader):
    """gguf's reader with a fast path for arrays (it makes one numpy object per
    array element, which takes seconds for a 150k-token vocabulary), and a size
    check of every tensor before gguf reshapes its bytes."""

    # The file's map as a plain ndarray (its base keeps the np.memmap open): each of the
    # thousands of views taken of it would otherwise be a memmap, built in Python.
    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    def _build_tensors(self, start_offs: int, fields) -> None:
        from gguf.constants import GGML_QUANT_SIZES
        for field in fields:
            _name_len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            qtype = GGMLQuantizationType(int(raw_dtype[0]))
            n_elems = 1
            for d in dims.tolist():     # Python ints: extreme dimensions must not wrap around
                n_elems *= int(d)
            block, type_size = GGML_QUANT_SIZES[qtype]
            offset = int(start_offs) + int(offset_tensor[0])
            need = n_elems * type_size // block
            if offset + need > len(self.data):
                raise _TruncatedTensor(name, offset, need, len(self.data))
        super()._build_tensors(start_offs, fields)

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        offs = orig_offs + 12
        itype, n = GGUFValueType(int(raw_itype[0])), int(alen[0])
        if itype == GGUFValueType.STRING:
            starts, lengths, end = _native.gguf_string_spans(self.data, offs, n)
            return end - orig_offs, [raw_itype, alen, _StringArray(self.data, starts, lengths)], \
                [2], [GGUFValueType.ARRAY, GGUFValueType.STRING]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is None:
            return super()._get_field_parts(orig_offs, raw_type)   # nested arrays: the slow general path
        values = self._get(offs, nptype, n)
        if len(values) != n:
            raise ValueError("array runs past the end of the file")
        return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, itype]


_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class Tensor:
    """One tensor of a GGUF file: its type, logical shape and raw block bytes.

    `shape` is in numpy order (rows last-but-one, columns last). `raw` is a
    uint8 view of the memory-mapped file with shape `(*shape[:-1], row_bytes)`:
    slicing it never copies.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray
    file: str

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    @property
    def n_elements(self) -> int:
        return int(math.prod(self.shape))

    @property
    def row_bytes(self) -> int:
        return int(self.raw.shape[-1])

    def __getitem__(self, index: int) -> "Tensor":
        """The index-th slice along the first axis (an expert of a merged tensor)."""
        if len(self.shape) < 2:
            raise IndexError(f"tensor {self.name} is 1-D and cannot be sliced")
        n = self.shape[0]
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for tensor {self.name} with {n} slices")
        return Tensor(f"{self.name}[{index % n}]", self.qtype, self.shape[1:], self.raw[index], self.file)

    def with_shape(self, shape: tuple[int, ...]) -> "Tensor":
        """The same bytes seen with another shape of the same row length (ggml's
        degenerate dims: `[1, n]` as `[n]`)."""
        shape = tuple(int(d) for d in shape)
        if int(math.prod(shape)) != self.n_elements or shape[-1] != self.shape[-1]:
            raise GGUFError(f"{self.file}: tensor {self.name!r} of shape {self.shape} cannot be seen as {shape}")
        return Tensor(self.name, self.qtype, shape, self.raw.reshape(*shape[:-1], self.row_bytes), self.file)

    def dequantize_rows(self, ids) -> np.ndarray:
        """float32 values of rows `ids` of a 2-D tensor (an embedding lookup), decoding only those rows."""
        ids = np.asarray(ids, dtype=np.int64)
        return quants.dequantize(np.asarray(self.raw[ids]), self.qtype, (len(ids), self.shape[1]))

    def dequantize(self) -> np.ndarray:
        """The values as a new float32 array of `shape`."""
        return quants.dequantize(self.raw, self.qtype, self.shape)


class GGUFModelFile:
    """A GGUF model, possibly split over several files, opened read-only.

    `metadata` maps keys to Python values (str, int, float, bool, list[str], or a
    numpy array for numeric arrays). `tensors` maps names to `Tensor`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        self.paths = _split_paths(Path(path))
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, Tensor] = {}
        self._readers: list[GGUFReader] = []
        self._spans: list[tuple[str, int, int]] | None = None   # locate()'s (path, address, bytes)
        for i, part in enumerate(self.paths):
            reader = _open_reader(part)
            self._readers.append(reader)
            fields = _read_fields(reader, part)
            if i == 0:
                self.metadata = fields
            for tensor in _read_tensors(reader, part):
                if tensor.name in self.tensors:
                    raise GGUFError(f"{part}: tensor {tensor.name!r} appears in more than one split file")
                self.tensors[tensor.name] = tensor
        self._check_splits()
        if "general.architecture" not in self.metadata:
            raise GGUFError(f"{self.path}: missing metadata key 'general.architecture'")

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: missing tensor {name!r}") from None

    def has(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.tensors.values())

    @property
    def file_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.paths)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def locate(self, arr: np.ndarray) -> tuple[str, int] | None:
        """(file, byte offset) of a C-contiguous view of one of our files, or None."""
        if not arr.flags.c_contiguous:
            return None
        addr = _native.data_address(arr)
        if self._spans is None:
            self._spans = [(path, _native.data_address(r.data), r.data.nbytes)
                           for path, r in zip(self.paths, self._readers)]
        for path, base, size in self._spans:
            if base <= addr and addr + arr.nbytes <= base + size:
                return path, addr - base
        return None

    def close(self) -> None:
        """Drop the memory maps (views handed out earlier keep their own reference)."""
        self._readers.clear()
        self._spans = []
        self.tensors.clear()

    def _check_splits(self) -> None:
        count = int(self.metadata.get("split.count", 1) or 1)
        if count != len(self.paths):
            raise GGUFError(f"{self.path}: metadata says split.count={count} but {len(self.paths)} file(s) were found")
        expected = self.metadata.get("split.tensors.count")
        if expected is not None and int(expected) != len(self.tensors):
            raise GGUFError(f"{self.path}: split.tensors.count={expected} but the split files hold "
                            f"{len(self.tensors)} tensors")


def _split_paths(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [str(path)]
    count = int(m.group("count"))
    if int(m.group("no")) != 1:
        raise GGUFError(f"{path}: open the first split file (-00001-of-{count:05d}.gguf), not part {m.group('no')}")
    paths = [path.with_name(f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise GGUFError(f"{path}: split file(s) missing: {', '.join(missing)}")
    return [str(p) for p in paths]


def _open_reader(path: str) -> GGUFReader:
    size = os.path.getsize(path)
    if size < 24:
        raise GGUFError(f"{path}: file is {size} bytes, too short to be a GGUF file (truncated?)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return _Reader(path, "r")
    except _TruncatedTensor as e:
        raise GGUFError(f"{path}: {e}") from None
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, struct.error) as e:
        if "GGMLQuantizationType" in str(e):
            raise UnsupportedError(f"{path}: a tensor uses an unknown GGML type id ({e})") from None
        # The reader indexes past the end of a truncated file, or meets a bad
        # value type; either way the file cannot be trusted.
        raise GGUFError(f"{path}: malformed or truncated GGUF file: {e}") from None


def _read_fields(reader: GGUFReader, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            out[name] = _field_value(field)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise GGUFError(f"{path}: cannot read metadata key {name!r}: {e}") from None
    return out


def _field_value(field) -> Any:
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if field.parts and isinstance(field.parts[-1], _StringArray):
            return field.parts[-1].decode()
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if sub == GGUFValueType.ARRAY:
            raise ValueError("nested arrays are not supported")
        if not field.data:
            return np.zeros(0)
        # Numeric array items are consecutive one-element parts; join them in one copy.
        first, last = field.data[0], field.data[-1]
        return np.concatenate(field.parts[first:last + 1]).copy()
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    value = field.parts[-1][0]
    if main == GGUFValueType.BOOL:
        return bool(value)
    if main in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        return float(value)
    return int(value)


_VALUE_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def metadata_value(md: Mapping[str, Any], key: str, kind: str, where: str = "GGUF") -> Any:
    """``md[key]`` checked to be a single value of `kind` ("int", "float", "bool",
    "str"), or None when the key is absent; a GGUFError that names the key otherwise.
    Numpy scalars are unwrapped, an int 0/1 is a bool, bytes are UTF-8 strings."""
    if key not in md:
        return None
    value = md[key]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bytes, bytearray)) and kind == "str":
        value = bytes(value).decode("utf-8", errors="replace")
    if kind == "bool" and not isinstance(value, bool) and isinstance(value, int) and value in (0, 1):
        value = bool(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        raise UnsupportedError(f"{where}: {key} is an array (a per-layer value?); only a single value "
                               f"is supported")
    if kind in ("int", "float") and isinstance(value, bool) or not isinstance(value, _VALUE_KINDS[kind]):
        raise GGUFError(f"{where}: metadata key {key!r} has type {type(value).__name__} ({value!r}), "
                        f"expected {kind}")
    return float(value) if kind == "float" else value


def _read_tensors(reader: GGUFReader, path: str) -> list[Tensor]:
    size = os.path.getsize(path)
    tensors = []
    for t in reader.tensors:
        qtype = GGMLQuantizationType(int(t.tensor_type))
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise GGUFError(f"{path}: tensor {t.name!r} ends at byte {end} but the file has {size} bytes (truncated?)")
        if any(d <= 0 for d in shape):
            raise GGUFError(f"{path}: tensor {t.name!r} has an empty dimension {shape}")
        # A plain ndarray view of the memmap (which it keeps alive as its base): slicing a
        # np.memmap runs its Python __array_finalize__ per view, ~0.3 s over a large model's
        # per-expert shards.
        raw = reader.data.view(np.ndarray)[int(t.data_offset):end]
        block, type_size = quants.block_size(qtype)
        if shape[-1] % block:
            raise GGUFError(f"{path}: tensor {t.name!r} has {shape[-1]} columns, not a multiple of "
                            f"the {qtype.name} block size {block}")
        row_bytes = shape[-1] // block * type_size
        tensors.append(Tensor(t.name, qtype, shape, raw.reshape(*shape[:-1], row_bytes), path))
    return tensors


def bad_block_error(t: Tensor, index: int) -> GGUFError:
    """The error naming block `index` (flat over the tensor's rows) of `t`."""
    per_row = t.shape[-1] // quants.traits(t.qtype).block
    return GGUFError(f"{t.file}: tensor {t.name!r} ({t.qtype.name}): block {index} (row {index // per_row}, "
                     f"block {index % per_row} of the row) has a non-finite scale or value (Inf/NaN)")


def check_tensor_blocks(t: Tensor) -> None:
    """Raise GGUFError naming the first block of `t` whose scale (or float
    value) is Inf or NaN (llama.cpp's --check-tensors)."""
    from .kernels import first_bad_block
    rows = t.raw.reshape(-1, t.row_bytes)
    bad = first_bad_block(rows, t.qtype, t.shape[-1])
    if bad >= 0:
        raise bad_block_error(t, bad)


def check_supported_types(gguf: GGUFModelFile, backend: str = "engine") -> None:
    """Reject tensors whose quant type `backend` cannot compute with, naming them
    (the reference dequantizes every type gguf.quants knows)."""
    bad = [(t.name, t.qtype.name) for t in gguf if not quants.is_supported(t.qtype, backend)]
    if bad:
        listed = ", ".join(f"{n} ({q})" for n, q in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise UnsupportedError(f"{gguf.path}: unsupported quant type(s) for the {backend} backend: {listed}; "
                               f"supported: {', '.join(quants.supported_names(backend))}")
