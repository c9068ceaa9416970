"""A recorded run seen as a trajectory theta_t: its steps, snapshots (read lazily) and sketches.

``Trajectory`` never holds the snapshots of a run in memory: a parameter vector is read when it is
asked for (:meth:`Trajectory.vectors` streams them one step at a time), and the exact Gram matrices
read column slices of every snapshot (:meth:`Trajectory.read_pieces`).  Sketches, one (k,) float32
row per recorded step, are small and are loaded once.

Which vector a measure uses: ``snapshots`` (exact; the tensors of the ``params`` snapshots, i.e. the
model's parameters, or those selected by the recorder's ``params`` filter) or ``sketches`` (the
count sketch of the whole parameter vector, so only the group ``all``).  The first snapshot or sketch
step is theta_0, the init (step 0 whenever the recorder wrote it).
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from trajscope.errors import CorruptRunError, TrajscopeError, UsageError
from trajscope.measures.groups import Group, natural_key, parse_groups
from trajscope.store import Run

SOURCES = ("snapshots", "sketches")
Piece = tuple  # (tensor name, row0 | None, row1 | None, offset in block, numel)


class NeedsSnapshotsError(UsageError):
    """A measure or group needs parameter snapshots, but the run has none (only sketches)."""


def progress(iterable, total: int, desc: str, enabled: bool):
    """tqdm over ``iterable`` when ``enabled`` (honours TQDM_DISABLE), else the iterable itself."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=True if os.environ.get("TQDM_DISABLE") else None)


class Trajectory:
    """Read-only view of a run as a trajectory (see module docstring).

    >>> traj = Trajectory.open("my-run", root="runs")                # doctest: +SKIP
    >>> traj.snapshot_steps, traj.sketch_steps                       # doctest: +SKIP
    >>> groups = traj.groups(["all", "layers"])                      # doctest: +SKIP
    """

    def __init__(self, run: Run, kind: str = "params", owns_run: bool = False):
        self.run, self.kind, self._owns = run, kind, owns_run
        self.snapshot_steps = np.asarray(run.snapshot_steps(kind), dtype=np.int64)  # (n,)
        self.cache: dict = {}  # Gram matrices and streamed statistics, by group and steps
        self._headers: dict[int, tuple] = {}  # parsed snapshot headers, by step

    @classmethod
    def open(cls, ref: "str | os.PathLike | Run", root: str | os.PathLike | None = None) -> "Trajectory":
        """A run given as a :class:`Run`, a run directory, an id, a unique id prefix or a name."""
        if isinstance(ref, Run):
            return cls(ref)
        from trajscope.store.runs import resolve

        return cls(Run.open(resolve(str(ref), root)), owns_run=True)

    def close(self) -> None:
        self.cache.clear()
        self._headers.clear()
        if self._owns:
            self.run.close()

    def __enter__(self) -> "Trajectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Trajectory(run={self.run.id!r}, snapshots={len(self.snapshot_steps)}, "
                f"sketches={len(self.sketch_steps)})")

    # ------------------------------------------------------------------ what was recorded
    @property
    def id(self) -> str:
        return self.run.id

    @property
    def has_snapshots(self) -> bool:
        return len(self.snapshot_steps) > 0

    @cached_property
    def _sketches(self) -> tuple[np.ndarray, Tensor]:
        return self.run.sketches()

    @property
    def sketch_steps(self) -> np.ndarray:
        """Steps with a sketch (T,), ascending."""
        return self._sketches[0]

    @property
    def sketch_matrix(self) -> Tensor:
        """Sketches (T, k) float32, one row per :attr:`sketch_steps`."""
        return self._sketches[1]

    @property
    def has_sketches(self) -> bool:
        return len(self.sketch_steps) > 0

    @property
    def sketch_k(self) -> int:
        return int(self.run.meta.get("sketch", {}).get("k") or self.sketch_matrix.shape[1])

    @property
    def sketch_seed(self) -> int:
        seed = self.run.meta.get("sketch", {}).get("seed")
        return 0 if seed is None else int(seed)  # the recorder's default

    @property
    def steps(self) -> np.ndarray:
        """Every step with a snapshot or a sketch, ascending."""
        return np.union1d(self.snapshot_steps, self.sketch_steps).astype(np.int64)

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the snapshot tensors (from the first snapshot's header); {} without snapshots."""
        if not self.has_snapshots:
            return {}
        from trajscope.measures.reader import read_header

        step = int(self.snapshot_steps[0])
        try:
            path, start, size = self.snapshot_span(step)
            fd = os.open(path, os.O_RDONLY)
            try:
                _, entries = read_header(fd, start, size)
            finally:
                os.close(fd)
            shapes = {k: tuple(e["shape"]) for k, e in entries.items()}
        except CorruptRunError:
            raise
        except Exception as e:  # noqa: BLE001 - the store names the file and the problem
            self._store_error(step, e)
        return dict(sorted(shapes.items(), key=lambda kv: natural_key(kv[0])))

    @property
    def names(self) -> list[str] | None:
        """Parameter-tensor names in the snapshots, or None if the run has no snapshots."""
        return list(self.shapes) if self.has_snapshots else None

    def groups(self, specs: str | Iterable[str] | None = None) -> list[Group]:
        """Parse group specs (see :data:`~trajscope.measures.groups.GROUP_HELP`)."""
        return parse_groups(specs, self.names)

    def group(self, spec: "Group | str") -> Group:
        """A Group as it is, or the one group a spec names (UsageError if it names several)."""
        if isinstance(spec, Group):
            return spec
        groups = self.groups(spec)
        if len(groups) != 1:
            raise UsageError(f"group {spec!r} names {len(groups)} groups; a measure takes one")
        return groups[0]

    def numel(self, group: Group) -> int:
        return sum(int(np.prod(self.shapes[n], dtype=np.int64)) for n in group.tensors)

    # ------------------------------------------------------------------ choosing the source
    def source(self, group: Group, exact: bool | None = None) -> str:
        """``snapshots`` or ``sketches`` for ``group``; ``exact=None`` prefers snapshots."""
        if exact is None:
            exact = self.has_snapshots or not group.is_all
        if exact:
            if not self.has_snapshots:
                raise NeedsSnapshotsError(
                    f"group {group.name!r} needs parameter snapshots, but run {self.id} has only "
                    "sketches (measure group 'all' from sketches, or record snapshots)")
            return "snapshots"
        if not group.is_all:
            raise UsageError(f"group {group.name!r}: sketches hold only the whole parameter vector; "
                             "measure it from snapshots (exact) or use group 'all'")
        if not self.has_sketches:
            raise TrajscopeError(f"run {self.id} has no sketches; measure it from snapshots (exact)")
        return "sketches"

    def require_snapshots(self, what: str) -> None:
        if not self.has_snapshots:
            raise NeedsSnapshotsError(f"{what} needs parameter snapshots, but run {self.id} has "
                                      "only sketches (record with snapshots to measure it)")

    def points(self, source: str, steps: Sequence[int] | None = None) -> np.ndarray:
        """The steps a measure uses: ``steps`` (each must be recorded in ``source``), or by default
        every snapshot step (exact) or every sketch step (sketched); ascending, unique."""
        have = self.snapshot_steps if source == "snapshots" else self.sketch_steps
        if steps is None:
            return have.copy()
        want = np.unique(np.asarray(list(steps), dtype=np.int64))
        missing = np.setdiff1d(want, have)
        if len(missing):
            raise UsageError(f"run {self.id} has no {source[:-1]} at step(s) "
                             f"{', '.join(map(str, missing[:5]))}")
        return want

    def sketches_at(self, steps: np.ndarray) -> Tensor:
        """Sketch rows (n, k) float32 at ``steps`` (each must have a sketch)."""
        idx = np.searchsorted(self.sketch_steps, steps)
        return self.sketch_matrix[torch.as_tensor(idx)]

    def sketch_covers(self, group: Group) -> bool:
        """True if the stored sketches are sketches of ``group``'s vector: the group ``all`` of a run
        without snapshots, or one whose snapshots hold exactly the sketched parameters (checked by
        sketching the first snapshot that has a sketch and comparing, relative error < 1e-4)."""
        if not (group.is_all and self.has_sketches):
            return False
        if not self.has_snapshots:
            return True
        key = ("sketch_covers", group)
        if key not in self.cache:
            from trajscope.functional.sketch import Sketcher

            both = np.intersect1d(self.snapshot_steps, self.sketch_steps)
            ok = False
            if len(both):
                snap = self.snapshot(int(both[0]))
                mine = Sketcher(self.sketch_k, self.sketch_seed).sketch((n, snap[n]) for n in group.tensors)
                stored = self.sketches_at(both[:1])[0]
                ok = float((mine - stored).norm()) <= 1e-4 * max(float(stored.norm()), 1e-30)
            self.cache[key] = ok
        return self.cache[key]

    # ------------------------------------------------------------------ reading snapshots
    def snapshot_path(self, step: int) -> Path:
        return self.snapshot_span(step)[0]

    def snapshot_span(self, step: int) -> tuple[Path, int, int | None]:
        """(file, byte offset, size or None) of the snapshot at ``step`` (``Run.snapshot_span``)."""
        try:
            return self.run.snapshot_span(int(step), self.kind)
        except KeyError as e:
            raise CorruptRunError(str(e).strip("'\"")) from None

    def snapshot(self, step: int) -> dict[str, Tensor]:
        """The named tensors at ``step`` (the store's CorruptRunError if missing or corrupt)."""
        return self.run.load_snapshot(int(step), self.kind)

    def _store_error(self, step: int, error: Exception):
        """Raise the store's error for the snapshot at ``step``, or a CorruptRunError naming it."""
        self.run.load_snapshot(int(step), self.kind)  # raises the store's one-line error
        msg = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CorruptRunError(f"snapshot file {self.snapshot_path(step)} does not match the run's "
                              f"first snapshot: {msg}") from None

    def flatten(self, tensors: dict[str, Tensor], group: Group, step: int, dtype=torch.float32) -> Tensor:
        """The group's vector (P_g,) from a snapshot's tensors."""
        try:
            parts = [tensors[n].reshape(-1).to(dtype) for n in group.tensors]
        except KeyError as e:
            raise CorruptRunError(f"snapshot at step {step} of run {self.id} has no tensor {e}") from None
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

    def vector(self, step: int, group: Group, dtype=torch.float32) -> Tensor:
        """The group's parameter vector (P_g,) at a snapshot step."""
        return self.flatten(self.snapshot(step), group, step, dtype)

    def vectors(self, steps: Iterable[int], groups: Sequence[Group], dtype=torch.float32
                ) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """Stream ``(step, {group name: vector (P_g,)})``, reading each snapshot once, one at a time."""
        for step in steps:
            snap = self.snapshot(int(step))
            yield int(step), {g.name: self.flatten(snap, g, int(step), dtype) for g in groups}
            del snap

    def column_blocks(self, group: Group, max_elems: int) -> list[list[Piece]]:
        """The group's vector cut into packed blocks of <= ``max_elems`` elements
        (:func:`trajscope.measures.reader.column_blocks`)."""
        from trajscope.measures.reader import column_blocks

        return column_blocks([(n, self.shapes[n]) for n in group.tensors], max_elems)

    def read_pieces(self, step: int, pieces: Sequence[Piece], out: Tensor) -> Tensor:
        """Read only ``pieces`` of the snapshot at ``step`` into ``out`` (>= block numel,), cast
        (:mod:`trajscope.measures.reader`; headers are cached per step)."""
        from trajscope.measures.reader import read_pieces

        step = int(step)
        try:
            path, start, size = self.snapshot_span(step)
            self._headers[step] = read_pieces(path, pieces, out, self._headers.get(step), start, size)
        except CorruptRunError:
            raise
        except Exception as e:  # noqa: BLE001 - missing/corrupt file, missing tensor, wrong shape
            self._headers.pop(step, None)
            self._store_error(step, e)
        return out
