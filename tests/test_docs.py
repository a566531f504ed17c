"""The documentation holds what the code does: the CLI reference is the commands' own help, every
Python option is documented, every relative link resolves, and `quantize --help` shows the
everyday options on one screen."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from onnxmodcap.cli import main
from onnxmodcap.config import QuantizeConfig

REPO = Path(__file__).resolve().parent.parent
SCREEN_LINES = 50


def test_cli_reference_is_the_commands_help():
    done = subprocess.run([sys.executable, str(REPO / "tools" / "cli_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_python_option_is_documented():
    documented = set(re.findall(r"^\| `(\w+)` \|", (REPO / "docs" / "python.md").read_text(), re.M))
    assert {f.name for f in dataclasses.fields(QuantizeConfig)} <= documented


def test_every_relative_link_in_readme_and_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken


def test_quantize_help_shows_the_everyday_options_first_on_one_screen():
    text = CliRunner().invoke(main, ["quantize", "--help"], terminal_width=80).output
    first_section = text.split("\n\n")[:3]  # usage, description, the everyday options
    assert first_section[2].startswith("Options:")
    assert len("\n\n".join(first_section).splitlines()) <= SCREEN_LINES
    for flag in ("--calib", "--bits", "--method", "--modcap", "--target", "--preset", "--device", "--resume"):
        assert flag in first_section[2]
    assert "Other options" not in text
