"""Benchmark workloads by category, held out from drafter and router training.

code:       HumanEval problems of the drafter data's held-out split (never trained on).
math:       word problems from templates that no training source uses.
structured: JSON tool calls for tools that no training prompt names, built from their schemas,
            and multi-turn tool transcripts (call, tool result, next call).
chat:       open questions the target wrote itself (Magpie-style, the drafter data's held-out
            questions, shipped in chat_heldout.json).

A workload prompt is a list of chat messages; `models.loading.encode_chat` applies the target's chat template.
Every list is deterministic and the first n of a longer list are the list for n.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..train.prompts import CATEGORIES, NAMES, humaneval_split

HELDOUT_SEED, HELDOUT = 0, 16  # the drafter data's defaults (python -m hybrid_sd.train.data)
WORKLOAD_SEED = 31_000         # far from every training and trace seed


def code(n: int) -> list[list[dict]]:
    heldout, _ = humaneval_split(HELDOUT_SEED, HELDOUT)
    return [[{"role": "user", "content": p}] for p in heldout[:n]]


def math(n: int) -> list[list[dict]]:
    rng = random.Random(WORKLOAD_SEED + 1)

    def one() -> str:
        name, other = rng.sample(NAMES, 2)
        a, b, c = rng.randint(3, 30), rng.randint(2, 12), rng.randint(2, 9)
        return rng.choice([
            f"{name} reads {a} pages a day. How many days does {name} need for a book of {a * b} pages?",
            f"A recipe needs {c} eggs for {b} people. How many eggs are needed for {b * a} people?",
            f"{name} runs {a} km on Monday, {b} km on Tuesday and {c} km on Wednesday. "
            "What is the total distance and the daily average?",
            f"A jar holds {a} red and {b} blue marbles. What fraction of the marbles are red? "
            "Give it in lowest terms.",
            f"A jacket costs {a * 10} dollars and is on sale for {rng.choice([10, 20, 25, 30, 40])}% off. "
            "What is the sale price?",
            f"A tank fills at {a} liters per minute. How long does it take to fill {a * b * 10} liters?",
            f"{name} is {b} years older than {other}. Together they are {2 * a + b} years old. "
            f"How old is {other}?",
            f"Convert {a * 17 + b} minutes into hours and minutes.",
        ])
    return [[{"role": "user", "content": one()}] for _ in range(n)]


# (name, {argument: type}, request, {argument: value}) -- tools the training data never mentions
TOOLS = [
    ("book_table", {"restaurant": "string", "time": "HH:MM", "party_size": "integer"},
     "Book a table for {size} at {restaurant} at {time}.",
     {"restaurant": "{restaurant}", "time": "{time}", "party_size": "{size}"}),
    ("get_stock_price", {"symbol": "string", "currency": "ISO code"},
     "What is {symbol} trading at, in {currency}?", {"symbol": "{symbol}", "currency": "{currency}"}),
    ("set_reminder", {"text": "string", "when": "YYYY-MM-DD HH:MM"},
     "Remind me to {task} on {date} at {time}.", {"text": "{task}", "when": "{date} {time}"}),
    ("translate_text", {"text": "string", "target_language": "string"},
     "Translate '{phrase}' into {language}.", {"text": "{phrase}", "target_language": "{language}"}),
    ("create_ticket", {"title": "string", "priority": "\"low\" | \"medium\" | \"high\"", "assignee": "string"},
     "Open a {priority} priority ticket for {name}: {task}.",
     {"title": "{task}", "priority": "{priority}", "assignee": "{name}"}),
]
FILL = dict(restaurant=["Casa Rosa", "The Blue Door", "Sakura", "Little Lisbon"], symbol=["AAPL", "NVDA", "SAP", "TSM"],
            currency=["EUR", "USD", "JPY", "GBP"], task=["renew the passport", "call the plumber", "back up the laptop",
                                                         "fix the login page", "send the invoice"],
            phrase=["Where is the train station?", "Thank you for your help", "See you tomorrow"],
            language=["Spanish", "German", "Japanese", "French"], priority=["low", "medium", "high"])


def _call(rng: random.Random, tool) -> tuple[str, dict]:
    """A user request for `tool` and the call that answers it."""
    fill = {k: rng.choice(v) for k, v in FILL.items()}
    fill.update(name=rng.choice(NAMES), size=rng.randint(2, 8), time=f"{rng.randint(8, 21)}:{rng.choice(['00', '30'])}",
                date=f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
    name, _, request, args = tool
    return request.format(**fill), {"tool": name, "arguments": {k: v.format(**fill) for k, v in args.items()}}


def _tool_system(tools) -> str:
    specs = "\n".join(f"- {name}({json.dumps(schema)})" for name, schema, _, _ in tools)
    return ("You call tools. Available tools:\n" + specs + "\nAnswer every request with one JSON object "
            '{"tool": <name>, "arguments": {...}} and nothing else.')


def structured(n: int) -> list[list[dict]]:
    rng = random.Random(WORKLOAD_SEED + 2)
    out = []
    for i in range(n):
        tools = rng.sample(TOOLS, 3)
        system = {"role": "system", "content": _tool_system(tools)}
        request, call = _call(rng, tools[0])
        if i % 2 == 0:  # a single call
            out.append([system, {"role": "user", "content": request}])
            continue
        # a transcript: the first call, its result, then the next request
        result = json.dumps({"status": "ok", "id": rng.randint(1000, 9999)})
        follow_up, _ = _call(rng, tools[1])
        out.append([system, {"role": "user", "content": request},
                    {"role": "assistant", "content": json.dumps(call)},
                    {"role": "user", "content": f"Tool result: {result}\nNext: {follow_up}"}])
    return out


def chat(n: int) -> list[list[dict]]:
    questions = json.loads((Path(__file__).parent / "chat_heldout.json").read_text())
    return [[{"role": "user", "content": q}] for q in questions[:n]]


WORKLOADS = {"code": code, "math": math, "structured": structured, "chat": chat}
assert tuple(sorted(WORKLOADS)) == tuple(sorted(CATEGORIES))


def workloads(per_category: int) -> dict[str, list[list[dict]]]:
    """{category: [messages]} with up to `per_category` prompts each (16 at most for code and chat)."""
    return {cat: make(per_category) for cat, make in WORKLOADS.items()}


