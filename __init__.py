"""ComfyUI entry point: ComfyUI-Manager (or `git clone`) puts this repository in custom_nodes/,
and ComfyUI imports this file and awaits its `comfy_entrypoint` (the V3 schema's extension
holding the Distillation++ Sampler and Guider nodes). The node uses the kdistpp package of this checkout, which needs
only torch, numpy, scipy and tqdm (ComfyUI has them); an already imported kdistpp is kept.
"""

import importlib.util
import os
import sys

if "kdistpp" not in sys.modules:
    _package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kdistpp")
    _spec = importlib.util.spec_from_file_location("kdistpp", os.path.join(_package, "__init__.py"),
                                                   submodule_search_locations=[_package])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kdistpp"] = _module
    _spec.loader.exec_module(_module)

from kdistpp.integrations.comfyui import comfy_entrypoint  # noqa: E402  (ComfyUI's V3 entry point)

__all__ = ["comfy_entrypoint"]
