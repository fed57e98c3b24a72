"""The dependency graph: levels respect dependencies, cycles are always found and named,
unknown dependencies and host-port clashes are refused with the field named."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import dags, digraphs

from dspy_infra.errors import CycleError, NotFound, SpecError
from dspy_infra.graph import find_cycle
from dspy_infra.models import DependsOn, PortMapping, ServiceSpec
from dspy_infra.services.graph import (
    check_host_ports,
    dependency_closure,
    dependents_closure,
    startup_levels,
    stop_order,
    topological_order,
    validate_graph,
)


def _specs(edges: dict[str, list[str]]) -> dict[str, ServiceSpec]:
    return {
        name: ServiceSpec(name=name, depends_on=[DependsOn(d) for d in deps]) for name, deps in edges.items()
    }


def _acyclic(edges: dict[str, list[str]]) -> bool:
    # Kahn's algorithm, an independent oracle for find_cycle.
    indegree = {n: 0 for n in edges}
    for deps in edges.values():
        for d in deps:
            indegree[d] += 1
    ready = [n for n, k in indegree.items() if k == 0]
    seen = 0
    while ready:
        node = ready.pop()
        seen += 1
        for d in edges[node]:
            indegree[d] -= 1
            if indegree[d] == 0:
                ready.append(d)
    return seen == len(edges)


@settings(max_examples=150, deadline=None)
@given(dags())
def test_levels_respect_dependencies_and_are_minimal(edges: dict[str, list[str]]) -> None:
    levels = startup_levels(_specs(edges))
    level_of = {name: k for k, names in enumerate(levels) for name in names}
    assert sorted(level_of) == sorted(edges)  # every service exactly once
    assert sum(len(lv) for lv in levels) == len(edges)
    for name, deps in edges.items():
        for dep in deps:
            assert level_of[dep] < level_of[name]
        # Minimal: a service sits right after its deepest dependency (no needless waiting).
        assert level_of[name] == (1 + max(level_of[d] for d in deps) if deps else 0)


@settings(max_examples=150, deadline=None)
@given(dags(), st.data())
def test_closure_holds_all_dependencies_in_startable_order(
    edges: dict[str, list[str]], data: st.DataObject
) -> None:
    specs = _specs(edges)
    wanted = data.draw(st.lists(st.sampled_from(sorted(edges)), min_size=1, unique=True))
    order = dependency_closure(specs, wanted)
    assert set(wanted) <= set(order)
    position = {n: i for i, n in enumerate(order)}
    for name in order:
        for dep in edges[name]:
            assert dep in position and position[dep] < position[name]
    # Nothing that is not needed.
    needed: set[str] = set()
    stack = list(wanted)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(edges[n])
    assert set(order) == needed


@settings(max_examples=150, deadline=None)
@given(dags(), st.data())
def test_stop_order_stops_dependents_first(edges: dict[str, list[str]], data: st.DataObject) -> None:
    specs = _specs(edges)
    subset = data.draw(st.lists(st.sampled_from(sorted(edges)), unique=True))
    order = stop_order(specs, subset)
    assert sorted(order) == sorted(subset)
    position = {n: i for i, n in enumerate(order)}
    for name in order:
        for dep in edges[name]:
            if dep in position:
                assert position[name] < position[dep]


@settings(max_examples=300, deadline=None)
@given(digraphs())
def test_find_cycle_agrees_with_kahn_and_names_a_real_cycle(edges: dict[str, list[str]]) -> None:
    cycle = find_cycle(edges)
    assert (cycle is None) == _acyclic(edges)
    if cycle is not None:
        assert cycle[0] == cycle[-1] and len(cycle) >= 3
        assert len(set(cycle[:-1])) == len(cycle) - 1  # a simple cycle
        for a, b in itertools.pairwise(cycle):
            assert b in edges[a]


@settings(max_examples=100, deadline=None)
@given(dags(max_nodes=8), st.data())
def test_a_back_edge_is_always_refused_with_the_cycle_named(
    edges: dict[str, list[str]], data: st.DataObject
) -> None:
    names = sorted(edges)
    if len(names) < 2:
        return
    # Pick a path a -> ... -> b (a depends on b transitively), then make b depend on a.
    a = data.draw(st.sampled_from([n for n in names if edges[n]] or [names[0]]))
    if not edges[a]:
        return
    b = data.draw(st.sampled_from(sorted(edges[a])))
    edges[b] = [*edges[b], a]
    with pytest.raises(CycleError) as info:
        validate_graph(_specs(edges))
    cycle = info.value.cycle
    assert cycle[0] == cycle[-1]
    assert " -> ".join(cycle) in str(info.value)
    assert info.value.field == f"services.{cycle[0]}.depends_on"
    with pytest.raises(CycleError):
        startup_levels(_specs(edges))


def test_cycle_message_reads_like_compose() -> None:
    with pytest.raises(CycleError, match=r"cycle found: a -> b -> a"):
        validate_graph(_specs({"a": ["b"], "b": ["a"], "c": []}))


def test_unknown_dependency_is_named_with_a_suggestion() -> None:
    with pytest.raises(SpecError) as info:
        validate_graph(_specs({"web": ["rediss"], "redis": []}))
    assert info.value.field == "services.web.depends_on"
    assert "'rediss'" in str(info.value) and "did you mean 'redis'?" in str(info.value)


def test_closure_of_an_unknown_service_is_not_found() -> None:
    with pytest.raises(NotFound, match="did you mean 'redis'"):
        dependency_closure(_specs({"redis": []}), ["redsi"])


def test_two_services_on_one_host_port_are_refused() -> None:
    a = ServiceSpec(name="a", ports=[PortMapping(80, 8080)])
    b = ServiceSpec(name="b", ports=[PortMapping(81, 8080)])
    with pytest.raises(SpecError) as info:
        check_host_ports([a, b])
    assert info.value.field == "services.b.ports" and "'a'" in str(info.value)
    # Any-free-port (0), unpublished (None) and other protocols never clash.
    check_host_ports(
        [
            ServiceSpec(name="c", ports=[PortMapping(80, 0)]),
            ServiceSpec(name="d", ports=[PortMapping(80, 0), PortMapping(81)]),
            ServiceSpec(name="e", ports=[PortMapping(53, 8080, protocol="udp")]),
            a,
        ]
    )


def test_dependents_and_topological_order() -> None:
    specs = _specs({"db": [], "api": ["db"], "ui": ["api"], "worker": ["db"], "lone": []})
    assert dependents_closure(specs, "db") == {"api", "ui", "worker"}
    assert dependents_closure(specs, "ui") == set()
    order = topological_order(specs)
    assert order.index("db") < order.index("api") < order.index("ui")
    assert startup_levels(specs) == [["db", "lone"], ["api", "worker"], ["ui"]]


def test_a_deep_chain_does_not_hit_the_recursion_limit() -> None:
    n = 3000
    edges = {f"s{i}": [f"s{i - 1}"] if i else [] for i in range(n)}
    specs = _specs(edges)
    assert len(startup_levels(specs)) == n
    edges["s0"] = [f"s{n - 1}"]
    assert find_cycle(edges) is not None
