"""Command-line interface: every command is a thin wrapper around a pipeline function."""

from __future__ import annotations

import functools
import sys

import click

from . import __version__
from .errors import UserError


def user_errors(command):
    """Turn a UserError into one `error:` line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxmodcap")
def main():
    """Post-training quantization of ONNX vision CNNs (BRECQ, QDrop, PD-Quant, ModCap)."""


if __name__ == "__main__":
    main()
