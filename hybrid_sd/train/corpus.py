"""Offline text that long prompts quote: Python functions and docstrings of the standard
library (read from its source files, never imported) and synthetic business documents.

Deterministic given the seed and the Python version (the standard library's source); the data
command stores every prompt it builds, so a resumed run never rebuilds them.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import random
from pathlib import Path

# pure-Python modules with plain, self-contained functions
STDLIB_MODULES = (
    "textwrap", "string", "fractions", "statistics", "heapq", "bisect", "colorsys", "calendar", "shlex", "difflib",
    "json.encoder", "json.decoder", "html", "urllib.parse", "ipaddress", "csv", "fnmatch", "random", "datetime",
    "functools", "collections", "pprint", "base64", "gettext", "tokenize", "inspect", "dataclasses", "enum",
    "argparse", "configparser", "zipfile", "pathlib", "shutil", "glob", "email.utils", "http.cookies", "mimetypes",
    "netrc", "plistlib", "quopri", "sched", "secrets", "tempfile", "uuid", "wave", "ast", "copy", "_pydecimal",
    "graphlib", "logging", "numbers", "optparse", "platform", "pstats", "selectors", "operator", "reprlib", "locale",
    "sysconfig", "traceback", "warnings", "contextlib", "queue", "threading", "keyword", "cmd", "code", "hmac",
    "ftplib", "imaplib", "smtplib", "mailbox", "http.client", "http.server", "pickle", "tarfile", "gzip", "filecmp",
    "linecache", "trace", "timeit", "getopt", "subprocess", "_pyio", "dis", "pdb", "bdb", "profile", "pydoc",
)
MAX_CODE_CHARS, MAX_DOC_CHARS = 1200, 1400  # keeps prompt + answer inside the trainers' 512 tokens


def _module_trees():
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            yield name, ast.parse(Path(spec.origin).read_text(encoding="utf-8"))


def _without_docstring(node: ast.FunctionDef) -> ast.FunctionDef:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        node.body = body[1:] or [ast.Pass()]
    return node


@functools.lru_cache(maxsize=1)
def stdlib_texts() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(functions, docs), one parse of the modules for both.

    functions: functions and methods of 5-30 lines, docstrings removed (prompts ask for them).
    docs: (title, text) of long module, class and function docstrings, cut at a paragraph."""
    functions, docs = [], []
    for module, tree in _module_trees():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 400:
                doc = inspect.cleandoc(doc)
                while len(doc) > MAX_DOC_CHARS and "\n\n" in doc:
                    doc = doc[:doc.rindex("\n\n")]
                if 400 <= len(doc) <= MAX_DOC_CHARS:
                    docs.append((module if isinstance(node, ast.Module) else f"{module}.{node.name}", doc))
            if isinstance(node, ast.FunctionDef) and 4 <= node.end_lineno - node.lineno <= 30 \
                    and not node.name.startswith("__"):
                code = ast.unparse(_without_docstring(node))
                if 120 <= len(code) <= MAX_CODE_CHARS:
                    functions.append(code)
    return tuple(dict.fromkeys(functions)), tuple(dict.fromkeys(docs))


def stdlib_functions() -> tuple[str, ...]:
    return stdlib_texts()[0]


def stdlib_docs() -> tuple[tuple[str, str], ...]:
    return stdlib_texts()[1]


SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.Add: ast.Sub,
         ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.And: ast.Or, ast.Or: ast.And}


def inject_bug(code: str, rng: random.Random) -> str | None:
    """The function with one plausible bug (a flipped comparison or operator, an off-by-one
    constant), or None where it has no place for one."""
    tree = ast.parse(code)
    spots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            spots += [(node, i) for i, op in enumerate(node.ops) if type(op) in SWAPS]
        elif isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
            spots.append((node, None))
        elif isinstance(node, ast.Constant) and type(node.value) is int and 0 <= node.value <= 16:
            spots.append((node, None))
    if not spots:
        return None
    node, i = rng.choice(spots)
    if isinstance(node, ast.Compare):
        node.ops[i] = SWAPS[type(node.ops[i])]()
    elif isinstance(node, ast.Constant):
        node.value += rng.choice([1, -1]) if node.value else 1
    else:
        node.op = SWAPS[type(node.op)]()
    buggy = ast.unparse(tree)
    return buggy if buggy != ast.unparse(ast.parse(code)) else None


# --- synthetic documents: every field a prompt asks for is in the text --------------------

FIRST = ["Amara", "Bruno", "Camille", "Deepak", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid", "Jonas", "Keiko",
         "Luis", "Mina", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tessa", "Umar", "Vera", "Wen", "Yusuf"]
LAST = ["Abbott", "Berg", "Castillo", "Dubois", "Eriksen", "Fischer", "Gupta", "Haddad", "Ito", "Jansen", "Kowalski",
        "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quintero", "Rossi", "Silva", "Tanaka", "Novak"]
COMPANIES = ["Northwind Traders", "Bluepeak Labs", "Greenfield Foods", "Orbitron Systems", "Harbor & Vale",
             "Copperleaf Studio", "Summit Logistics", "Brightwave Energy", "Maple Street Bakery", "Ironclad Security"]
PRODUCTS = [("standing desk", 180, 650), ("noise-cancelling headphones", 60, 380), ("espresso machine", 90, 900),
            ("mechanical keyboard", 45, 220), ("office chair", 120, 700), ("4K monitor", 200, 800),
            ("portable projector", 150, 600), ("air purifier", 80, 400), ("robot vacuum", 150, 700),
            ("smart thermostat", 70, 260), ("electric kettle", 20, 90), ("hiking backpack", 40, 250)]
PROJECTS = ["the website redesign", "the data migration", "the spring campaign", "the mobile app release",
            "the warehouse move", "the annual audit", "the customer survey", "the onboarding guide"]
CITIES = ["Porto", "Krakow", "Austin", "Melbourne", "Nagoya", "Accra", "Montreal", "Bergen", "Valencia", "Pune"]


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def date(rng: random.Random, year: int = 2025) -> str:
    return f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def email_doc(rng: random.Random) -> tuple[str, list[str]]:
    sender, to, project = person(rng), person(rng), rng.choice(PROJECTS)
    when, budget, pct = date(rng), rng.randint(5, 90) * 1000, rng.randint(10, 95)
    body = [f"Hi {to.split()[0]},",
            f"Quick update on {project}: we are about {pct}% done and still on track for {when}.",
            rng.choice([f"The remaining budget is ${budget:,}, which should cover the last phase.",
                        f"We spent ${budget:,} so far, slightly above the plan.",
                        f"Finance approved an extra ${budget:,} last week."]),
            rng.choice(["Could you review the attached draft by Friday?", "Please confirm the new timeline.",
                        "Let me know if the vendor contract needs another look.",
                        "Can we meet on Tuesday to go over the open risks?"]),
            f"Best,\n{sender}\n{rng.choice(COMPANIES)}"]
    text = (f"From: {sender}\nTo: {to}\nDate: {date(rng)}\nSubject: Update on {project}\n\n" + "\n\n".join(body))
    return text, ["sender", "recipient", "project", "deadline", "amount", "requested action"]


def invoice_doc(rng: random.Random) -> tuple[str, list[str]]:
    lines, total = [], 0
    for name, lo, hi in rng.sample(PRODUCTS, rng.randint(2, 4)):
        qty, price = rng.randint(1, 6), rng.randint(lo, hi)
        total += qty * price
        lines.append(f"  {name:<30} {qty:>3} x {price:>5}.00 = {qty * price:>7}.00")
    tax = round(total * rng.choice([0.05, 0.08, 0.1, 0.2]), 2)
    text = (f"INVOICE {rng.choice(['INV', 'NO', 'A'])}-{rng.randint(1000, 99999)}\n"
            f"Vendor: {rng.choice(COMPANIES)}, {rng.choice(CITIES)}\nBill to: {person(rng)}\n"
            f"Issued: {date(rng)}   Due: {date(rng)}\n\nItems:\n" + "\n".join(lines) +
            f"\n\nSubtotal: {total}.00\nTax: {tax:.2f}\nTotal due: {total + tax:.2f} USD\n"
            f"Payment: {rng.choice(['bank transfer', 'credit card', 'check'])}")
    return text, ["invoice number", "vendor", "customer", "due date", "line items", "total"]


def meeting_doc(rng: random.Random) -> tuple[str, list[str]]:
    people = [person(rng) for _ in range(rng.randint(3, 5))]
    project = rng.choice(PROJECTS)
    actions = [f"- {rng.choice(people)}: {rng.choice(['draft', 'review', 'send', 'update', 'test'])} "
               f"{rng.choice(['the budget sheet', 'the vendor list', 'the release notes', 'the slide deck', 'the test plan', 'the FAQ'])}"
               f" by {date(rng)}" for _ in range(rng.randint(2, 4))]
    decisions = rng.sample([f"Move the launch of {project} by {rng.randint(2, 4)} weeks.",
                            f"Hire {rng.randint(1, 3)} contractors for {rng.randint(2, 8)} months.",
                            f"Keep the current supplier in {rng.choice(CITIES)}.",
                            f"Cut the scope of {project} to the core features.",
                            f"Raise the budget by {rng.randint(5, 30)}%."], 2)
    text = (f"Meeting notes: {project}\nDate: {date(rng)}\nAttendees: {', '.join(people)}\n\n"
            f"Discussion:\n{people[0]} opened with the status of {project}. "
            f"{people[1]} raised concerns about {rng.choice(['the timeline', 'costs', 'staffing', 'quality'])}.\n\n"
            "Decisions:\n" + "\n".join(f"- {d}" for d in decisions) + "\n\nAction items:\n" + "\n".join(actions))
    return text, ["date", "attendees", "decisions", "action items with owners and due dates"]


def product_doc(rng: random.Random) -> tuple[str, list[str]]:
    name, lo, hi = rng.choice(PRODUCTS)
    brand = rng.choice(COMPANIES).split()[0]
    text = (f"{brand} {name.title()} {rng.choice(['Pro', 'Lite', 'X', 'Max', 'S2'])}\n"
            f"Price: ${rng.randint(lo, hi)}.{rng.choice(['00', '49', '99'])}\n"
            f"Weight: {rng.randint(2, 250) / 10} kg   Color: {rng.choice(['black', 'white', 'graphite', 'sage', 'navy'])}\n"
            f"Warranty: {rng.randint(1, 5)} years   Rating: {rng.randint(30, 50) / 10}/5 "
            f"({rng.randint(12, 4000)} reviews)\n\nFeatures:\n" +
            "\n".join(f"- {f}" for f in rng.sample(["quiet operation", "energy saving mode", "app control",
                                                    "fast setup", "recycled materials", "USB-C charging",
                                                    "compact design", "two-year battery life", "washable parts"], 3)) +
            f"\n\nShips from {rng.choice(CITIES)} within {rng.randint(1, 10)} business days.")
    return text, ["product name", "price", "weight", "warranty", "rating", "features"]


def profile_doc(rng: random.Random) -> tuple[str, list[str]]:
    who, city = person(rng), rng.choice(CITIES)
    years = rng.randint(2, 25)
    role = rng.choice(["data analyst", "nurse", "civil engineer", "product designer", "teacher", "accountant"])
    text = (f"{who} is a {role} based in {city} with {years} years of experience. "
            f"After studying at the University of {rng.choice(CITIES)}, {who.split()[0]} worked at "
            f"{rng.choice(COMPANIES)} for {rng.randint(1, years)} years before joining {rng.choice(COMPANIES)} "
            f"in {rng.randint(2005, 2024)}. {who.split()[0]} speaks {', '.join(rng.sample(['English', 'Spanish', 'Hindi', 'Japanese', 'German', 'Arabic', 'French'], 2))}, "
            f"enjoys {rng.choice(['rock climbing', 'chess', 'baking', 'cycling', 'photography'])}, and can be reached at "
            f"{who.split()[0].lower()}.{who.split()[1].lower()}@example.com or +1-555-{rng.randint(1000, 9999)}.")
    return text, ["name", "job title", "city", "years of experience", "languages", "email", "phone"]


DOCUMENTS = {"email": email_doc, "invoice": invoice_doc, "meeting notes": meeting_doc,
             "product listing": product_doc, "profile": profile_doc}


def document(rng: random.Random) -> tuple[str, str, list[str]]:
    """(kind, text, fields the text holds)."""
    kind = rng.choice(sorted(DOCUMENTS))
    return (kind, *DOCUMENTS[kind](rng))
