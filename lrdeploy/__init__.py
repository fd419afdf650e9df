"""lrdeploy: low-rank compression of ONNX / torch models for edge deployment.

Public API: ``lrdeploy.analyze``, ``lrdeploy.compress`` (see ``lrdeploy.api``) and
``lrdeploy.profile`` (``lrdeploy.profiling``). TVM is never
imported here: analysis, compression and export must not pay for it.
"""

__version__ = "0.1.0"

from lrdeploy.api import CompressResult, analyze, compress, load  # noqa: E402
from lrdeploy.errors import LrdeployError  # noqa: E402
from lrdeploy.profiling import ProfileResult, profile  # noqa: E402

__all__ = ["CompressResult", "LrdeployError", "ProfileResult", "__version__", "analyze",
           "compress", "load", "profile"]
