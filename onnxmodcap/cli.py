"""Command-line interface: every command is a thin wrapper around a pipeline function."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import click
from tqdm import tqdm

from . import __version__
from .config import (
    DEFAULT_BATCH_SIZE, DEFAULT_BITS, DEFAULT_CACHE_GIB, DEFAULT_METHOD, DEFAULT_MODCAP, DEFAULT_NUM_CALIB, END_BITS,
    FORMATS, INIT_METHODS, MAX_BITS, METHODS, MIN_BITS, MIXED_PRECISION_WIDTHS, MODCAP_MODES, PRESET_CHOICES,
    PROVIDER_CHOICES, QUANTIZED_OP_TYPES, TARGETS,
)
from .errors import UserError, first_line
from .progress import show_progress
from .recipes import (
    FAST_ITERS, LARGE_ACTIVATIONS, PAPER_ITERS, PRESETS, QUICK_ITERS, ReconstructionSettings, method_defaults,
    network_defaults,
)


TRACEBACK_VARIABLE = "ONNXMODCAP_TRACEBACK"


def user_errors(command):
    """Turn any failure into one `error:` line on stderr and a non-zero exit, never a traceback
    (unless ONNXMODCAP_TRACEBACK=1 asks for one)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as err:
            if os.environ.get(TRACEBACK_VARIABLE) == "1":
                raise
            fail(f"internal error ({type(err).__name__}: {first_line(err)}). Please report it; "
                 f"{TRACEBACK_VARIABLE}=1 shows the traceback", 1)

    return wrapper


def fail(message: str, exit_code: int):
    click.echo(f"error: {message}", err=True)
    sys.exit(exit_code)


class MessageHandler(logging.Handler):
    """The library's log records as `note: ...` (`warning: ...`, `debug: ...`) lines on the
    current stderr, written between progress bars rather than through them."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "note" if record.levelno == logging.INFO else record.levelname.lower()
        tqdm.write(f"{prefix}: {record.getMessage()}", file=sys.stderr)


MESSAGES = MessageHandler()


def configure_messages(quiet: bool, verbose: bool) -> None:
    """Notes on stderr by default; -q: warnings only and no progress bars; -v: debug messages too."""
    logger = logging.getLogger("onnxmodcap")
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if MESSAGES not in logger.handlers:
        logger.addHandler(MESSAGES)
    logger.propagate = False
    show_progress(not quiet)


def context_line(message: str) -> None:
    """A line that says what a command runs on (provider, preprocessing, data); -q hides it."""
    if logging.getLogger("onnxmodcap").isEnabledFor(logging.INFO):
        tqdm.write(message, file=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxmodcap")
@click.option("-q", "--quiet", is_flag=True, help="Only results, warnings and errors: no notes, no progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="Debug messages too.")
def main(quiet, verbose):
    """Post-training quantization of ONNX vision CNNs (BRECQ, QDrop, PD-Quant, ModCap)."""
    configure_messages(quiet, verbose)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--verify", is_flag=True,
              help="Run the torch mirror and ONNX Runtime on the same random batch and report the error.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random verification batch.")
@click.option("--modcap", type=click.Choice(["off", "free"]), default="off", show_default=True,
              help="free: also print the data-free ModCap schedule (capacities, differentials, merged units).")
@click.option("--modcap-k", type=int, help="Adjacent pairs to merge (default: about one per four blocks).")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits the data-free capacities assume.")
@click.option("--input-size", help="Model input size N or HxW, for a model whose image size is dynamic.")
@user_errors
def inspect(model, as_json, verify, seed, modcap, modcap_k, bits, input_size):
    """Show the reconstruction units of MODEL (an ONNX file)."""
    from .inspect_model import format_table, inspect_model
    from .mirror import unsupported_message

    inspection = inspect_model(model, verify=verify, seed=seed, modcap=modcap, modcap_k=modcap_k, bits=bits,
                               input_size=input_size)
    report = inspection.to_dict()
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))
    if inspection.unsupported:
        raise UserError(unsupported_message(inspection.unsupported))


def preprocessing_options(command):
    """Flags that override the model's preprocessing metadata and the defaults read from its input
    shape. The command receives them as one `preprocess` mapping (`resolve_preprocessing`'s flags)."""

    @functools.wraps(command)
    def gathered(*args, **kwargs):
        preprocess = {name: kwargs.pop(name) for name in ("input_size", "resize", "mean", "std", "scale", "color",
                                                          "layout")}
        return command(*args, preprocess=preprocess, **kwargs)

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
        gathered = option(gathered)
    return gathered


# Options that quantize and analyze share.
BITS = click.option("--bits", type=int, default=DEFAULT_BITS, show_default=True,
                    help=f"Bits for weights and activations ({MIN_BITS}..{MAX_BITS}).")
WBITS = click.option("--wbits", type=int, help="Weight bits (overrides --bits).")
ABITS = click.option("--abits", type=int, help="Activation bits (overrides --bits).")
CALIBRATION_METHOD = click.option(
    "--calibration-method", "--init", "init", type=click.Choice(INIT_METHODS), default="lp", show_default=True,
    help="Scale initialisation (lp: Lp-norm p=2.4 grid search, as in BRECQ/QDrop).")
NUM_CALIB = click.option("--num-calib", type=int,
                         help=f"Calibration images to use (default: all, at most {DEFAULT_NUM_CALIB}).")
BATCH_SIZE = click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True,
                          help="Batch size of calibration (and of reconstruction in quantize).")
DEVICE = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                      help="Where torch runs calibration (and reconstruction in quantize).")
SEED = click.option("--seed", type=int, default=0, show_default=True,
                    help="Seed of every random choice; one seed, one file.")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--data", required=True, type=click.Path(path_type=str),
              help="Labelled folder (one subfolder per class), unlabelled image folder, or .npz file.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=str),
              help="Float model to compare against (agreement, KL, cosine).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="Use N images spread evenly over the data.")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
              help="auto: CUDA when it loads, else CPU.")
@preprocessing_options
@user_errors
def evaluate(model, data, reference, as_json, batch_size, limit, provider, preprocess):
    """Top-1/top-5 accuracy of MODEL on labelled data, and its fidelity to a reference model."""
    from .evaluate import evaluate as run_evaluation

    result = run_evaluation(model, data, reference_path=reference, flags=preprocess, batch_size=batch_size,
                            limit=limit, provider=provider, progress=True, note=context_line)
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
    if result.outputs:
        lines += ["fidelity to the reference, per output:"] + [f"  {output.text()}" for output in result.outputs]
    return "\n".join(lines)


# `quantize --help` lists its options in these sections, in this order; everyday ones first.
QUANTIZE_SECTIONS = {
    "Options": ("calib", "output", "bits", "wbits", "abits", "method", "modcap", "target", "preset", "device",
                "report", "resume"),
    "Input preprocessing (default: the model's metadata, else read from its input shape)": (
        "input_size", "resize", "mean", "std", "scale", "color", "layout"),
    "What gets quantized, and how it is stored": (
        "mixed_precision", "exclude_nodes", "exclude_op_types", "overrides", "no_keep_ends", "init", "bias_correction",
        "num_calib", "fmt", "reduce_range", "dynamic_batch"),
    "Reconstruction, for experts (defaults: the published recipes, see docs/methods.md)": (
        "iters", "modcap_k", "compare_granularity", "round_lambda", "round_lr", "pd_temperature", "pd_lambda",
        "dc_lambda", "no_dc", "seed"),
    "Resources": ("batch_size", "cache_mem", "work_dir", "provider"),
}


class SectionedCommand(click.Command):
    """A command whose --help lists its options in the sections of `sections` (parameter names),
    -h/--help at the end of the first, and any option no section names under "Other options"."""

    def __init__(self, *args, sections: dict[str, tuple[str, ...]], **kwargs):
        super().__init__(*args, **kwargs)
        self.sections = sections

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {param.name: param.get_help_record(ctx) for param in self.get_params(ctx)
                   if isinstance(param, click.Option)}
        listed = {name for names in self.sections.values() for name in names}
        help_name = self.get_help_option(ctx).name
        sections = {**self.sections, "Other options": tuple(name for name in records if name not in listed)}
        first = next(iter(sections))
        sections[first] = (*sections[first], help_name)
        sections["Other options"] = tuple(name for name in sections["Other options"] if name != help_name)
        for title, names in sections.items():
            if any(name in records for name in names):
                with formatter.section(title):
                    formatter.write_dl([records[name] for name in names if name in records])


def split_commas(ctx, param, values: tuple[str, ...]) -> tuple[str, ...]:
    """A repeatable option that also takes comma-separated values."""
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())


SETTINGS = ReconstructionSettings()
DEPTHWISE = network_defaults(depthwise=True)


@main.command(cls=SectionedCommand, sections=QUANTIZE_SECTIONS)
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--calib", required=True, type=click.Path(path_type=str),
              help="Calibration images (a folder of images of any size), a .npz of uint8 images, "
                   "or a .npy/.npz of ready model inputs.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str),
              help="Output file (default: MODEL_STEM.w{W}a{A}.onnx beside MODEL).")
@BITS
@WBITS
@ABITS
@click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True,
              help="rtn: round to nearest. brecq: block reconstruction (AdaRound + LSQ). qdrop: brecq with "
                   "random quantization drop. pdquant: qdrop plus prediction difference and distribution correction.")
@click.option("--modcap", type=click.Choice(MODCAP_MODES),
              help="Reconstruct the adjacent units that differ most in capacity jointly, by measured output "
                   f"error (data) or parameters x bits (free). Default: {DEFAULT_MODCAP} (always off with rtn).")
@click.option("--target", type=click.Choice(TARGETS), default="ort", show_default=True,
              help="ort: ONNX Runtime, asymmetric grids. tensorrt: zero point 0, INT8 only, Conv+Add fusable.")
@click.option("--preset", type=click.Choice(PRESET_CHOICES), default="auto", show_default=True,
              help=f"Iterations per unit: paper ({PAPER_ITERS}, the published recipe), fast ({FAST_ITERS}), "
                   f"quick ({QUICK_ITERS}); auto: paper on CUDA, else fast, or quick above "
                   f"{LARGE_ACTIVATIONS / 1e6:g} million activation values per image (224x224 models).")
@DEVICE
@click.option("--report", type=click.Path(dir_okay=False, path_type=str),
              help="Write the JSON report here (after reconstruction also a PNG of the unit losses beside it).")
@click.option("--resume", is_flag=True, help="Continue an interrupted reconstruction from its checkpoint.")
@click.option("--mixed-precision", metavar="BUDGET",
              help="Per-layer widths from " + ",".join(map(str, MIXED_PRECISION_WIDTHS)) + " that fit BUDGET, chosen by "
                   "measured sensitivity: average weight bits (e.g. 4.5) or a weight size (e.g. 3MB) set weight "
                   "widths; bit operations per image (e.g. 20GBOPs) set weight and activation widths (TensorRT: "
                   "weight widths). --overrides and the kept ends still hold.")
@click.option("--exclude-nodes", "--exclude", "exclude_nodes", multiple=True,
              help="Regex of node names kept in float (repeatable).")
@click.option("--exclude-op-types", multiple=True, callback=split_commas,
              help=f"Op types kept in float, of {', '.join(QUANTIZED_OP_TYPES)} (repeatable or comma-separated).")
@click.option("--overrides", type=click.Path(dir_okay=False, path_type=str),
              help='JSON/YAML file: {"layers": {"<node regex>": {"wbits": 8, "abits": 8} or "float"}}.')
@click.option("--no-keep-ends", is_flag=True,
              help=f"Quantize the first and last weighted layers to --bits too (default: they stay at {END_BITS} bits).")
@CALIBRATION_METHOD
@click.option("--bias-correction/--no-bias-correction", default=None,
              help="Subtract from each quantized layer's bias the mean shift that quantization adds to its "
                   "output channels, measured on the calibration images. Default: with rtn; not after "
                   "reconstruction, which fits each unit's output itself and measured worse with it.")
@NUM_CALIB
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="qdq", show_default=True,
              help="qdq: int8 containers carrying any grid exactly. native: INT4/UINT4 weights (opset 21).")
@click.option("--reduce-range", is_flag=True,
              help="ORT target: 8-bit weights on 7 bits' range (outside depthwise Convs) for ONNX Runtime's faster "
                   "u8 x s8 kernels. Default: the full range in uint8, for its u8 x u8 kernels (the u8 x s8 ones "
                   "saturate on x86 CPUs without VNNI).")
@click.option("--dynamic-batch", is_flag=True,
              help="Write a model whose source fixes its batch size with a dynamic batch dimension instead.")
@click.option("--iters", type=int, help="Reconstruction iterations per unit (overrides --preset).")
@click.option("--modcap-k", type=int, help="Adjacent pairs ModCap merges (default: about one per four blocks).")
@click.option("--compare-granularity", is_flag=True,
              help="Also reconstruct without ModCap and report both loss curves (about twice the time).")
@click.option("--round-lambda", type=float,
              help=f"Weight of AdaRound's rounding loss (default {SETTINGS.round_lambda:g}, or "
                   f"{DEPTHWISE['round_lambda']:g} with depthwise convolutions).")
@click.option("--round-lr", type=float,
              help=f"Adam's rate on AdaRound's rounding variables (default: paper {SETTINGS.weight_lr:g}, "
                   f"{method_defaults('pdquant')['weight_lr']:g} with pdquant; fast {PRESETS['fast']['weight_lr']:g}; "
                   f"quick {PRESETS['quick']['weight_lr']:g}).")
@click.option("--pd-temperature", type=float,
              help=f"pdquant: KL temperature (default {SETTINGS.pd_temperature:g}, or {DEPTHWISE['pd_temperature']:g} "
                   "with depthwise convolutions).")
@click.option("--pd-lambda", type=float,
              help=f"pdquant: lambda_r; the prediction difference is weighted 1/lambda_r (default {SETTINGS.pd_lambda:g}).")
@click.option("--dc-lambda", type=float,
              help=f"pdquant: lambda_c of distribution correction (default {SETTINGS.dc_lambda:g}, or "
                   f"{DEPTHWISE['dc_lambda']:g} with depthwise convolutions).")
@click.option("--no-dc", is_flag=True, help="pdquant: skip distribution correction (ModCap groups never get it).")
@SEED
@BATCH_SIZE
@click.option("--cache-mem", type=float, default=DEFAULT_CACHE_GIB, show_default=True,
              help="GiB of unit inputs/outputs kept in memory during reconstruction and bias correction; "
                   "the rest spills to the work folder.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=str),
              help="Checkpoint folder of reconstruction, and where spilled tensors go "
                   "(default: .OUTPUT_NAME.work beside the output).")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
              help="ONNX Runtime provider for validation (auto: CUDA when it loads, else CPU).")
@preprocessing_options
@user_errors
def quantize(model, calib, fmt, no_keep_ends, no_dc, exclude_nodes, **options):
    """Quantize MODEL with calibration data and write a QDQ ONNX model validated in ONNX Runtime."""
    from .pipeline import quantize as run_quantize

    result = run_quantize(model, calib, format=fmt, keep_ends=not no_keep_ends, dc=not no_dc,
                          exclude=exclude_nodes, **options)
    skipped = result.report.calibration.skipped
    for name, reason in skipped[:10]:
        click.echo(f"warning: skipped {name}: {reason}", err=True)
    if skipped:
        click.echo(f"warning: skipped {len(skipped)} calibration images that could not be read or converted",
                   err=True)
    click.echo(f"wrote {result.output}")
    click.echo(result.validation.summary())
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.report.stage_seconds.items())
    click.echo(f"time: {stages} (total {result.report.seconds:.0f} s)")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--calib", required=True, type=click.Path(path_type=str),
              help="Calibration images, as for quantize; the first 256 are also the analysis images.")
@BITS
@WBITS
@ABITS
@click.option("--target", type=click.Choice(TARGETS), default="ort", show_default=True,
              help="The target whose grids are analysed (as for quantize).")
@CALIBRATION_METHOD
@NUM_CALIB
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="Rows of each ranking printed (the JSON report has them all).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole analysis as one JSON object.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=str),
              help="Write the JSON analysis here and a PNG chart of the layers beside it.")
@BATCH_SIZE
@DEVICE
@SEED
@preprocessing_options
@user_errors
def analyze(model, calib, top, as_json, **options):
    """Rank the layers and reconstruction units of MODEL by how much quantizing them costs."""
    from .sensitivity import analyze as run_analysis

    analysis = run_analysis(model, calib, **options)
    click.echo(json.dumps(analysis.to_dict(), indent=2) if as_json else analysis.table(top))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--target", type=click.Choice(["tensorrt"]), default="tensorrt", show_default=True)
@user_errors
def check(model, target):
    """Lint a QDQ MODEL against TensorRT's explicit-quantization rules; list each violation."""
    from .check import check_tensorrt

    violations = check_tensorrt(model)
    for violation in violations:
        click.echo(str(violation))
    if violations:
        raise UserError(f"{len(violations)} TensorRT rule violations in {model}")
    click.echo(f"{model}: no TensorRT rule violations")


if __name__ == "__main__":
    main(prog_name="onnxmodcap")
