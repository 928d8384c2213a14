"""Triton kernels equal their PyTorch references: on the CPU under TRITON_INTERPRET=1 (in a
subprocess, since the variable must be set before triton is imported), and on a GPU."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

CHECK = textwrap.dedent("""
    import torch
    from hybrid_sd.kernels import row_argmax, row_stats, row_stats_reference, triton_usable
    assert triton_usable(torch.zeros(1, device=DEVICE)), "the Triton path is not taken"
    torch.manual_seed(0)
    for R, V, T, block in [(1, 100, 1.0, 64), (8, 3000, 0.7, 256), (3, 1024, 1.3, 1024), (9, 49152, 1.0, 1024)]:
        x = (torch.randn(R, V) * 4).to(DEVICE)
        x[0, 5] = x[0].max() + 1
        x[0, 17] = x[0, 5]  # a tie: the first index wins, as in torch.argmax
        got, ref = row_stats(x, 1 / T, block=block), row_stats_reference(x, 1 / T)
        assert torch.equal(got[0], ref[0]) and int(got[0][0]) == 5, (got[0], ref[0])
        assert torch.equal(row_argmax(x), x.argmax(-1))
        for name, g, r in zip(("lse", "entropy", "top1"), got[1:], ref[1:]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)
    print("ok")
""")


def run_check(device: str, env: dict):
    run = subprocess.run([sys.executable, "-c", f"DEVICE = {device!r}\n" + CHECK], capture_output=True, text=True,
                         timeout=600, env={**os.environ, **env})
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_row_stats_triton_interpreted_on_cpu():
    pytest.importorskip("triton")
    run_check("cpu", {"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_row_stats_triton_on_gpu():
    run_check("cuda", {})


def test_reference_path_without_triton_matches_torch():
    from hybrid_sd.kernels import row_argmax, row_stats
    x = torch.randn(4, 500)
    assert torch.equal(row_argmax(x), x.argmax(-1))
    argmax, lse, entropy, top1 = row_stats(x)
    p = torch.softmax(x, -1)
    torch.testing.assert_close(lse, torch.logsumexp(x, -1))
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1))
    torch.testing.assert_close(top1, p.max(-1).values)
