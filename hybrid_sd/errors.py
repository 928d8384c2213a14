"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a missing or mismatched checkpoint, a bad flag, a too-long prompt."""


def exit_code(command, args) -> int:
    """Run a command's body; a UserError becomes one line on stderr and exit code 2."""
    import sys
    try:
        result = command(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
