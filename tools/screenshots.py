"""Regenerates the docs' screenshots of ComfyUI's and the A1111 webui's pages (docs/img/comfyui_*.png,
docs/img/webui_*.png) by running the browser tests that take them.

    KDISTPP_COMFYUI=<ComfyUI 0.8.0 tree> KDISTPP_A1111=<A1111 1.10.1 tree> python tools/screenshots.py

The tests run in the venvs that hold each host's requirements (.venv-comfyui, .venv-a1111; override
with KDISTPP_COMFYUI_PYTHON / KDISTPP_A1111_PYTHON) with KDISTPP_SCREENSHOTS set to the output folder
(docs/img, or the first argument). A screenshot is saved only by a test that got that far, so a
failing or skipped test leaves the old picture: this script then names it and exits non-zero.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = (  # (host variable, venv python variable, default venv, test file, extra pytest flags)
    ("KDISTPP_COMFYUI", "KDISTPP_COMFYUI_PYTHON", ".venv-comfyui", "tests/test_host_comfyui_browser.py", []),
    ("KDISTPP_A1111", "KDISTPP_A1111_PYTHON", ".venv-a1111", "tests/test_host_a1111_browser.py",
     ["-p", "no:cacheprovider"]),
)
SHOTS = ("comfyui_search.png", "comfyui_node.png", "comfyui_guider_node.png", "comfyui_templates.png", "comfyui_workflow.png",
         "webui_panel.png", "webui_generate.png")


def main(argv: list[str]) -> int:
    folder = Path(argv[0]).resolve() if argv else REPO / "docs" / "img"
    missing = [host for host, *_ in RUNS if not os.environ.get(host)]
    if missing:
        print(f"set {' and '.join(missing)} to the host program's folder (see docs/comfyui.md, docs/webui.md)",
              file=sys.stderr)
        return 2
    start = time.time()
    failed = 0
    for host, python_var, venv, tests, flags in RUNS:
        python = os.environ.get(python_var, str(REPO / venv / "bin" / "python"))
        env = {**os.environ, host: str(Path(os.environ[host]).resolve()), "KDISTPP_SCREENSHOTS": str(folder),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        # -rs: a skipped test (a missing browser or package) says why instead of passing silently
        result = subprocess.run([python, "-m", "pytest", "-q", "-rs", *flags, tests], cwd=REPO, env=env)
        failed |= result.returncode != 0
    stale = [name for name in SHOTS if not (folder / name).is_file() or (folder / name).stat().st_mtime < start]
    print(f"screenshots in {folder}:", *SHOTS)
    if stale:  # a skipped test saves nothing and exits 0
        print("not taken this time:", *stale, file=sys.stderr)
    return 1 if failed or stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
