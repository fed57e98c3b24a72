"""Shared hypothesis strategies (one place, as the house rules ask). Others may import them."""

from __future__ import annotations

import ipaddress
import json
import math
import string
from typing import Any

import attrs
from hypothesis import strategies as st

from dspy_infra.executors.slurm import FAILED_STATES
from dspy_infra.models import (
    DependsOn,
    HealthCheck,
    PortMapping,
    Resources,
    RestartPolicy,
    ServiceSpec,
    TaskClass,
    TaskSpec,
    VolumeMount,
)
from dspy_infra.scheduler.limiter import LimiterSample

__all__ = [
    "Dag",
    "any_task_ids",
    "attempt_journal_plans",
    "attempt_plans",
    "bad_workflow_specs",
    "batch_intake_plans",
    "codes",
    "container_fields",
    "dags",
    "digraphs",
    "graphs",
    "health_fields",
    "hostile_json",
    "hostile_json_bodies",
    "hostile_strings",
    "hostile_task_docs",
    "hostile_task_kwargs",
    "hostile_task_requests",
    "http_fields",
    "json_scalar",
    "json_values",
    "key",
    "label_keys",
    "limiter_ops",
    "limiter_samples",
    "lines",
    "loopback_v4",
    "manager_dags",
    "names",
    "output_chunks",
    "poisoned_batches",
    "port_numbers",
    "ports",
    "priorities",
    "public_v4",
    "ray_demands",
    "remote_task_docs",
    "result_keys",
    "runner_calls",
    "service_cli_names",
    "service_cli_ports",
    "service_cli_service_specs",
    "service_handles_port_numbers",
    "service_specs",
    "slurm_task_ids",
    "states",
    "step_names",
    "store_op_plans",
    "submit_and_wait_plans",
    "submit_task_request_fields",
    "task_doc",
    "task_ids",
    "task_outcomes",
    "task_specs",
    "text",
    "text_values",
    "url_like",
    "wire_json_objects",
    "wire_json_values",
    "word",
    "workflow_properties_dags",
]

#: Task ids as users write them (non-empty, short, printable).
task_ids = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=24)

#: Priorities, small enough that ties are common (FIFO within a priority gets exercised).
priorities = st.integers(min_value=-3, max_value=3)

#: What a test task does per attempt: "ok" or "fail"; a list per task, one entry per attempt.
task_outcomes = st.lists(st.sampled_from(["ok", "fail"]), min_size=1, max_size=5)

#: Operations on a ResizableSemaphore: ("acquire", _), ("release", _), ("resize", n), ("cancel", i).
limiter_ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.just(0)),
        st.tuples(st.just("release"), st.just(0)),
        st.tuples(st.just("resize"), st.integers(min_value=1, max_value=6)),
    ),
    max_size=60,
)

#: One interval of limiter observations, anywhere from idle to overloaded.
limiter_samples = st.builds(
    LimiterSample,
    backlog=st.integers(min_value=0, max_value=1000),
    inflight=st.integers(min_value=0, max_value=100),
    mean_wait=st.floats(min_value=0, max_value=600, allow_nan=False),
    error_rate=st.floats(min_value=0, max_value=1, allow_nan=False),
)


@st.composite
def task_specs(draw: st.DrawFn, task_class: str = "cpu_short", handler: str = "noop") -> TaskSpec:
    """A valid TaskSpec with a random id, priority, attempts and payload extras."""
    extra = draw(
        st.dictionaries(
            st.text(string.ascii_lowercase, min_size=1, max_size=8).filter(lambda k: k != "handler"),
            st.text(string.printable, max_size=20),
            max_size=3,
        )
    )
    return TaskSpec(
        id=draw(task_ids),
        task_class=task_class,
        payload={"handler": handler, **extra},
        priority=draw(priorities),
        max_attempts=draw(st.integers(min_value=1, max_value=4)),
    )


#: Any task id a client could send: any Unicode text, colons, slashes and dots included.
any_task_ids = st.text(min_size=1, max_size=64)

#: A command's output as the pipe delivers it: chunks of bytes of varied sizes and content.
output_chunks = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 3000), st.integers(0, 255)),
    ),
    max_size=20,
)
# -- hostile inputs (tests/test_adversarial_*.py) -------------------------------------------

#: Strings an attacker or a careless client sends: empty, huge, NUL, control characters,
#: template and path syntax, non-ASCII. (Lone surrogates cannot cross protobuf or UTF-8
#: JSON; the JSON-body strategies below add them as \ud800 escapes.)
hostile_strings = st.one_of(
    st.just(""),
    st.text(max_size=20),
    st.sampled_from(["\x00", "a\x00b", "{{", "{{ input.x }}", "../../etc/passwd", "é" * 10, " ", "\n"]),
    st.integers(min_value=257, max_value=5000).map(lambda n: "x" * n),
    st.just("y" * 400_000),
)


def _json_trees(*, non_finite: bool, text_size: int, key_size: int, width: int) -> st.SearchStrategy[Any]:
    """Nested lists and objects of small leaves: null, booleans, integers beyond 64 bits,
    floats (NaN and infinities only with ``non_finite``) and short text."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=non_finite, allow_infinity=non_finite)
        | st.text(max_size=text_size),
        lambda inner: (
            st.lists(inner, max_size=width)
            | st.dictionaries(st.text(max_size=key_size), inner, max_size=width)
        ),
        max_leaves=12,
    )


#: Any JSON value with small leaves (for nesting and type confusion).
json_values = _json_trees(non_finite=False, text_size=10, key_size=6, width=4)


def _nested(depth: int, leaf: Any = 1) -> Any:
    value: Any = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


#: Task documents (HTTP /queue/submit bodies, SubmitTasks.tasks_json entries) that are wrong
#: in at least one field. None of them may create a task.
_TASK_KEYS: frozenset[str] = frozenset(
    {"id", "class", "payload", "priority", "timeout", "max_attempts", "workflow_id"}
)

hostile_task_docs = st.one_of(
    # Wrong type or range of a known field.
    st.fixed_dictionaries(
        {"payload": st.just({"handler": "noop"})},
        optional={
            "id": st.sampled_from(["x" * 300, "a\x00b"])
            | st.integers()
            | st.lists(st.integers(), max_size=2),
            "priority": st.sampled_from([2**31, -(2**31) - 1, 10**30, 1e30, "high", True, 1.5]),
            "timeout": st.sampled_from([0, -1, 10**400, "soon", [1]]),
            "max_attempts": st.sampled_from([0, 101, 10**30, "3", None]),
        },
    ).filter(lambda d: len(d) > 1 and any(v is not None for k, v in d.items() if k != "payload")),
    # Unstorable or over-deep payload values.
    st.sampled_from(
        [
            {"payload": {"handler": "noop", "n": 10**30}},
            {"payload": {"handler": "noop", "deep": _nested(60)}},
            {"payload": "not an object"},
            {"payload": [1, 2]},
            {"payload": {"handler": "noop", "k" * 300: "long key"}},
        ]
    ),
    # Unknown keys and wrong top-level types.
    st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda k: k not in _TASK_KEYS),
        json_values,
        min_size=1,
        max_size=3,
    ),
    st.one_of(st.lists(json_values, max_size=3), st.integers(), st.text(max_size=10), st.none()),
)


def _doc_bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


#: Raw HTTP bodies that are not one acceptable task: malformed JSON, deep nesting, lone
#: surrogates, non-finite numbers, huge integers, non-UTF-8 bytes, and hostile task documents.
hostile_json_bodies = st.one_of(
    st.binary(max_size=64).filter(lambda b: not b.strip().startswith(b"{")),
    st.sampled_from(
        [
            b"",
            b"{",
            b"{not json",
            b"[" * 100_000,
            b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
            b'{"payload": {"handler": "noop", "s": "\\ud800"}}',
            b'{"payload": {"handler": "noop", "x": NaN}}',
            b'{"payload": {"handler": "noop", "x": Infinity}}',
            b'{"payload": {"handler": "noop", "x": 1' + b"0" * 5000 + b"}}",
            b"\xff\xfe{}",
            b'{"payload": {"handler": "noop"}, "payload": 5}',
        ]
    ),
    hostile_task_docs.map(_doc_bytes),
)


@st.composite
def hostile_task_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Fields of an ``orchestrator.v1.SubmitTaskRequest`` with at least one of them wrong
    (representable in protobuf: valid UTF-8 strings, int32, doubles)."""
    fields: dict[str, Any] = {
        "id": draw(st.sampled_from(["ok-id"]) | hostile_strings),
        "payload": {"handler": "noop"},
    }
    wrong = draw(st.sampled_from(["id", "class", "timeout", "max_attempts", "payload", "unavailable_class"]))
    if wrong == "id":
        fields["id"] = draw(st.sampled_from(["", "x" * 300, "a\x00b", "z" * 400_000]))
    elif wrong == "class":
        fields["class"] = draw(st.sampled_from(["warp", "x" * 5000, "a\x00b"]))
    elif wrong == "timeout":
        fields["timeout_seconds"] = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-300]))
    elif wrong == "max_attempts":
        fields["max_attempts"] = draw(st.sampled_from([-1, 101, 2**31 - 1]))
    elif wrong == "payload":
        fields["payload"] = draw(
            st.sampled_from(
                [
                    {"handler": "noop", "k" * 300: "key too long"},
                    {"handler": "noop", "big": "b" * 2_000_000},
                    {"k\x00": "v", "handler": "noop"},
                ]
            )
        )
    else:
        fields["class"] = "gpu_slurm"  # no Slurm executor configured (slurm unset): refused
    return fields


@st.composite
def bad_workflow_specs(draw: st.DrawFn) -> tuple[Any, str]:
    """(a workflow spec that must be refused, a word its error's field contains)."""
    step = {"name": "a", "task_class": "cpu_short", "payload": {"handler": "noop"}}
    kind = draw(
        st.sampled_from(
            [
                "priority",
                "surrogate",
                "huge_int",
                "nan",
                "deep",
                "cycle",
                "unknown_dep",
                "too_many",
                "not_upstream",
                "template",
                "too_big",
                "dup",
            ]
        )
    )
    if kind == "priority":
        return {
            "steps": [{**step, "priority": draw(st.sampled_from([10**30, 2**31, 1e30, -(2**31) - 1]))}]
        }, "priority"
    if kind == "surrogate":
        return '{"steps": [{"name": "a", "payload": {"handler": "noop", "s": "\\ud800"}}]}', "payload"
    if kind == "huge_int":
        return {"steps": [{**step, "payload": {"handler": "noop", "n": 10**30}}]}, "payload"
    if kind == "nan":
        return '{"steps": [{"name": "a", "payload": {"handler": "noop"}, "timeout": NaN}]}', "timeout"
    if kind == "deep":
        return {"steps": [{**step, "payload": {"handler": "noop", "d": _nested(40)}}]}, "payload"
    if kind == "cycle":
        return {
            "steps": [{**step, "depends_on": ["b"]}, {**step, "name": "b", "depends_on": ["a"]}]
        }, "depends_on"
    if kind == "unknown_dep":
        return {"steps": [{**step, "depends_on": ["q" * draw(st.integers(1, 100_000))]}]}, "depends_on"
    if kind == "too_many":
        n = draw(st.integers(2001, 8000))
        return {"steps": [{**step, "name": f"s{i}"} for i in range(n)]}, "steps"
    if kind == "not_upstream":
        return {
            "steps": [
                step,
                {**step, "name": "b", "payload": {"handler": "noop", "x": "{{ steps.a.result.k }}"}},
            ]
        }, "payload"
    if kind == "template":
        return {
            "steps": [
                {
                    **step,
                    "payload": {"handler": "noop", "x": "{{" * draw(st.integers(1, 200_000)) + " bogus }}"},
                }
            ]
        }, "payload"
    if kind == "too_big":
        return b'{"steps": [{"name": "a", "payload": {"handler": "noop", "x": "' + b"x" * (
            1 << 20
        ) + b'"}}]}', "spec"
    return {"steps": [step, step]}, "steps"


@st.composite
def poisoned_batches(draw: st.DrawFn) -> list[list[tuple[int, bool]]]:
    """Concurrent submit batches of (unique number, refused by the store?) pairs."""
    flags = draw(st.lists(st.booleans(), min_size=1, max_size=40))
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(flags)), max_size=5)))
    numbered = list(enumerate(flags))
    batches: list[list[tuple[int, bool]]] = []
    start = 0
    for cut in [*cuts, len(flags)]:
        if cut > start:
            batches.append(numbered[start:cut])
            start = cut
    return batches


#: Batches for ``Scheduler.submit_batch``, submitted concurrently in this order; each entry:
#: ("new", priority) a fresh task, ("same", k) / ("clash", k) the id of the k-th fresh task so
#: far (modulo their number) with the same / other content, or what the scheduler refuses:
#: ("bad_class", 0) an unknown class, ("bad_handler", 0) a handler that is not a string,
#: ("too_big", 0) a payload over ``max_payload_bytes``.
batch_intake_plans = st.lists(
    st.lists(
        st.one_of(
            st.tuples(st.just("new"), priorities),
            st.tuples(st.sampled_from(["same", "clash"]), st.integers(0, 30)),
            st.tuples(st.sampled_from(["bad_class", "bad_handler", "too_big"]), st.just(0)),
        ),
        max_size=12,
    ),
    min_size=1,
    max_size=3,
)

#: What each run of a task does, in order: finish, raise, or take its process down ("crash").
attempt_plans = st.lists(st.sampled_from(["ok", "fail", "crash"]), min_size=1, max_size=6)

#: What happens to five tasks before a kill (the first three submitted at the start, the last
#: two not): ("start", i) an attempt of task i starts (its row queued, the attempt journaled;
#: for a task not yet submitted, its submit: its whole row, attempt 1 running, journaled),
#: ("fail", i) / ("complete", i) it ends (row queued), ("prune", i) a finished task
#: whose end is in the log leaves retention, ("commit", 0) every queued row reaches the store's log. The plan ends at the kill.
attempt_journal_plans = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["start", "start", "fail", "complete", "prune"]), st.integers(0, 4)),
        st.tuples(st.just("commit"), st.just(0)),
    ),
    max_size=30,
)

#: Rounds of submissions to a durable scheduler that keeps 2 finished tasks: each round runs
#: its submissions at once; each is (id, content variant, how: "submit_and_wait", "submit"
#: then wait, or "batch" (the same task twice in one submit_many) then wait).
submit_and_wait_plans = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]),
            st.integers(0, 1),
            st.sampled_from(["submit_and_wait", "submit_and_wait", "submit", "batch"]),
        ),
        min_size=1,
        max_size=3,
    ),
    min_size=1,
    max_size=12,
)

#: Operations on the durable store, in the order the loop queues them: ("insert", n) rows,
#: ("update", n) changes of already inserted rows, an ``after_write`` or ``after_commit``
#: callback, or ("yield", _) a turn of the event loop (so batches split at random points).
store_op_plans = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["insert", "update"]), st.integers(1, 40)),
        st.tuples(st.sampled_from(["after_write", "after_commit", "yield"]), st.just(0)),
    ),
    min_size=1,
    max_size=40,
)


#: JSON-ish values including what no store can hold (lone surrogates, NUL, huge ints, NaN).
hostile_json = _json_trees(non_finite=True, text_size=8, key_size=4, width=3)

#: Keyword arguments for TaskSpec, valid or not.
hostile_task_kwargs = st.fixed_dictionaries(
    {
        "id": st.text(min_size=0, max_size=10),
        "payload": st.dictionaries(st.text(max_size=5), hostile_json, max_size=4),
        "priority": st.integers(min_value=-(2**40), max_value=2**40),
        "timeout": st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 10**12),
        "max_attempts": st.integers(min_value=-1, max_value=120),
    }
)


#: Task documents as a remote client writes them (SubmitTasks.tasks_json entries, HTTP
#: bodies): each field absent, valid or wrong, the payload any JSON-ish object (including
#: what no store can hold) or not an object at all.
remote_task_docs = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["t-1", "", "x" * 300, "a\x00b", "\ud800"]) | st.integers(-1, 1) | st.none(),
        "class": st.sampled_from(["cpu_short", "", "gpu", "a\x00"]) | st.none() | st.integers(0, 1),
        "payload": st.dictionaries(st.text(max_size=5), hostile_json, max_size=4)
        | st.dictionaries(st.text(max_size=300), st.text(max_size=8), max_size=3)
        | hostile_json,
        "priority": st.none() | st.booleans() | st.integers(-(2**33), 2**33) | st.floats(-2, 2),
        "timeout": st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 10**9),
        "max_attempts": st.none() | st.booleans() | st.integers(-1, 120) | st.text(max_size=2),
        "workflow_id": st.none() | st.sampled_from(["", "wf", "w\x00", "y" * 300]) | st.integers(0, 1),
    },
)


#: JSON values the stores and the wire hold: 64-bit ints, finite floats, UTF-8 text without
#: NUL (values.check_text refuses it), nesting.
wire_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)

#: JSON objects (payloads, results, workflow inputs and outputs) as they travel on the wire.
wire_json_objects = st.dictionaries(
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12),
    wire_json_values,
    max_size=6,
)


# -- backends/test_docker_backend.py -------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)


label_keys = st.from_regex(r"[a-z][a-z0-9._-]{0,15}", fullmatch=True)


text_values = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)

#: Keyword arguments of a betterproto2 ``SubmitTaskRequest``: any value each field can carry.
submit_task_request_fields = st.fixed_dictionaries(
    {
        "id": text_values,
        "class_": text_values,
        "payload": st.dictionaries(text_values, text_values, max_size=4),
        "payload_json": text_values,
        "priority": st.integers(-(2**31), 2**31 - 1),
        "timeout_seconds": st.floats(allow_nan=False),
        "max_attempts": st.integers(-(2**31), 2**31 - 1),
        "workflow_id": text_values,
    }
)


ports = st.integers(1, 65535)


@st.composite
def service_specs(draw: st.DrawFn) -> ServiceSpec:
    container_ports = draw(st.lists(ports, unique=True, max_size=4))
    host_ports = draw(
        st.lists(ports, unique=True, min_size=len(container_ports), max_size=len(container_ports))
    )
    mappings = [
        PortMapping(
            c,
            draw(st.sampled_from([None, 0, h])),
            host_ip=draw(st.sampled_from(["127.0.0.1", "0.0.0.0"])),
            protocol=draw(st.sampled_from(["tcp", "udp"])),
        )
        for c, h in zip(container_ports, host_ports, strict=True)
    ]
    volumes = draw(
        st.lists(
            st.builds(
                VolumeMount,
                source=st.one_of(names, names.map(lambda n: "/srv/" + n)),
                target=names.map(lambda n: "/mnt/" + n),
                read_only=st.booleans(),
            ),
            max_size=3,
        )
    )
    return ServiceSpec(
        name=draw(names),
        image=draw(names) + ":" + draw(names),
        command=draw(st.lists(text_values, max_size=3)),
        ports=mappings,
        environment=draw(
            st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,10}", fullmatch=True), text_values)
        ),
        volumes=volumes,
        labels=draw(st.dictionaries(label_keys, text_values, max_size=3)),
        resources=Resources(
            cpus=draw(st.one_of(st.none(), st.floats(0.01, 64))),
            memory_bytes=draw(st.one_of(st.none(), st.integers(4 << 20, 1 << 40))),
        ),
        entrypoint=draw(st.one_of(st.none(), st.lists(text_values, max_size=2))),
        network_mode=draw(st.sampled_from(["service", "bridge", "host"])),
        user=draw(st.sampled_from(["", "0", "1000:1000", "nobody"])),
    )


# -- backends/test_process_backend.py ------------------------------------------------------

lines = st.lists(
    st.tuples(
        st.sampled_from(["stdout", "stderr"]),
        st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\n"), max_size=30),
    ),
    max_size=25,
)


# -- executors/test_slurm.py ---------------------------------------------------------------

slurm_task_ids = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1, max_size=256
)


states = st.sampled_from(sorted(FAILED_STATES | {"COMPLETED", "RUNNING", "PENDING", "COMPLETING"}))


# -- handlers/test_container_handler.py ----------------------------------------------------

container_fields = st.sampled_from(["image", "cmd", "env", "workdir", "network", "pull"])


# -- handlers/test_http_handler.py ---------------------------------------------------------

codes = st.integers(100, 599)


http_fields = st.sampled_from(["url", "method", "headers", "expect_status", "body"])


url_like = st.one_of(
    st.text(),
    st.builds(
        lambda scheme, rest: f"{scheme}://{rest}", st.sampled_from(["http", "https", "ftp", ""]), st.text()
    ),
)


# -- rpc/test_auth.py ----------------------------------------------------------------------

public_v4 = st.ip_addresses(v=4).filter(lambda a: not a.is_loopback).map(str)


loopback_v4 = st.integers(min_value=0, max_value=(1 << 24) - 1).map(
    lambda n: str(ipaddress.IPv4Address((127 << 24) | n))
)


# -- rpc/test_rpc_errors.py ----------------------------------------------------------------

word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=20).filter(
    lambda s: s[0].isalpha()
)


# -- services/test_catalog.py --------------------------------------------------------------

port_numbers = st.integers(1, 65535)


health_fields = st.fixed_dictionaries(
    {},
    optional={
        "path": st.sampled_from(["/", "/health", "/-/ready"]),
        "expected_status": st.integers(100, 599),
        "interval": st.floats(0.01, 10),
        "timeout": st.floats(0.01, 10),
        "startup_timeout": st.floats(0.1, 300),
        "retries": st.integers(1, 10),
        "port": st.integers(1, 65535),
    },
)


# -- services/test_graph.py ----------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn, max_nodes: int = 12) -> dict[str, list[str]]:
    """A random DAG: node i may depend only on nodes j < i (then names are shuffled)."""
    n = draw(st.integers(1, max_nodes))
    names = draw(st.permutations([f"svc{i}" for i in range(n)]))
    edges: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        deps = draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=3)) if i else []
        edges[name] = deps
    return edges


@st.composite
def digraphs(draw: st.DrawFn) -> dict[str, list[str]]:
    """Any directed graph without self-loops (may or may not have cycles)."""
    n = draw(st.integers(1, 8))
    names = [f"n{i}" for i in range(n)]
    return {
        name: draw(
            st.lists(st.sampled_from([m for m in names if m != name] or [name]), unique=True, max_size=3)
        )
        if n > 1
        else []
        for name in names
    }


# -- services/test_manager.py --------------------------------------------------------------


@st.composite
def manager_dags(draw: st.DrawFn) -> dict[str, list[str]]:
    n = draw(st.integers(1, 5))
    names = [f"n{i}" for i in range(n)]
    return {
        name: draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=2)) if i else []
        for i, name in enumerate(names)
    }


# -- services/test_monitor.py ---------------------------------------------------------------

#: A restart policy (any backoff and cap) and how many restarts came before.
restart_policies = st.builds(
    lambda backoff, cap: RestartPolicy(backoff=backoff, max_backoff=cap),
    st.floats(0.001, 10),
    st.floats(0.001, 120),
)
prior_restarts = st.integers(0, 60)


# -- services/test_service_cli.py ----------------------------------------------------------

text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)


service_cli_names = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)


service_cli_ports = st.integers(1, 65535)


@st.composite
def service_cli_service_specs(draw: st.DrawFn) -> ServiceSpec:
    container = draw(st.lists(service_cli_ports, min_size=0, max_size=3, unique=True))
    hosts = draw(
        st.lists(st.sampled_from([0, *range(20000, 20010)]), min_size=len(container), max_size=len(container))
    )
    pinned = [h for h in hosts if h]
    if len(set(pinned)) != len(pinned):
        hosts = [0] * len(container)
    return ServiceSpec(
        name=draw(service_cli_names),
        image=draw(st.sampled_from(["", "redis:7", "reg.example:5000/a/b:1"])),
        command=draw(st.lists(text, max_size=4)),
        ports=[PortMapping(c, h) for c, h in zip(container, hosts, strict=True)],
        environment=draw(
            st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True), text, max_size=3)
        ),
        depends_on=[
            DependsOn(n, draw(st.sampled_from(["service_healthy", "service_started"])))
            for n in draw(st.lists(st.sampled_from(["db", "cache"]), unique=True))
        ],
        health=HealthCheck(
            kind=draw(st.sampled_from(["tcp", "http", "redis", "engine"])),
            path=draw(st.sampled_from(["/", "/health"])),
            startup_timeout=draw(st.sampled_from([60.0, 2.5])),
        ),
        required=draw(st.booleans()),
        restart=RestartPolicy(max_restarts=draw(st.integers(0, 9))),
        url=draw(st.sampled_from(["", "redis://{host}:{port}/0", 'x"y\\z'])),
        entrypoint=draw(st.one_of(st.none(), st.lists(text, max_size=2))),
        network_mode=draw(st.sampled_from(["service", "bridge", "host"])),
        user=draw(st.sampled_from(["", "{uid}:{gid}", "1000"])),
    )


# -- services/test_service_handles.py ------------------------------------------------------

service_handles_port_numbers = st.integers(1, 65535)


# -- test_cli.py ---------------------------------------------------------------------------

key = st.text(st.characters(blacklist_characters="=", blacklist_categories=["Cs"]), min_size=1).filter(
    lambda k: k.strip() == k and k != ""
)


# -- test_http.py --------------------------------------------------------------------------

json_scalar = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2) | st.text(max_size=8)


task_doc = st.dictionaries(
    st.sampled_from(
        ["id", "class", "payload", "priority", "timeout", "max_attempts", "workflow_id", "extra"]
    ),
    json_scalar | st.dictionaries(st.text(max_size=4), json_scalar, max_size=3),
    max_size=6,
)


# -- workflows/test_workflow_properties.py -------------------------------------------------


@attrs.frozen
class Dag:
    #: step name -> its dependencies, in declaration order (not necessarily topological).
    deps: dict[str, tuple[str, ...]]
    failing: frozenset[str]
    attempts: dict[str, int]
    continue_on_failure: bool
    #: step name -> True when its failure is permanent (no retries).
    permanent: frozenset[str]

    def ancestors(self, name: str) -> set[str]:
        out: set[str] = set()
        stack = list(self.deps[name])
        while stack:
            dep = stack.pop()
            if dep not in out:
                out.add(dep)
                stack.extend(self.deps[dep])
        return out

    def spec(self, ms: int = 0) -> dict[str, Any]:
        """``ms``: each step sleeps ``0..ms`` milliseconds (varied by step)."""
        steps = []
        for i, (name, deps) in enumerate(self.deps.items()):
            payload = {"handler": "record", "fail": str(name in self.failing).lower()}
            if ms:
                payload["ms"] = str(i * 7 % (ms + 1))
            if name in self.permanent:
                payload["permanent"] = "true"
            steps.append(
                {
                    "name": name,
                    "depends_on": list(deps),
                    "payload": payload,
                    "max_attempts": self.attempts[name],
                }
            )
        return {"steps": steps, "continue_on_failure": self.continue_on_failure}


@st.composite
def workflow_properties_dags(draw: st.DrawFn) -> Dag:
    n = draw(st.integers(1, 30))
    names = [f"s{i}" for i in range(n)]
    # Edges only point to earlier steps (so the graph is acyclic), then the declaration
    # order is shuffled so the engine cannot lean on it.
    deps = {
        name: tuple(draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=3)) if i else ())
        for i, name in enumerate(names)
    }
    order = draw(st.permutations(names))
    failing = draw(st.sets(st.sampled_from(names), max_size=max(1, n // 4)))
    return Dag(
        deps={name: deps[name] for name in order},
        failing=frozenset(failing),
        attempts={name: draw(st.integers(1, 2)) for name in names},
        continue_on_failure=draw(st.booleans()),
        permanent=frozenset(draw(st.sets(st.sampled_from(names), max_size=3))),
    )


# -- workflows/test_workflows.py -----------------------------------------------------------


@st.composite
def graphs(draw: st.DrawFn) -> dict[str, list[str]]:
    names = [f"n{i}" for i in range(draw(st.integers(1, 12)))]
    return {n: draw(st.lists(st.sampled_from(names), unique=True, max_size=4)) for n in names}


step_names = st.from_regex(r"\A[a-z0-9][a-z0-9_.-]{0,30}\Z").filter(lambda n: ".result." not in n + ".")


result_keys = st.from_regex(r"\A[A-Za-z0-9_.:/-]{1,20}\Z")


#: Resource name -> amount, as a Ray class asks per attempt or a cluster reports free.
ray_demands = st.dictionaries(
    st.sampled_from(["CPU", "GPU", "worker2", "head", "memory"]),
    st.one_of(st.integers(1, 64).map(float), st.floats(0.001, 64.0, allow_nan=False)),
    max_size=4,
)

#: Calls owners make on one Ray runner, in order: (what, task index, attempt number); what is
#: "run" (start or adopt), "adopt" (no call: only adopt), "retry" (drop the outcome held,
#: then run) or "collect" (the owner recorded the outcome held).
runner_calls = st.lists(
    st.tuples(st.sampled_from(["run", "adopt", "retry", "collect"]), st.integers(0, 2), st.integers(1, 4)),
    max_size=30,
)


#: Task classes as the scheduler may hold them, by executor and on_shutdown: what a graceful
#: stop leaves running (``scheduler.context.classes_left_running``).
on_shutdown_classes = st.lists(
    st.builds(
        TaskClass,
        name=st.from_regex(r"\A[a-z][a-z0-9_]{0,10}\Z"),
        executor=st.sampled_from(["local", "slurm", "ray", "kubernetes"]),
        on_shutdown=st.sampled_from([None, "leave", "cancel"]),
    ),
    max_size=8,
    unique_by=lambda cls: cls.name,
)

#: Output an attempt writes to its task log: chunks of bytes (some empty, some past a small limit).
log_chunks = st.lists(st.binary(max_size=700), max_size=12)
