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
    # the round's one read: acceptance and the router's signals at the new bonus row together
    from hybrid_sd.verify import Sampling, judge
    logits = torch.randn(5, 300).to(DEVICE)
    draft = logits[:4].argmax(-1)
    draft[2] = (draft[2] + 1) % 300
    v = judge(draft, None, logits, Sampling(), signals=True, draft_confidence=torch.tensor([0.25], device=DEVICE))
    _, _, entropy, top1 = row_stats_reference(logits[2:3])
    assert (v.accepted, v.token, v.draft_confidence) == (2, int(logits[2].argmax()), 0.25), v
    assert abs(v.top1 - float(top1[0])) < 1e-5 and abs(v.entropy - float(entropy[0])) < 1e-5, v
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


ACCEPT_CHECK = textwrap.dedent("""
    import torch
    from hybrid_sd.kernels import accept, triton_usable
    assert triton_usable(torch.zeros(1, device=DEVICE)), "the Triton path is not taken"
    g = torch.Generator().manual_seed(0)
    for k in (0, 1, 3, 7):
        for trial in range(6):
            argmax = torch.randint(0, 50, (k + 1,), generator=g)
            draft = argmax[:k].clone()
            if k and trial % 3:  # a mismatch somewhere (or none when trial % 3 == 0)
                draft[int(torch.randint(0, k, (1,), generator=g))] += 1
            d, t = draft.to(DEVICE), argmax.to(DEVICE)
            assert accept.greedy_accept(d, t).tolist() == accept.greedy_accept_reference(d, t).tolist()
    for k, V, with_q in [(0, 100, True), (3, 100, True), (5, 3000, False), (7, 49152, True), (4, 700, False)]:
        for trial in range(4):
            p = torch.softmax(torch.randn(k + 1, V, generator=g) * 3, -1)
            q = torch.softmax(torch.randn(k, V, generator=g) * 3, -1) if with_q else None
            if with_q and k and trial == 1:
                q[0] = p[0]  # an empty residual at the first rejection: sample from p
            draft = (torch.multinomial(q, 1, generator=g).view(-1) if with_q and k
                     else p[:k].argmax(-1))
            u = torch.rand(k + 1, generator=g)
            if k and trial == 1:
                u[0] = 0.999  # reject the first draft
            args = [x.to(DEVICE) if x is not None else None for x in (draft, p, q, u)]
            got, ref = accept.rejection_accept(*args, block=256), accept.rejection_accept_reference(*args)
            assert got.tolist() == ref.tolist(), (k, V, with_q, trial, got, ref)
    print("ok")
""")


def test_accept_kernels_triton_interpreted_on_cpu():
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, "-c", "DEVICE = 'cpu'\n" + ACCEPT_CHECK], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accept_kernels_triton_on_gpu():
    run = subprocess.run([sys.executable, "-c", "DEVICE = 'cuda'\n" + ACCEPT_CHECK], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_rejection_reference_follows_the_residual_distribution():
    """Marginal of the committed token after one draft equals p exactly (the lossless identity
    p(x) = q(x) min(1, p/q) + (1 - sum min(p, q)) residual(x)), by enumeration over u."""
    from hybrid_sd.kernels.accept import rejection_accept_reference
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    q = torch.tensor([[0.2, 0.2, 0.6]])
    counts = torch.zeros(3)
    n = 60
    for d in range(3):  # the draft is sampled from q[0]
        for i in range(n):
            for j in range(n):
                u = torch.tensor([(i + 0.5) / n, (j + 0.5) / n])
                a, token = rejection_accept_reference(torch.tensor([d]), p, q, u).tolist()
                counts[d if a == 1 else token] += q[0, d] / n ** 2
    # a == 1 commits the draft (the next token would come from p[1], not counted here)
    torch.testing.assert_close(counts, p[0], atol=0.02, rtol=0)


def test_triton_is_imported_only_when_a_kernel_runs():
    """`import triton` costs ~0.4 s of every start-up; decoding on the CPU must not pay it
    (kernels/triton_kernels.py is imported on a kernel's first run)."""
    check = textwrap.dedent("""
        import sys, torch
        before = "triton" in sys.modules
        import hybrid_sd.verify, hybrid_sd.kernels, hybrid_sd.engine
        from hybrid_sd.kernels import row_stats
        row_stats(torch.randn(2, 50))
        assert before or "triton" not in sys.modules, "triton was imported"
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_a_triton_that_does_not_import_falls_back_to_the_references():
    check = textwrap.dedent("""
        import sys, torch
        sys.modules["triton"] = None  # what a missing or broken install looks like to `import`
        from hybrid_sd.kernels import row_stats, row_stats_reference, triton_usable
        x = torch.randn(3, 40)
        assert not triton_usable(x)
        assert all(torch.equal(a, b) for a, b in zip(row_stats(x), row_stats_reference(x)))
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
