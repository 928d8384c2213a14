"""The benchmark's workloads are held out from drafter and router training."""
import json
import random
from collections import Counter

import pytest

from hybrid_sd.eval.workloads import TOOLS, workloads
from hybrid_sd.train import data
from hybrid_sd.train.prompts import (CATEGORIES, chat_prompts, code_prompts, humaneval_split, math_prompts,
                                     sources, structured_prompts)
from hybrid_sd.train.traces import TRACE_SEED

PER_CATEGORY = 400


@pytest.fixture(scope="module")
def plan():
    """The drafter data's prompt plan (the target's own questions stay placeholders here)."""
    return data.new_plan(PER_CATEGORY, {"seed": 0, "heldout": 16, "shard_size": 128, "max_new_tokens": 192})


def plan_texts(items):
    """Every text a prompt shows the target (not the target's own answers)."""
    return [m["content"] for it in items for m in it["messages"] if m["content"]]


def trace_prompts():
    rng = random.Random
    return (code_prompts(rng(TRACE_SEED + 1), 400) + math_prompts(rng(TRACE_SEED + 2), 400)
            + structured_prompts(rng(TRACE_SEED + 3), 400) + chat_prompts(rng(TRACE_SEED + 4), 400))


def user_texts(messages_list):
    return [m["content"] for messages in messages_list for m in messages if m["role"] == "user"]


def test_workloads_are_deterministic_prefixes_with_every_category():
    small, large = workloads(3), workloads(16)
    assert list(small) == ["code", "math", "structured", "chat"]
    for cat in small:
        assert len(large[cat]) == 16 and large[cat][:3] == small[cat]
        assert len({str(m) for m in large[cat]}) == 16  # no prompt twice


def test_workloads_share_no_prompt_with_training_or_traces(plan):
    w = workloads(16)
    heldout, rest = humaneval_split(0, 16)
    assert [m[-1]["content"] for m in w["code"]] == heldout and not set(heldout) & set(rest)
    train = set(plan_texts(plan["train"])) | set(trace_prompts())
    for cat in ("math", "structured", "chat"):
        assert not set(user_texts(w[cat])) & train, cat
    tools = [name for name, *_ in TOOLS]
    assert not [t for t in train if any(name in t for name in tools)]  # tools no training prompt names


def test_no_training_prompt_equals_or_contains_a_workload_heldout_or_trace_prompt(plan):
    held = plan_texts(plan["heldout"])
    forbidden = {t for convs in workloads(64).values() for t in user_texts(convs)} | set(held) | set(trace_prompts())
    for text in plan_texts(plan["train"]):
        assert not [f for f in forbidden if f in text], text[:200]
    # the held-out split is the benchmark's own code and chat prompts, and every category's
    assert [t for it, t in zip(plan["heldout"], held) if it["category"] == "code"] == humaneval_split(0, 16)[0]
    assert [t for it, t in zip(plan["heldout"], held) if it["category"] == "chat"] == data.chat_heldout()
    assert Counter(it["category"] for it in plan["heldout"]) == {cat: 16 for cat in CATEGORIES}


def test_the_target_writes_no_held_out_question(plan, tmp_path, monkeypatch):
    """The target's own questions pass the same filter."""
    leaked = data.chat_heldout()[3]
    batches = iter([[leaked, None, "A question nobody held out, surely?"], ["Another fresh question here?"] * 3])
    monkeypatch.setattr(data, "magpie_batch", lambda *a: next(batches))
    args = type("Args", (), {"seed": 0, "batch": 3})
    pool = data.question_pool(tmp_path, None, None, (), "chat", 2, args, data.Exclusions(plan["heldout"]))
    assert pool == ["A question nobody held out, surely?", "Another fresh question here?"]
    assert json.loads((tmp_path / "magpie.json").read_text())["chat"]["batches"] == 2


def test_training_plan_mixes_every_source_balanced_and_interleaved(plan):
    train = plan["train"]
    assert Counter(it["category"] for it in train) == {cat: PER_CATEGORY for cat in CATEGORIES}
    assert [it["category"] for it in train[:8]] == list(CATEGORIES) * 2  # every shard holds every category
    assert {it["source"] for it in train} == set(sources(0, 16))
    for cat in CATEGORIES:  # no conversation the target answers twice
        keys = [k for it in train if it["category"] == cat for k in data.stage_keys(it["messages"])]
        assert len(keys) == len(set(keys)), cat
    multi = [it for it in train if any(m["content"] is None for m in it["messages"])]
    assert {it["category"] for it in multi} == set(CATEGORIES)


def test_plan_for_n_is_a_prefix_of_the_plan_for_more(plan):
    small = data.new_plan(40, plan["settings"])
    for cat in CATEGORIES:
        big = [it for it in plan["train"] if it["category"] == cat]
        assert [it for it in small["train"] if it["category"] == cat] == big[:40]


def test_structured_workload_has_single_calls_and_multi_turn_transcripts():
    roles = [[m["role"] for m in messages] for messages in workloads(4)["structured"]]
    assert ["system", "user"] in roles and ["system", "user", "assistant", "user"] in roles


def test_the_shipped_data_set_keeps_held_out_and_benchmark_prompts_out_of_training():
    """data/smollm2-v3.tar.xz, the self-distilled set kept in git: no user turn of a training
    row equals or contains a held-out, benchmark-workload or router-trace prompt, and its
    held-out rows are the plan's held-out split."""
    import tarfile
    from pathlib import Path

    path = Path(__file__).parent.parent / "data" / "smollm2-v3.tar.xz"
    rows = {"train": [], "heldout": []}
    with tarfile.open(path) as tar:
        plan = json.load(tar.extractfile("smollm2-v3/prompts.json"))
        for member in tar.getmembers():
            if member.name.endswith(".jsonl"):  # smollm2-v3/{train,heldout}/NNNNN.jsonl
                rows[member.name.split("/")[1]] += [json.loads(line) for line in tar.extractfile(member)]
    assert len(rows["train"]) > 10000 and len(rows["heldout"]) == len(plan["heldout"])
    exclusions = data.Exclusions(plan["heldout"])
    users = {m["content"] for r in rows["train"] for m in r["messages"] if m["role"] == "user"}
    assert not [u for u in users if exclusions.hit(u)]
    assert {r["prompt"] for r in rows["heldout"]} == {it["messages"][-1]["content"] for it in plan["heldout"]}
