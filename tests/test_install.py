"""graphs/, kernels/ and profiling/ install as hybrid_sd.* in both editable and regular installs."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("hybrid_sd.graphs", "hybrid_sd.kernels", "hybrid_sd.profiling")
CHECK = ("import importlib.util, hybrid_sd.graphs, hybrid_sd.kernels, hybrid_sd.profiling, hybrid_sd.engine;"
         "assert all(importlib.util.find_spec(n) is None for n in ('graphs', 'profiling')), 'generic top-level package';"
         "print(hybrid_sd.graphs.__file__)")


def test_current_install_maps_subpackages():
    for name in SUBPACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is not None, name
        assert Path(spec.origin).parent.name == name.split(".")[1]


def test_regular_install_imports_subpackages(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(ROOT)], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(build.stderr[-2000:])
    installed = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info"))
    assert installed == ["hybrid_sd"], installed  # nothing generic at the top level
    for sub in ("graphs", "kernels", "profiling"):
        assert (target / "hybrid_sd" / sub / "__init__.py").is_file()
    assert (target / "hybrid_sd" / "eval" / "chat_heldout.json").is_file()  # the bench's chat prompts
    assert (target / "hybrid_sd" / "kernels" / "cpu_rows.cpp").is_file()  # built on the user's machine
    env = dict(os.environ, PYTHONPATH=str(target))
    run = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(target))


@pytest.mark.parametrize("site", [True, False], ids=["with-site-packages", "without"])
def test_checkout_root_does_not_shadow_pypi_kernels(site):
    """From the repo root (`python -m …` puts it on sys.path) a top-level `kernels` is PyPI's
    package where one is installed (transformers imports it then), else missing; never ours."""
    code = "try:\n import kernels\nexcept ModuleNotFoundError:\n print('absent')\nelse:\n print(kernels.__file__)"
    run = subprocess.run([sys.executable, *([] if site else ["-S"]), "-c", code], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    found = run.stdout.strip()
    if not site:
        assert found == "absent"
    else:
        assert found == "absent" or not Path(found).resolve().is_relative_to(ROOT), found


def test_transformers_imports_from_checkout_root():
    run = subprocess.run([sys.executable, "-c", "import transformers.activations, hybrid_sd.kernels"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
