"""The one exception type the CLI turns into a one-line message and exit code 2; docs/errors.md
lists the messages and what to do about each."""
import errno
import os
import sys

BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away


class UserError(Exception):
    """Bad input from the user: a missing or mismatched checkpoint, a bad flag, a too-long prompt."""


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so that flushing what is left in sys.stdout at exit
    (into a closed pipe or a full disk) does not print a second error (Python's documented
    recipe for SIGPIPE)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return  # no real stdout (None, or a test's capture object)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def exit_code(command, args) -> int:
    """Run a command's body; a UserError becomes one line on stderr and exit code 2, and so does
    a full disk under an output; a reader that went away (`... | head`) ends it quietly with
    141, as Unix tools do."""
    try:
        result = command(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        silence_stdout()
        return BROKEN_PIPE
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        silence_stdout()  # most likely stdout itself: its flush at exit would fail again
        print(f"error: cannot write the output ({e.strerror or e})", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
