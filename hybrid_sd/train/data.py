"""Self-distilled training data: the target answers prompts; its greedy answers are the text.

`python -m hybrid_sd.train.data [--out DIR] [--per-category N] [--heldout N]`

A drafter must imitate the target, not the internet, so every response is the target's own
greedy continuation. Generation is batched (transformers' `generate` over the packed target,
left padding), which is ~9x the single-stream throughput on the CPU; batching can change a
rare near-tie against single-stream decoding, which does not matter for training text.
Shards of `--batch` prompts are written atomically and skipped when present (resumable); a
larger `--per-category` later grows the stored data set, keeping what is there.
Held-out prompts (per category) come from separate seeds / HumanEval problems and are never
used for training.
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from ..cli import Parser
from ..models.loading import encode_prompt
from ..errors import UserError, exit_code
from .prompts import CATEGORIES, code_prompts, humaneval_split, math_prompts, structured_prompts


def default_data_dir() -> Path:
    from ..models.embedded import cache_root
    return cache_root() / "data" / "smollm2-135m-instruct"


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_split(data_dir: Path, split: str) -> list[dict]:
    rows = []
    for shard in sorted((Path(data_dir) / split).glob("*.jsonl")):
        rows.extend(json.loads(line) for line in shard.read_text().splitlines() if line)
    if not rows:
        raise UserError(f"no {split} data in {data_dir}; run python -m hybrid_sd.train.data first")
    return rows


def user_turn_prefix(tokenizer) -> str:
    """The chat template up to where the user's words begin (Magpie-style prompting)."""
    marker = "\x00MARK\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=False)
    return text[:text.index(marker)]


@torch.inference_mode()
def batched_generate(model, tokenizer, prompts_ids: list[list[int]], max_new: int, eos: tuple[int, ...],
                     sample: bool = False, seed: int = 0) -> list[list[int]]:
    """Greedy (or sampled) continuations, cut after the first EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    width = max(len(p) for p in prompts_ids)
    ids = torch.full((len(prompts_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts_ids):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    torch.manual_seed(seed)
    kwargs = dict(do_sample=True, temperature=1.0, top_p=0.95) if sample else dict(do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad,
                         eos_token_id=list(eos), **kwargs)[:, width:].tolist()
    results = []
    for row in out:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        results.append(row[:cut])
    return results


def templated_prompts(per_category: int, heldout: int, seed: int) -> dict:
    """{split: [(category, text)]} for the categories built from templates and HumanEval. Each
    list is a prefix of the list for a larger `per_category`, so a data set can grow."""
    splits = {"train": [], "heldout": []}
    code_heldout, code_rest = humaneval_split(seed, heldout)
    code_train = code_rest[:per_category]
    code_train += code_prompts(random.Random(seed + 1), max(0, per_category - len(code_train)))
    splits["heldout"] += [("code", p) for p in code_heldout]
    splits["train"] += [("code", p) for p in code_train]
    for cat, make in (("math", math_prompts), ("structured", structured_prompts)):
        splits["train"] += [(cat, p) for p in make(random.Random(seed + 10 + len(cat)), per_category)]
        splits["heldout"] += [(cat, p) for p in make(random.Random(seed + 1000 + len(cat)), heldout)]
    return splits


def chat_questions(tokenizer, model, eos, want: int, seed: int, batch: int, avoid=()) -> list[str]:
    """Magpie: the target completes its own user turn (sampled, for variety); new questions only."""
    prefix = tokenizer.encode(user_turn_prefix(tokenizer), add_special_tokens=False)
    seen, questions = set(avoid), []
    bar = tqdm(total=want, desc="chat questions", unit="q")
    for attempt in range(40 + want // max(batch // 4, 1)):
        if len(questions) >= want:
            break
        for out in batched_generate(model, tokenizer, [prefix] * batch, 64, eos, sample=True, seed=seed + attempt):
            if not out or out[-1] not in eos:  # an unfinished question is not a question
                continue
            text = tokenizer.decode(out, skip_special_tokens=True).strip()
            if len(text) >= 12 and text not in seen and len(questions) < want:
                seen.add(text)
                questions.append(text)
                bar.update()
    bar.close()
    return questions


def build_prompts(tokenizer, model, eos, per_category: int, heldout: int, seed: int, batch: int) -> dict:
    """{split: [(category, text)]}; chat questions are written by the target itself."""
    splits = templated_prompts(per_category, heldout, seed)
    questions = chat_questions(tokenizer, model, eos, per_category + heldout, seed, batch)
    splits["heldout"] += [("chat", q) for q in questions[:heldout]]
    splits["train"] += [("chat", q) for q in questions[heldout:]]
    return splits


def grow_prompts(splits: dict, tokenizer, model, eos, per_category: int, seed: int, batch: int) -> dict:
    """Extend a stored plan to `per_category` training prompts per category, keeping every
    stored prompt (and so every answered shard) and the held-out split as they are."""
    have = {cat: [t for c, t in splits["train"] if c == cat] for cat in CATEGORIES}
    heldout = sum(1 for c, _ in splits["heldout"] if c == "code")
    fresh = templated_prompts(per_category, heldout, seed)
    grown = {"train": [], "heldout": list(splits["heldout"])}
    for cat in CATEGORIES:
        if cat == "chat":
            continue
        texts = [t for c, t in fresh["train"] if c == cat]
        if texts[:len(have[cat])] != have[cat][:len(texts)]:
            raise UserError(f"the stored prompt plan's {cat} prompts were built with other settings; "
                            "grow it with the same --seed or build a new data set with --out")
        grown["train"] += [(cat, t) for t in (have[cat] if len(have[cat]) >= per_category else texts)]
    extra = max(0, per_category - len(have["chat"]))
    # seeds far from the ones the stored questions were sampled with; never a held-out question
    avoid = have["chat"] + [t for c, t in splits["heldout"] if c == "chat"]
    new = chat_questions(tokenizer, model, eos, extra, seed + 100_000, batch, avoid) if extra else []
    grown["train"] += [("chat", q) for q in have["chat"] + new]
    return grown


def main(argv=None) -> int:
    p = Parser(prog="python -m hybrid_sd.train.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="data directory (default: the user cache)")
    p.add_argument("--target", default=None, help="target checkpoint directory (default: embedded SmolLM2)")
    p.add_argument("--per-category", type=int, default=512, help="training prompts per category")
    p.add_argument("--heldout", type=int, default=16, help="held-out prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    return exit_code(build, p.parse_args(argv))


def build(args) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.embedded import default_target_dir
    from ..models.loading import eos_ids
    from ..models.packed_linear import pack_linears

    target_dir = Path(args.target) if args.target else default_target_dir()
    out = Path(args.out) if args.out else default_data_dir()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    model = pack_linears(AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval())
    eos = eos_ids(target_dir, model.config)
    plan_file = out / "prompts.json"
    if plan_file.is_file():  # resume (or grow) with exactly the same prompts
        splits = {k: [tuple(x) for x in v] for k, v in json.loads(plan_file.read_text()).items()}
        if any(sum(1 for c, _ in splits["train"] if c == cat) < args.per_category for cat in CATEGORIES):
            splits = grow_prompts(splits, tokenizer, model, eos, args.per_category, args.seed, args.batch)
    else:
        splits = build_prompts(tokenizer, model, eos, args.per_category, args.heldout, args.seed, args.batch)
    out.mkdir(parents=True, exist_ok=True)
    tmp = plan_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(splits))
    os.replace(tmp, plan_file)
    jobs = []
    for split, items in splits.items():
        for cat in CATEGORIES:
            texts = [t for c, t in items if c == cat]
            for s in range(0, len(texts), args.batch):
                jobs.append((split, cat, s // args.batch, texts[s:s + args.batch]))
    for split, cat, shard, texts in tqdm(jobs, desc="answering", unit="shard"):
        path = out / split / f"{cat}-{shard:03d}.jsonl"
        if path.is_file() and [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == texts:
            continue  # answered before (a grown plan keeps every full shard)
        prompt_ids = [encode_prompt(tokenizer, t, chat=True) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(prompt_ids[i]))  # less padding
        answers = [None] * len(texts)
        for i, ans in zip(order, batched_generate(model, tokenizer, [prompt_ids[i] for i in order],
                                                  args.max_new_tokens, eos)):
            answers[i] = ans
        write_jsonl_atomic(path, [{"category": cat, "prompt": t, "prompt_ids": p, "response_ids": a}
                                  for t, p, a in zip(texts, prompt_ids, answers)])
    return out


if __name__ == "__main__":
    sys.exit(main())
