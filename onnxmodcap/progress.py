"""Progress bars of long stages: tqdm on stderr, which the command line's `-q` switches off."""

from __future__ import annotations

from tqdm import tqdm

_shown = True


def show_progress(shown: bool) -> None:
    """Show (the default) or hide every progress bar this process creates from now on."""
    global _shown
    _shown = shown


def progress_bar(iterable=None, **options) -> tqdm:
    """A tqdm bar, hidden when `show_progress(False)` was called."""
    if not _shown:
        options["disable"] = True
    return tqdm(iterable, **options)
