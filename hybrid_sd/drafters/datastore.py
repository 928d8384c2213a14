"""A datastore of the target's own answers, looked up by the tokens that precede a position.

Retrieval drafting (in the spirit of REST): where the current context's last tokens occurred
in an earlier answer of the same target, what followed there is a draft. A small target
answers alike to alike requests, so its past answers predict it well where the prompt holds
no match (math working, boilerplate around code, JSON scaffolding).

On disk: `datastore.safetensors` holds one uint16 array, MAX_N SEPs then the answers' tokens,
each answer followed by SEP, and `datastore.json` its vocabulary size and counts (`python -m hybrid_sd.train.datastore`
writes both). At load, every position is sorted by the MAX_N tokens before it (most recent
first), packed four to a 64-bit key, so that the positions following any suffix of the context
are one contiguous range found by binary search: no Python loop over the store.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

MAX_N = 8        # longest context suffix matched (two packed keys of four tokens)
SEP = 65535      # separates answers (and pads before the first): never a token of the vocabulary
SAMPLE = 256     # positions of a match that vote on its continuation (spread over the range)
MIN_AGREEMENT = 0.4  # draft while this share of the voting occurrences follows the whole draft so far
                     # (a longer draft costs verify time; chosen on the held-out split, docs/drafters.md)
FORMAT = "hybrid_sd.datastore"
VERSION = 1
FILES = ("datastore.json", "datastore.safetensors")


def _packed(tokens: np.ndarray, start: int) -> np.ndarray:
    """Per position p: tokens p-start-1 .. p-start-4 in 16-bit fields, the most recent highest."""
    wide = tokens.astype(np.uint64)
    key = np.zeros(len(tokens), dtype=np.uint64)
    for j in range(4):
        d = start + j + 1
        col = np.full(len(tokens), SEP, dtype=np.uint64)
        col[d:] = wide[:-d]
        key = (key << np.uint64(16)) | col
    return key


class Datastore:
    def __init__(self, tokens: np.ndarray, vocab_size: int):
        if vocab_size >= SEP:
            raise ValueError(f"a datastore holds vocabularies below {SEP} tokens; this one has {vocab_size}")
        if len(tokens) == 0 or tokens[-1] != SEP:  # a continuation stops at the end of the store
            tokens = np.concatenate([tokens, np.array([SEP], dtype=np.uint16)])
        self.tokens, self.vocab_size = tokens, vocab_size
        k1, k2 = _packed(tokens, 0), _packed(tokens, 4)
        self.order = np.lexsort((k2, k1))  # positions sorted by their preceding tokens
        self.keys = (k1[self.order], k2[self.order])
        self.answers = int((tokens[MAX_N:] == SEP).sum())
        self.size = len(tokens) - MAX_N - self.answers  # answer tokens

    @classmethod
    def from_answers(cls, answers, vocab_size: int) -> "Datastore":
        """From token lists (each a whole answer of the target)."""
        flat = [SEP] * MAX_N  # the first answer's first tokens see only SEP before them
        for ids in answers:
            if any(not 0 <= t < vocab_size for t in ids):
                raise ValueError(f"an answer holds a token outside the vocabulary of {vocab_size}")
            flat += [*ids, SEP]
        return cls(np.array(flat, dtype=np.uint16), vocab_size)

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        from ..cli import write_atomic
        directory = Path(directory)
        write_atomic(directory / "datastore.safetensors",
                     writer=lambda tmp: save_file({"tokens": self.tokens}, tmp))
        write_atomic(directory / "datastore.json", json.dumps(
            {"format": FORMAT, "version": VERSION, "vocab_size": self.vocab_size, "answers": self.answers,
             "tokens": self.size}, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path, vocab_size: int) -> "Datastore":
        """Every missing, damaged or mismatched file is a ValueError that says which and why."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from ..models.loading import read_json
        directory = Path(directory)
        for name in FILES:
            if not (directory / name).is_file():
                raise ValueError(f"{directory} has no {name} (write one with python -m hybrid_sd.train.datastore)")
        meta = read_json(directory / "datastore.json", "a datastore description")
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{directory / 'datastore.json'} is not a version-{VERSION} {FORMAT} file")
        if meta.get("vocab_size") != vocab_size:
            raise ValueError(f"the datastore in {directory} was built for a vocabulary of {meta.get('vocab_size')} "
                             f"tokens, the target has {vocab_size}: build one from this target's answers")
        try:
            tokens = load_file(str(directory / "datastore.safetensors"))["tokens"]
        except (SafetensorError, KeyError, OSError) as e:
            raise ValueError(f"{directory / 'datastore.safetensors'} is damaged or cut short ({e})") from None
        if tokens.dtype != np.uint16 or tokens.ndim != 1 or len(tokens) < MAX_N \
                or bool(((tokens >= vocab_size) & (tokens != SEP)).any()):
            raise ValueError(f"{directory / 'datastore.safetensors'} does not hold uint16 tokens of this vocabulary")
        return cls(tokens, vocab_size)

    def match(self, ids: list[int]) -> tuple[int, int, int]:
        """(lo, hi, n): the longest suffix of `ids` (n tokens, at most MAX_N) that occurs in the
        store; positions order[lo:hi] follow its occurrences. n = 0: not even the last token."""
        lo, hi, n = 0, len(self.order), 0
        query = [0, 0]
        for d in range(1, min(MAX_N, len(ids)) + 1):
            token = ids[-d]
            if not 0 <= token < self.vocab_size:
                break
            half, j = divmod(d - 1, 4)  # key 0 holds tokens 1-4 back, key 1 tokens 5-8
            shift = 16 * (3 - j)
            query[half] |= token << shift
            low, high = query[half], query[half] | ((1 << shift) - 1)  # any tokens further back
            keys = self.keys[half][lo:hi]
            new_lo = lo + int(np.searchsorted(keys, np.uint64(low), "left"))
            new_hi = lo + int(np.searchsorted(keys, np.uint64(high), "right"))
            if new_lo >= new_hi:
                break
            lo, hi, n = new_lo, new_hi, d
        return lo, hi, n

    def voters(self, ids: list[int]) -> tuple[np.ndarray, int]:
        """The store positions that follow the longest matched suffix (at most SAMPLE, spread over
        its range) and the suffix length n; n = 0: none."""
        lo, hi, n = self.match(ids)
        positions = self.order[lo:hi] if n else self.order[:0]
        if len(positions) > SAMPLE:
            positions = positions[np.linspace(0, len(positions) - 1, SAMPLE).astype(np.int64)]
        return positions, n

    def continuation(self, ids: list[int], k: int) -> tuple[list[int], int, list[float]]:
        """Up to k tokens that most often followed the longest matched suffix (token by token,
        among the occurrences that agree so far, while at least MIN_AGREEMENT of the voting
        occurrences agree with the whole draft), the suffix length n, and per drafted token the
        share of the voting occurrences that follow the draft that far; ([], 0, []) for none."""
        positions, n = self.voters(ids)
        if n == 0 or k <= 0:
            return [], 0, []
        out: list[int] = []
        shares: list[float] = []
        last, voters = len(self.tokens) - 1, len(positions)
        for j in range(k):
            following = self.tokens[np.minimum(positions + j, last)]
            votes = Counter(following[following != SEP].tolist())
            if not votes:
                break
            token, count = votes.most_common(1)[0]
            if count < MIN_AGREEMENT * voters:
                break
            out.append(token)
            shares.append(count / voters)
            positions = positions[following == token]
        return out, n, shares

    def prefixes(self, ids: list[int], depth: int, limit: int) -> dict[tuple[int, ...], float]:
        """The `limit` continuation prefixes (up to `depth` tokens) that the most voting
        occurrences follow, each with the share that do: a draft tree's candidates (REST's trie).
        Ties go to the shorter prefix, so a prefix's parent always ranks before it."""
        positions, n = self.voters(ids)
        if n == 0 or depth <= 0 or limit <= 0:
            return {}
        following = self.tokens[np.minimum(positions[:, None] + np.arange(depth), len(self.tokens) - 1)]
        # sorted rows: the occurrences sharing a j-token prefix are one run, its length the count
        rows = following[np.lexsort(following.T[::-1])]
        inside = np.cumprod(rows != SEP, axis=1).astype(bool)  # no answer's end within the prefix
        starts = np.zeros(len(rows), dtype=bool)
        starts[0] = True
        runs = []  # (start row, length j, count) of every prefix
        for j in range(depth):
            starts[1:] |= rows[1:, j] != rows[:-1, j]
            first = np.flatnonzero(starts)
            count = np.diff(np.append(first, len(rows)))
            keep = inside[first, j]
            runs.append(np.stack([first[keep], np.full(int(keep.sum()), j + 1), count[keep]], axis=1))
        runs = np.concatenate(runs)
        best = runs[np.lexsort((runs[:, 1], -runs[:, 2]))[:limit]]  # most followed, then shorter
        return {tuple(rows[r, :j].tolist()): c / len(rows) for r, j, c in best.tolist()}
