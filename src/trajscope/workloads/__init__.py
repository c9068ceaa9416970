"""Workloads by name: ``get("mnist1d-cnn")``, ``names()``."""

from trajscope.workloads.base import LOSSES, Data, Workload, all_workloads, get, names, register

# Importing the modules registers their workloads.
from trajscope.workloads import mnist1d as _mnist1d  # noqa: F401,E402
from trajscope.workloads import digits as _digits  # noqa: F401,E402
from trajscope.workloads import mnist5k as _mnist5k  # noqa: F401,E402
from trajscope.workloads import modadd as _modadd  # noqa: F401,E402
from trajscope.workloads import cifar as _cifar  # noqa: F401,E402
from trajscope.workloads import pretext as _pretext  # noqa: F401,E402
from trajscope.workloads import zipf as _zipf  # noqa: F401,E402

__all__ = ["LOSSES", "Data", "Workload", "all_workloads", "get", "names", "register"]
