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


def test_benchmark_entry_point_writes_every_section(tmp_path):
    text = load("run").main(["--tiny", "--device", "cpu", "--docs", str(tmp_path)])
    assert (tmp_path / "benchmarks.md").read_text() == text
    for heading in ("## Headline", "## One guided step", "## Forms and w", "## Quality", "## Compute-matched", "## Renoise", "## Conditional generation", "## Digits with a CFG teacher",
                    "## The 2-D picture", "## Overhead", "## Real-size cost",
                    "## SFD"):
        assert heading in text, heading
    for png in ("forms_w.png", "compute_matched.png", "toy_2d.png", "sfd_digits.png", "conditional_forms.png",
                "conditional_tradeoff.png"):
        assert (tmp_path / "img" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
