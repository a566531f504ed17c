"""Command-line interface: every command is a thin wrapper around a pipeline function."""

from __future__ import annotations

import functools
import json
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


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--verify", is_flag=True,
              help="Run the torch mirror and ONNX Runtime on the same random batch and report the error.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random verification batch.")
@user_errors
def inspect(model, as_json, verify, seed):
    """Show the reconstruction units of MODEL (an ONNX file)."""
    from .inspect_model import format_table, inspect_model
    from .mirror import unsupported_message

    inspection = inspect_model(model, verify=verify, seed=seed)
    report = inspection.to_dict()
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))
    if inspection.unsupported:
        raise UserError(unsupported_message(inspection.unsupported))


if __name__ == "__main__":
    main()
