"""Directed graphs of names (node -> the nodes it depends on), for service dependencies and
workflow steps alike: one cycle finder, one order, one set of levels. Pure functions, no
I/O, iterative (a deep graph never hits the recursion limit), deterministic.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

__all__ = ["find_cycle", "levels", "ordered"]


def find_cycle(edges: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges`` (node -> nodes it depends on), first node
    repeated last (``["a", "b", "a"]``), or None. Deterministic: nodes are visited sorted.
    Edges to nodes absent from ``edges`` are ignored (unknown names are checked elsewhere)."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(edges, white)
    for root in sorted(edges):
        if colour[root] != white:
            continue
        # Iterative DFS (a deep graph must not hit the recursion limit); `path` is the grey chain.
        path: list[str] = [root]
        iters = [iter(sorted(edges[root]))]
        colour[root] = grey
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                iters.pop()
                continue
            if nxt not in colour:
                continue
            if colour[nxt] == grey:
                return [*path[path.index(nxt) :], nxt]
            if colour[nxt] == white:
                colour[nxt] = grey
                path.append(nxt)
                iters.append(iter(sorted(edges[nxt])))
    return None


def ordered(edges: Mapping[str, Iterable[str]]) -> list[str]:
    """Every node after its dependencies, stable in ``edges``' order (Kahn's algorithm with
    in-degree counts: O(nodes + edges)). Nodes on a cycle, or downstream of one, are left
    out (``find_cycle`` names the cycle); edges to absent nodes are ignored."""
    deps = {node: [d for d in targets if d in edges] for node, targets in edges.items()}
    indegree = {node: len(d) for node, d in deps.items()}
    dependents: dict[str, list[str]] = {node: [] for node in deps}
    for node, targets in deps.items():
        for dep in targets:
            dependents[dep].append(node)
    ready = collections.deque(node for node, count in indegree.items() if count == 0)
    order: list[str] = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for child in dependents[node]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return order


def levels(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Level 0 = no dependencies; level k = depends only on levels < k (sorted in each level).
    Edges to absent nodes count as satisfied. The graph must be acyclic (check with
    ``find_cycle`` first)."""
    level: dict[str, int] = {}
    for node in ordered(edges):
        level[node] = 1 + max((level[d] for d in edges[node] if d in edges), default=-1)
    out: list[list[str]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for node in sorted(level):
        out[level[node]].append(node)
    return out
