"""Draft trees: several guesses per position, verified by the target in one pass.

A tree of k nodes is `parents` [k]: node i's parent is an earlier node (parents[i] < i) or
-1, the bonus token (the root, verify row 0). Node i sits at verify row i + 1 and at depth
depth(parent) + 1; a chain is the tree with parents [-1, 0, 1, ...]. Because every parent
precedes its children, any prefix of the nodes is a tree again: a drafter orders its nodes
best first (the lookup drafter puts its chain's draft first), and a budget of N nodes is the
first N.

Everything here is host-side bookkeeping over a few dozen nodes; the device sees only the
rows, their positions and the ancestor mask.
"""
from __future__ import annotations

import heapq

import torch


def chain_parents(k: int) -> list[int]:
    return list(range(-1, k - 1))


def is_chain(parents: list[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def depths(parents: list[int]) -> list[int]:
    """Depth of each node: 1 for a child of the bonus."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def check_tree(parents: list[int]) -> None:
    if any(not -1 <= p < i for i, p in enumerate(parents)):
        raise ValueError(f"not a tree in topological order (parents must precede their children): {parents}")


def ancestor_mask(parents: list[int], device=None) -> torch.Tensor:
    """[k+1, k+1] bool over verify rows (row 0 = the bonus): row i sees row j iff j is i itself
    or one of its ancestors."""
    k = len(parents)
    rows = [[False] * (k + 1) for _ in range(k + 1)]
    rows[0][0] = True
    for i, p in enumerate(parents):
        rows[i + 1] = list(rows[p + 1])
        rows[i + 1][i + 1] = True
    return torch.tensor(rows, dtype=torch.bool, device=device)


def children_of(parents: list[int], tokens: list[int]) -> dict[tuple[int, int], int]:
    """(parent row, token) -> child row; the first node wins if a drafter repeated a guess."""
    out: dict[tuple[int, int], int] = {}
    for i, (p, t) in enumerate(zip(parents, tokens)):
        out.setdefault((p + 1, t), i + 1)
    return out


def walk(parents: list[int], tokens: list[int], next_token) -> tuple[list[int], int]:
    """Descend from the bonus: at row r the target's token is `next_token(r)`; while it is a
    child's token, move to that child. Returns (accepted rows, excluding row 0; the target's
    token at the last row). With next_token = argmax this is greedy acceptance; with a sample
    of the target's distribution at r it is lossless sampling (every committed token is drawn
    from the target's own conditional)."""
    children = children_of(parents, tokens)
    path, row = [], 0
    while True:
        token = next_token(row)
        child = children.get((row, token))
        if child is None:
            return path, token
        path.append(child)
        row = child


def merge(drafts: list[tuple[list[int], list[int], list[float]]]) -> tuple[list[int], list[int], list[float], list[int]]:
    """One tree of several drafts, each (tokens, parents, scores): a path that several drafts
    propose is one node, with the score of the first draft that proposed it. Returns (tokens,
    parents, scores, owner: the index of the draft each node's score comes from). Nodes come
    depth by depth, the drafts in turn within a depth, so every parent precedes its children and
    the first N nodes hold every draft's first guesses (a cut that cannot rank them by
    calibrated acceptance, `--budget N`, keeps all drafters' shallow nodes, not one's whole draft)."""
    found: dict[tuple[int, ...], tuple[int, int, float]] = {}  # path -> (draft, its node, score)
    for d, (draft_tokens, draft_parents, draft_scores) in enumerate(drafts):
        paths: list[tuple[int, ...]] = []
        for i, (token, parent, score) in enumerate(zip(draft_tokens, draft_parents, draft_scores)):
            path = (paths[parent] if parent >= 0 else ()) + (token,)
            paths.append(path)
            found.setdefault(path, (d, i, score))
    order = sorted(found, key=lambda path: (len(path), found[path][:2]))
    node = {path: i for i, path in enumerate(order)}
    parents = [node[path[:-1]] if len(path) > 1 else -1 for path in order]
    return ([path[-1] for path in order], parents, [found[path][2] for path in order],
            [found[path][0] for path in order])


def best_first(top_logp: torch.Tensor, top_ids: torch.Tensor, budget: int):
    """DDTree: the `budget` most probable prefixes under independent per-depth distributions
    (a block drafter's slots), best first. top_logp/top_ids [D, K]: each depth's K best tokens,
    sorted descending. Returns (tokens, parents, path log-probabilities), in pop order, so every
    parent precedes its children and scores never increase.

    A node is (depth d, rank r under its parent); popping it pushes its first child (rank 0 at
    d + 1) and its next sibling (rank r + 1 at d): each node enters the heap once, from the
    node that is its best-first predecessor."""
    D, K = top_logp.shape
    lp, ids = top_logp.tolist(), top_ids.tolist()
    tokens, parents, scores = [], [], []
    heap = [(-lp[0][0], 0, 0, -1, 0)]  # (-score, tie-break, depth index, parent, rank)
    tick = 1
    while heap and len(tokens) < budget:
        neg, _, d, parent, rank = heapq.heappop(heap)
        node, score = len(tokens), -neg
        tokens.append(ids[d][rank])
        parents.append(parent)
        scores.append(score)
        if d + 1 < D:
            heapq.heappush(heap, (-(score + lp[d + 1][0]), tick, d + 1, node, 0))
            tick += 1
        if rank + 1 < K:
            heapq.heappush(heap, (-(score - lp[d][rank] + lp[d][rank + 1]), tick, d, parent, rank + 1))
            tick += 1
    return tokens, parents, scores

