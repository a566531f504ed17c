"""PD-Quant and ModCap against QDrop and BRECQ on the shipped models: top-1 (mean of seeds), the
oscillation of the per-unit losses, and wall times.

    OMP_NUM_THREADS=1 python tools/bench_modcap.py run --results /tmp/mc/a.jsonl --iters 200 --seeds 0 1 2 \
        --run mobilenetv2_x0_5:2:4:qdrop --run mobilenetv2_x0_5:2:4:qdrop:data ...
    python tools/bench_modcap.py render --results /tmp/mc/a.jsonl /tmp/mc/b.jsonl --out docs/benchmarks/modcap.md
    python tools/bench_modcap.py oscillation --results /tmp/mc/a.jsonl /tmp/mc/b.jsonl
    python tools/bench_modcap.py grid --results /tmp/mc/a.jsonl /tmp/mc/b.jsonl
    python tools/bench_modcap.py compare --before /tmp/mc/old.jsonl --after /tmp/mc/new.jsonl

A run is MODEL:WBITS:ABITS:METHOD[:MODCAP] (MODEL: a stem in --models). Each (run, seed) quantizes
in this process with `onnxmodcap.quantize(...)` (calibration folder, all images), then evaluates
the output on the whole test set against the float model, and appends one JSON line to --results;
runs already in --results are skipped, so an interrupted benchmark continues where it stopped.
Several `run` processes with different --results files can share the machine; `render` merges them
into the table between the marker comments of --out, leaving the rest of that file as it is.
`oscillation` pairs each ModCap run with the run without ModCap of the same seed and settings, and
prints the oscillation figure over all units and over the ModCap run's group ends only (the outputs
that both runs reconstruct), with the loss sum and total variation it is the ratio of. `grid`
prints one table of top-1 and time per model, bit width and method, the latest record of each
seed counting. `compare` puts the same runs measured at two code states side by side (run each
state from its own `git worktree`, with its own --results file).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import onnxmodcap
from onnxmodcap.evaluate import evaluate
from onnxmodcap.modcap import oscillation, total_variation
from onnxmodcap.partition import partition
from onnxmodcap.config import METHODS
from onnxmodcap.prepare import prepare

from benchgrid import machine, parse_cell, read_records, run_cells, write_between


TABLE_START, TABLE_END = "<!-- bench_modcap: table start -->", "<!-- bench_modcap: table end -->"


def parse_run(text: str, args) -> dict:
    """A cell MODEL:WBITS:ABITS:METHOD[:MODCAP], with the run's iteration and rate settings."""
    cell = parse_cell(text, ("model", "wbits", "abits", "method", "modcap"), {"modcap": "off"})
    return {**cell, "wbits": int(cell["wbits"]), "abits": int(cell["abits"]), "iters": args.iters,
            "round_lr": args.round_lr, "preset": args.preset}


def key(record: dict) -> tuple:
    return (record["model"], record["wbits"], record["abits"], record["method"], record["modcap"],
            record["iters"], record.get("round_lr"), record["seed"])


def measure(spec: dict, seed: int, args) -> dict:
    """Quantize in this process and evaluate on the whole test set against the float model."""
    model = args.models / f"{spec['model']}.onnx"
    with tempfile.TemporaryDirectory() as folder:
        output, report = Path(folder) / "q.onnx", Path(folder) / "q.json"
        started = time.monotonic()
        result = onnxmodcap.quantize(model, args.calib, wbits=spec["wbits"], abits=spec["abits"],
                                     method=spec["method"], modcap=spec["modcap"], iters=args.iters,
                                     round_lr=args.round_lr, preset=args.preset, seed=seed, output=str(output),
                                     report=str(report))
        wall = time.monotonic() - started
        evaluation = evaluate(str(output), str(args.data), reference_path=str(model))
    report = result.report.to_dict()
    recon, losses = report.get("reconstruction", []), report.get("unit_losses", {})
    return {"weight_lr": report.get("reconstruction_settings", {}).get("weight_lr"), "top1": evaluation.top1,
            "agreement": evaluation.agreement, "kl": evaluation.kl, "quantize_seconds": round(wall, 1),
            "reconstruction_seconds": round(sum(u["seconds"] for u in recon), 1),
            "correction_seconds": round(sum(u.get("correction_seconds", 0.0) for u in recon), 1),
            "oscillation": losses.get("oscillation"), "unit_losses_after": losses.get("after"),
            "merged": report.get("modcap", {}).get("merged"),
            "parity": result.validation.to_dict(), "threads": os.environ.get("OMP_NUM_THREADS"),
            "load_after": os.getloadavg()[0]}


def run(args) -> None:
    cells = [parse_run(text, args) for text in args.run]
    run_cells(cells, args.seeds, args.results, lambda cell, seed: measure(cell, seed, args), key)


def render(args) -> None:
    records = read_records(args.results)
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((*key(record)[:6], record.get("weight_lr"), record["code"]), []).append(record)
    lines = ["| model | W/A | method | modcap | iters/unit | rounding lr | code | seeds | top-1 % mean ± sd | per seed | "
             "oscillation mean | quantize s mean | recon s mean | DC s mean | merged (seed 0) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, wbits, abits, method, modcap, iters, lr, code), rows in sorted(groups.items(), key=lambda item: str(item[0])):
        rows.sort(key=lambda r: r["seed"])
        top1 = [100 * r["top1"] for r in rows]
        spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
        mean = lambda field: statistics.fmean(r[field] for r in rows)  # noqa: E731
        oscillation = f"{mean('oscillation'):.3f}" if rows[0]["oscillation"] is not None else "–"
        merged = "; ".join("+".join(g) for g in rows[0]["merged"]) if rows[0]["merged"] else "–"
        lines.append(f"| {model} | W{wbits}A{abits} | {method} | {modcap} | {iters} | {lr or '–'} | {code} | {len(rows)} | "
                     f"{statistics.fmean(top1):.2f} ± {spread:.2f} | {', '.join(f'{t:.2f}' for t in top1)} | "
                     f"{oscillation} | {mean('quantize_seconds'):.0f} | {mean('reconstruction_seconds'):.0f} | "
                     f"{mean('correction_seconds'):.0f} | {merged} |")
    codes = sorted({r["code"] for r in records})
    header = [f"Machine: {machine()}; code: {', '.join(codes)}; "
              f"threads per run: {', '.join(sorted({str(r['threads']) for r in records}))}; "
              f"last run finished {max(r['finished'] for r in records)}.", ""]
    write_between(args.out, TABLE_START, TABLE_END, "\n".join(header + lines))


def without_modcap(record: dict) -> tuple:
    """The key of the same run with --modcap off."""
    return (*key(record)[:4], *key(record)[5:])


def compare_oscillation(args) -> None:
    records = read_records(args.results)
    baselines = {without_modcap(r): r for r in records if r["modcap"] == "off"}
    unit_names = {}
    pairs: dict[tuple, list[tuple[dict, dict]]] = {}
    for record in records:
        if record["modcap"] != "off" and without_modcap(record) in baselines:
            pairs.setdefault((record["model"], record["wbits"], record["abits"], record["method"], record["modcap"]),
                             []).append((baselines[without_modcap(record)], record))
    print("| model | W/A | method | modcap | seeds | oscillation, all units: off / modcap | at group ends: "
          "off / modcap | loss sum at group ends: off / modcap | total variation at group ends: off / modcap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (model, wbits, abits, method, modcap), runs in sorted(pairs.items()):
        if model not in unit_names:
            unit_names[model] = [u.name for u in partition(prepare(args.models / f"{model}.onnx").model)]
        figures = []
        for off, on in runs:
            inside = {unit_names[model].index(name) for group in on["merged"] for name in group[:-1]}
            ends = [[loss for i, loss in enumerate(r["unit_losses_after"]) if i not in inside] for r in (off, on)]
            figures.append([oscillation(off["unit_losses_after"]), oscillation(on["unit_losses_after"]),
                            *map(oscillation, ends), *map(sum, ends), *map(total_variation, ends)])
        means = [statistics.fmean(column) for column in zip(*figures)]
        print(f"| {model} | W{wbits}A{abits} | {method} | {modcap} | {len(runs)} | "
              + " | ".join(f"{means[i]:.3g} / {means[i + 1]:.3g}" for i in range(0, 8, 2)) + " |")


GRID_COLUMNS = [("rtn", "off"), ("brecq", "off"), ("brecq", "data"), ("brecq", "free"), ("qdrop", "off"),
                ("qdrop", "data"), ("qdrop", "free"), ("pdquant", "off"), ("pdquant", "data"), ("pdquant", "free")]


def grid(args) -> None:
    """Top-1 and quantize time per model, bit width and method, over runs at the preset's
    iterations and rounding rate. A run measured again replaces the earlier record of the same
    seed: pass the files oldest first."""
    latest = {key(r): r for r in read_records(args.results) if r["iters"] is None and r.get("round_lr") is None}
    cells: dict[tuple, list[dict]] = {}
    for record in latest.values():
        cells.setdefault((record["model"], record["wbits"], record["abits"], record["method"], record["modcap"]),
                         []).append(record)
    columns = [c for c in GRID_COLUMNS if any(k[3:] == c for k in cells)]
    print("Each cell: top-1 % (mean of the seeds) / quantize s (mean); seeds in brackets where fewer than 3.\n")
    print("| model | W/A | " + " | ".join(m if c == "off" else f"{m} + {c}" for m, c in columns) + " |")
    print("|---|---|" + "---:|" * len(columns))
    for model, wbits, abits in sorted({k[:3] for k in cells}, key=lambda k: (k[0], -k[1], -k[2])):
        row = []
        for column in columns:
            runs = cells.get((model, wbits, abits, *column), [])
            seeds = f" [{len(runs)}]" if 0 < len(runs) < 3 else ""
            row.append(f"{100 * statistics.fmean(r['top1'] for r in runs):.2f} / "
                       f"{statistics.fmean(r['quantize_seconds'] for r in runs):.0f}{seeds}" if runs else "–")
        print(f"| {model} | W{wbits}A{abits} | " + " | ".join(row) + " |")


def compare(args) -> None:
    """Top-1 of the same runs at two code states, side by side, with the RTN figure of each model and
    bit width from the --after files (RTN does not reconstruct, so a fix to reconstruction leaves it as it is)."""
    def cells(paths: list[Path]) -> dict[tuple, list[dict]]:
        """The latest record of each seed, grouped by everything else in its key."""
        latest = {key(record): record for record in read_records(paths, failed=True)}
        grouped: dict[tuple, list[dict]] = {}
        for seeded, record in latest.items():
            grouped.setdefault(seeded[:7], []).append(record)
        return grouped

    def top1(runs: list[dict]) -> str:
        values = [100 * r["top1"] for r in runs if "error" not in r]
        failures = len(runs) - len(values)
        refused = f", {failures} refused" if failures else ""
        if not values:
            return f"– [0{refused}]" if runs else "–"
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.2f}{spread} [{len(values)}{refused}]"

    def mean(runs: list[dict], field: str) -> float:
        return statistics.fmean(r[field] for r in runs if "error" not in r)

    before, after = cells(args.before), cells(args.after)
    print("Each cell: top-1 % mean ± sd over seeds [seeds measured, runs refused]; Δ = after - before (means); "
          "s: quantize wall s (mean).\n")
    print("| model | W/A | method | RTN | before | after | Δ | s before / after |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for cell in sorted(set(before) | set(after), key=lambda k: (k[0], -k[1], -k[2], METHODS.index(k[3]))):
        if cell[3] == "rtn":
            continue
        rtn = next((runs for k, runs in after.items() if k[:3] == cell[:3] and k[3] == "rtn"), [])
        old, new = before.get(cell, []), after.get(cell, [])
        measured = all(any("error" not in r for r in runs) for runs in (old, new))
        delta = f"{100 * (mean(new, 'top1') - mean(old, 'top1')):+.2f}" if measured else "–"
        seconds = " / ".join(f"{mean(runs, 'quantize_seconds'):.0f}" if any("error" not in r for r in runs) else "–"
                             for runs in (old, new))
        print(f"| {cell[0]} | W{cell[1]}A{cell[2]} | {cell[3]}{'' if cell[4] == 'off' else ' + ' + cell[4]} | "
              f"{top1(rtn)} | {top1(old)} | {top1(new)} | {delta} | {seconds} |")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run")
    runner.add_argument("--run", action="append", required=True)
    runner.add_argument("--results", type=Path, required=True)
    runner.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    runner.add_argument("--iters", type=int, default=None, help="iterations per unit (default: the preset's)")
    runner.add_argument("--preset", default="fast", choices=["fast", "paper"])
    runner.add_argument("--round-lr", type=float, default=None,
                        help="Adam's rate on the rounding variables (default: the preset's and method's)")
    runner.add_argument("--models", type=Path, default=Path("models"))
    runner.add_argument("--calib", type=Path, default=Path("models/calib"))
    runner.add_argument("--data", type=Path, default=Path("models/fashion_mnist_test.npz"))
    renderer = commands.add_parser("render")
    renderer.add_argument("--results", type=Path, nargs="+", required=True)
    renderer.add_argument("--out", type=Path, required=True)
    comparer = commands.add_parser("oscillation")
    comparer.add_argument("--results", type=Path, nargs="+", required=True)
    comparer.add_argument("--models", type=Path, default=Path("models"))
    gridder = commands.add_parser("grid")
    gridder.add_argument("--results", type=Path, nargs="+", required=True)
    compared = commands.add_parser("compare")
    compared.add_argument("--before", type=Path, nargs="+", required=True)
    compared.add_argument("--after", type=Path, nargs="+", required=True)
    args = parser.parse_args()
    {"run": run, "render": render, "oscillation": compare_oscillation, "grid": grid, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
