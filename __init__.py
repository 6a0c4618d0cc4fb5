"""ComfyUI entry point: ComfyUI-Manager (or `git clone`) puts this repository in custom_nodes/,
and ComfyUI imports this file and awaits its `comfy_entrypoint` (the V3 schema's extension
holding the Distillation++ Sampler and Guider nodes). The nodes use the kdistpp package of this
checkout, which needs only torch, numpy, scipy and tqdm (ComfyUI has them); an already imported
kdistpp is kept.

A clone is a folder named kdistpp, so a script run in the folder that holds it imports this file
as the top-level package `kdistpp`: then the library (the inner kdistpp/ package) takes this
module's place in sys.modules, and `import kdistpp` gives the library as from an installed copy.
"""

import importlib.util
import os
import sys

__all__ = ["comfy_entrypoint"]


def _load_library():
    """Executes this checkout's kdistpp/ package as the top-level module `kdistpp`."""
    package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kdistpp")
    spec = importlib.util.spec_from_file_location("kdistpp", os.path.join(package, "__init__.py"),
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kdistpp"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("kdistpp", None)
        raise
    return module


if __name__ == "kdistpp":
    # Imported as the package `kdistpp` itself (the clone's parent folder is on sys.path): Python's
    # import returns sys.modules["kdistpp"] after this file runs, so the library replaces this shim.
    # A host that named the module kdistpp and keeps this object still finds the entry point.
    _load_library()

    def __getattr__(name):
        if name in __all__:
            from kdistpp.integrations import comfyui

            return getattr(comfyui, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
else:
    if "kdistpp" not in sys.modules:
        _load_library()

    from kdistpp.integrations.comfyui import comfy_entrypoint  # noqa: E402  (ComfyUI's V3 entry point)
