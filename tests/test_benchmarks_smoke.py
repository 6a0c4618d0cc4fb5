"""The benchmark scripts run and write their tables (no timing is asserted here)."""

from __future__ import annotations

import importlib.util
import pathlib


def load(name):
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_benchmark_writes_its_table(tmp_path):
    out = tmp_path / "overhead.md"
    load("overhead").main(["--repeats", "2", "--steps", "2", "--out", str(out), "--device", "cpu"])
    text = out.read_text()
    assert "| comparison |" in text and text.count("\n| ") >= 7
