"""Read row ranges of tensors from a safetensors snapshot file, straight into a buffer.

A safetensors file is an 8-byte little-endian header length, a JSON header ``{name: {"dtype",
"shape", "data_offsets": [begin, end]}}`` (offsets relative to the end of the header), then the raw
little-endian tensor bytes in row-major order.  Rows r0..r1 of a tensor are therefore one contiguous
byte range, which ``os.preadv`` copies into the destination (the float32 case, no intermediate copy):
about 100x faster here than slicing the memory map that ``safetensors.safe_open`` returns, whose
page faults dominated the exact Gram pass.  Nothing is executed from the file; any inconsistency
raises ValueError (the caller turns it into the store's CorruptRunError).

A snapshot in a pack (``Run.snapshot_span``) is such a file at a byte offset of a larger one:
``start`` and ``size`` say where, and every offset is taken from there.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 << 20  # the safetensors limit


def column_blocks(shapes: Sequence[tuple[str, tuple[int, ...]]], max_elems: int) -> list[list[tuple]]:
    """Cut the concatenation of tensors ``(name, shape)`` into blocks of at most ``max_elems``
    elements, each a list of pieces ``(name, row0, row1, offset in block, numel)`` (rows along dim 0;
    None for 0-d tensors).  Packed: a block takes as many rows of the next tensor as still fit; a
    single row larger than ``max_elems`` is a block of its own (rows are never split)."""
    blocks, cur, size = [], [], 0
    for name, shape in shapes:
        rows = shape[0] if shape else 1
        per = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
        r = 0
        while r < rows and per > 0:
            take = min(rows - r, max(max_elems - size, 0) // per)
            if take == 0 and cur:  # no room left for one row: next block
                blocks.append(cur)
                cur, size = [], 0
                continue
            take = max(take, 1)
            cur.append((name, r if shape else None, r + take if shape else None, size, take * per))
            size, r = size + take * per, r + take
    if cur:
        blocks.append(cur)
    return blocks


def read_header(fd: int, start: int = 0, size: int | None = None) -> tuple[int, dict]:
    """(byte offset of the data in the file, {name: entry}) of the safetensors file in bytes
    ``start .. start + size`` of an open file (default: all of it); checks every entry."""
    size = os.fstat(fd).st_size - start if size is None else size
    raw = os.pread(fd, 8, start)
    if len(raw) < 8 or size < 8:
        raise ValueError("file shorter than its header")
    n = struct.unpack("<Q", raw)[0]
    if n > min(MAX_HEADER, size - 8):
        raise ValueError(f"header length {n} exceeds the file")
    header = json.loads(os.pread(fd, n, start + 8))
    header.pop("__metadata__", None)
    base = 8 + n
    for name, e in header.items():
        if e["dtype"] not in DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {e['dtype']}")
        a, b = e["data_offsets"]
        itemsize = torch.empty(0, dtype=DTYPES[e["dtype"]]).element_size()
        if not 0 <= a <= b <= size - base or b - a != int(np.prod(e["shape"], dtype=np.int64)) * itemsize:
            raise ValueError(f"tensor {name!r} has inconsistent offsets")
    return start + base, header


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise ValueError("file ended before the tensor data")
        got += n


def read_rows(fd: int, base: int, entry: dict, r0: int | None, r1: int | None, out: Tensor) -> None:
    """Rows r0..r1 (along dim 0; None: the whole, possibly 0-d, tensor) into ``out`` (contiguous, numel
    of the rows), cast to ``out``'s dtype."""
    dtype = DTYPES[entry["dtype"]]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shape = entry["shape"]
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize if shape else itemsize
    a = entry["data_offsets"][0] + (0 if r0 is None else r0 * row)
    nbytes = (entry["data_offsets"][1] - entry["data_offsets"][0]) if r0 is None else (r1 - r0) * row
    if out.numel() * itemsize != nbytes:
        raise ValueError(f"buffer of {out.numel()} elements for {nbytes} bytes")
    if dtype == out.dtype and out.is_contiguous() and sys.byteorder == "little":
        _pread_into(fd, memoryview(out.numpy()).cast("B"), base + a)
        return
    tmp = bytearray(nbytes)
    _pread_into(fd, memoryview(tmp), base + a)
    if nbytes:
        out.copy_(torch.frombuffer(tmp, dtype=dtype))


def read_pieces(path, pieces: Sequence[tuple], out: Tensor, header: tuple[int, dict] | None = None,
                start: int = 0, size: int | None = None) -> tuple[int, dict]:
    """Read ``pieces`` ``(name, row0, row1, offset, numel)`` of the file at ``path`` (the one in
    bytes ``start .. start + size``, see :func:`read_header`) into ``out[offset:offset+numel]``;
    returns the parsed header (pass it back to skip re-parsing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        base, entries = header if header is not None else read_header(fd, start, size)
        for name, r0, r1, off, n in pieces:
            if name not in entries:
                raise ValueError(f"no tensor {name!r}")
            read_rows(fd, base, entries[name], r0, r1, out[off:off + n])
        return base, entries
    finally:
        os.close(fd)
