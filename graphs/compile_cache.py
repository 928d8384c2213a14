"""Where torch.compile keeps what it built, so that only the first run on a machine compiles.

Inductor caches each compiled graph (its FX graph cache, on by default; the AOTAutograd cache
skips graphs with frozen weights, which the CPU's compiled steps have) under one directory,
`/tmp/torchinductor_<user>` unless told otherwise: gone at the next boot.
`use_compile_cache(directory)` points it at a directory that lasts. A later process then pays
only for dynamo's trace of each step (about a second per key on the CPU), not for lowering and
building its C++ again. It must run before the first compile of the process: inductor reads the
place once and keeps it (in the same variable, so a place already set is kept and reported).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"
_said: set[str] = set()  # directories already reported unusable in this process


def use_compile_cache(directory: Path) -> Path | None:
    """Keep inductor's caches in `directory`, unless a place is set already (the user's, or
    inductor's own after a compile); returns the place in use, None for inductor's default where
    `directory` cannot be written (said once on stderr: compiling still works, it just does
    not outlive /tmp)."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    directory = Path(directory).absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        writable = os.access(directory, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:
        if str(directory) not in _said:
            _said.add(str(directory))
            print(f"[graphs] the compile cache {directory} cannot be written: compiled steps are kept in "
                  "inductor's default place (/tmp) this time; set HYBRID_SD_CACHE to a writable directory "
                  "to keep them", file=sys.stderr)
        return None
    os.environ[CACHE_VARIABLE] = str(directory)
    return directory
