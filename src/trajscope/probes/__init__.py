"""Online measurements during training (see :mod:`trajscope.probes.base`)."""

from trajscope.probes.base import REGISTRY, Probe, all_probes, register

__all__ = ["REGISTRY", "Probe", "all_probes", "register"]
