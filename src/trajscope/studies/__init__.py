"""Reproductions of published early-phase findings, one file each (see :mod:`trajscope.studies.base`)."""

from trajscope.studies.base import (REGISTRY, Finding, Study, StudyContext, StudyResult, all_studies, get,
                                    register, run_study)

__all__ = ["REGISTRY", "Finding", "Study", "StudyContext", "StudyResult", "all_studies", "get", "register",
           "run_study"]

# Importing a study module registers it (add new modules below).
from trajscope.studies import catapult as _catapult  # noqa: F401,E402
from trajscope.studies import explr as _explr  # noqa: F401,E402
from trajscope.studies import edge_of_stability as _edge_of_stability  # noqa: F401,E402
from trajscope.studies import kernel_motion as _kernel_motion  # noqa: F401,E402
from trajscope.studies import directional as _directional  # noqa: F401,E402
from trajscope.studies import bn_only as _bn_only  # noqa: F401,E402
from trajscope.studies import grokking as _grokking  # noqa: F401,E402
from trajscope.studies import heavy_tail as _heavy_tail  # noqa: F401,E402
from trajscope.studies import early_phase as _early_phase  # noqa: F401,E402
