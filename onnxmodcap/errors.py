"""The one exception type that reaches the user as a single error line."""


class UserError(Exception):
    """Bad input or an impossible request: the CLI prints `error: <message>` and exits non-zero."""

    exit_code = 2


class Interrupted(UserError):
    """The user stopped a run (Ctrl-C); finished work is checkpointed."""

    exit_code = 130
