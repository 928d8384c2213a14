"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a missing or mismatched checkpoint, a bad flag, a too-long prompt."""
