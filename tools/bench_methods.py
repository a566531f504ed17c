"""Accuracy and cost of the quantization methods (rtn, brecq, qdrop) on the shipped models.

    OMP_NUM_THREADS=1 python tools/bench_methods.py --out benchmarks_methods.md \
        --run resnet18:float --run resnet18:4:4:rtn --run resnet18:4:4:qdrop --run resnet18:4:4:brecq

Every --run is MODEL:float or MODEL:WBITS:ABITS:METHOD, where MODEL is a file or a stem in --models
(resnet18 -> models/resnet18.onnx). For each run, one at a time, it
- quantizes with the CLI (`onnxmodcap quantize ... --preset P --modcap off --report R --seed S`), timing the whole
  command (wall clock) and reading the report's seconds, per-unit losses and parity figures;
- evaluates the output on the full test set with `onnxmodcap evaluate ... --reference MODEL --json`;
- inserts one row into the markdown table of --out and one details block (the exact commands, the
  per-unit losses, the load average, warnings) as soon as the run is measured. The file is rewritten
  atomically after every run, so finished rows survive an interrupted benchmark, and a later
  invocation adds its rows to the same table.
A float row evaluates MODEL against itself (top-1 of the float model, agreement 100 %).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROWS_END = "<!-- bench_methods: rows end -->"
DETAILS_END = "<!-- bench_methods: details end -->"
TABLE_HEADER = (
    "| # | model | W/A | method | iters/unit | seed | top-1 % | Δ vs float | agreement % | KL | "
    "quantize wall s | recon s | unit loss sum before → after | units loss up | parity exact / argmax | load 1-min before/after |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("torch", "onnxruntime", "onnx", "numpy"):
        try:
            found[name] = __import__(name).__version__
        except Exception as error:  # noqa: BLE001 - a missing package is reported, not fatal
            found[name] = f"unavailable ({error})"
    return found


def cpu_model(unknown: str = "unknown CPU") -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return unknown


def machine() -> str:
    return f"{platform.node()}, {platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu_model()})"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"load average: {load_average()}"


def shell(command: list[str]) -> str:
    """The command as typed in the venv (the onnxmodcap executable by its name)."""
    shown = [Path(command[0]).name if Path(command[0]).name == "onnxmodcap" else command[0], *command[1:]]
    return " ".join(shlex.quote(part) for part in shown)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def code_state() -> str:
    """The onnxmodcap code a run imports (the package is installed editable, and the working tree may
    change between runs): HEAD, the package files that differ from it, and a hash of the package sources."""
    root = Path(__file__).resolve().parent.parent
    package = root / "onnxmodcap"
    digest_all = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest_all.update(path.name.encode() + b"\0" + path.read_bytes())

    def git(*command: str) -> str:
        try:
            return subprocess.run(["git", *command], cwd=root, capture_output=True, text=True,
                                  check=False).stdout.strip()
        except OSError:
            return "n/a"

    changed = [line[3:] for line in git("status", "--porcelain", "--", "onnxmodcap").splitlines()]
    return (f"HEAD {git('rev-parse', '--short', 'HEAD')}, onnxmodcap/*.py sha256 {digest_all.hexdigest()[:12]}, "
            f"uncommitted package changes: {', '.join(changed) if changed else 'none'}")


def resolve_model(name: str, models: Path) -> Path:
    path = Path(name)
    if path.suffix == ".onnx" or path.exists():
        return path
    return models / f"{name}.onnx"


def parse_run(text: str, models: Path) -> dict:
    parts = text.split(":")
    if len(parts) == 2 and parts[1] == "float":
        return {"model": resolve_model(parts[0], models), "method": "float", "wbits": None, "abits": None}
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--run {text!r}: expected MODEL:float or MODEL:WBITS:ABITS:METHOD")
    return {"model": resolve_model(parts[0], models), "wbits": int(parts[1]), "abits": int(parts[2]),
            "method": parts[3]}


def header(args, env_threads: str) -> str:
    found = versions()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "# Block reconstruction methods on the shipped Fashion-MNIST models\n\n"
        f"Started {now} by `tools/bench_methods.py`.\n\n"
        f"- Machine: {machine()}\n"
        f"- Load when the benchmark started (`uptime`): `{uptime()}`; other jobs shared the machine, so the "
        "load of every run is in its row and its details.\n"
        f"- Versions: python {found['python']}, torch {found['torch']}, onnxruntime {found['onnxruntime']}, "
        f"onnx {found['onnx']}, numpy {found['numpy']}\n"
        f"- Threads: OMP_NUM_THREADS={env_threads} for every command\n"
        f"- Calibration: `{args.calib}`; test set: `{args.data}` (all images unless a row says otherwise)\n\n"
        "Columns: top-1 and agreement (share of test images whose top-1 class equals the float model's) come "
        "from `onnxmodcap evaluate --json`; KL is the mean KL divergence to the float model from the same "
        "output. *Quantize wall s* is the wall clock of the whole `onnxmodcap quantize` command (process "
        "start, calibration, reconstruction, export, ONNX Runtime validation); *recon s* is the sum of the "
        "per-unit reconstruction seconds in the report. *Unit loss* is the report's per-unit output error "
        "(256 calibration images) before and after reconstruction; *units loss up* counts units whose "
        "loss after is larger than before. Exact commands and per-unit figures are under Details.\n\n"
        "## Results\n\n"
        + TABLE_HEADER + ROWS_END + "\n\n## Details\n\n" + DETAILS_END + "\n"
    )


def insert(out: Path, row: str, details: str, fresh_header: str) -> None:
    text = out.read_text() if out.exists() else fresh_header
    if ROWS_END not in text or DETAILS_END not in text:
        text = text.rstrip("\n") + "\n\n" + fresh_header
    text = text.replace(ROWS_END, row + ROWS_END, 1)
    text = text.replace(DETAILS_END, details + DETAILS_END, 1)
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, out)


def next_index(out: Path) -> int:
    if not out.exists():
        return 1
    text = out.read_text()
    if ROWS_END not in text:
        return 1
    table = text.split(ROWS_END, 1)[0]
    return sum(1 for line in table.splitlines() if line.startswith("| ") and line[2:3].isdigit()) + 1


def run_command(command: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    return done, time.monotonic() - started


def notable_lines(stderr: str) -> list[str]:
    """Warnings and errors from a command's stderr (tqdm progress lines are dropped)."""
    keep = []
    for raw in stderr.replace("\r", "\n").splitlines():
        line = raw.strip()
        lowered = line.lower()
        if not line or "it/s]" in line or "s/it]" in line or "unit/s]" in line or "s/unit]" in line:
            continue
        if any(word in lowered for word in ("warn", "error", "parity", "fail", "nan", "traceback", "skipp")):
            keep.append(line[:300])
    return keep


def failure_tail(stderr: str, limit: int = 800) -> str:
    """The end of a failed command's stderr without tqdm progress lines (kept one line)."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()
             if line.strip() and "it/s" not in line and "s/it" not in line and "[A" not in line]
    return " / ".join(lines)[-limit:] or "(no message)"


def fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def measure(spec: dict, args, env: dict, index: int, float_top1: dict) -> tuple[str, str]:
    model: Path = spec["model"]
    stem = model.stem
    load_before = load_average()
    quantize_cmd, quantize_seconds, report, notes = None, None, None, []
    started_at = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S UTC")
    code = code_state()
    if spec["method"] == "float":
        target = model
    else:
        tag = f"{stem}.w{spec['wbits']}a{spec['abits']}.{spec['method']}.s{args.seed}"
        target = args.work / f"{tag}.onnx"
        report_path = args.work / f"{tag}.json"
        quantize_cmd = [args.onnxmodcap, "quantize", str(model), "--calib", str(args.calib),
                        "--wbits", str(spec["wbits"]), "--abits", str(spec["abits"]), "--method", spec["method"]]
        if spec["method"] != "rtn":
            quantize_cmd += ["--preset", args.preset, "--modcap", "off"]  # the methods alone; ModCap: bench_modcap.py
            if args.iters is not None:
                quantize_cmd += ["--iters", str(args.iters)]
        quantize_cmd += ["-o", str(target), "--report", str(report_path), "--seed", str(args.seed)]
        print(f"[{index}] {shell(quantize_cmd)}", file=sys.stderr, flush=True)
        done, quantize_seconds = run_command(quantize_cmd, env)
        notes += notable_lines(done.stderr)
        if done.returncode != 0:
            notes.append(f"quantize exited {done.returncode}"
                         f"{' (killed by signal ' + str(-done.returncode) + ')' if done.returncode < 0 else ''}: "
                         f"{failure_tail(done.stderr)}")
        else:
            report = json.loads(report_path.read_text())
    evaluation = None
    evaluate_cmd = [args.onnxmodcap, "evaluate", str(target), "--data", str(args.data), "--reference", str(model),
                    "--json"]
    if args.limit:
        evaluate_cmd += ["--limit", str(args.limit)]
    if report is not None or spec["method"] == "float":
        print(f"[{index}] {shell(evaluate_cmd)}", file=sys.stderr, flush=True)
        done, evaluate_seconds = run_command(evaluate_cmd, env)
        notes += notable_lines(done.stderr)
        if done.returncode != 0:
            notes.append(f"evaluate exited {done.returncode}: {failure_tail(done.stderr)}")
        else:
            evaluation = json.loads(done.stdout.strip().splitlines()[-1])
            notes.append(f"evaluate took {evaluate_seconds:.1f} s")
    load_after = load_average()

    top1 = evaluation["top1"] * 100 if evaluation and evaluation.get("top1") is not None else None
    if spec["method"] == "float" and top1 is not None:
        float_top1[str(model)] = top1
    delta = top1 - float_top1[str(model)] if top1 is not None and str(model) in float_top1 else None
    agreement = evaluation.get("agreement") if evaluation else None
    kl = evaluation.get("kl") if evaluation else None
    units = (report or {}).get("reconstruction") or []
    before = sum(u["loss_before"] for u in units) if units else None
    after = sum(u["loss_after"] for u in units) if units else None
    up = [u for u in units if u["loss_after"] > u["loss_before"]]
    recon = sum(u["seconds"] for u in units) if units else None
    validation = (report or {}).get("validation") or {}
    parity = (f"{validation['exact_images'] * 100:.0f}% / {validation['argmax_agreement'] * 100:.0f}%"
              if validation else "n/a")
    wa = "float" if spec["method"] == "float" else f"W{spec['wbits']}A{spec['abits']}"
    iters = "" if spec["method"] in ("float", "rtn") else str(args.iters or {"fast": 1000, "paper": 20000}.get(
        args.preset, args.preset))
    row = (f"| {index} | {stem} | {wa} | {spec['method']} | {iters or '–'} | "
           f"{args.seed if spec['method'] != 'float' else '–'} | {fmt(top1)} | "
           f"{'–' if spec['method'] == 'float' else (f'{delta:+.2f}' if delta is not None else 'n/a')} | "
           f"{fmt(agreement * 100 if agreement is not None else None)} | {fmt(kl, 4)} | "
           f"{fmt(quantize_seconds, 1) if quantize_seconds is not None else '–'} | "
           f"{fmt(recon, 1) if recon is not None else '–'} | "
           f"{f'{before:.4g} → {after:.4g}' if units else '–'} | "
           f"{f'{len(up)}/{len(units)}' if units else '–'} | {parity} | {load_before.split()[0]} / "
           f"{load_after.split()[0]} |\n")

    lines = [f"### {index}. {stem} {wa} {spec['method']}\n",
             f"- Started {started_at}; load average (1/5/15 min) before `{load_before}`, after `{load_after}`",
             f"- Model `{model}` sha256 {digest(model)}…",
             f"- Code when the run started: {code}"]
    if quantize_cmd:
        lines.append(f"- Quantize: `OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '')} {shell(quantize_cmd)}`")
        lines.append(f"  - wall {fmt(quantize_seconds, 1)} s; report `seconds` "
                     f"{(report or {}).get('seconds', 'n/a')}")
    ran = report is not None or spec["method"] == "float"
    lines.append(f"- Evaluate: `OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '')} {shell(evaluate_cmd)}`"
                 f"{'' if ran else ' (not run: quantize failed)'}")
    if evaluation:
        shown = {k: v for k, v in evaluation.items() if not isinstance(v, (list, dict))}
        lines.append(f"  - `{json.dumps(shown)}`")
    if validation:
        lines.append(f"- Validation (report): images {validation.get('images')}, held-out {validation.get('held_out')}, "
                     f"provider {validation.get('provider')}, exact {validation.get('exact_images')}, "
                     f"max diff rel {validation.get('max_abs_diff_relative')}, argmax {validation.get('argmax_agreement')}, "
                     f"float top-1 agreement {validation.get('float_top1_agreement')}, "
                     f"parity_ok {validation.get('parity_ok')}")
    if units:
        lines.append("- Per-unit loss (before → after, seconds):")
        lines.append("")
        lines.append("  | unit | before | after | after/before | s |")
        lines.append("  |---|---|---|---|---|")
        for u in units:
            ratio = u["loss_after"] / u["loss_before"] if u["loss_before"] else float("nan")
            mark = " **up**" if u["loss_after"] > u["loss_before"] else ""
            lines.append(f"  | {u['name']} | {u['loss_before']:.4g} | {u['loss_after']:.4g} | "
                         f"{ratio:.3f}{mark} | {u['seconds']} |")
        lines.append("")
    for note in notes:
        lines.append(f"- Note: {note}")
    details = "\n".join(lines) + "\n\n"
    return row, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True,
                        help="MODEL:float or MODEL:WBITS:ABITS:METHOD (repeatable, run in the order given)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks_methods.md"))
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--calib", type=Path, default=Path("models/calib"))
    parser.add_argument("--data", type=Path, default=Path("models/fashion_mnist_test.npz"))
    parser.add_argument("--preset", default="fast", choices=["fast", "paper"])
    parser.add_argument("--iters", type=int, default=None, help="Overrides --preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="Evaluate on N test images (default: all)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_methods"),
                        help="Folder for the quantized models and reports")
    parser.add_argument("--threads", default=os.environ.get("OMP_NUM_THREADS", "1"),
                        help="OMP_NUM_THREADS for the commands (default: the current value, else 1)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="Start no new run after this many minutes since the benchmark started")
    parser.add_argument("--onnxmodcap", default=str(Path(sys.executable).with_name("onnxmodcap")),
                        help="The onnxmodcap executable")
    args = parser.parse_args()
    specs = [parse_run(text, args.models) for text in args.run]
    for spec in specs:
        if not spec["model"].exists():
            parser.error(f"model not found: {spec['model']}")
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    fresh = header(args, str(args.threads))
    float_top1: dict = {}
    if args.out.exists():  # float rows measured by an earlier invocation give the Δ column its reference
        for line in args.out.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) > 6 and cells[3] == "float":
                try:
                    float_top1[str(resolve_model(cells[1], args.models))] = float(cells[6])
                except ValueError:
                    pass
    started = time.monotonic()
    for spec in specs:
        if args.deadline is not None and (time.monotonic() - started) / 60 > args.deadline:
            print(f"deadline of {args.deadline} min passed: not starting {spec}", file=sys.stderr)
            break
        index = next_index(args.out)
        row, details = measure(spec, args, env, index, float_top1)
        insert(args.out, row, details, fresh)
        print(row.strip(), flush=True)


if __name__ == "__main__":
    main()
