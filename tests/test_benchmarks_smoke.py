"""The benchmark runner runs its tiny setting and writes what it should, where it should (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).parent.parent
HEADINGS = ("## Headline", "## One guided step", "## Forms and w", "## Quality", "## Compute-matched", "## Renoise",
            "## Conditional generation", "## Digits with a CFG teacher", "## Flow-matching students",
            "## The 2-D picture", "## Overhead", "## Real-size cost", "## SFD: trajectory", "## SFD on a flow teacher",
            "## SFD on an SD-architecture UNet", "## SFD on a flow transformer")
SECTIONS = ("headline", "displacement", "forms", "quality", "compute_matched", "renoise", "conditional", "digits_cfg",
            "flow", "picture", "overhead", "sdxl", "sfd", "sfd_flow", "sfd_unet", "sfd_flow_transformer")
PNG = b"\x89PNG\r\n\x1a\n"


def load(name):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run():
    return load("run")


@pytest.fixture(scope="module")
def tiny(run, tmp_path_factory):
    """One tiny run of every section into a scratch folder: (folder, the page it returned)."""
    out = tmp_path_factory.mktemp("bench")
    return out, run.main(["--tiny", "--device", "cpu", "--out", str(out)])


def sections(text: str) -> dict:
    """Page text per '## ' heading."""
    parts = ("\n" + text).split("\n## ")[1:]
    return {"## " + p.partition("\n")[0]: p for p in parts}


def label_line(part: str) -> str:
    return next(line for line in part.splitlines() if line.startswith("> "))


@pytest.mark.filterwarnings("error::kdistpp.GuidanceWarning", "error::kdistpp.ParametrizationWarning")
def test_tiny_run_writes_every_section_under_its_label(tiny):
    """(The tiny run, in this test's set-up, asks for no setting that warns: the benchmarks pass what acts.)"""
    out, text = tiny
    assert (out / "benchmarks.md").read_text() == text
    by_heading = sections(text)
    for heading in HEADINGS:
        part = next(v for k, v in by_heading.items() if k.startswith(heading))
        line = label_line(part)
        assert line.startswith("> Setting: **tiny**: "), (heading, line)
        assert "Device: " in line and "CPU" in line, line
        assert "Command: `.venv/bin/python benchmarks/run.py --tiny --device cpu --out " in line, line
    labels = json.loads((out / "bench" / "labels.json").read_text())
    assert set(labels) == set(SECTIONS)
    assert {v["setting"] for v in labels.values()} == {"tiny"}
    assert labels["forms"]["sizes"].startswith("200 samples, tuning seeds 100, 101, dimensions 2, w in [")
    # the tiny UNet says so in its own text, and the toy sections ran on one thread
    assert "**Tiny UNet**" in by_heading["## Real-size cost: SDXL UNet (Table 2 wall time)"]
    assert "tiny SDXL-architecture UNet" in labels["sdxl"]["sizes"]
    assert ", 1 thread," in labels["quality"]["device"]
    # the flow section: flow students from s = 1, its controls, and where it does not help said in words
    flow = next(v for k, v in by_heading.items() if k.startswith("## Flow-matching students"))
    assert labels["flow"]["sizes"].startswith("100 samples, seeds 0, 1, tuning seeds 100, 101, dimensions 2, ")
    for phrase in ("converged teacher", "teacher, same NFE", "student, +2 steps", "control: eps, step 1",
                   "| consistency |"):
        assert phrase in flow, phrase
    assert "**Where Distillation++ does not help.**" in flow or "helped every student and sampler" in flow
    # SFD on a flow teacher: flow students against the teacher at the same NFE, and a plain verdict
    sfd_flow = next(v for k, v in by_heading.items() if k.startswith("## SFD on a flow teacher"))
    assert labels["sfd_flow"]["sizes"].startswith("teacher: 60 DSM iterations, hidden 64; students: 4 SFD batches; ")
    for phrase in ("| SFD flow student |", "| teacher, flow Euler (DDIM) |", "teacher, converged (3M, 100 steps)",
                   "SFD + Distillation++ (interpolate, w=0.3, first step)", "**Where it does not help.**"):
        assert phrase in sfd_flow, phrase
    # no words about how the project was made
    for phrase in ("issue", "lent to", "No GPU"):
        assert phrase not in text, phrase
    assert json.loads((out / "bench" / "tuned_settings.json").read_text()).keys() == {"tiny"}
    for png in ("forms_w.png", "compute_matched.png", "toy_2d.png", "sfd_digits.png", "conditional_forms.png",
                "conditional_tradeoff.png"):
        assert (out / "img" / png).read_bytes()[:8] == PNG


def test_only_relabels_one_section_and_announces_its_sweep(run, tiny, tmp_path, capsys):
    out, text = tiny
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    (tmp_path / "bench" / "tuned_settings.json").unlink()  # `--only picture` then needs the forms sweep first
    before = json.loads((tmp_path / "bench" / "labels.json").read_text())
    capsys.readouterr()
    page = run.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--only", "picture"])
    printed = capsys.readouterr().out
    assert "[forms sweep]" in printed and "running the forms sweep first" in printed
    assert "forms sweep: 100%" in printed  # its progress bar
    after = json.loads((tmp_path / "bench" / "labels.json").read_text())
    assert after["picture"]["command"].endswith("--only picture")
    assert {k: v for k, v in after.items() if k != "picture"} == {k: v for k, v in before.items() if k != "picture"}
    old, new = sections(text), sections(page)
    assert old.keys() == new.keys()
    for heading in new:
        if heading.startswith("## The 2-D picture"):
            assert "--only picture`" in label_line(new[heading])
        else:
            assert new[heading] == old[heading], heading


def test_assemble_rewrites_the_page_from_stored_labels(run, tiny, tmp_path):
    out, _ = tiny
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    labels = json.loads((tmp_path / "bench" / "labels.json").read_text())
    labels["sfd"]["device"] = "a test device"
    (tmp_path / "bench" / "labels.json").write_text(json.dumps(labels))
    (tmp_path / "bench" / "overhead.md").unlink()
    page = run.main(["--assemble", "--out", str(tmp_path)])
    assert "## Overhead" not in page
    assert "Device: a test device." in label_line(sections(page)["## SFD: trajectory-distilled students, and "
                                                                    "Distillation++ on top"])
    assert (tmp_path / "benchmarks.md").read_text() == page


def test_committed_page_is_the_assembly_of_its_fragments(run, tmp_path):
    """docs/benchmarks.md is what the runner assembles from docs/bench/: nobody edited it by hand."""
    shutil.copytree(ROOT / "docs" / "bench", tmp_path / "bench")
    assert run.main(["--assemble", "--out", str(tmp_path)]) == (ROOT / "docs" / "benchmarks.md").read_text()


def test_quick_and_tiny_write_to_a_scratch_folder_unless_asked(run):
    assert run.out_dir(run.parse([])) == str(ROOT / "docs")
    assert run.out_dir(run.parse(["--quick"])) == str(ROOT / "build" / "bench-quick")
    assert run.out_dir(run.parse(["--tiny"])) == str(ROOT / "build" / "bench-tiny")
    assert run.out_dir(run.parse(["--quick", "--out", "docs"])) == str(pathlib.Path("docs").resolve())
    assert run.sdxl_tiny(run.parse(["--quick"])) and not run.sdxl_tiny(run.parse(["--quick", "--real-sdxl"]))
    assert not run.sdxl_tiny(run.parse([]))
