"""Write docs/cli.md, the command-line reference, from the commands' own --help texts.

    python tools/cli_reference.py           # rewrite docs/cli.md
    python tools/cli_reference.py --check   # exit 1 when docs/cli.md differs from the code (a test runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click

from onnxmodcap.cli import main

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
WIDTH = 100  # help text columns, fixed so that the file does not depend on the terminal

HEADER = """# Command-line reference

Every command's `--help`, as the code defines it (`python tools/cli_reference.py` writes this file;
the tests fail when it differs from the code). Options common to all commands come first:
`-q/--quiet` shows only results, warnings and errors, `-v/--verbose` adds debug messages. The
methods and their settings are explained in [methods.md](methods.md), the written model in
[targets.md](targets.md), validation in [parity.md](parity.md).
"""


def render() -> str:
    root = click.Context(main, info_name="onnxmodcap", terminal_width=WIDTH, max_content_width=WIDTH,
                         **main.context_settings)
    parts = [HEADER, section("onnxmodcap", main.get_help(root))]
    for name in main.list_commands(root):
        command = main.get_command(root, name)
        context = click.Context(command, info_name=name, parent=root, terminal_width=WIDTH, max_content_width=WIDTH)
        parts.append(section(f"onnxmodcap {name}", command.get_help(context)))
    return "\n".join(parts)


def section(title: str, help_text: str) -> str:
    return f"## `{title}`\n\n```text\n{help_text}\n```\n"


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    text = render()
    if not args.check:
        REFERENCE.write_text(text)
        return
    if not REFERENCE.is_file() or REFERENCE.read_text() != text:
        sys.exit(f"{REFERENCE} is out of date: run python tools/cli_reference.py")


if __name__ == "__main__":
    cli()
