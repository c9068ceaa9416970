"""Online measurements during training (see :mod:`trajscope.probes.base`)."""

from trajscope.probes.base import REGISTRY, Probe, all_probes, register

__all__ = ["REGISTRY", "Probe", "all_probes", "register"]

# Importing a probe module registers its probes (the conformance test runs every registered one).
from trajscope.probes import sharpness as _sharpness  # noqa: F401,E402
from trajscope.probes import noise as _noise  # noqa: F401,E402
from trajscope.probes import kernel as _kernel  # noqa: F401,E402
from trajscope.probes import training_set as _training_set  # noqa: F401,E402
