"""The benchmark runner the grid benchmarks share (bench_modcap.py: the methods and ModCap on the
shipped models; bench_real_models.py: real pretrained models at real resolution).

A benchmark is a list of cells, each given on the command line as a colon-separated spec
(`resnet18:4:4:qdrop`, `open_nsfw:w8a8:rtn`). Each cell is measured once per seed and appended as
one JSON line to a results file, with the code state it ran on; several processes can fill
separate files. Given a key, a cell already recorded is skipped, so an interrupted benchmark
continues where it stopped; without one, every cell is measured again and the latest record counts.
Rendering writes a markdown table between two marker comments of a document.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_cell(text: str, fields: Sequence[str], defaults: dict[str, str] | None = None) -> dict[str, str]:
    """`fields` named in order from a colon-separated spec; trailing fields in `defaults` may be left out."""
    parts = text.split(":")
    optional = defaults or {}
    required = len(fields) - sum(1 for name in fields if name in optional)
    if not required <= len(parts) <= len(fields):
        raise SystemExit(f"bad cell {text!r}: expected {':'.join(fields)}")
    given = {**optional, **dict(zip(fields, parts))}
    return {name: given[name] for name in fields}


def read_records(paths: Iterable[Path], failed: bool = False) -> list[dict]:
    """The records of the results files, in order; with `failed`, also the cells that failed."""
    records = []
    for path in paths:
        if path.exists():
            records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record for record in records if failed or "error" not in record]


def run_cells(cells: Sequence[dict], seeds: Sequence[int], results: Path, measure: Callable[[dict, int], dict],
              key: Callable[[dict], tuple] | None = None) -> None:
    """Measure each cell at each seed and append its record to `results`. With `key`, a cell whose
    key is already recorded there (measured or failed) is skipped. `measure` may raise
    onnxmodcap's UserError for a cell that the tool refuses: that is recorded as the cell's error."""
    from onnxmodcap.errors import Interrupted, RunFailed, UserError

    done = {key(record) for record in read_records([results], failed=True)} if key else set()
    for cell in cells:
        for seed in seeds:
            base = {**cell, "seed": seed}
            if key and key(base) in done:
                continue
            print(f"{':'.join(str(value) for value in cell.values() if value is not None)} seed {seed}", flush=True)
            try:
                record = {**base, **measure(cell, seed)}
            except (Interrupted, RunFailed):
                raise
            except UserError as err:  # a refused run (a parity failure, say) is a result too
                record = {**base, "error": str(err)}
            record |= {"code": code_state(), "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            print(f"  {record.get('error') or 'done'}", flush=True)
            with results.open("a") as stream:
                stream.write(json.dumps(record) + "\n")


def code_state() -> str:
    """The onnxmodcap code a run imports (installed editable, so the working tree counts): HEAD, and
    the package files that differ from it with a hash of the package sources when there are any."""
    def git(*command: str) -> str:
        try:
            # rstrip: porcelain lines start with a status column that may be a space
            return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True).stdout.rstrip()
        except OSError:
            return "n/a"

    changed = [line[3:] for line in git("status", "--porcelain", "--", "onnxmodcap").splitlines()]
    if not changed:
        return git("rev-parse", "--short", "HEAD")
    sources = hashlib.sha256()
    for path in sorted((REPO / "onnxmodcap").rglob("*.py")):
        sources.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return f"{git('rev-parse', '--short', 'HEAD')} + changes to {', '.join(changed)} (sha256 {sources.hexdigest()[:12]})"


def cpu_model(unknown: str = "unknown CPU") -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return unknown


def machine() -> str:
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu_model()})"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], numeric: Sequence[bool] = ()) -> str:
    """A markdown table; columns flagged in `numeric` are right-aligned."""
    align = ["---:" if right else "---" for right in (*numeric, *[False] * (len(header) - len(numeric)))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_between(path: Path, start: str, end: str, text: str) -> None:
    """Replace what lies between the marker lines `start` and `end` of `path` with `text` (a new
    file holds just the markers and the text)."""
    document = path.read_text() if path.exists() else f"{start}\n{end}\n"
    if start not in document or end not in document:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    before, rest = document.split(start, 1)
    _, after = rest.split(end, 1)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(f"{before}{start}\n{text.strip()}\n{end}{after}")
    temporary.replace(path)
