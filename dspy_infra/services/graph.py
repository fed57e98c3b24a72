"""The service dependency graph: validation, cycles, startup levels and stop order.

Pure functions over ``{name: ServiceSpec}`` (no I/O). Everything a user can get wrong in a
graph is refused here with a ``SpecError`` naming the field: an unknown dependency
(``services.X.depends_on``), a cycle (``CycleError`` naming it, ``a -> b -> a``, as Docker
Compose does) and two services publishing the same host port (``services.X.ports``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence

from ..errors import CycleError, NotFound, SpecError
from ..models import ServiceSpec

__all__ = [
    "check_host_ports",
    "dependency_closure",
    "dependents_closure",
    "find_cycle",
    "startup_levels",
    "stop_order",
    "topological_order",
    "unknown_service",
    "validate_graph",
]


def unknown_service(name: str, known: Iterable[str], *, field: str = "services") -> NotFound:
    """The error for a service name nobody declared, with the closest known name."""
    return NotFound(f"unknown service {name!r}", field=field, fix=_suggest(name, known))


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return "declare it in [services.NAME] or remove the dependency"


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


def _deps(spec: ServiceSpec) -> list[str]:
    return [d.name for d in spec.depends_on]


def _unknown_dependency(name: str, dep: str, specs: Mapping[str, ServiceSpec]) -> SpecError:
    return SpecError(
        f"depends on unknown service {dep!r}", field=f"services.{name}.depends_on", fix=_suggest(dep, specs)
    )


def validate_graph(specs: Mapping[str, ServiceSpec]) -> None:
    """Refuse unknown dependencies and cycles among ``specs``."""
    for name in sorted(specs):
        for dep in _deps(specs[name]):
            if dep not in specs:
                raise _unknown_dependency(name, dep, specs)
    cycle = find_cycle({name: _deps(spec) for name, spec in specs.items()})
    if cycle is not None:
        raise CycleError(cycle, field=f"services.{cycle[0]}.depends_on")


def check_host_ports(specs: Iterable[ServiceSpec]) -> None:
    """Refuse two services publishing the same fixed host port (same ip family and protocol)."""
    taken: dict[tuple[int, str], str] = {}
    for spec in specs:
        for port in spec.ports:
            if not port.host_port:
                continue  # None = unpublished, 0 = any free port: never a clash
            key = (port.host_port, port.protocol)
            other = taken.get(key)
            if other is not None and other != spec.name:
                raise SpecError(
                    f"host port {port.host_port}/{port.protocol} is already published by service {other!r}",
                    field=f"services.{spec.name}.ports",
                    fix="give one of them another host port (or 0 for any free port)",
                )
            taken[key] = spec.name


def dependency_closure(specs: Mapping[str, ServiceSpec], names: Sequence[str]) -> list[str]:
    """``names`` plus everything they depend on, transitively, in a startable order."""
    for name in names:
        if name not in specs:
            raise unknown_service(name, specs)
    wanted: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in wanted:
            continue
        wanted.add(name)
        for dep in _deps(specs[name]):
            if dep not in specs:
                raise _unknown_dependency(name, dep, specs)
            stack.append(dep)
    return topological_order({n: specs[n] for n in wanted})


def dependents_closure(specs: Mapping[str, ServiceSpec], name: str) -> set[str]:
    """Every service that depends on ``name``, directly or not (not ``name`` itself)."""
    reverse: dict[str, set[str]] = {n: set() for n in specs}
    for n, spec in specs.items():
        for dep in _deps(spec):
            reverse.setdefault(dep, set()).add(n)
    out: set[str] = set()
    stack = list(reverse.get(name, ()))
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(reverse.get(n, ()))
    return out


def startup_levels(specs: Mapping[str, ServiceSpec]) -> list[list[str]]:
    """Level 0 = no dependencies; level k = depends only on levels < k (sorted in each level).
    Dependencies on services outside ``specs`` are treated as already satisfied."""
    validate_cycles = find_cycle({n: [d for d in _deps(s) if d in specs] for n, s in specs.items()})
    if validate_cycles is not None:
        raise CycleError(validate_cycles, field=f"services.{validate_cycles[0]}.depends_on")
    level: dict[str, int] = {}

    def depth(name: str) -> int:
        # Iterative memoised longest path, safe for deep chains.
        stack = [name]
        while stack:
            top = stack[-1]
            pending = [d for d in _deps(specs[top]) if d in specs and d not in level]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            level[top] = 1 + max((level[d] for d in _deps(specs[top]) if d in specs), default=-1)
        return level[name]

    levels: list[list[str]] = []
    for name in sorted(specs):
        k = depth(name)
        while len(levels) <= k:
            levels.append([])
    for name in sorted(specs):
        levels[level[name]].append(name)
    return levels


def topological_order(specs: Mapping[str, ServiceSpec]) -> list[str]:
    """Every service after its dependencies (levels flattened)."""
    return [name for lvl in startup_levels(specs) for name in lvl]


def stop_order(specs: Mapping[str, ServiceSpec], names: Iterable[str]) -> list[str]:
    """``names`` ordered so that each service stops before the services it depends on."""
    wanted = set(names)
    known = {n: s for n, s in specs.items()}
    order = [n for n in reversed(topological_order(known)) if n in wanted]
    # Names the catalog no longer knows (e.g. removed from config) still get stopped, last.
    order.extend(sorted(wanted - set(order)))
    return order
