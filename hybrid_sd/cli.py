"""What every command-line entry point shares: an argparse parser whose errors are one line,
argument types that refuse nonsense at parse time (NaN, infinities, zero counts, non-integer
lists), output checks made before any work, and atomic writes of results."""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, as for every other user error
        self.exit(2, f"error: {message} (see --help)\n")


# ---- argparse types: each raises ArgumentTypeError, which Parser prints as one line --------

def _integer(text: str, lo: int, hi: int | None = None, what: str | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what or _range(lo, hi)}, got {text!r}") from None
    if value < lo or (hi is not None and value > hi):
        raise argparse.ArgumentTypeError(f"expected {what or _range(lo, hi)}, got {value}")
    return value


def _range(lo: int, hi: int | None) -> str:
    return f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, batches, epochs)."""
    return _integer(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (0 = skip)."""
    return _integer(text, 0)


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**64 - 1]."""
    return _integer(text, 0, SEED_MAX, what="an integer in [0, 2**64 - 1]")


def int_at_least(lo: int):
    """An integer >= lo (e.g. a block size >= 2)."""
    def parse(text: str) -> int:
        return _integer(text, lo)
    parse.__name__ = f"int_at_least_{lo}"
    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def finite_float(text: str) -> float:
    return _float(text)


def nonnegative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, time limits, loss weights)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. 2,4,6."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers >= 1, got {text!r}")
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers >= 1, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers >= 1, got {text!r}")
    return values


def layer_ids(text: str) -> str:
    """A comma-separated list of integers >= 0 (layer ids), checked and returned as given."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers >= 0, got {text!r}")
    return text


# ---- outputs: checked before the work, written whole or not at all --------------------------

class OutputError(argparse.ArgumentTypeError):
    """An output path that cannot be written: an argparse type error (one line through Parser)
    and, through check_out_dir / check_out_file, a UserError."""


def _check_creatable(path: Path, flag: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{flag}{path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{flag}{path}: cannot write in {parent} (permission denied or read-only)")
            return


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output directory that exists or can be created: not a file, no file on its path, and a
    writable nearest existing ancestor. Checked before any work, so that nothing expensive is
    lost at the end. Creates nothing. Raises UserError."""
    return _as_user_error(_out_dir, path, flag)


def _as_user_error(check, path: str | Path, flag: str) -> Path:
    from .errors import UserError
    try:
        return check(path, f"{flag} ")
    except OutputError as e:
        raise UserError(str(e)) from None


def _out_dir(path: str | Path, flag: str) -> Path:
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{flag}{path} is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{flag}{path}: cannot write in it (permission denied or read-only)")
        return path
    _check_creatable(path, flag)
    return path


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """An output file that can be (re)written: not a directory, and its directory exists or can
    be created and is writable. Creates nothing. Raises UserError."""
    return _as_user_error(_out_file, path, flag)


def _out_file(path: str | Path, flag: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag}{path} is a directory, not a file")
    _check_creatable(path, flag)
    return path


def out_dir(text: str) -> Path:
    """argparse type of an --out directory (check_out_dir, before any work; argparse names the flag)."""
    return _out_dir(text, "")


def out_file(text: str) -> Path:
    """argparse type of an --out file (check_out_file, before any work; argparse names the flag)."""
    return _out_file(text, "")


def write_atomic(path: str | Path, data: str | bytes | None = None, writer=None) -> Path:
    """Write `data` (or call writer(temporary path)) to a temporary file next to `path`, then
    rename it over `path`: a reader sees the old file or the new one, never half of one. A
    failed write (full disk, read-only, no permission) is one UserError naming the file."""
    from .errors import UserError
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            if data is not None:
                f.write(data.encode() if isinstance(data, str) else data)
        if writer is not None:
            writer(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are shared files
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def resolve_device(name: str):
    """The torch device `--device` names (cpu or cuda[:N]), or a UserError saying what is wrong."""
    import torch

    from .errors import UserError
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use cpu or cuda[:N])") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but this torch build sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r} (use cpu or cuda[:N])")
    return device
