"""Command line: `python -m kdistpp COMMAND [options]`; `python -m kdistpp --help` lists the commands."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": "student, student++ and teacher on a built-in 2-D toy problem: prints distances to the data, writes a PNG",
}


def usage() -> str:
    from .demo import build_parser

    lines = ["usage: python -m kdistpp COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<6} {text}" for name, text in COMMANDS.items()]
    lines += ["", build_parser().format_help()]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        demo_main(argv[1:])
        return
    asked = bool(argv) and argv[0] in ("-h", "--help")
    if argv and not asked:
        print(f"unknown command {argv[0]!r}\n")
    print(usage())
    raise SystemExit(0 if asked else 2)


if __name__ == "__main__":
    main()
