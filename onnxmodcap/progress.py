"""Progress bars of long stages: tqdm on stderr, which the command line's `-q` switches off."""

from __future__ import annotations

from tqdm import tqdm

_shown = True

# How much the time left of a bar that counts predicted seconds trusts the prediction: the rate it
# divides the work left by counts this share of the whole run's predicted seconds as done at the
# predicted speed, beside what was really done. On the three real-model runs made with the probe
# of `reconstruct.step_costs` as it is, 0.5 kept the time left within 18-20 % where the plain mean
# rate missed by 24-55 % (docs/benchmarks/reconstruct.md, "The held rate").
PREDICTION_WEIGHT = 0.5


def show_progress(shown: bool) -> None:
    """Show (the default) or hide every progress bar this process creates from now on."""
    global _shown
    _shown = shown


def progress_bar(iterable=None, bar: type[tqdm] = tqdm, **options) -> tqdm:
    """A tqdm bar (or one of the subclass `bar`), hidden when `show_progress(False)` was called."""
    if not _shown:
        options["disable"] = True
    return bar(iterable, **options)


def held_rate(done: float, elapsed: float, prior: float) -> float:
    """Predicted seconds of work per real second, with `prior` predicted seconds counted as done in
    `prior` real seconds: early in a run the rate stays near the prediction's own 1 instead of
    following the first unit, whose speed may be untypical of the rest."""
    return (done + prior) / (elapsed + prior)


class PredictedSecondsBar(tqdm):
    """A bar whose work is counted in predicted seconds and whose time left divides the work left by
    `held_rate` with PREDICTION_WEIGHT of the total as the prior, instead of tqdm's own rate."""

    @property
    def format_dict(self):
        shown = super().format_dict
        if "initial" not in shown:  # a disabled bar shows nothing
            return shown
        prior = PREDICTION_WEIGHT * (self.total or 0)
        if shown["elapsed"] + prior > 0:
            shown["rate"] = held_rate(shown["n"] - shown["initial"], shown["elapsed"], prior)
        return shown


def predicted_seconds_bar(total: float, initial: float = 0.0, **options) -> tqdm:
    """A `PredictedSecondsBar` of `total` predicted seconds, `initial` of them done before (a resumed
    run), hidden when `show_progress(False)` was called."""
    return progress_bar(bar=PredictedSecondsBar, total=total, initial=initial, smoothing=0, **options)
