"""The CPU row kernel (kernels/cpu_rows) equals its PyTorch reference, gives each row the same
bits whatever rows share the call, and where it cannot be built says why while the linears
keep their PyTorch products."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hybrid_sd.kernels import cpu_rows
from hybrid_sd.models.packed_linear import PackedLinear, cpu_kernels_ready

needs_kernel = pytest.mark.skipif(not cpu_kernels_ready(),
                                  reason=f"the CPU row kernel cannot run here: {cpu_rows.why_not()}")


@needs_kernel
@pytest.mark.parametrize("n,k", [(8, 1), (24, 37), (40, 64), (96, 576), (1032, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_the_reference(n, k, bias):
    """Every row count of one register block (1-8), several blocks per panel (9-17) and a long
    prefill-like call, with output widths whose panels do not fill a block of 4."""
    g = torch.Generator().manual_seed(n * k)
    weight = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    panels = cpu_rows.panels_of(weight)
    assert panels.shape == (n // 8, k, 8)
    for m in [*range(1, 18), 30]:
        rows = torch.randn(m, k, generator=g)
        got = cpu_rows.rows_times_panels(rows, panels, b)
        torch.testing.assert_close(got, torch.nn.functional.linear(rows, weight, b), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got, cpu_rows.rows_times_panels_reference(rows, panels, b), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """A decoding step (one row) and a verify (that row among others) give the same bits: the
    engine's greedy path and its verify then agree exactly on the target's logits."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(200, 96, generator=g), torch.randn(200, generator=g)
    panels = cpu_rows.panels_of(weight)
    rows = torch.randn(33, 96, generator=g)
    for m in (2, 3, 5, 7, 8, 9, 12, 13, 17, 33):  # past 8 rows: blocks of 8 inside each panel
        together = cpu_rows.rows_times_panels(rows[:m], panels, bias)
        for r in range(m):
            alone = cpu_rows.rows_times_panels(rows[r:r + 1], panels, bias)
            assert torch.equal(together[r], alone[0]), (m, r)


@needs_kernel
def test_packed_linear_takes_the_kernel_up_to_its_row_limit(monkeypatch):
    linear = torch.nn.Linear(48, 64).eval()
    packed = PackedLinear(linear)
    assert packed.panels is not None and packed.slabs is None
    for rows in (1, 7, cpu_rows.MAX_ROWS, cpu_rows.MAX_ROWS + 5):
        x = torch.randn(1, rows, 48)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    calls = []
    kernel = cpu_rows.rows_times_panels
    monkeypatch.setattr(cpu_rows, "rows_times_panels", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    for rows in (1, cpu_rows.MAX_ROWS, cpu_rows.MAX_ROWS + 1):
        packed(torch.randn(rows, 48))
    assert calls == [1, cpu_rows.MAX_ROWS]  # more rows go to oneDNN


@needs_kernel
def test_the_graph_op_is_the_kernel():
    """The custom op that traces, compiles and the profiler see: same bits, and a fake
    implementation that agrees with it (torch.library.opcheck)."""
    from hybrid_sd.models.packed_linear import rows_times_panels_op
    weight, bias = torch.randn(32, 20), torch.randn(32)
    panels, rows = cpu_rows.panels_of(weight), torch.randn(5, 20)
    assert torch.equal(rows_times_panels_op(rows, panels, bias), cpu_rows.rows_times_panels(rows, panels, bias))
    torch.library.opcheck(rows_times_panels_op, (rows, panels, bias), test_utils=("test_schema", "test_faketensor"))


@needs_kernel
def test_the_kernel_refuses_rows_it_would_misread():
    panels = cpu_rows.panels_of(torch.randn(16, 10))
    for bad in (torch.randn(2, 11), torch.randn(2, 10, dtype=torch.float64), torch.randn(10, 2).t()):
        with pytest.raises(ValueError, match="contiguous fp32"):
            cpu_rows.rows_times_panels(bad, panels)


def test_the_switch_turns_the_kernel_off_quietly(tmp_path):
    script = textwrap.dedent("""
        import torch
        from hybrid_sd.models.packed_linear import PackedLinear
        packed = PackedLinear(torch.nn.Linear(16, 32))
        assert packed.panels is None and packed.slabs is not None
    """)
    env = {**os.environ, "HYBRID_SD_CPU_KERNEL": "off", "HYBRID_SD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "row kernel" not in done.stderr  # asked for: nothing to warn about
    assert not (tmp_path / "cache" / "kernels").exists()


def test_without_a_compiler_the_linears_fall_back_and_say_why(tmp_path):
    script = textwrap.dedent("""
        import torch
        from hybrid_sd.kernels import cpu_rows
        from hybrid_sd.models.packed_linear import PackedLinear
        linear = torch.nn.Linear(16, 32)
        packed = PackedLinear(linear)
        assert packed.panels is None and packed.slabs is not None
        x = torch.randn(1, 16)
        torch.testing.assert_close(packed(x), linear(x))
        print("WHY", cpu_rows.why_not())
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "HYBRID_SD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "WHY no C++ compiler" in done.stdout
    assert "the CPU row kernel is off (no C++ compiler" in done.stderr
    assert not list((tmp_path / "cache").glob("**/*.so*"))  # nothing half-built left behind


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    compiler = tmp_path / "broken-g++"
    compiler.write_text("#!/bin/sh\necho 'internal compiler error' >&2\nexit 1\n")
    compiler.chmod(0o755)
    script = textwrap.dedent("""
        from pathlib import Path
        from hybrid_sd.kernels import cpu_rows
        assert not cpu_rows.load(Path(BUILD))
        print("WHY", cpu_rows.why_not())
    """).replace("BUILD", repr(str(tmp_path / "build")))
    env = {**os.environ, "CXX": str(compiler)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "internal compiler error" in done.stdout
    assert list((tmp_path / "build").iterdir()) == []


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 7, 576), (3, 130), (5, 9, 64), (2, 3)])
def test_rms_norm_equals_the_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, weight = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    got = cpu_rows.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(got, cpu_rows.rms_norm_reference(x, weight, 1e-6), rtol=1e-5, atol=1e-6)
    rows = x.reshape(-1, shape[-1])
    for r in range(rows.shape[0]):  # row by row: the same bits alone
        assert torch.equal(cpu_rows.rms_norm(rows[r:r + 1].contiguous(), weight, 1e-6)[0], got.reshape(rows.shape)[r])


@needs_kernel
def test_packing_turns_the_norms_kernel_on_and_graphs_see_the_same_op():
    from hybrid_sd.models.packed_linear import pack_linears, rms_norm_op
    from hybrid_sd.models.transformer import RMSNorm
    block = torch.nn.Sequential(RMSNorm(16, 1e-5), torch.nn.Linear(16, 24))
    x = torch.randn(3, 16)
    before = block(x)
    assert not block[0].cpu_kernel
    pack_linears(block)
    assert block[0].cpu_kernel
    torch.testing.assert_close(block(x), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(block[0](x), cpu_rows.rms_norm(x, block[0].weight, 1e-5))
    assert torch.equal(rms_norm_op(x, block[0].weight, 1e-5), block[0](x))
    torch.library.opcheck(rms_norm_op, (x, block[0].weight, 1e-5), test_utils=("test_schema", "test_faketensor"))


@needs_kernel
@pytest.mark.parametrize("v", [37, 4096, 49152])
@pytest.mark.parametrize("inv_t", [1.0, 1 / 0.7])
def test_row_stats_equal_the_reference(v, inv_t):
    """The verify's statistics in one pass: the argmax exactly torch's (ties: the first), the
    log-sum-exp, entropy and top-1 to float rounding."""
    from hybrid_sd.kernels import row_argmax, row_stats, row_stats_reference
    g = torch.Generator().manual_seed(v)
    logits = torch.randn(7, v, generator=g) * 4
    logits[3, 5] = logits[3, v - 2] = logits[3].max() + 1  # a tie: the first index wins
    want = row_stats_reference(logits, inv_t)
    for got in (cpu_rows.row_stats(logits, inv_t), row_stats(logits, inv_t)):  # the kernel, and the dispatch to it
        assert torch.equal(got[0], want[0]) and int(got[0][3]) == 5
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(cpu_rows.row_argmax(logits), logits.argmax(-1))
    assert torch.equal(row_argmax(logits), logits.argmax(-1))
