"""ComfyUI custom node package for kdistpp: link or copy this folder into ComfyUI/custom_nodes/.

Uses an installed kdistpp if there is one, else the checkout this folder lives in (the package
needs only torch and tqdm, which ComfyUI has).
"""

import os
import sys

try:
    import kdistpp  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from kdistpp.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
