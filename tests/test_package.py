"""The package as a user meets it: a light import, the demo, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

from kdistpp.demo import format_table, run_demo


def test_import_pulls_no_k_diffusion_and_no_heavy_extras():
    code = ("import sys, kdistpp; heavy = [m for m in ('k_diffusion', 'clip', 'torchvision', 'cleanfid', 'wandb', 'scipy') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_demo_writes_its_table_and_png(tmp_path):
    rows, path = run_demo(n=300, out_dir=str(tmp_path))
    table = format_table(rows)
    assert [r["method"].split(" ")[0] for r in rows] == ["student", "student++", "teacher,", "teacher,", "data"]
    assert "sliced W2" in table and len(table.splitlines()) == 2 + len(rows)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 1000


def test_cli_demo_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kdistpp", "demo", "--n", "200", "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert "student++" in out.stdout and os.path.exists(tmp_path / "demo_scatter.png")
    bad = subprocess.run([sys.executable, "-m", "kdistpp", "dmeo"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stdout
