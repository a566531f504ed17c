"""The one exception type that reaches the user as a single error line."""


class UserError(Exception):
    """Bad input or an impossible request: the CLI prints `error: <message>` and exits non-zero."""
