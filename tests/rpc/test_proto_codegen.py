"""The committed betterproto2 code is exactly what `make proto` generates from proto/, and the
wire contract's names and field numbers are those DESIGN.md fixes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gen_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_committed_code_matches_regeneration(tmp_path: Path) -> None:
    gen = _gen_module()
    out = tmp_path / "_gen"
    gen.generate(out)
    fresh, committed = _tree(out), _tree(gen.GEN_DIR)
    committed = {k: v for k, v in committed.items() if "__pycache__" not in k}
    assert sorted(fresh) == sorted(committed), "file set differs: run `make proto` and commit"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code is stale: {stale}; run `make proto` and commit"


def test_generation_is_deterministic(tmp_path: Path) -> None:
    gen = _gen_module()
    gen.generate(tmp_path / "a")
    gen.generate(tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


CONTRACT = {
    # message: {field: number} for the fields DESIGN.md fixes.
    "orchestrator.v1.SubmitTaskRequest": {"id": 1, "class": 2, "payload": 3, "priority": 4, "workflow_id": 5},
    "orchestrator.v1.SubmitTaskResponse": {"success": 1, "task_id": 2, "error": 3},
    "orchestrator.v1.TaskResult": {
        "task_id": 1,
        "status": 2,
        "result": 3,
        "error": 4,
        "duration_ms": 5,
        "completed_at": 6,
    },
    "orchestrator.v1.WorkflowStatusUpdate": {
        "run_id": 1,
        "status": 2,
        "current_step": 3,
        "steps_completed": 4,
        "total_steps": 5,
        "output": 6,
        "error": 7,
    },
    "orchestrator.v1.SystemEvent": {"event_type": 1, "resource_id": 2, "data": 3, "timestamp": 4},
    "orchestrator.v1.MetricsResponse": {"metrics": 1, "timestamp": 2},
    "env_manager.v1.ServiceStatus": {
        "name": 1,
        "status": 2,
        "container_id": 3,
        "ports": 4,
        "health_checks": 5,
        "started_at": 6,
        "resource_usage": 7,
    },
    "env_manager.v1.ExecuteTaskResponse": {"success": 1, "result": 2, "error": 3, "latency_ms": 4},
    "env_manager.v1.ImagePullProgress": {
        "image_name": 1,
        "status": 2,
        "current": 3,
        "total": 4,
        "progress_percent": 5,
    },
    "env_manager.v1.LogEntry": {
        "service_name": 1,
        "container_id": 2,
        "stream": 3,
        "message": 4,
        "timestamp": 5,
    },
}

METHODS = {
    "orchestrator.v1.OrchestratorService": [
        "SubmitTask",
        "StreamTaskResults",
        "GetTaskStatus",
        "CreateWorkflow",
        "StartWorkflowRun",
        "StreamWorkflowStatus",
        "GetMetrics",
        "StreamEvents",
        "Health",
    ],
    "env_manager.v1.EnvManagerService": [
        "StartServices",
        "StopServices",
        "RestartService",
        "GetServicesStatus",
        "StreamHealth",
        "GetResourceAvailability",
        "ExecuteTask",
        "PullImages",
        "StreamLogs",
    ],
}


@pytest.fixture(scope="module")
def descriptors():  # type: ignore[no-untyped-def]
    # Parse the .proto sources with the official protoc into a descriptor set.
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    gen = _gen_module()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = ["protoc", f"-I{gen.PROTO_DIR}", f"--descriptor_set_out={out}", *gen.PROTO_FILES]
        assert protoc.main(args) == 0
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    messages, services = {}, {}
    for f in fds.file:
        for m in f.message_type:
            messages[f"{f.package}.{m.name}"] = {fld.name: fld.number for fld in m.field}
        for s in f.service:
            services[f"{f.package}.{s.name}"] = [meth.name for meth in s.method]
    return messages, services


def test_contract_field_numbers(descriptors) -> None:  # type: ignore[no-untyped-def]
    messages, _ = descriptors
    for name, fields in CONTRACT.items():
        assert name in messages, name
        for field, number in fields.items():
            assert messages[name].get(field) == number, f"{name}.{field} must be field {number}"


def test_contract_methods_in_order(descriptors) -> None:  # type: ignore[no-untyped-def]
    _, services = descriptors
    for service, methods in METHODS.items():
        # The contract's methods come first, in order; additions follow.
        assert services[service][: len(methods)] == methods
