"""Run the toy benchmarks and write docs/benchmarks.md (tables) and docs/img/*.png (plots).

    .venv/bin/python benchmarks/run.py --quick      # < 5 min on 2 CPU cores
    .venv/bin/python benchmarks/run.py              # full: more samples, finer w grid

The w sweep runs first, on its own tuning seeds; the (form, w) it picks per student kind is what
every later table uses, so no table is tuned on the seeds it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import compute_matched  # noqa: E402
import conditional  # noqa: E402
import digits_cfg  # noqa: E402
import displacement  # noqa: E402
import forms  # noqa: E402
import overhead  # noqa: E402
import picture  # noqa: E402
import quality  # noqa: E402
import renoise  # noqa: E402
import sdxl_cost  # noqa: E402
import sfd  # noqa: E402

ORDER = ("displacement", "forms", "quality", "compute_matched", "renoise", "conditional", "digits_cfg", "picture",
         "overhead", "sdxl", "sfd")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples and a coarser w grid (< 5 min on 2 CPU cores)")
    p.add_argument("--tiny", action="store_true", help="smallest setting that exercises every script (the smoke test)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="+", choices=ORDER, help="re-run these sections; the others are kept from disk")
    p.add_argument("--docs", default=None, help="write under this folder instead of the repository's docs/")
    return p.parse_args(argv)


def command_line(args) -> str:
    flags = [f for f, on in (("--quick", args.quick), ("--tiny", args.tiny)) if on]
    return " ".join([".venv/bin/python benchmarks/run.py", *flags, "--device", args.device])


def headline(summary, cfg) -> str:
    rows = [[label, f"{w}/{t}/{l}", f"{cw}/{ct}/{cl}"] for label, w, t, l, cw, ct, cl in summary]
    return "\n".join([
        "## Headline", "",
        "Does one guided (teacher) step beat one more student step at the same NFE? Counts over "
        f"N = {min(cfg.step_counts)}..{max(cfg.step_counts)} and dimensions {list(cfg.dims)} (wins/ties/losses, a win = better by more than one standard error). The right column "
        "asks whether the *teacher* is what helps, against the same refinement with the student as its own teacher.", "",
        common.table(["student", "guided N+1 NFE vs N+1 student steps", "guided vs control (student as teacher)"], rows),
    ])


def main(argv=None) -> str:
    args = parse(argv)
    if args.docs:
        common.set_docs_dir(args.docs)
    cfg = common.Config.make(quick=args.quick, device=args.device, tiny=args.tiny)
    wanted = set(args.only or ORDER)
    started = time.perf_counter()
    durations = {}

    def section(name, fn):
        t = time.perf_counter()
        out = fn()
        text = out[0] if isinstance(out, tuple) else out
        durations[name] = time.perf_counter() - t
        common.write_section(name, f"{text}\n\n_This section: {durations[name]:.0f} s, `{command_line(args)} --only {name}`._")
        print(f"[{name}] {durations[name]:.0f} s", flush=True)
        return out

    if "displacement" in wanted:
        section("displacement", lambda: displacement.run(cfg))
    setting = "tiny" if args.tiny else "quick" if args.quick else "full"
    settings = {k: ("eps", 0.0) for k in common.KINDS}
    if "forms" in wanted:
        settings = section("forms", lambda: forms.run(cfg))[1]
        save_settings(setting, settings)
    elif any(n in wanted for n in ("quality", "compute_matched", "renoise", "picture")):
        settings = load_settings(setting)  # later tables need the tuned (form, w)
        if settings is None:
            settings = forms.best_settings(forms.sweep(cfg), cfg)
            save_settings(setting, settings)
    if "quality" in wanted:
        section("quality", lambda: quality.run(cfg, settings))
    if "compute_matched" in wanted:
        summary = section("compute_matched", lambda: compute_matched.run(cfg, settings))[1]
        common.write_section("headline", headline(summary, cfg))
    if "renoise" in wanted:
        section("renoise", lambda: renoise.run(cfg, settings))
    if "conditional" in wanted:
        section("conditional", lambda: conditional.run(cfg))
    if "digits_cfg" in wanted:
        section("digits_cfg", lambda: digits_cfg.run(cfg))
    if "picture" in wanted:
        section("picture", lambda: picture.run(cfg, settings))
    if "overhead" in wanted:
        repeats, steps = (2, 2) if args.tiny else (9, 10) if args.quick else (15, 20)
        section("overhead", lambda: "## Overhead\n\n" + overhead.section(torch.device(args.device), repeats, steps,
                                                                        command_line(args) + " --only overhead"))
    if "sdxl" in wanted:
        section("sdxl", lambda: sdxl_cost.run(torch.device(args.device), tiny=args.tiny, quick=args.quick))
    if "sfd" in wanted:
        section("sfd", lambda: sfd.run(cfg))
    total = time.perf_counter() - started
    print(f"[this invocation] {total:.0f} s", flush=True)

    bodies, timed_sections = [], {}
    for name in ("headline",) + ORDER:
        path = os.path.join(common.SECTIONS, f"{name}.md")
        if os.path.exists(path):
            with open(path) as f:
                bodies += [f.read().rstrip(), ""]
            found = re.search(r"_This section: (\d+) s", bodies[-2])
            if found:  # each fragment records its own run time, so the total stays true after `--only` re-runs
                timed_sections[name] = int(found.group(1))
    parts = ["# Benchmarks", "",
             "Generated by `benchmarks/run.py`; do not edit by hand. Toy problems, students and metrics: "
             "[toys.md](toys.md). Sections re-run with `--only` keep the others from their last run: a section "
             "keeps the numbers of the code it last ran with. Every table of samples was last made with the final "
             "samplers (`direction='student'` by default, DPM++ 2S a refining its midpoint); the overhead and real-size "
             "cost sections measure time, which the guided-step semantics do not change.", "",
             f"- Command: `{command_line(args)}`" + (f" (sections: {', '.join(args.only)})" if args.only else ""),
             f"- Machine: {common.machine(args.device)}",
             f"- Setting: {setting}; {cfg.n} samples, seeds {list(cfg.seeds)}, dimensions {list(cfg.dims)}",
             f"- Duration: {sum(timed_sections.values())} s, the sum of the sections' own run times ("
             + ", ".join(f"{k} {v} s" for k, v in timed_sections.items()) + ")", ""] + bodies
    text = "\n".join(parts)
    with open(os.path.join(common.DOCS, "benchmarks.md"), "w") as f:
        f.write(text)
    return text


def settings_path() -> str:
    return os.path.join(common.SECTIONS, "tuned_settings.json")


def read_saved_settings() -> dict:
    if not os.path.exists(settings_path()):
        return {}
    with open(settings_path()) as f:
        return json.load(f)


def save_settings(setting: str, settings: dict) -> None:
    """Keep the forms sweep's picks, so a later `--only quality` uses them without re-running the sweep."""
    saved = read_saved_settings()
    saved[setting] = {k: list(v) for k, v in settings.items()}
    os.makedirs(common.SECTIONS, exist_ok=True)
    with open(settings_path(), "w") as f:
        json.dump(saved, f, indent=1, sort_keys=True)


def load_settings(setting: str) -> dict | None:
    saved = read_saved_settings().get(setting)
    return {k: (form, w) for k, (form, w) in saved.items()} if saved and set(saved) == set(common.KINDS) else None


if __name__ == "__main__":
    main()
