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


def preprocessing_options(command):
    """Flags that override the model's preprocessing metadata and the defaults read from its input
    shape; they reach `resolve_preprocessing` as the `flags` mapping."""
    options = [
        click.option("--input-size", help="Model input size: N or HxW (default: the input shape)."),
        click.option("--resize", help="Resize the shorter image side to this before the centre crop "
                                      "(default: the larger input side)."),
        click.option("--mean", help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406."),
        click.option("--std", help="Per-channel std after scaling, e.g. 0.229,0.224,0.225."),
        click.option("--scale", help="Pixel scale applied to 0..255 values first, e.g. 1/255 or 1."),
        click.option("--color", type=click.Choice(["rgb", "bgr", "grey", "gray"], case_sensitive=False),
                     help="Channel order of the model input (default: 1 channel grey, 3 RGB)."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"], case_sensitive=False),
                     help="Tensor layout (default: guessed from the input shape)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--data", required=True, type=click.Path(path_type=str),
              help="Labelled folder (one subfolder per class), unlabelled image folder, or .npz file.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=str),
              help="Float model to compare against (agreement, KL, cosine).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="Use N images spread evenly over the data.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when it loads, else CPU.")
@preprocessing_options
@user_errors
def evaluate(model, data, reference, as_json, batch_size, limit, provider, **flags):
    """Top-1/top-5 accuracy of MODEL on labelled data, and its fidelity to a reference model."""
    from tqdm import tqdm

    from .evaluate import evaluate as run_evaluation

    result = run_evaluation(model, data, reference_path=reference, flags=flags, batch_size=batch_size,
                            limit=limit, provider=provider, progress=True,
                            note=lambda message: tqdm.write(message, file=sys.stderr))
    for name, reason in result.skipped[:10]:
        click.echo(f"warning: skipped {name}: {reason}", err=True)
    if result.skipped:
        click.echo(f"warning: skipped {len(result.skipped)} of {result.images + len(result.skipped)} "
                   "images that could not be read or converted", err=True)
    click.echo(json.dumps(result.as_json()) if as_json else format_evaluation(result))


def format_evaluation(result) -> str:
    percent = lambda fraction: f"{100 * fraction:.2f} %"  # noqa: E731
    lines = [f"images: {result.images}"]
    if result.top1 is not None:
        lines.append(f"top-1: {percent(result.top1)}")
    if result.top5 is not None:
        lines.append(f"top-5: {percent(result.top5)}")
    if result.agreement is not None:
        lines += [f"top-1 agreement with reference: {percent(result.agreement)}",
                  f"mean KL(reference || model): {result.kl:.6f}",
                  f"mean cosine similarity of logits: {result.cosine:.6f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main(prog_name="onnxmodcap")
