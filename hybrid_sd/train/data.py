"""Self-distilled training data: the target answers prompts; its greedy answers are the text.

`python -m hybrid_sd.train.data [--out DIR] [--per-category N] [--heldout N] [--batch N] [--shard-size N]`

A drafter must imitate the target, not the internet, so every response is the target's own
greedy continuation, computed in batches by the project's own compact target
(train/generate.py). Prompts come from the sources in prompts.py, mapped onto the four
benchmark categories (`category`) with the finer mix kept per row (`source`); multi-turn
sources are answered turn by turn, the target continuing its own dialogue, and every turn it
answers is a row. The whole prompt plan is built first and stored (prompts.json); the
target's own questions (Magpie) are sampled as the shards that use them come up and kept in
magpie.json. Categories are interleaved in the plan, so a partial run is balanced.

Shards of `--shard-size` prompts are written atomically and skipped when present, so a killed
run resumes where it stopped; a larger `--per-category` later appends to the plan and keeps
every answered shard. mix.json (next to the shards, rewritten after each) reports planned and
answered prompts, answers and tokens per category and source. The target's hidden states that
the drafters train on (`--capture`) come out of the same forward passes and are stored beside
each training shard (`NNNNN.features.safetensors`, fp16), so training never recomputes them.

The held-out split (per category: the benchmark's HumanEval problems, templated math and JSON
requests from separate seeds, the shipped chat questions) never reaches training, nor does any
benchmark workload or router-trace prompt: a training prompt that equals or contains one is
drawn again.
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..cli import Parser
from ..errors import UserError, exit_code
from ..models.loading import encode_chat
from .prompts import (CATEGORIES, MAGPIE_LEADS, QUESTION_RE, category_items, chat_prompts, code_prompts,
                      humaneval_split, math_prompts, structured_prompts, user)

PLAN_VERSION = 2
WORKLOAD_PROMPTS = 64  # benchmark prompts per category kept out of training (more than any run uses)
TRACE_PROMPTS = 400    # router-trace prompts per category kept out of training
MAGPIE_NEW_TOKENS = 80


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


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1 if path.name == "mix.json" else None)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def split_shards(data_dir: Path, split: str) -> list[Path]:
    shards = sorted((Path(data_dir) / split).glob("*.jsonl"))
    if not shards:
        raise UserError(f"no {split} data in {data_dir}; run python -m hybrid_sd.train.data first")
    return shards


def read_split(data_dir: Path, split: str) -> list[dict]:
    rows = []
    for shard in split_shards(data_dir, split):
        rows.extend(read_jsonl(shard))
    if not rows:
        raise UserError(f"no {split} data in {data_dir}; run python -m hybrid_sd.train.data first")
    return rows


# --- target features stored beside a shard -------------------------------------------------
# One safetensors file per shard, one fp16 tensor per (row, hidden state) named "r{row}.h{layer}"
# ([positions, hidden]; layer in Transformer.forward's numbering). Rows may hold fewer positions
# than their tokens (generation never feeds an answer's last token); readers pad.

def features_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".jsonl") + ".features.safetensors")


def feature_key(row: int, layer: int) -> str:
    return f"r{row}.h{layer}"


def read_features(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except Exception as e:  # cut short or foreign: recomputed by whoever needs it
        print(f"warning: {path} is unreadable ({type(e).__name__}); its features are recomputed", file=sys.stderr)
        return {}


def write_features_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def capture_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """--capture: "auto" = what the trainers read by default (the AR drafter's three hidden
    states and the last one, the distillation teacher), "none", or comma-separated ids."""
    from ..drafters.ar import default_aux_layers
    if spec == "none":
        return ()
    if spec == "auto":
        return tuple(sorted(set(default_aux_layers(n_layers)) | {n_layers}))
    try:
        ids = tuple(sorted({int(x) for x in spec.split(",") if x.strip()}))
    except ValueError:
        raise UserError(f"--capture takes auto, none or comma-separated hidden-state ids, got {spec!r}") from None
    if not ids or not all(0 <= i <= n_layers for i in ids):
        raise UserError(f"--capture ids must lie in 0..{n_layers} (0 = embeddings, {n_layers} = last layer's "
                        f"output), got {spec!r}")
    return ids


def user_turn_prefix(tokenizer) -> str:
    """The chat template up to where the user's words begin (Magpie-style prompting)."""
    marker = "\x00MARK\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=False)
    return text[:text.index(marker)]


@torch.inference_mode()
def batched_generate(model, tokenizer, prompts_ids: list[list[int]], max_new: int, eos: tuple[int, ...],
                     sample: bool = False, seed: int = 0) -> list[list[int]]:
    """transformers' `generate` over a Hugging Face model (left padding), cut after the first EOS;
    the router traces answer their prompts with it. The data command uses train/generate.py."""
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


# --- the prompt plan ----------------------------------------------------------------------

def chat_heldout() -> list[str]:
    return json.loads((Path(__file__).parent.parent / "eval" / "chat_heldout.json").read_text())


def item(category: str, source: str, messages: list[dict]) -> dict:
    return {"category": category, "source": source, "messages": messages}


def heldout_items(heldout: int, seed: int) -> list[dict]:
    """Per category, as the drafter data has always held out: HumanEval problems, templated
    math and JSON requests from separate seeds, and the target's own chat questions."""
    code, _ = humaneval_split(seed, heldout)
    items = [item("code", "humaneval", [user(p)]) for p in code]
    for cat, make in (("math", math_prompts), ("structured", structured_prompts)):
        items += [item(cat, f"{cat}_template", [user(p)]) for p in make(random.Random(seed + 1000 + len(cat)), heldout)]
    return items + [item("chat", "chat_magpie", [user(q)]) for q in chat_heldout()[:heldout]]


class Exclusions:
    """Texts no training prompt may equal or contain: the held-out split, the benchmark's
    workloads and the router traces' prompts; and the benchmark's tool names."""

    def __init__(self, heldout: list[dict]):
        from ..eval.workloads import TOOLS, workloads
        from .traces import TRACE_SEED
        texts = {m["content"] for it in heldout for m in it["messages"] if m["role"] == "user"}
        texts |= {m["content"] for convs in workloads(WORKLOAD_PROMPTS).values() for conv in convs for m in conv
                  if m["role"] == "user"}
        rng = random.Random
        texts |= set(code_prompts(rng(TRACE_SEED + 1), TRACE_PROMPTS) + math_prompts(rng(TRACE_SEED + 2), TRACE_PROMPTS)
                     + structured_prompts(rng(TRACE_SEED + 3), TRACE_PROMPTS) + chat_prompts(rng(TRACE_SEED + 4), TRACE_PROMPTS))
        texts |= {name for name, *_ in TOOLS}
        # indexed by their first HEAD characters: one dict probe per position of a prompt
        self.short = [t for t in texts if len(t) < self.HEAD]
        self.heads: dict[str, list[str]] = defaultdict(list)
        for t in sorted(texts):
            if len(t) >= self.HEAD:
                self.heads[t[:self.HEAD]].append(t)

    HEAD = 12

    def hit(self, text: str) -> bool:
        if any(t in text for t in self.short):
            return True
        for i in range(len(text) - self.HEAD + 1):
            for t in self.heads.get(text[i:i + self.HEAD], ()):
                if text.startswith(t, i):
                    return True
        return False


def next_turn(messages: list[dict]) -> int:
    """Index of the first assistant turn the target has yet to answer (len: only the last)."""
    return next((i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"] is None), len(messages))


def stage_keys(messages: list[dict]) -> list[str]:
    """One key per conversation the target answers: two prompts sharing one get the same answer."""
    cuts = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"] is None] + [len(messages)]
    return [json.dumps(messages[:c]) for c in cuts]


def acceptor(exclusions: Exclusions):
    """accept(item): a prompt new to its category that quotes nothing held out."""
    seen: set[str] = set()

    def accept(it: dict) -> bool:
        keys = stage_keys(it["messages"])
        if any(k in seen for k in keys):
            return False
        if any(m["content"] and exclusions.hit(m["content"]) for m in it["messages"]):
            return False
        seen.update(keys)
        return True
    return accept


def interleave(per_category: dict[str, list[dict]]) -> list[dict]:
    """code, math, structured, chat, code, ...: every shard holds every category."""
    out = []
    for i in range(max((len(v) for v in per_category.values()), default=0)):
        out += [per_category[cat][i] for cat in CATEGORIES if i < len(per_category.get(cat, []))]
    return out


def train_items(per_category: int, heldout: list[dict], settings: dict, have: dict | None = None) -> dict:
    """{category: the first max(per_category, have) training prompts}."""
    exclusions = Exclusions(heldout)
    have = have or {}
    return {cat: category_items(cat, max(per_category, have.get(cat, 0)), settings["seed"], settings["heldout"],
                                acceptor(exclusions)) for cat in CATEGORIES}


def new_plan(per_category: int, settings: dict) -> dict:
    held = heldout_items(settings["heldout"], settings["seed"])
    return {"version": PLAN_VERSION, "settings": settings, "heldout": held,
            "train": interleave(train_items(per_category, held, settings))}


def grow_plan(plan: dict, per_category: int) -> dict:
    """Append prompts up to `per_category` per category; stored prompts (and so every answered
    shard) stay where they are."""
    have = Counter(it["category"] for it in plan["train"])
    if all(have[cat] >= per_category for cat in CATEGORIES):
        return plan
    fresh = train_items(per_category, plan["heldout"], plan["settings"], have)
    for cat in CATEGORIES:
        stored = [it for it in plan["train"] if it["category"] == cat]
        if fresh[cat][:len(stored)] != stored:
            raise UserError(f"the stored prompt plan's {cat} prompts differ from what this version builds; "
                            "build a new data set with another --out")
    return {**plan, "train": plan["train"] + interleave({cat: fresh[cat][have[cat]:] for cat in CATEGORIES})}


def load_or_build_plan(out: Path, args) -> dict:
    settings = {"seed": args.seed, "heldout": args.heldout, "shard_size": args.shard_size,
                "max_new_tokens": args.max_new_tokens}
    path = out / "prompts.json"
    if not path.is_file():
        plan = new_plan(args.per_category, settings)
    else:
        plan = json.loads(path.read_text())
        if plan.get("version") != PLAN_VERSION:
            raise UserError(f"{path} was written by an older version of this command; use another --out")
        for key, value in plan["settings"].items():
            if settings[key] != value:
                raise UserError(f"{out} was built with --{key.replace('_', '-')} {value}; resume it with the same value")
        plan = grow_plan(plan, args.per_category)
    write_json_atomic(path, plan)
    return plan


# --- the target's own questions (Magpie) --------------------------------------------------

def magpie_batch(model, tokenizer, eos, lead: str, batch: int, seed: int) -> list[str | None]:
    """`batch` questions the target writes after the user-turn prefix of its chat template and
    a lead phrase (sampled, for variety); None where it did not finish one."""
    from .generate import Sampler, generate_sorted
    rng = random.Random(seed)
    prefix = user_turn_prefix(tokenizer)
    leads = [rng.choice(MAGPIE_LEADS[lead]) for _ in range(batch)]
    prompts = [tokenizer.encode(prefix + lead_text, add_special_tokens=False) for lead_text in leads]
    outs = generate_sorted(model, prompts, MAGPIE_NEW_TOKENS, eos, batch, Sampler(seed=seed))
    return [(lead_text + tokenizer.decode(o[:-1])).strip() if o and o[-1] in eos else None
            for lead_text, o in zip(leads, outs)]


def question_pool(out: Path, model, tokenizer, eos, lead: str, need: int, args, exclusions: Exclusions) -> list[str]:
    """At least `need` distinct questions under `lead`, sampled batch by batch and stored after
    each (magpie.json), so a resumed run continues the same sequence."""
    path = out / "magpie.json"
    pools = json.loads(path.read_text()) if path.is_file() else {}
    pool = pools.setdefault(lead, {"questions": [], "batches": 0})
    seen = set(pool["questions"])
    start = pool["batches"]
    while len(pool["questions"]) < need:
        if pool["batches"] - start > 40 + 4 * need:
            raise UserError(f"the target wrote too few usable {lead} questions ({len(pool['questions'])} of {need})")
        seed = zlib.crc32(f"{args.seed}:{lead}:{pool['batches']}".encode())
        for q in magpie_batch(model, tokenizer, eos, lead, args.batch, seed):
            if q and len(q) >= 12 and q not in seen and not exclusions.hit(q):
                seen.add(q)
                pool["questions"].append(q)
        pool["batches"] += 1
        write_json_atomic(path, pools)
    if pool["batches"] > start:
        print(f"{time.strftime('%H:%M:%S')} {lead} questions: {len(pool['questions'])} "
              f"({pool['batches']} batches sampled)", file=sys.stderr, flush=True)
    return pool["questions"]


def resolve(items: list[dict], pools: dict[str, list[str]]) -> list[dict]:
    """Items with their question placeholders replaced by the target's questions."""
    def fill(text):
        return QUESTION_RE.sub(lambda m: pools[m.group(1)][int(m.group(2))], text) if text else text
    return [{**it, "messages": [{**m, "content": fill(m["content"])} for m in it["messages"]]} for it in items]


def questions_needed(items: list[dict]) -> dict[str, int]:
    need: dict[str, int] = defaultdict(int)
    for it in items:
        for m in it["messages"]:
            for lead, i in QUESTION_RE.findall(m["content"] or ""):
                need[lead] = max(need[lead], int(i) + 1)
    return need


# --- answering ----------------------------------------------------------------------------

def answer(model, tokenizer, eos, items: list[dict], first: int, max_new: int, batch: int, on_tokens=None,
           capture: tuple[int, ...] = ()) -> tuple[list[dict], list[torch.Tensor | None]]:
    """Rows for every turn the target answers, turn by turn: a multi-turn conversation goes on
    with the target's own previous answer. With `capture`, also each row's target features
    ([positions, len(capture) * H] fp16, every position but the answer's last), else Nones."""
    from .generate import generate_sorted
    convs = [[dict(m) for m in it["messages"]] for it in items]
    rows, feats, pending, turn = [], [], list(range(len(items))), 0
    while pending:
        stages = [convs[i][:next_turn(convs[i])] for i in pending]
        prompts = [encode_chat(tokenizer, s) for s in stages]
        parts: dict[int, list[torch.Tensor]] = defaultdict(list)
        answers = generate_sorted(model, prompts, max_new, eos, batch, on_tokens=on_tokens, capture=capture,
                                  on_features=lambda j, f: parts[j].append(f))
        going_on = []
        for j, (i, stage, p, a) in enumerate(zip(pending, stages, prompts, answers)):
            rows.append({"item": first + i, "category": items[i]["category"], "source": items[i]["source"],
                         "turn": turn, "prompt": stage[-1]["content"], "messages": stage,
                         "prompt_ids": p, "response_ids": a})
            feats.append(torch.cat(parts[j]) if capture else None)
            k = next_turn(convs[i])
            if k < len(convs[i]):
                text = tokenizer.decode(a[:-1] if a and a[-1] in eos else a, skip_special_tokens=True)
                convs[i][k] = {"role": "assistant", "content": text}
                going_on.append(i)
        pending, turn = going_on, turn + 1
    order = sorted(range(len(rows)), key=lambda r: (rows[r]["item"], rows[r]["turn"]))
    return [rows[r] for r in order], [feats[r] for r in order]


def shard_features(feats: list[torch.Tensor], capture: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The feature file's tensors for a shard's rows, one per row and hidden state."""
    out = {}
    for row, f in enumerate(feats):
        for layer, part in zip(capture, f.chunk(len(capture), dim=-1)):
            out[feature_key(row, layer)] = part
    return out


def shard_jobs(plan: dict, size: int) -> list[tuple[Path, int, list[dict]]]:
    """(relative path, first plan index, items) per shard: the held-out split first."""
    return [(Path(split) / f"{s // size:05d}.jsonl", s, plan[split][s:s + size])
            for split in ("heldout", "train") for s in range(0, len(plan[split]), size)]


def shard_done(path: Path, first: int, items: list[dict]) -> bool:
    if not path.is_file():
        return False
    rows = read_jsonl(path)
    return sorted({r.get("item") for r in rows}) == list(range(first, first + len(items))) and \
        all(r["source"] == items[r["item"] - first]["source"] for r in rows)


def brief(rows: list[dict]) -> list[dict]:
    """What the mix report needs of answered rows (the token ids stay on disk)."""
    return [{"item": r["item"], "category": r["category"], "source": r["source"],
             "prompt_tokens": len(r["prompt_ids"]), "response_tokens": len(r["response_ids"])} for r in rows]


def tally(rows: list[dict]) -> dict:
    return {"answers": len(rows), "prompts": len({r["item"] for r in rows}),
            "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "response_tokens": sum(r["response_tokens"] for r in rows)}


def mix_report(plan: dict, done: dict[str, list[dict]]) -> dict:
    """Planned prompts and answered rows (`brief`) per split, category and source."""
    report = {}
    for split in ("train", "heldout"):
        planned = Counter((it["category"], it["source"]) for it in plan[split])
        rows = [r for key, rs in done.items() if key.startswith(split + "/") for r in rs]
        cats = {}
        for cat in CATEGORIES:
            mine = [r for r in rows if r["category"] == cat]
            srcs = sorted({s for c, s in planned if c == cat})
            cats[cat] = {"planned_prompts": sum(n for (c, _), n in planned.items() if c == cat), **tally(mine),
                         "sources": {s: {"planned_prompts": planned[(cat, s)],
                                         **tally([r for r in mine if r["source"] == s])} for s in srcs}}
        total = {"planned_prompts": len(plan[split]), **tally(rows)}
        report[split] = {"total": total, "categories": cats}
    return report


def print_mix(report: dict) -> None:
    for split, part in report.items():
        t = part["total"]
        print(f"{split}: {t['prompts']}/{t['planned_prompts']} prompts answered, {t['answers']} answers, "
              f"{t['response_tokens']} response tokens", flush=True)
        for cat, c in part["categories"].items():
            srcs = ", ".join(f"{s} {v['prompts']}/{v['planned_prompts']}" for s, v in c["sources"].items())
            print(f"  {cat:10s} {c['prompts']:6d}/{c['planned_prompts']:<6d} {c['response_tokens']:9d} tokens  ({srcs})",
                  flush=True)


def check_args(args) -> None:
    if args.per_category < 1:
        raise UserError(f"--per-category must be at least 1, got {args.per_category}")
    if not 0 <= args.heldout <= len(chat_heldout()):
        raise UserError(f"--heldout must be between 0 and {len(chat_heldout())} (the shipped chat questions), got {args.heldout}")
    if not 1 <= args.max_new_tokens <= 2048:
        raise UserError(f"--max-new-tokens must be between 1 and 2048, got {args.max_new_tokens}")
    for flag in ("batch", "shard_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    from ..cli import SEED_MAX, check_out_dir
    check_out_dir(args.out if args.out else default_data_dir(), "--out")  # before any work: a file, no permission
    if not 0 <= args.seed <= SEED_MAX:
        raise UserError(f"--seed must be an integer in [0, 2**64 - 1], got {args.seed}")


def main(argv=None) -> int:
    p = Parser(prog="python -m hybrid_sd.train.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="data directory (default: the user cache)")
    p.add_argument("--target", default=None, help="target checkpoint directory (default: embedded SmolLM2)")
    p.add_argument("--per-category", type=int, default=512, help="training prompts per category")
    p.add_argument("--heldout", type=int, default=16, help="held-out prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=192, help="longest answer per turn")
    p.add_argument("--batch", type=int, default=32, help="prompts answered together")
    p.add_argument("--shard-size", type=int, default=128, help="prompts per shard file (the unit of resuming)")
    p.add_argument("--capture", default="auto",
                   help="target hidden states stored with the training shards: auto (what the trainers read by "
                        "default), none, or ids (0 = embeddings, i = output of layer i-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="where the target answers: cpu or cuda[:N] (a GPU answers large batches far faster)")
    return exit_code(build, p.parse_args(argv))


def build(args) -> Path:
    from ..cli import resolve_device
    from ..models.loading import load_target
    from ..models.packed_linear import pack_linears

    check_args(args)
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else default_data_dir()
    out.mkdir(parents=True, exist_ok=True)
    plan = load_or_build_plan(out, args)
    jobs = shard_jobs(plan, args.shard_size)
    done = {str(rel): brief(read_jsonl(out / rel)) for rel, first, items in jobs if shard_done(out / rel, first, items)}
    report = mix_report(plan, done)
    write_json_atomic(out / "mix.json", report)
    print_mix(report)
    todo = [(rel, first, items) for rel, first, items in jobs if str(rel) not in done]
    if not todo:
        return out
    model, tokenizer, eos = load_target(args.target, device=device, load_tokenizer=True)
    layers = capture_layers(args.capture, model.n_layers)
    pack_linears(model)  # a no-op for a model on a GPU
    exclusions = Exclusions(plan["heldout"])
    # on a terminal a live bar; in a log file one line per shard with the same meter and ETA
    tty = sys.stderr.isatty()
    bar = tqdm(total=sum(len(items) for _, _, items in todo), desc="answering", unit="prompt", smoothing=0,
               file=sys.stderr if tty else open(os.devnull, "w"))
    tokens, start = [0], time.perf_counter()

    def counted(n):
        tokens[0] += n

    for rel, first, items in todo:
        pools = {lead: question_pool(out, model, tokenizer, eos, lead, n, args, exclusions)
                 for lead, n in sorted(questions_needed(items).items())}
        capture = layers if rel.parts[0] == "train" else ()  # held-out rows are only decoded
        rows, feats = answer(model, tokenizer, eos, resolve(items, pools), first, args.max_new_tokens, args.batch,
                             counted, capture)
        if capture:  # before the shard: a shard on disk is complete
            write_features_atomic(features_path(out / rel), shard_features(feats, capture))
        write_jsonl_atomic(out / rel, rows)
        done[str(rel)] = brief(rows)
        write_json_atomic(out / "mix.json", mix_report(plan, done))
        rate = tokens[0] / (time.perf_counter() - start)
        bar.set_postfix_str(f"{tokens[0]} tokens, {rate:.0f} tok/s", refresh=False)
        bar.update(len(items))
        if not tty:
            print(f"{time.strftime('%H:%M:%S')} {rel}: {len(items)} prompts, {len(rows)} answers, "
                  f"{sum(len(r['response_ids']) for r in rows)} tokens | {bar}", file=sys.stderr, flush=True)
    bar.close()
    report = mix_report(plan, done)
    write_json_atomic(out / "mix.json", report)
    print_mix(report)
    return out


if __name__ == "__main__":
    sys.exit(main())
