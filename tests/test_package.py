"""The package as a user meets it: a light import, the demo, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


def _run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_sfd_and_integrations_load_on_first_access_only():
    code = ("import sys, kdistpp; names = ('kdistpp.sfd', 'kdistpp.integrations'); "
            "before = [n in sys.modules for n in names]; kdistpp.sfd.SFDTrainer; kdistpp.integrations; "
            "print(before, [n in sys.modules for n in names], 'sfd' in dir(kdistpp))")
    assert _run_python(code) == "[False, False] [True, True] True"


def test_unknown_attribute_is_an_attribute_error():
    import kdistpp

    try:
        kdistpp.no_such_thing
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("no AttributeError")


def test_help_names_the_public_pieces():
    import pydoc

    import kdistpp

    text = pydoc.render_doc(kdistpp, renderer=pydoc.plaintext)
    doc = kdistpp.__doc__
    for name in ("sample_euler_distpp", "sample_euler_ancestral_distpp", "sample_dpmpp_2s_ancestral_distpp",
                 "sample_dpmpp_2m_distpp", "sample_consistency_distpp", "sample_consistency", "teacher_guided",
                 "get_sigmas_karras", "CFGDenoiser", "toys", "metrics", "kdistpp.sfd", "kdistpp.integrations",
                 "python -m kdistpp demo"):
        assert name in doc, name
    assert doc.split("\n\n")[0] in text


def test_cli_help_lists_the_commands_and_the_demo_options():
    for argv in (["--help"], ["-h"], []):
        out = subprocess.run([sys.executable, "-m", "kdistpp", *argv], capture_output=True, text=True)
        assert out.returncode == (2 if not argv else 0)
        assert "demo" in out.stdout
        for option in ("--n", "--seed", "--steps", "--w", "--form", "--out", "--device"):
            assert option in out.stdout, (argv, option)
    demo = subprocess.run([sys.executable, "-m", "kdistpp", "demo", "--help"], capture_output=True, text=True, check=True)
    assert "--device" in demo.stdout and "interpolate" in demo.stdout


def test_example_script_takes_a_device_and_installs_as_the_readme_says():
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "sdxl_lightning_distpp.py")
    with open(example) as f:
        source = f.read()
    with open(os.path.join(os.path.dirname(example), "..", "README.md")) as f:
        readme = f.read()
    install = 'pip install -e ".[diffusers]"'
    assert install in source and install in readme
    out = subprocess.run([sys.executable, example, "--help"], capture_output=True, text=True, check=True)
    assert "--device" in out.stdout


def test_readme_names_what_the_skip_reasons_and_the_test_extra_need():
    import re

    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    tests = os.path.join(root, "tests")
    variables, folders = set(), set()
    for name in os.listdir(tests):
        if name.endswith(".py"):
            with open(os.path.join(tests, name)) as f:
                text = f.read()
            variables |= set(re.findall(r"KDISTPP_(?:COMFYUI|A1111|FORGE)", text))
            folders |= set(re.findall(r"\.\./shared/hosts/[\w.-]+", text))  # default folders skip reasons name
    assert variables == {"KDISTPP_COMFYUI", "KDISTPP_A1111", "KDISTPP_FORGE"} and folders
    for needed in (*variables, *folders, ".ci/run", "numpy < 2", "k-diffusion"):
        assert needed in readme, needed


def _clone_layout(tmp_path):
    """A folder holding a copy of this checkout named kdistpp, as `git clone` makes it (the root
    __init__.py and the kdistpp/ package; the rest of the tree plays no part in the import)."""
    import shutil

    root = os.path.join(os.path.dirname(__file__), "..")
    clone = tmp_path / "kdistpp"
    clone.mkdir()
    shutil.copy(os.path.join(root, "__init__.py"), clone / "__init__.py")
    shutil.copytree(os.path.join(root, "kdistpp"), clone / "kdistpp", ignore=shutil.ignore_patterns("__pycache__"))
    return clone


def test_a_script_beside_the_clone_imports_the_library(tmp_path):
    clone = _clone_layout(tmp_path)
    code = ("import kdistpp, kdistpp.flow; from kdistpp import sample_euler_distpp; "
            "print(kdistpp.__file__); print(kdistpp.flow.__file__); print(kdistpp.get_sigmas_karras(2, 0.1, 10).shape)")
    # cwd first on sys.path, as for a script run there; no PYTHONPATH pointing at an installed copy
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(clone / "kdistpp" / "__init__.py")
    assert lines[1] == str(clone / "kdistpp" / "flow.py")
    assert lines[2] == "torch.Size([3])"


def test_the_clone_loaded_as_comfyui_loads_it_exports_the_entry_point(tmp_path):
    clone = _clone_layout(tmp_path)
    # ComfyUI 0.8.0's load_custom_node: the module is named after the folder's path, '.' -> '_x_'
    code = ("import importlib.util, sys; p = sys.argv[1]; name = p.replace('.', '_x_'); "
            "spec = importlib.util.spec_from_file_location(name, p + '/__init__.py'); "
            "m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m); "
            "import kdistpp, kdistpp.integrations.comfyui as c; "
            "print(m.comfy_entrypoint is c.comfy_entrypoint and not hasattr(m, 'NODE_CLASS_MAPPINGS'), "
            "kdistpp.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, str(clone)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    flag, path = out.stdout.split()
    assert flag == "True"
    assert path == str(clone / "kdistpp" / "__init__.py")  # the node uses its own checkout's library


@pytest.mark.parametrize("argv,text", [
    (["--steps", "1"], "argument --steps: 1 is below 2"),
    (["--n", "0"], "argument --n: 0 is below 1"),
    (["--n", "many"], "argument --n: 'many' is not an integer"),
    (["--w", "-1"], "argument --w: -1 is not a finite weight"),
    (["--w", "nan"], "argument --w: nan is not a finite weight"),
    (["--device", "gpu0"], "argument --device: 'gpu0' is not a torch device"),
])
def test_cli_bad_arguments_are_usage_errors(argv, text, capsys, tmp_path):
    from kdistpp.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["demo", *argv, "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: python -m kdistpp demo") and err[-1].startswith("python -m kdistpp demo: error: ")
    assert text in err[-1] and not any("Traceback" in line for line in err)
    assert not os.listdir(tmp_path)  # nothing ran


def test_cli_smallest_arguments_run(tmp_path):
    from kdistpp.demo import build_parser, run_demo

    args = build_parser().parse_args(["--steps", "2", "--n", "1", "--w", "0", "--out", str(tmp_path)])
    rows, _ = run_demo(args.n, args.seed, args.steps, args.w, args.form, args.out, args.device)
    assert len(rows) == 5
