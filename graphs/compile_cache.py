"""Where torch.compile keeps what it built, so that only the first run on a machine compiles.

Inductor caches each compiled graph (its FX graph cache and AOTAutograd cache, on by default)
under one directory, `/tmp/torchinductor_<user>` unless told otherwise: gone at the next boot.
`use_compile_cache(directory)` points it at a directory that lasts. A later process then pays
only for dynamo's trace of each step (about a second per key on the CPU), not for lowering and
building its C++ again. It must run before the first compile of the process: inductor reads
the place once and keeps it.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def use_compile_cache(directory: Path) -> Path:
    """Keep inductor's caches in `directory`, unless the user named a place already; returns the
    place in use."""
    if not os.environ.get(CACHE_VARIABLE):
        os.environ[CACHE_VARIABLE] = str(Path(directory).absolute())
    return Path(os.environ[CACHE_VARIABLE])
