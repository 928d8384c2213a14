"""The CLI on the embedded default: streaming, --json, and one-line errors with exit code 2."""
import json
import os
import subprocess
import sys

import pytest


def decode(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "hybrid_sd.decode", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("drafter", ["none", "ngram", "ar", "block", "merged", "hybrid"])
def test_json_output(drafter):
    run = decode("--json", "--drafter", drafter, "--max-new-tokens", "12", "What is the capital of France?")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    for key in ("text", "token_ids", "prompt_tokens", "new_tokens", "tokens_per_s", "ttft_s", "drafter", "rounds",
                "mean_accepted"):
        assert key in out, key
    assert out["new_tokens"] == len(out["token_ids"]) <= 12
    assert "Paris" in out["text"]
    assert out["drafter"] == drafter and out["rounds"] >= 1 and out["mean_accepted"] >= 1.0
    if drafter == "hybrid":
        for key in ("router", "share", "tokens_per_round", "switches", "catchup_tokens", "switching_overhead"):
            assert key in out, key
    if drafter == "merged":  # a merge verifies trees: their size and accepted depth are reported
        assert out["tree"]["merged"]["nodes"] >= 1


@pytest.mark.parametrize("budget", [None, pytest.param("8", marks=pytest.mark.slow)])
def test_tree_json_and_stats(budget):
    """--tree auto on the default drafter (cut by cost, or a fixed budget): the same text as
    chains, and the tree's size and accepted depth per drafter reported."""
    args = ["--json", "--stats", "--tree", "auto", "--max-new-tokens", "24", "What is the capital of France?"]
    run = decode(*args, *(["--budget", budget] if budget else []))
    chain = decode("--json", "--drafter", "none", "--max-new-tokens", "24", "What is the capital of France?")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["token_ids"] == json.loads(chain.stdout)["token_ids"]
    assert out["tree"] and all(t["nodes"] >= 1 for t in out["tree"].values())
    if budget:
        assert all(t["nodes"] <= int(budget) for t in out["tree"].values())
    assert "[tree " in run.stderr and "depth" in run.stderr


def test_stream_from_stdin_with_stats():
    run = decode("--stats", "--max-new-tokens", "8", "--no-chat", stdin="The capital of France is")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), "nothing streamed"
    assert "tok/s" in run.stderr and "ttft" in run.stderr


def test_sampling_is_seeded():
    args = ("--json", "--temperature", "0.8", "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "16", "Tell a joke")
    first, second = decode(*args), decode(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["token_ids"] == json.loads(second.stdout)["token_ids"]


@pytest.mark.parametrize("args, message", [
    (("--top-p", "1.5", "x"), "--top-p"),
    (("--temperature", "-1", "x"), "--temperature"),
    (("--max-new-tokens", "0", "x"), "--max-new-tokens"),
    (("--drafter", "magic", "x"), "unknown drafter"),
    (("--drafter", "ar", "--draft", "/nonexistent/eagle3", "x"), "does not exist"),
    (("--drafter", "hybrid", "--router", "magic", "x"), "unknown router"),
    (("--drafter", "hybrid", "--router-dir", "/nonexistent/router", "x"), "no entropy.json"),
    (("--drafter", "hybrid", "--router", "learned", "--router-dir", "/nonexistent/router", "x"), "no learned.json"),
    (("--lam", "-1", "x"), "--lam"),
    (("--target", "/nonexistent/ckpt", "x"), "no config.json"),
    pytest.param(("--device", "cuda", "x"), "CUDA", marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")),
    (("--dtype", "int3", "x"), "dtype"),
    (("--max-context", "16", "x" * 400), "context"),
    (("--budget", "8", "x"), "--tree auto"),
    (("--tree", "auto", "--budget", "0", "x"), "--budget"),
    (("--tree", "sometimes", "x"), "--tree"),
    (("--threads", "0", "x"), "--threads"),
    (("--no-such-flag",), "unrecognized"),
])
def test_user_errors_are_one_line(args, message, capsys):
    """In-process (decode.main, as `python -m` runs it; a subprocess per case cost ~10 s of
    imports each); the broken-pipe and closed-stdout tests below run the process itself."""
    from hybrid_sd import decode as cli
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse's own errors exit from parse_args
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err


def test_bench_quick_runs_every_method_and_writes_results_and_plots(tmp_path):
    from hybrid_sd import bench
    methods = ["plain", "hf", "hf-lookup", "ngram", "ar@3", "block", "hybrid"]
    assert bench.main(["--quick", "--methods", ",".join(methods), "--max-new-tokens", "10", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["methods"] == methods and result["categories"] == ["code", "math", "structured", "chat"]
    for m in methods:
        assert set(result["speedup"][m]) == {"code", "math", "structured", "chat", "mix"}
        assert all(v > 0 for v in result["tokens_per_s"][m].values())
    assert all(v == 1.0 for v in result["speedup"]["plain"].values())
    assert "hf" not in result["tau"] and all(result["tau"][m]["mix"] >= 1.0 for m in methods[3:])
    phases = result["phases_ms_per_round"]["hybrid"]["mix"]
    assert phases["verify"] > 0 and phases["draft"] > 0
    strip = result["routing"]["hybrid"]["chat"]  # [drafter, k, accepted, committed] per round
    assert all(0 <= a <= k and c == a + 1 for _, k, a, c in strip)
    assert "| AR drafter k=3 |" in (tmp_path / "results.md").read_text()
    # every method's rounds priced by the hybrid's table: a plain step costs one plain step
    modelled = result["modelled_speedup"]
    assert set(modelled) == set(methods[:1] + methods[3:]) and modelled["plain"]["mix"] == 1.0
    assert all(v > 0 for m in methods[3:] for v in modelled[m].values())
    assert "Modelled speed-up on the mix" in (tmp_path / "results.md").read_text()
    for png in ("speedup.png", "accepted.png", "phases.png", "routing-hybrid.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_an_unknown_method(tmp_path, capsys):
    from hybrid_sd import bench
    assert bench.main(["--methods", "plain,eagle", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert bench.main(["--methods", "hf@3", "--out", str(tmp_path)]) == 2
    for bad in ("plain:tree", "ar:tree0", "ar:treex", "ar:bush",  # trees: drafters and hybrids, N >= 1
                "plain+cuda", "llamacpp+trace", "llamacpp+compile", "ar+"):  # +trace, +compile: this engine's only
        assert bench.main(["--methods", bad, "--out", str(tmp_path)]) == 2
    assert bench.method_spec("ar@4:tree16+trace") == ("ar", 4, True, 16, "trace")
    assert bench.method_spec("plain").graphs == "auto"  # CUDA graphs on a GPU, eager on the CPU
    assert bench.method_spec("hybrid+compile") == ("hybrid", None, False, None, "compile")
    assert bench.method_spec("merged@3:tree") == ("merged", 3, True, None, "auto")  # the default merge, at k = 3
    assert bench.method_spec("hybrid@3") is None  # a router picks the hybrid's k
    assert bench.main(["--per-category", "17", "--out", str(tmp_path)]) == 2
    assert "16" in capsys.readouterr().err
    assert bench.main(["--device", "tpu", "--out", str(tmp_path)]) == 2
    assert "tpu" in capsys.readouterr().err  # one line naming the device
    assert not any(tmp_path.iterdir())  # nothing written for a bad request


def test_bench_on_a_gpu_leaves_other_libraries_out(tmp_path, capsys, monkeypatch):
    import torch

    from hybrid_sd import bench
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda", "--methods", "plain", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    monkeypatch.setattr(bench, "resolve_device", lambda name: torch.device("cuda"))
    assert bench.main(["--device", "cuda", "--methods", "plain,hf,ngram", "--out", str(tmp_path)]) == 2
    assert "hf run on the CPU only" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_profile_prints_a_phase_table():
    run = decode("--profile", "--max-new-tokens", "12", "Count from one to ten.")
    assert run.returncode == 0, run.stderr
    assert "ms per round" in run.stderr and "| verify |" in run.stderr and "| draft |" in run.stderr


# ---- prompts that are not UTF-8, and outputs that go away ---------------------------------------

def decode_bytes(*args, stdin: bytes = b"", **popen):
    return subprocess.run([sys.executable, "-m", "hybrid_sd.decode", *args], input=stdin, capture_output=True,
                          timeout=300, **popen)


def test_prompt_bytes_that_are_not_utf8_are_replaced_with_one_warning():
    run = decode_bytes("--json", "--drafter", "none", "--max-new-tokens", "2", stdin=b"Caf\xe9 au lait, \xff\xfe please?")
    assert run.returncode == 0, run.stderr
    err = run.stderr.decode()
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "not valid UTF-8" in warnings[0] and "offset 3" in warnings[0], err
    assert json.loads(run.stdout)["prompt_tokens"] > 20


def test_read_prompt_from_an_argument_with_undecodable_bytes(capsys):
    import argparse

    from hybrid_sd.decode import read_prompt
    arg = b"na\xefve".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    assert read_prompt(argparse.Namespace(prompt=arg)) == "na\ufffdve"
    assert "offset 2" in capsys.readouterr().err
    assert read_prompt(argparse.Namespace(prompt="naïve")) == "naïve" and capsys.readouterr().err == ""


def test_a_reader_that_goes_away_ends_generation_quietly():
    """`python -m hybrid_sd.decode ... | head -c 10`: exit 141 (128 + SIGPIPE), nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_sd.decode", "--drafter", "none", "--max-new-tokens", "200",
                             "Count from one to two hundred, one number per line."],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(10)
    proc.stdout.close()  # the reader is gone; the next write hits a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert len(first) == 10 and err == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_on_stdout_is_one_line():
    with open("/dev/full", "wb") as full:
        run = subprocess.run([sys.executable, "-m", "hybrid_sd.decode", "--drafter", "none", "--max-new-tokens", "3",
                              "--json", "Hi"], stdout=full, stderr=subprocess.PIPE, timeout=300)
    err = run.stderr.decode()
    assert run.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith("error: cannot write the output to stdout (No space left on device)")


def test_a_closed_stdout_is_one_line_before_any_work():
    run = subprocess.run([sys.executable, "-m", "hybrid_sd.decode", "--max-new-tokens", "3", "Hi"],
                         stderr=subprocess.PIPE, timeout=300, preexec_fn=lambda: os.close(1))
    err = run.stderr.decode()
    assert run.returncode == 2 and err.count("\n") == 1 and "stdout is closed" in err, err


def test_help_states_the_guarantees():
    run = decode("--help")
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    for phrase in ("token for token", "bfloat16/float16", "not valid UTF-8", "U+FFFD", "<|im_end|>",
                   "encoded as plain text", "141"):
        assert phrase in text, phrase


@pytest.mark.gpu
def test_bench_runs_on_a_gpu(tmp_path):
    """This engine's methods on a CUDA device, chains and trees, each output equal to plain
    decoding there (a difference fails the run)."""
    import torch

    from hybrid_sd import bench
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    methods = "plain,ngram,ar,block,ar:tree,hybrid,hybrid:tree"
    assert bench.main(["--quick", "--device", "cuda", "--methods", methods, "--out", str(tmp_path), "--no-plots"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert torch.cuda.get_device_name(0) in result["machine"]
    assert all(v.split("/")[0] == v.split("/")[1] for v in result["equal_outputs"].values())
