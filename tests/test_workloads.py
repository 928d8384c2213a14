"""The benchmark's workloads are held out from drafter and router training."""
import random

from hybrid_sd.eval.workloads import TOOLS, workloads
from hybrid_sd.train.data import templated_prompts
from hybrid_sd.train.prompts import chat_prompts, code_prompts, humaneval_split, math_prompts, structured_prompts
from hybrid_sd.train.traces import TRACE_SEED


def user_texts(messages_list):
    return [m["content"] for messages in messages_list for m in messages if m["role"] == "user"]


def test_workloads_are_deterministic_prefixes_with_every_category():
    small, large = workloads(3), workloads(16)
    assert list(small) == ["code", "math", "structured", "chat"]
    for cat in small:
        assert len(large[cat]) == 16 and large[cat][:3] == small[cat]
        assert len({str(m) for m in large[cat]}) == 16  # no prompt twice


def test_workloads_share_no_prompt_with_training_or_traces():
    w = workloads(16)
    heldout, rest = humaneval_split(0, 16)
    assert [m[-1]["content"] for m in w["code"]] == heldout and not set(heldout) & set(rest)
    train = {t for _, t in templated_prompts(512, 16, 0)["train"]}  # the drafter data's templated prompts
    rng = random.Random
    train |= set(code_prompts(rng(TRACE_SEED + 1), 400) + math_prompts(rng(TRACE_SEED + 2), 400)
                 + structured_prompts(rng(TRACE_SEED + 3), 400) + chat_prompts(rng(TRACE_SEED + 4), 400))
    for cat in ("math", "structured", "chat"):
        assert not set(user_texts(w[cat])) & train, cat
    tools = [name for name, *_ in TOOLS]
    assert not [t for t in train if any(name in t for name in tools)]  # tools no training prompt names


def test_structured_workload_has_single_calls_and_multi_turn_transcripts():
    roles = [[m["role"] for m in messages] for messages in workloads(4)["structured"]]
    assert ["system", "user"] in roles and ["system", "user", "assistant", "user"] in roles
