"""Controllers that act on training (see :mod:`trajscope.controllers.base`)."""

from trajscope.controllers.base import KIND, REGISTRY, Controller, all_controllers, register

__all__ = ["KIND", "REGISTRY", "Controller", "all_controllers", "register"]

# Importing a controller module registers its controllers (add new modules below).
from trajscope.controllers import race as _race  # noqa: F401,E402
from trajscope.controllers.base import LoopHooks, MemoryRun  # noqa: E402,F401
from trajscope.controllers import stability as _stability  # noqa: F401,E402
from trajscope.controllers import freeze as _freeze  # noqa: F401,E402
from trajscope.controllers import prune as _prune  # noqa: F401,E402
from trajscope.controllers import explr as _explr  # noqa: F401,E402
