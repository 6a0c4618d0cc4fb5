"""Run the toy benchmarks and write docs/benchmarks.md (tables) and docs/img/*.png (plots).

    .venv/bin/python benchmarks/run.py              # full: more samples, finer w grid; writes docs/
    .venv/bin/python benchmarks/run.py --quick      # < 5 min, < 4 GB on 2 CPU cores; writes build/bench-quick/
    .venv/bin/python benchmarks/run.py --only sfd   # re-run one section; the others are kept as they are
    .venv/bin/python benchmarks/run.py --assemble   # run nothing: rewrite docs/benchmarks.md from docs/bench/

Each section is stored as a markdown fragment in <out>/bench/, and the run that made it (setting,
sizes, device, seconds, command) in <out>/bench/labels.json; the page is assembled from the two,
so re-running one section relabels only that section. Quick and tiny runs write to a scratch
folder under build/ unless `--out docs` asks for the docs.

The w sweep runs first, on its own tuning seeds; the (form, w) it picks per student kind is what
every later table uses, so no table is tuned on the seeds it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import compute_matched  # noqa: E402
import conditional  # noqa: E402
import digits_cfg  # noqa: E402
import displacement  # noqa: E402
import flow  # noqa: E402
import forms  # noqa: E402
import overhead  # noqa: E402
import picture  # noqa: E402
import quality  # noqa: E402
import renoise  # noqa: E402
import sdxl_cost  # noqa: E402
import sfd  # noqa: E402
import sfd_flow  # noqa: E402
import sfd_unet  # noqa: E402

ORDER = ("displacement", "forms", "quality", "compute_matched", "renoise", "conditional", "digits_cfg", "flow",
         "picture", "overhead", "sdxl", "sfd", "sfd_flow", "sfd_unet", "sfd_flow_transformer")
TUNED = ("quality", "compute_matched", "renoise", "picture")  # the sections that read the forms sweep's picks
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true",
                   help="fewer samples, seeds and training steps, a coarser w grid, a tiny SDXL UNet (< 5 min, < 4 GB on 2 CPU cores)")
    p.add_argument("--tiny", action="store_true", help="smallest setting that exercises every script (the smoke test)")
    p.add_argument("--real-sdxl", action="store_true",
                   help="with --quick or --tiny: time the real-size SDXL UNet anyway (about 10 GB of memory and minutes on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="+", choices=ORDER, help="re-run these sections; the others are kept from disk")
    p.add_argument("--out", "--docs", dest="out", default=None,
                   help="write benchmarks.md, bench/ and img/ under this folder (default: docs/ for the full setting, "
                        "build/bench-quick/ or build/bench-tiny/ otherwise; `--out docs` writes a quick run into the docs)")
    p.add_argument("--assemble", action="store_true",
                   help="run no section: rewrite benchmarks.md from the stored fragments and their labels")
    return p.parse_args(argv)


def setting_name(args) -> str:
    return "tiny" if args.tiny else "quick" if args.quick else "full"


def out_dir(args) -> str:
    if args.out:
        return os.path.abspath(args.out)
    return DOCS if setting_name(args) == "full" else os.path.join(ROOT, "build", f"bench-{setting_name(args)}")


def shown_path(path: str) -> str:
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def command_line(args) -> str:
    """The invocation, normalised: the command that made (and re-makes) the sections it ran."""
    words = [".venv/bin/python", "benchmarks/run.py"]
    words += [f for f, on in (("--quick", args.quick), ("--tiny", args.tiny), ("--real-sdxl", args.real_sdxl)) if on]
    words += ["--device", args.device]
    if args.out:
        words += ["--out", shown_path(os.path.abspath(args.out))]
    if args.only:
        words += ["--only", *args.only]
    return " ".join(shlex.quote(w) for w in words)


def seed_list(seeds) -> str:
    seeds = list(seeds)
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds))


def dims(cfg) -> str:
    return "dimensions " + " and ".join(map(str, cfg.dims))


def sdxl_tiny(args) -> bool:
    return (args.quick or args.tiny) and not args.real_sdxl


def threaded(name: str, args) -> bool:
    """Whether a section runs on all of torch's threads: the sections that time models big enough to use
    them (overhead in the full setting, sdxl with the real-size UNet). The others run on one thread: their
    tensors are a few thousand rows, where more threads cost time, and many times more on a busy CPU."""
    return name == "sdxl" and not sdxl_tiny(args) or name == "overhead" and setting_name(args) == "full"


def overhead_sizes(args) -> tuple[int, int]:
    return (2, 2) if args.tiny else (9, 10) if args.quick else (15, 20)


def sizes(name: str, cfg: common.Config, args) -> str:
    """What the section's numbers were computed from, in this setting."""
    toy = f"{cfg.n} samples, {seed_list(cfg.seeds)}, {dims(cfg)}"
    if name == "displacement":
        return f"{cfg.n} samples, 16-D, seed 0"
    if name == "forms":
        return (f"{cfg.n} samples, tuning {seed_list(100 + s for s in cfg.seeds)}, {dims(cfg)}, "
                f"w in {list(forms.w_grid(cfg))}")
    if name in ("quality", "renoise"):
        return toy + "; (form, w) from the forms sweep of the same setting"
    if name in ("compute_matched", "headline"):
        return toy + f", N = {min(cfg.step_counts)}..{max(cfg.step_counts)}; (form, w) from the forms sweep of the same setting"
    if name == "picture":
        return f"{cfg.n} samples, {seed_list(cfg.seeds[:1])}, 2-D; (form, w) from the forms sweep of the same setting"
    if name == "conditional":
        c = conditional.sized(cfg)
        return (f"{c.n} samples, {seed_list(c.seeds)}, tuning {seed_list(conditional.tuning_seeds(c))}, {dims(c)}, "
                f"w in {list(conditional.w_grid(c))}")
    if name == "flow":
        c = flow.sized(cfg)
        return (f"{c.n} samples, {seed_list(c.seeds)}, tuning {seed_list(conditional.tuning_seeds(c))}, {dims(c)}, "
                f"{len(flow.guided_settings(c))} guided settings, shift {flow.SHIFT:g}")
    if name == "digits_cfg":
        s = digits_cfg.sizes(cfg)
        return (f"teacher: {s['dsm']} DSM iterations, hidden {s['hidden']}; students: {s['sfd']} SFD batches; "
                f"{s['n_eval']} samples, {seed_list(s['seeds'])}")
    if name == "sfd":
        s = sfd.sizes(cfg)
        return (f"teachers: {s['dsm']} DSM iterations, hidden {s['hidden']} (digits {2 * s['hidden']}); students: {s['sfd']} SFD / {s['sfd_v']} "
                f"SFD-v batches; {s['n_eval']} samples, {seed_list(s['eval_seeds'])}, NFE {list(s['nfes'])}")
    if name == "sfd_flow":
        s = sfd_flow.sizes(cfg)
        return (f"teacher: {s['dsm']} DSM iterations, hidden {2 * s['hidden']}; students: {s['sfd']} SFD batches; "
                f"{s['n_eval']} samples, {seed_list(s['eval_seeds'])}, NFE {list(s['nfes'])}")
    if name in ("sfd_unet", "sfd_flow_transformer"):
        s = sfd_unet.sizes(cfg)
        return (f"teacher: {s['teacher']} iterations; students: {s['sfd']} SFD batches (LoRA rank {s['rank']}); "
                f"{s['n_eval']} samples, {seed_list(s['eval_seeds'])}, NFE {list(s['nfes'])}")
    if name == "overhead":
        repeats, steps = overhead_sizes(args)
        return f"{repeats} interleaved repeats, {steps}-step samplers"
    if name == "sdxl":
        s = sdxl_cost.setting(torch.device(args.device), sdxl_tiny(args), args.quick)
        unet = "tiny SDXL-architecture UNet" if sdxl_tiny(args) else "real-size SDXL UNet"
        return f"{unet}, {str(s['dtype']).replace('torch.', '')}, {s['latent']}x{s['latent']} latents, {s['repeats']} repeats"
    raise KeyError(name)


def headline(summary, cfg) -> str:
    rows = [[label, f"{w}/{t}/{l}", f"{cw}/{ct}/{cl}"] for label, w, t, l, cw, ct, cl in summary]
    return "\n".join([
        "## Headline", "",
        "Does one guided (teacher) step beat one more student step at the same NFE? Counts over "
        f"N = {min(cfg.step_counts)}..{max(cfg.step_counts)} and dimensions {list(cfg.dims)} (wins/ties/losses, a win = better by more than one standard error). The right column "
        "asks whether the *teacher* is what helps, against the same refinement with the student as its own teacher.", "",
        common.table(["student", "guided N+1 NFE vs N+1 student steps", "guided vs control (student as teacher)"], rows),
    ])


# --- labels: which run made each section ---------------------------------------------------------

def labels_path() -> str:
    return os.path.join(common.SECTIONS, "labels.json")


def read_labels() -> dict:
    if not os.path.exists(labels_path()):
        return {}
    with open(labels_path()) as f:
        return json.load(f)


def save_label(name: str, label: dict) -> None:
    labels = read_labels()
    labels[name] = label
    os.makedirs(common.SECTIONS, exist_ok=True)
    with open(labels_path(), "w") as f:
        json.dump(labels, f, indent=1, sort_keys=True)
        f.write("\n")


def render_label(label: dict | None) -> str:
    if not label:
        return "> No record of the run that made this section."
    return (f"> Setting: **{label['setting']}**: {label['sizes']}. Device: {label['device']}. "
            f"Run time: {label['seconds']} s. Command: `{label['command']}`.")


def assemble() -> str:
    """benchmarks.md from the stored fragments and labels: each section under its own label."""
    labels = read_labels()
    bodies, rows = [], []
    for name in ("headline",) + ORDER:
        path = os.path.join(common.SECTIONS, f"{name}.md")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            heading, _, rest = f.read().strip().partition("\n")
        label = labels.get(name)
        bodies += [heading, "", render_label(label), "", rest.strip(), ""]
        if name != "headline":
            rows.append([name, label["setting"] if label else "?", label["device"] if label else "?",
                         f"{label['seconds']} s" if label else "?"])
    total = sum(labels[r[0]]["seconds"] for r in rows if r[0] in labels)
    parts = ["# Benchmarks", "",
             "Generated by `benchmarks/run.py`; do not edit by hand. Toy problems, students and metrics: "
             "[toys.md](toys.md). Each section says which run made its numbers: the setting (full, quick or tiny) "
             "and its sizes, the device, the run time and the command. `--only NAME` re-runs one section and keeps "
             "the others as they are, so a section keeps the numbers of the code it last ran with; `--assemble` "
             "rewrites this page from the fragments and labels in `bench/` beside it without running anything.", "",
             common.table(["section", "setting", "device", "run time"], rows), "",
             f"Sum of the sections' run times: {total} s.", ""] + bodies
    text = "\n".join(parts).rstrip() + "\n"
    with open(os.path.join(common.DOCS, "benchmarks.md"), "w") as f:
        f.write(text)
    return text


# --- the forms sweep's picks, shared by the later tables -----------------------------------------

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


def tuned_settings(setting: str, cfg: common.Config) -> dict:
    """The saved picks of this setting's forms sweep; without them, run the sweep (announced) and save its picks."""
    settings = load_settings(setting)
    if settings is None:
        print(f"[forms sweep] {shown_path(settings_path())} has no (form, w) picks for the {setting} setting, which "
              f"{', '.join(TUNED)} use: running the forms sweep first ({forms.sweep_size(cfg)} sampler runs on the "
              "tuning seeds; its table is not written, its picks are saved for later runs).", flush=True)
        started = time.perf_counter()
        settings = forms.best_settings(forms.sweep(cfg, progress=True), cfg)
        save_settings(setting, settings)
        print(f"[forms sweep] {time.perf_counter() - started:.0f} s; picks: "
              + ", ".join(f"{k} {f} w={w:g}" for k, (f, w) in settings.items()), flush=True)
    return settings


def main(argv=None) -> str:
    args = parse(argv)
    common.set_docs_dir(out_dir(args))
    if args.assemble:
        return assemble()
    setting = setting_name(args)
    cfg = common.Config.make(quick=args.quick, device=args.device, tiny=args.tiny)
    wanted = set(args.only or ORDER)
    device = torch.device(args.device)
    print(f"[{setting}] writing under {shown_path(common.DOCS)}", flush=True)
    started = time.perf_counter()
    threads = torch.get_num_threads()

    def label(name, seconds):
        return {"setting": setting, "sizes": sizes(name, cfg, args), "device": common.machine(args.device),
                "seconds": round(seconds), "command": command_line(args)}

    def section(name, fn):
        torch.set_num_threads(threads if threaded(name, args) else 1)
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
        common.write_section(name, out[0] if isinstance(out, tuple) else out)
        save_label(name, label(name, seconds))
        if name == "compute_matched":
            common.write_section("headline", headline(out[1], cfg))
            save_label("headline", label("headline", seconds))
        print(f"[{name}] {seconds:.0f} s", flush=True)
        return out

    if "displacement" in wanted:
        section("displacement", lambda: displacement.run(cfg))
    settings = None
    if "forms" in wanted:
        settings = section("forms", lambda: forms.run(cfg))[1]
        save_settings(setting, settings)
    elif wanted.intersection(TUNED):
        torch.set_num_threads(1)
        settings = tuned_settings(setting, cfg)  # later tables need the tuned (form, w)
    if "quality" in wanted:
        section("quality", lambda: quality.run(cfg, settings))
    if "compute_matched" in wanted:
        section("compute_matched", lambda: compute_matched.run(cfg, settings))
    if "renoise" in wanted:
        section("renoise", lambda: renoise.run(cfg, settings))
    if "conditional" in wanted:
        section("conditional", lambda: conditional.run(cfg))
    if "digits_cfg" in wanted:
        section("digits_cfg", lambda: digits_cfg.run(cfg))
    if "flow" in wanted:
        section("flow", lambda: flow.run(cfg))
    if "picture" in wanted:
        section("picture", lambda: picture.run(cfg, settings))
    if "overhead" in wanted:
        section("overhead", lambda: "## Overhead\n\n" + overhead.section(device, *overhead_sizes(args)))
    if "sdxl" in wanted:
        section("sdxl", lambda: sdxl_cost.run(device, tiny=sdxl_tiny(args), quick=args.quick))
    if "sfd" in wanted:
        section("sfd", lambda: sfd.run(cfg))
    if "sfd_flow" in wanted:
        section("sfd_flow", lambda: sfd_flow.run(cfg))
    if "sfd_unet" in wanted:
        section("sfd_unet", lambda: sfd_unet.run(cfg))
    if "sfd_flow_transformer" in wanted:
        section("sfd_flow_transformer", lambda: sfd_unet.run_flow(cfg))
    torch.set_num_threads(threads)
    print(f"[this invocation] {time.perf_counter() - started:.0f} s; {shown_path(os.path.join(common.DOCS, 'benchmarks.md'))}",
          flush=True)
    return assemble()


if __name__ == "__main__":
    main()
