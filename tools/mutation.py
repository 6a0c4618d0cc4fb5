"""Mutation testing of kdistpp's core and SFD files: does the suite notice a small change in the code?

Each mutant changes one operator or constant (+ <-> -, * <-> /, < <-> <=, == <-> !=, and <-> or,
`not x` -> `x`, a number n -> n + 1, True <-> False) in one module; the tests that cover that module
run against it in a scratch copy of the repository; a failing test (or a crash, or a time-out)
kills the mutant. Survivors are listed for review: each is either fixed by a new test or argued
equivalent in docs/mutation.md.

    .venv/bin/python tools/mutation.py                 # all scoped files, 2 workers
    .venv/bin/python tools/mutation.py kdistpp/cfg.py  # one file
    .venv/bin/python tools/mutation.py --list          # the mutants, not run

Per-mutant test selection (the default; --no-select runs each file's whole scope): one traced run
of the scoped tests records which tests execute each line of the mutated files; a mutant then runs
only the tests that execute the statement it changes, fastest first (a statement no test executes,
e.g. a class attribute read at import, runs the file's whole scope). With one worker and
OMP_NUM_THREADS=1 it stays on one core.

Writes docs/mutation.json (every mutant's outcome; rewritten after each mutant, so a stopped run
keeps what it finished) and docs/mutation.md (score per file, and each survivor with its verdict
from tools/mutation_verdicts.json: why it is equivalent, or which test now kills it). Not part of
CI: it runs the tests hundreds of times.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# fastest and most sensitive first: -x stops at the first failure
CORE_TESTS = ["tests/test_direction.py", "tests/test_sampler_options.py", "tests/test_validation.py",
              "tests/test_model_outputs.py", "tests/test_guidance_settings.py", "tests/test_teacher_guided_schedule.py",
              "tests/test_flow.py", "tests/test_distpp.py", "tests/test_baselines.py", "tests/test_host_comfyui_samplers.py"]
SFD_TESTS = ["tests/test_sfd.py", "tests/test_sfd_mechanics.py"]
SCOPE = {
    "kdistpp/refine.py": CORE_TESTS, "kdistpp/samplers.py": CORE_TESTS, "kdistpp/steps.py": CORE_TESTS,
    "kdistpp/guided_steps.py": CORE_TESTS, "kdistpp/guided_denoiser.py": CORE_TESTS, "kdistpp/cfg.py": CORE_TESTS,
    "kdistpp/validation.py": CORE_TESTS, "kdistpp/sfd/trajectory.py": SFD_TESTS, "kdistpp/sfd/trainer.py": SFD_TESTS,
    "kdistpp/parametrization.py": ["tests/test_flow.py", *CORE_TESTS[:-4], *CORE_TESTS[-3:]],
    "kdistpp/flow.py": ["tests/test_flow.py", "tests/test_integration_diffusers_flow.py", "tests/test_guidance_settings.py"],
}
SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Lt: ast.LtE, ast.LtE: ast.Lt,
         ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.And: ast.Or, ast.Or: ast.And,
         ast.Pow: ast.Mult, ast.FloorDiv: ast.Div, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn,
         ast.NotIn: ast.In}


def _skipped_lines(tree: ast.AST) -> set[int]:
    """Docstrings, annotations and error-message f-strings: mutating them tests nothing."""
    lines = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            lines.update(range(body[0].lineno, body[0].end_lineno + 1))
        if isinstance(node, (ast.AnnAssign, ast.arg)) and getattr(node, "annotation", None) is not None:
            lines.update(range(node.annotation.lineno, node.annotation.end_lineno + 1))
        if isinstance(node, ast.JoinedStr):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def mutation_points(source: str) -> list[tuple[int, str]]:
    """(node index in ast.walk order, description) of every mutable spot."""
    tree = ast.parse(source)
    skip = _skipped_lines(tree)
    points = []
    for k, node in enumerate(ast.walk(tree)):
        line = getattr(node, "lineno", None)
        if line in skip:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in SWAPS:
            points.append((k, f"line {line}: {type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"))
        elif isinstance(node, ast.BoolOp):
            points.append((k, f"line {line}: {type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"))
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAPS:
            points.append((k, f"line {line}: {type(node.ops[0]).__name__} -> {SWAPS[type(node.ops[0])].__name__}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            points.append((k, f"line {line}: drop 'not'"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and line is not None:
            points.append((k, f"line {line}: {node.value!r} -> {node.value + 1!r}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            points.append((k, f"line {line}: {node.value} -> {not node.value}"))
    return points


def mutate(source: str, index: int) -> str:
    tree = ast.parse(source)
    for k, node in enumerate(ast.walk(tree)):
        if k != index:
            continue
        if isinstance(node, ast.BinOp):
            node.op = SWAPS[type(node.op)]()
        elif isinstance(node, ast.BoolOp):
            node.op = SWAPS[type(node.op)]()
        elif isinstance(node, ast.Compare):
            node.ops = [SWAPS[type(node.ops[0])]()]
        elif isinstance(node, ast.UnaryOp):
            return _drop_not(tree, node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            node.value = not node.value
        elif isinstance(node, ast.Constant):
            node.value = node.value + 1
        return ast.unparse(tree)
    raise IndexError(index)


def _drop_not(tree, target):
    class Drop(ast.NodeTransformer):
        def visit_UnaryOp(self, node):
            self.generic_visit(node)
            return node.operand if node is target else node

    return ast.unparse(Drop().visit(tree))


def statement_lines(source: str, line: int) -> range:
    """The lines of the innermost statement containing `line` (a mutated expression may span lines)."""
    best = None
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.stmt) and node.lineno <= line <= node.end_lineno:
            if best is None or node.end_lineno - node.lineno < best.end_lineno - best.lineno:
                best = node
    return range(line, line + 1) if best is None else range(best.lineno, best.end_lineno + 1)


class LineMap:
    """A pytest plugin: which test executed which line of the traced files, and each test's duration."""

    def __init__(self, files: list[str]):
        self.files = {str(Path(f).resolve()) for f in files}
        self.current, self.lines, self.durations, self.failed = None, {}, {}, set()

    def pytest_runtest_logreport(self, report):
        if report.failed:  # a test that fails on the unmutated code kills nothing: never selected
            self.failed.add(report.nodeid)

    def _global(self, frame, event, arg):
        return self._local if frame.f_code.co_filename in self.files else None

    def _local(self, frame, event, arg):
        if event == "line" and self.current is not None:
            self.lines.setdefault((frame.f_code.co_filename, frame.f_lineno), set()).add(self.current)
        return self._local

    def pytest_runtest_protocol(self, item, nextitem):
        import threading

        self.current, start = item.nodeid, time.perf_counter()
        sys.settrace(self._global)
        threading.settrace(self._global)
        try:
            from _pytest.runner import runtestprotocol

            runtestprotocol(item, nextitem=nextitem)
        finally:
            sys.settrace(None)
            threading.settrace(None)
            self.durations[item.nodeid] = time.perf_counter() - start
            self.current = None
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True


def build_line_map(workdir: Path, files: list[str], out: Path) -> None:
    """Runs the union of the files' scoped tests once, traced, in the scratch copy; writes
    {file: {line: [test node ids]}} and the tests' durations to `out`."""
    os.chdir(workdir)
    sys.path.insert(0, str(workdir))
    import pytest

    tests = sorted({t for f in files for t in SCOPE[f]})
    plugin = LineMap([str(workdir / f) for f in files])
    pytest.main(["-q", "-p", "no:cacheprovider", *tests], plugins=[plugin])
    by_file = {}
    for (filename, line), ids in plugin.lines.items():
        by_file.setdefault(str(Path(filename).relative_to(workdir)), {}).setdefault(str(line), sorted(ids))
    out.write_text(json.dumps({"lines": by_file, "durations": plugin.durations, "failed": sorted(plugin.failed)}))


def select_tests(line_map: dict, path: str, source: str, line: int) -> list[str] | None:
    """The tests that execute the mutated statement, fastest first; None when no test does."""
    lines = line_map["lines"].get(path, {})
    ids = set()
    for n in statement_lines(source, line):
        ids.update(lines.get(str(n), ()))
    ids -= set(line_map["failed"])
    if not ids:
        return None
    return sorted(ids, key=lambda t: line_map["durations"].get(t, 0.0))


def preimport() -> None:
    """Heavy imports done once per worker; each mutant runs in a fork that imports kdistpp afresh."""
    import hypothesis  # noqa: F401
    import k_diffusion  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401

    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import hosts

        hosts.import_comfy()
    except BaseException:  # noqa: BLE001 - no ComfyUI here: its tests skip in the mutants too
        pass
    sys.path.remove(str(ROOT / "tests"))
    for name in [m for m in sys.modules if m == "kdistpp" or m.startswith("kdistpp.")]:
        del sys.modules[name]


def run_mutant(workdir: Path, path: str, source: str, tests: list[str], timeout: float) -> str:
    """Writes the mutant into the scratch copy and runs its tests in a forked child."""
    original = (workdir / path).read_text()
    (workdir / path).write_text(source)
    try:
        pid = os.fork()
        if pid == 0:  # child: quiet, in the scratch copy, kdistpp imported from there
            os.chdir(workdir)
            sys.path.insert(0, str(workdir))
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            import pytest

            os._exit(int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])))
        deadline = time.time() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
            if time.time() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return "killed (time-out)"
            time.sleep(0.05)
    finally:
        (workdir / path).write_text(original)


def worker(workdir: str, timeout: float) -> None:
    """Reads jobs (JSON lines: file, index) on stdin, prints one outcome per line."""
    os.environ["KDISTPP_EXAMPLES"] = "10"
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    preimport()
    for line in sys.stdin:
        path, index, tests = json.loads(line)
        source = mutate((Path(workdir) / path).read_text(), index)  # the snapshot the job list was made from
        print(json.dumps(run_mutant(Path(workdir), path, source, tests or SCOPE[path], timeout)), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", default=list(SCOPE))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "mutation.json"))
    parser.add_argument("--update", action="store_true",
                        help="re-run only the named files and replace their rows in the existing report")
    parser.add_argument("--no-select", action="store_true", help="run each file's whole test scope per mutant")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="run again only the mutants that survived in the existing report (after tests were added) "
                             "and replace their rows")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--map", nargs=2, help=argparse.SUPPRESS)  # workdir, output file
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.timeout)
    if args.map:
        os.environ["KDISTPP_EXAMPLES"] = "10"
        return build_line_map(Path(args.map[0]), args.files, Path(args.map[1]))
    jobs = []
    for path in args.files:
        source = (ROOT / path).read_text()
        for index, what in mutation_points(source):
            jobs.append((path, index, what))
    if args.rerun_survivors:
        earlier = json.loads(Path(args.out).read_text())
        again = {(r["file"], r["mutation"]) for r in earlier["results"] if r["outcome"] == "survived"}
        jobs = [job for job in jobs if (job[0], job[2]) in again]
        args.files = sorted({job[0] for job in jobs}, key=args.files.index)
    if args.list:
        print("\n".join(f"{p} {w}" for p, _, w in jobs), f"\n{len(jobs)} mutants", sep="")
        return
    host = ROOT.parent / "shared" / "hosts" / "comfyui-0.8.0"  # the scratch copies have no ../shared
    if host.is_dir():
        os.environ.setdefault("KDISTPP_COMFYUI", str(host))
    scratch = Path(tempfile.mkdtemp(prefix="kdistpp-mutation-"))
    workers = []
    for w in range(args.workers):
        copy_root = scratch / f"w{w}"
        shutil.copytree(ROOT, copy_root, ignore=shutil.ignore_patterns(".venv*", ".git", "__pycache__", "docs", "*.egg-info"))
        workers.append(copy_root)
    args.total = len(jobs)
    args.previous = json.loads(Path(args.out).read_text()) if args.update and Path(args.out).exists() else None
    if args.rerun_survivors:
        args.previous = earlier
    started = time.time()
    line_map = None
    if not args.no_select:
        map_file = scratch / "lines.json"
        subprocess.run([sys.executable, __file__, "--map", str(workers[0]), str(map_file), *args.files], cwd=workers[0],
                       stdout=subprocess.DEVNULL, check=False)
        line_map = json.loads(map_file.read_text())
        print(f"line map of {len(line_map['durations'])} tests in {time.time() - started:.0f} s; failing on the "
              f"unmutated code (never selected): {line_map['failed']}", flush=True)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(w), "--timeout", str(args.timeout)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=w) for w in workers]
    idle, results = list(procs), []
    sources = {path: (ROOT / path).read_text() for path in args.files}

    def one(job):
        path, index, what = job
        line = int(what.split(":")[0].split()[1])
        tests = None if line_map is None else select_tests(line_map, path, sources[path], line)
        proc = idle.pop()
        try:
            proc.stdin.write(json.dumps([path, index, tests]) + "\n")
            proc.stdin.flush()
            outcome = json.loads(proc.stdout.readline())
        finally:
            idle.append(proc)
        print(f"{outcome:18s} {path} {what} ({'whole scope' if tests is None else f'{len(tests)} tests'})", flush=True)
        result = {"file": path, "mutation": what, "outcome": outcome, "tests": "scope" if tests is None else len(tests)}
        results.append(result)
        write(results, args, started, partial=True)
        return result

    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(one, jobs))
    for proc in procs:
        proc.stdin.close()
        proc.wait()
    shutil.rmtree(scratch, ignore_errors=True)
    write(results, args, started, partial=False)


def write(results: list, args, started: float, partial: bool) -> None:
    """docs/mutation.json and .md from the mutants finished so far (`partial`: the run is still going)."""
    seconds = round(time.time() - started)
    reruns = []
    previous = args.previous
    if previous is not None and args.rerun_survivors:  # the survivors' rows replaced by their new outcomes
        again = {(r["file"], r["mutation"]) for r in results}
        kept = [r for r in previous["results"] if (r["file"], r["mutation"]) not in again]
        order = {key: k for k, key in enumerate(dict.fromkeys((r["file"], r["mutation"]) for r in previous["results"]))}
        results = sorted(kept + results, key=lambda r: order[(r["file"], r["mutation"])])
        seconds += previous["seconds"]
        reruns = previous.get("reruns", []) + [f"the {len(again)} surviving mutations, after tests were added"]
    elif previous is not None:  # --update: keep the other files' rows from the last full run
        kept = [r for r in previous["results"] if r["file"] not in args.files]
        results = kept + results
        seconds += previous["seconds"]
        reruns = previous.get("reruns", []) + [" ".join(args.files)]
    killed = sum(r["outcome"].startswith("killed") for r in results)
    summary = {"mutants": len(results), "killed": killed, "score": killed / max(len(results), 1),
               "seconds": seconds, "results": results, "reruns": reruns,
               "planned": len(results) if args.rerun_survivors else
               args.total + (len(previous["results"]) - len([r for r in previous["results"] if r["file"] in args.files])
                             if previous else 0)}
    if partial:
        summary["partial"] = True
    Path(args.out).write_text(json.dumps(summary, indent=1))
    command = "" if args.update else " ".join(sys.argv[1:])
    if args.rerun_survivors:
        command = previous.get("command", "")
    summary["command"] = command
    Path(args.out).write_text(json.dumps(summary, indent=1))
    Path(args.out).with_suffix(".md").write_text(report(summary, command))
    if not partial:
        print(f"{killed}/{len(results)} killed ({100 * summary['score']:.1f}%) in {summary['seconds']} s")


def report(summary: dict, argv: str) -> str:
    verdicts_path = ROOT / "tools" / "mutation_verdicts.json"
    verdicts = json.loads(verdicts_path.read_text()) if verdicts_path.exists() else {}
    files = {}
    for r in summary["results"]:
        row = files.setdefault(r["file"], [0, 0])
        row[0] += 1
        row[1] += r["outcome"].startswith("killed")
    lines = ["# Mutation testing", "",
             f"Generated by `{('.venv/bin/python tools/mutation.py ' + argv).strip()}`; do not edit by hand.",
             "Each mutant changes one operator or constant in one module; the module's tests run against it "
             "(tools/mutation.py says which); a failing test kills it.", "",
             f"**{summary['killed']} of {summary['mutants']} killed ({100 * summary['score']:.1f}%)** in "
             f"{summary['seconds']} s."]
    if summary["mutants"] < summary.get("planned", summary["mutants"]):
        lines.append(f"This report covers {summary['mutants']} of the run's {summary['planned']} mutants, in the order "
                     "of the table; the files and mutants after them were not run.")
    if summary.get("reruns"):
        lines.append("Re-run after the full run (`--update` for files, `--rerun-survivors` for the survivors once "
                     "tests were added; their rows replace the earlier ones): " + "; ".join(summary["reruns"]) + ".")
    lines += ["", "| file | mutants | killed | score |", "|---|---|---|---|"]
    for f, (n, k) in files.items():
        lines.append(f"| {f} | {n} | {k} | {100 * k / n:.0f}% |")
    survivors = [r for r in summary["results"] if r["outcome"] == "survived"]
    lines += ["", "## Survivors", "", "| file | mutation | verdict |", "|---|---|---|"]
    for r in survivors:
        key = f"{r['file']} {r['mutation']}"
        lines.append(f"| {r['file']} | {r['mutation']} | {verdicts.get(key, 'NOT REVIEWED')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
