"""The exceptions that reach the user as a single error line."""


class UserError(Exception):
    """Bad input or an impossible request: the CLI prints `error: <message>` and exits non-zero."""

    exit_code = 2


class Interrupted(UserError):
    """The user stopped a run (Ctrl-C); finished work is checkpointed."""

    exit_code = 130


class RunFailed(UserError):
    """A run broke part-way (a crash inside a unit, a full disk); finished work is checkpointed."""

    exit_code = 1


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
