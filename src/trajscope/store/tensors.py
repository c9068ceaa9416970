"""Tensor files of the store: safetensors written atomically, and nested state without pickle.

A nested structure (an optimizer ``state_dict``, RNG states) is split into its tensors, saved as
safetensors entries, and a JSON skeleton in the file's metadata that says where each tensor goes.
Reading never executes code.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trajscope.errors import CorruptRunError
from trajscope.store.paths import temporary_path

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def safetensors_header(entries, metadata: Mapping[str, str] | None = None) -> bytes | None:
    """The first bytes of a safetensors file whose tensors ``entries`` = ``[(name, dtype, shape)]``
    follow one another in that order: an 8-byte little-endian header length and the JSON header
    (each tensor's dtype, shape and byte range), padded so the data starts 8-byte aligned.  None if
    a dtype is not one this encoder knows.  A file is this header plus the raw bytes of the tensors,
    so a caller that holds them in one flat buffer builds the header once and reuses it."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in _DTYPES:
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    return len(head).to_bytes(8, "little") + head


def encode_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes | None:
    """The bytes of a safetensors file holding ``tensors`` (a copy: later changes to the tensors do
    not reach it), or None if a dtype is not one this encoder knows.

    The layout is :func:`safetensors_header` then the raw bytes. Encoding here costs a fraction of
    ``safetensors.torch.save_file`` for the many small tensors of a snapshot; the tests read every
    file back with safetensors' own loader.
    """
    ts = {name: t.detach() for name, t in tensors.items()}
    head = safetensors_header([(n, t.dtype, tuple(t.shape)) for n, t in ts.items()], metadata)
    if head is None:
        return None
    # (nbytes,) uint8 views of CPU copies; the join below copies them once more into the file bytes
    buffers = [memoryview(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()) for t in ts.values()]
    return b"".join([head, *buffers])


def write_atomic(path: Path, data) -> int:
    """Write ``data`` (bytes, or a list of bytes-like parts written one after another, so that a
    caller need not join them) to a temporary name and rename it to ``path``; return its size.

    Plain ``os`` calls (no file object, the folder made only when missing, the parts in
    ``writev`` calls): on small models the per-file cost, not the bytes, is what a snapshot costs.
    """
    parts = [memoryview(p).cast("B") for p in (data if isinstance(data, (list, tuple)) else [data])]
    tmp = str(temporary_path(Path(path)))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        write_all(fd, parts)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return sum(len(v) for v in parts)


_IOV_MAX = 512  # below every platform's IOV_MAX (1024 on Linux)


def write_all(fd: int, views: list[memoryview]) -> None:
    """Write every byte of ``views`` in order (``writev`` may write less than asked)."""
    views = [v for v in views if len(v)]
    while views:
        done = os.writev(fd, views[:_IOV_MAX]) if hasattr(os, "writev") else os.write(fd, views[0])
        while views and done >= len(views[0]):
            done -= len(views.pop(0))
        if done:
            views[0] = views[0][done:]


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Write ``tensors`` as a safetensors file, via a temporary file and an atomic rename.

    A process killed mid-write leaves at most a temporary file, never a half-written ``path``.
    Returns the bytes written.
    """
    data = encode_tensors(tensors, metadata)
    if data is None:
        return _save_with_library(Path(path), tensors, metadata)
    return write_atomic(path, data)


def _save_with_library(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage; detach + contiguous + clone gives each entry its own.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = temporary_path(path)
    save_file(flat, str(tmp), metadata=dict(metadata or {}))
    os.replace(tmp, path)
    return path.stat().st_size


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file; a missing or unreadable file raises a CorruptRunError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CorruptRunError(f"snapshot file {path} is missing")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptRunError(f"snapshot file {path} is corrupt: {str(e).splitlines()[0]}") from None
    return tensors, meta


def load_tensors_range(path: Path, offset: int, nbytes: int, what: str
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the safetensors file that fills bytes ``offset .. offset + nbytes`` of ``path`` (a
    snapshot in a pack), with safetensors' own loader; errors name the file and ``what`` it is."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CorruptRunError(f"snapshot file {path} is missing ({what})") from None
    try:
        chunks, got = [], 0
        while got < nbytes:
            chunk = os.pread(fd, nbytes - got, offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != nbytes:
        raise CorruptRunError(f"snapshot file {path} is corrupt: {what} (bytes {offset}-{offset + nbytes}) "
                              f"ends after {len(data)} bytes")
    try:
        from safetensors.torch import load

        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        meta = header.pop("__metadata__", None) or {}
        tensors = {k: tensors[k] for k in sorted(header, key=lambda k: header[k]["data_offsets"])}  # file order
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CorruptRunError(f"snapshot file {path} is corrupt: {what}: {str(e).splitlines()[0]}") from None
    return tensors, meta


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested dict/list/tuple of tensors and JSON scalars into (skeleton, tensors).

    The skeleton is JSON-serializable; each tensor is replaced by ``{"__tensor__": key}``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(o, path):
        if isinstance(o, torch.Tensor):
            tensors[path] = o
            return {_TENSOR: path}
        if isinstance(o, Mapping):
            int_keys = all(isinstance(k, int) for k in o) and len(o) > 0
            if not int_keys and not all(isinstance(k, str) for k in o):
                raise TypeError(f"cannot store mapping with keys {list(o)[:3]} at {path!r}")
            out = {str(k): walk(v, f"{path}/{k}") for k, v in o.items()}
            return {_INTKEYS: out} if int_keys else out
        if isinstance(o, tuple):
            return {_TUPLE: [walk(v, f"{path}/{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(o)]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot store {type(o).__name__} at {path!r}")

    return walk(obj, prefix), tensors


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""

    def walk(o):
        if isinstance(o, dict):
            if _TENSOR in o:
                return tensors[o[_TENSOR]]
            if _TUPLE in o:
                return tuple(walk(v) for v in o[_TUPLE])
            if _INTKEYS in o:
                return {int(k): walk(v) for k, v in o[_INTKEYS].items()}
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    return walk(skeleton)


def save_state(path: Path, state: Any) -> int:
    """Save any nested state (see :func:`flatten_state`) as one safetensors file."""
    skeleton, tensors = flatten_state(state, "s")
    return save_tensors(path, tensors, {"skeleton": json.dumps(skeleton)})


def load_state(path: Path) -> Any:
    return state_from(*load_tensors(path), path)


def state_from(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], path) -> Any:
    """The nested state of a file's ``tensors`` and ``meta`` (from :func:`save_state`)."""
    if "skeleton" not in meta:
        raise CorruptRunError(f"snapshot file {path} holds no state skeleton")
    return unflatten_state(json.loads(meta["skeleton"]), tensors)
