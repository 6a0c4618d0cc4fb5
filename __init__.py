"""ComfyUI entry point: ComfyUI-Manager (or `git clone`) puts this repository in custom_nodes/,
and ComfyUI imports this file. The node uses the kdistpp package of this checkout, which needs
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

from kdistpp.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
