"""Base of the measures' result objects: save in a run, load back, turn into a DataFrame.

A result is a dataclass.  Its array fields (numpy) are stored as tensors of the run's result
``<kind>:<group>`` (``results/<name>.safetensors``), every other field as JSON in ``run.db``
(non-finite floats as null).  ``Result.load(run, name)`` rebuilds the object.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from trajscope.store import Run


def jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN/inf to None, arrays and tuples to lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


@dataclasses.dataclass
class Result:
    """Base class; subclasses set ``kind`` and implement :meth:`to_frame`."""

    kind: ClassVar[str] = "result"

    @property
    def name(self) -> str:
        """The name it is stored under in the run: ``<kind>:<group>``."""
        return f"{self.kind}:{getattr(self, 'group', 'all')}"

    def to_frame(self) -> pd.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_result(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON data, tensors) as :meth:`Run.save_result` takes them."""
        data, tensors = {"kind": self.kind}, {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray) and v.dtype != object:
                tensors[f.name] = torch.from_numpy(np.ascontiguousarray(v))
            else:
                data[f.name] = jsonable(v)
        return data, tensors

    def save(self, run: Run) -> str:
        """Store in a run opened for writing; returns the result name."""
        run.save_result(self.name, *self.to_result())
        return self.name

    @classmethod
    def from_result(cls, data: dict, tensors: dict[str, torch.Tensor]):
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw.update({k: t.numpy() for k, t in tensors.items() if k in names})
        for f in dataclasses.fields(cls):  # JSON null back to NaN for float fields
            if kw.get(f.name, 0) is None and "float" in str(f.type):
                kw[f.name] = math.nan
        return cls(**kw)

    @classmethod
    def load(cls, run: Run, name: str):
        """The result ``name`` stored in ``run`` (KeyError if there is none)."""
        return cls.from_result(*run.load_result(name))
