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
from ..graph import find_cycle, levels
from ..models import ServiceSpec

__all__ = [
    "check_host_ports",
    "dependency_closure",
    "dependents_closure",
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
    validate_cycles = find_cycle({n: _deps(s) for n, s in specs.items()})
    if validate_cycles is not None:
        raise CycleError(validate_cycles, field=f"services.{validate_cycles[0]}.depends_on")
    return levels({n: _deps(s) for n, s in specs.items()})


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
