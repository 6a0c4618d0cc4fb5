"""Command line: `python -m kdistpp demo [--help]`."""

from __future__ import annotations

import sys


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("demo",):
        print("usage: python -m kdistpp demo [--n N] [--seed S] [--steps K] [--w W] [--form F] [--out DIR] [--device D]")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    from .demo import main as demo_main

    demo_main(argv[1:])


if __name__ == "__main__":
    main()
