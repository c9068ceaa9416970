"""Dense operators for frozen convolutions: a frozen layer is a constant linear map, so build it once.

Once a convolution's weight (and bias) no longer trains, the layer is a fixed affine map of its
input, ``y = M x + b`` with ``M`` of shape ``(out_numel, in_numel)`` per sample. For a small
feature map one matrix product with that dense ``M`` is cheaper than the convolution kernel
(oneDNN's fixed cost per call dominates small layers on a CPU), and its backward is one more
matrix product, ``grad_x = grad_y M``, instead of the convolution's backward-data pass. Only a
frozen layer can use this: a trained weight would need ``M`` rebuilt at every step.

:func:`install_frozen_ops` overrides ``forward`` on the instance of every convolution
(``nn.Conv1d/2d/3d``, any stride, padding, padding mode, dilation, groups, bias) whose parameters
all have ``requires_grad=False``; :func:`remove_frozen_ops` undoes it. ``M`` is built the first time
a per-sample input shape is seen, by the module's own convolution applied to the identity basis (so
each entry is exactly a weight value or zero), and used only if it has at most ``max_entries``
entries (default 64 Ki: 256 KiB in float32, so that ``M`` stays in a CPU core's L2 cache beside
the activations). The dense product does more multiply-adds than the convolution
(``in_numel / (in_channels / groups * kernel_numel)`` times as many), so it pays only where the
kernel's fixed cost dominates; on ``mnist1d-cnn`` (one CPU thread, batch 128) it was faster for the
first (M 640 x 40) and third (160 x 320) convolutions and slower for the second (320 x 640, 800
KiB, which the cap excludes). Timing both paths on the first batch (as
``torch.backends.cudnn.benchmark`` does) was tried and picked the dense path for the second
convolution too: in a timing loop ``M`` is cache-hot, in a training step it is not.

The module falls back to its own ``forward`` (exactly the unmodified layer) when a parameter trains
again, when its parameters are other tensors than at the install (as under
``torch.func.functional_call``), for an unbatched input, another dtype or device, and under
autocast; ``M`` is rebuilt if the weight or bias was written in place (their ``_version`` changed,
e.g. by ``load_state_dict``) or moved to another dtype or device (``module.double()``).
Nothing is registered as a parameter or buffer: ``state_dict()`` and the parameter list are
unchanged. Results equal the unmodified layer to float rounding (a different summation order).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trajscope.errors import UsageError

MODES = ("dense", "native")
DEFAULT_MAX_ENTRIES = 1 << 16
_ATTR = "_trajscope_frozen_op"
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MISSING = object()


@dataclass
class _Plan:
    """Per-sample input shape -> dense operator (or None: native), for one module."""

    max_entries: int
    slots: dict  # the module's ``_parameters`` at the install, None entries included (a copy)
    versions: list = field(default_factory=list)  # [dtype, device, _version...] when the operators were built
    params: tuple[torch.Tensor, ...] = ()  # the non-None slots (functional_call swaps them)

    def __post_init__(self) -> None:
        self.params = tuple(p for p in self.slots.values() if p is not None)
    dense: dict[tuple[int, ...], "_Dense | None"] = field(default_factory=dict)


@dataclass
class _Dense:
    matrix: torch.Tensor  # (out_numel, in_numel)
    bias: torch.Tensor | None  # (out_numel,)
    out_shape: tuple[int, ...]  # per sample, e.g. (C_out, L_out)


def _frozen(module: nn.Module) -> bool:
    params = _own_params(module)
    return bool(params) and not any(p.requires_grad for p in params)


@torch.no_grad()
def dense_operator(module: nn.Module, in_shape: tuple[int, ...], max_entries: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]] | None:
    """(M, b, out_shape) of a convolution for per-sample input shape ``in_shape``: the module's
    output for a batch ``x`` of that shape is ``(x.flatten(1) @ M.T + b).view(-1, *out_shape)``.
    None if ``M`` would have more than ``max_entries`` entries. Built from the identity basis in
    chunks of at most ``max(max_entries, in_numel)`` input entries (memory stays about ``M``'s)."""
    w = module.weight
    zero = torch.zeros(1, *in_shape, dtype=w.dtype, device=w.device)
    y0 = module._conv_forward(zero, w, module.bias)  # (1, *out_shape): the bias map
    out_shape, n_in, n_out = tuple(y0.shape[1:]), zero.numel(), y0.numel()
    if max_entries is not None and n_in * n_out > max_entries:
        return None
    matrix = torch.empty(n_out, n_in, dtype=w.dtype, device=w.device)
    chunk = max(1, (max_entries or n_in * n_in) // n_in)
    for j in range(0, n_in, chunk):
        k = min(chunk, n_in - j)
        basis = torch.zeros(k, n_in, dtype=w.dtype, device=w.device)
        basis[torch.arange(k), torch.arange(j, j + k)] = 1
        matrix[:, j:j + k] = module._conv_forward(basis.view(k, *in_shape), w, None).reshape(k, n_out).t()
    bias = None if module.bias is None else y0.reshape(-1).contiguous()
    return matrix, bias, out_shape


def _dense_apply(d: _Dense, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.flatten(1), d.matrix, d.bias).view(x.shape[0], *d.out_shape)


def _own_params(module: nn.Module) -> tuple[torch.Tensor, ...]:
    return tuple(p for p in module._parameters.values() if p is not None)


def _plan_for(module: nn.Module, plan: _Plan, x: torch.Tensor) -> _Dense | None:
    """The dense operator for ``x``'s per-sample shape, or None: the module's own forward.

    Called at every forward of a frozen convolution, so every check is a cheap attribute test:
    the same parameter objects as at the install (``functional_call`` swaps them), none
    trainable, no autocast, ``x`` batched with the weight's dtype and device."""
    slots = module._parameters
    if len(slots) != len(plan.slots):
        return None
    for name, q in plan.slots.items():
        if slots.get(name) is not q:
            return None
    for p in plan.params:
        if p.requires_grad:
            return None
    w = plan.params[0]
    if torch.is_autocast_enabled() or x.dim() != w.dim() or x.dtype != w.dtype or x.device != w.device:
        return None
    versions = [w.dtype, w.device] + [p._version for p in plan.params]
    if versions != plan.versions:  # written in place or converted: every operator is stale
        plan.dense.clear()
        plan.versions = versions
    key = tuple(x.shape[1:])
    d = plan.dense.get(key, _MISSING)
    if d is _MISSING:
        built = dense_operator(module, key, plan.max_entries)
        d = plan.dense[key] = None if built is None else _Dense(*built)
    return d


def _frozen_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    plan: _Plan | None = self.__dict__.get(_ATTR)
    d = None if plan is None else _plan_for(self, plan, x)
    return type(self).forward(self, x) if d is None else _dense_apply(d, x)


def install_frozen_ops(model: nn.Module, mode: str = "dense", max_entries: int = DEFAULT_MAX_ENTRIES) -> list[str]:
    """Give every frozen convolution of ``model`` the dense path (module docstring); return the
    names of the modules given it (whether ``M`` fits is decided at each one's first call).
    ``mode="native"`` installs nothing (and removes an earlier install)."""
    if mode not in MODES:
        raise UsageError(f"frozen_ops must be one of {', '.join(MODES)}, got {mode!r}")
    if int(max_entries) < 1:
        raise UsageError(f"frozen_ops: max_entries must be >= 1, got {max_entries}")
    remove_frozen_ops(model)
    if mode == "native":
        return []
    names = []
    for name, m in model.named_modules():
        if isinstance(m, _CONV_TYPES) and _frozen(m):
            m.__dict__[_ATTR] = _Plan(int(max_entries), dict(m._parameters))
            m.forward = types.MethodType(_frozen_forward, m)
            names.append(name)
    return names


def remove_frozen_ops(model: nn.Module) -> None:
    """Undo :func:`install_frozen_ops`: every module runs its own ``forward`` again."""
    for m in model.modules():
        if _ATTR in m.__dict__:
            del m.__dict__[_ATTR]
            m.__dict__.pop("forward", None)


def dense_modules(model: nn.Module) -> dict[str, list[list[int]]]:
    """Module name -> the per-sample input shapes it runs on the dense path (after its first calls)."""
    return {name: [list(k) for k, d in m.__dict__[_ATTR].dense.items() if d is not None]
            for name, m in model.named_modules() if _ATTR in m.__dict__}
