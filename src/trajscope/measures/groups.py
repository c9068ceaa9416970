"""Groups of parameters that a measure looks at: all, per tensor, per layer, by pattern, Q/K/V.

A group is a name and a tuple of parameter-tensor names; its vector is the concatenation of those
tensors, flattened (row-major), in the order of the tuple.  Only parameters are ever included: the
snapshots of kind ``params`` hold ``model.named_parameters()`` (buffers such as BatchNorm running
statistics are recorded, if at all, as a separate kind and never enter a group).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from trajscope.errors import UsageError

GROUP_HELP = """Which parameters to measure (repeat the option for several groups; default: all).
  all                   every recorded parameter (the only group that sketches can measure)
  tensors               one group per parameter tensor, named by the tensor
  layers                one group per layer (module): the tensors whose names agree up to the last
                        dot, e.g. 0.weight + 0.bias -> layer 0
  qkv                   the attention Q, K and V projections (*q_proj*, *k_proj*, *v_proj*, as in
                        modadd-transformer): groups <module>.q, <module>.k, <module>.v
  NAME=GLOB[,GLOB...]   one group NAME of the tensors matching any glob, e.g. attn='blocks.*.attn.*'
  GLOB                  one group of the tensors matching the glob (or an exact tensor name), named
                        by the glob, e.g. '0.*'
Buffers (BatchNorm running statistics, ...) are not parameters and are never included."""
"""Help text of the ``--group`` option of ``trajscope analyze`` (the syntax :func:`parse_groups` reads)."""

PRESETS = ("all", "tensors", "layers", "qkv")
_QKV = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"))


@dataclass(frozen=True)
class Group:
    """A named set of parameter tensors. ``is_all``: the whole parameter vector (what sketches hold)."""

    name: str
    tensors: tuple[str, ...]
    is_all: bool = False

    def __str__(self) -> str:
        return self.name


def natural_key(name: str) -> tuple:
    """Sort key that orders ``blocks.2`` before ``blocks.10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


def layer_of(tensor: str) -> str:
    """The module path of a parameter: its name up to the last dot (``0.weight`` -> ``0``)."""
    return tensor.rsplit(".", 1)[0] if "." in tensor else tensor


def all_group(names: Sequence[str] | None) -> Group:
    """Group ``all``; ``names=None`` when the run has no snapshots (only sketches)."""
    return Group("all", tuple(sorted(names or (), key=natural_key)), is_all=True)


def _glob(name: str, patterns: list[str], names: Sequence[str], spec: str) -> Group:
    hit = [n for n in names if any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not hit:
        shown = ", ".join(sorted(names, key=natural_key)[:8]) + (", ..." if len(names) > 8 else "")
        raise UsageError(f"group {spec!r} matches no parameter tensor (tensors: {shown})")
    return Group(name, tuple(sorted(hit, key=natural_key)))


def _qkv(names: Sequence[str]) -> list[Group]:
    """Groups ``<module>.q``, ``.k``, ``.v`` for every module that has a ``q_proj`` child."""
    modules = []
    for n in names:
        parts = n.split(".")
        if "q_proj" in parts:
            mod = ".".join(parts[:parts.index("q_proj")])
            if mod not in modules:
                modules.append(mod)
    groups = []
    for mod in sorted(modules, key=natural_key):
        for short, proj in _QKV:
            prefix = f"{mod}.{proj}" if mod else proj
            hit = [n for n in names if n == prefix or n.startswith(prefix + ".")]
            if hit:
                groups.append(Group(f"{mod}.{short}" if mod else short, tuple(hit)))
    if not groups:
        raise UsageError("group 'qkv' found no q_proj/k_proj/v_proj parameters in this run")
    return groups


def parse_group(spec: str, names: Sequence[str] | None) -> list[Group]:
    """The groups one ``--group`` value names (see :data:`GROUP_HELP`).

    ``names``: the run's parameter-tensor names, or None if it has no snapshots (then only ``all``
    exists; :class:`~trajscope.measures.trajectory.NeedsSnapshotsError` is raised by the caller)."""
    spec = spec.strip()
    if not spec:
        raise UsageError("empty group; " + GROUP_HELP.splitlines()[0].lower())
    if spec == "all":
        return [all_group(names)]
    if names is None:
        from trajscope.measures.trajectory import NeedsSnapshotsError

        raise NeedsSnapshotsError(f"group {spec!r} needs parameter snapshots, but the run has only "
                                  "sketches (of all parameters: use group 'all')")
    ordered = sorted(names, key=natural_key)
    if spec == "tensors":
        return [Group(n, (n,)) for n in ordered]
    if spec == "layers":
        layers: dict[str, list[str]] = {}
        for n in ordered:
            layers.setdefault(layer_of(n), []).append(n)
        return [Group(k, tuple(v)) for k, v in sorted(layers.items(), key=lambda kv: natural_key(kv[0]))]
    if spec == "qkv":
        return _qkv(ordered)
    if "=" in spec:
        name, _, pats = spec.partition("=")
        patterns = [p.strip() for p in pats.split(",") if p.strip()]
        if not name.strip() or not patterns:
            raise UsageError(f"bad group {spec!r}: write NAME=GLOB[,GLOB...]")
        return [_glob(name.strip(), patterns, names, spec)]
    return [_glob(spec, [spec], names, spec)]


def parse_groups(specs: str | Iterable[str] | None, names: Sequence[str] | None) -> list[Group]:
    """All groups named by ``specs`` (None: ``["all"]``), in order, without repeats.  Two different
    groups of the same name raise a UsageError."""
    if specs is None:
        specs = ["all"]
    elif isinstance(specs, str):
        specs = [specs]
    out: dict[str, Group] = {}
    for spec in specs:
        for g in parse_group(str(spec), names):
            if g.name in out and out[g.name] != g:
                raise UsageError(f"two different groups are named {g.name!r}; rename one with NAME=GLOB")
            out[g.name] = g
    return list(out.values())
