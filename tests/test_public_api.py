"""House rules that are easy to break silently: explicit public surfaces, documented hooks,
metric names that dashboards depend on."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import dspy_infra
from dspy_infra import hookspecs
from dspy_infra.metrics import InfraMetrics


def public_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(dspy_infra.__path__, "dspy_infra."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts[1:]):
            continue
        names.append(info.name)
    return names


def test_every_public_module_declares_all() -> None:
    missing = []
    for name in public_modules():
        module = importlib.import_module(name)
        if not hasattr(module, "__all__") and not name.endswith("__init__"):
            if not getattr(module, "__path__", None):  # packages may re-export nothing
                missing.append(name)
    assert missing == []


def test_top_level_all_names_exist() -> None:
    for name in dspy_infra.__all__:
        assert hasattr(dspy_infra, name), name


def test_every_hookspec_is_documented() -> None:
    specs = [
        fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("dspy_infra_")
    ]
    assert len(specs) >= 5
    for fn in specs:
        assert fn.__doc__ and fn.__doc__.strip(), f"{fn.__name__} has no docstring"


def test_dashboard_metric_names_and_labels_are_kept() -> None:
    m = InfraMetrics()
    m.service_start_total.labels("redis", "success").inc()
    m.service_stop_total.labels("redis", "success").inc()
    m.failed_service_starts_total.labels("redis", "timeout").inc()
    m.active_services.set(1)
    m.service_health_check_duration_seconds.labels("redis", "healthy").observe(0.01)
    m.docker_api_duration_seconds.labels("create", "success").observe(0.01)
    for gauge in (m.concurrency_limit, m.inflight_tasks, m.queue_depth, m.error_rate):
        gauge.labels("cpu_short").set(1)
    m.task_errors_total.labels("cpu_short").inc()
    m.gpu_wait_seconds.labels("gpu").observe(0.5)
    text = m.exposition().decode()
    for expected in (
        'env_manager_service_start_total{service_name="redis",status="success"} 1.0',
        'env_manager_service_stop_total{service_name="redis",status="success"} 1.0',
        'env_manager_failed_service_starts_total{reason="timeout",service_name="redis"} 1.0',
        "env_manager_active_services 1.0",
        'env_manager_service_health_check_duration_seconds_count{service_name="redis",status="healthy"} 1.0',
        'env_manager_docker_api_duration_seconds_count{operation="create",status="success"} 1.0',
        'orchestrator_concurrency_limit{task_class="cpu_short"} 1.0',
        'orchestrator_inflight_tasks{task_class="cpu_short"} 1.0',
        'orchestrator_task_errors_total{task_class="cpu_short"} 1.0',
        'env_queue_depth{task_class="cpu_short"} 1.0',
        'gpu_wait_seconds_count{task_class="gpu"} 1.0',
        'env_error_rate{task_class="cpu_short"} 1.0',
    ):
        assert expected in text, expected


def test_each_infra_gets_its_own_registry() -> None:
    a, b = InfraMetrics(), InfraMetrics()
    a.active_services.set(3)
    assert b.snapshot(["env_manager_active_services"]) == {"env_manager_active_services": 0.0}
    assert a.snapshot(["env_manager_active_services"]) == {"env_manager_active_services": 3.0}
