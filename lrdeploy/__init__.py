"""lrdeploy: low-rank compression of ONNX / torch models for edge deployment.

Public API: ``lrdeploy.analyze``, ``lrdeploy.compress``, ``lrdeploy.plan_for_budget`` with
``lrdeploy.Budget`` (see ``lrdeploy.api``) and
``lrdeploy.profile`` (``lrdeploy.profiling``). TVM is never
imported here: analysis, compression and export must not pay for it.
"""

__version__ = "0.1.0"

from lrdeploy.api import (  # noqa: E402
    Budget,
    CompressResult,
    analyze,
    compress,
    load,
    plan_for_budget,
)
from lrdeploy.errors import LrdeployError  # noqa: E402
from lrdeploy.profiling import ProfileResult, profile  # noqa: E402

__all__ = ["Budget", "CompressResult", "LrdeployError", "ProfileResult", "__version__", "analyze",
           "compress", "load", "plan_for_budget", "profile"]
