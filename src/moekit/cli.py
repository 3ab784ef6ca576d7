"""`moekit <command>`: thin entry points into the library."""

from __future__ import annotations

import argparse
import sys


def _bench(argv: list[str]) -> int:
    from .benchmark import main

    return main(argv)


def _routers(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moekit routers", description="List the routers.")
    parser.parse_args(argv)
    from .routing import ROUTER_CLASSES

    for name, cls in ROUTER_CLASSES.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:14s} {summary}")
    return 0


COMMANDS = {
    "bench": (_bench, "time the MoE layer against a dense FFN of equal active FLOPs"),
    "routers": (_routers, "list the available routers"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: moekit <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:10s} {help_text}")
        print("\n`moekit <command> --help` shows a command's options.")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"moekit {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"moekit: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return command[0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
