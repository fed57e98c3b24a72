"""Every metric, named in one place, in a registry owned by one Infra (never the global one).

The names and labels of the ``env_manager_*`` metrics and of ``orchestrator_concurrency_limit``,
``orchestrator_inflight_tasks``, ``orchestrator_task_errors_total``, ``env_queue_depth``,
``gpu_wait_seconds`` and ``env_error_rate`` are those of the stack this library replaces:
dashboards query them, so they do not change. Per-class labels and the task duration
histogram are additions beside them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "InfraMetrics"]

_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class InfraMetrics:
    """The metric objects of one Infra instance."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry

        # -- env manager (service manager + backends) -----------------------------------
        self.service_start_total = Counter(
            "env_manager_service_start_total",
            "Service start attempts by outcome.",
            ["service_name", "status"],
            registry=r,
        )
        self.service_stop_total = Counter(
            "env_manager_service_stop_total",
            "Service stops by outcome.",
            ["service_name", "status"],
            registry=r,
        )
        self.failed_service_starts_total = Counter(
            "env_manager_failed_service_starts_total",
            "Failed service starts by reason.",
            ["service_name", "reason"],
            registry=r,
        )
        self.active_services = Gauge(
            "env_manager_active_services",
            "Services currently running.",
            registry=r,
        )
        self.service_health_check_duration_seconds = Histogram(
            "env_manager_service_health_check_duration_seconds",
            "Duration of one health probe.",
            ["service_name", "status"],
            registry=r,
        )
        self.docker_api_duration_seconds = Histogram(
            "env_manager_docker_api_duration_seconds",
            "Duration of container engine API calls.",
            ["operation", "status"],
            registry=r,
        )

        # -- scheduler -------------------------------------------------------------------
        self.concurrency_limit = Gauge(
            "orchestrator_concurrency_limit",
            "Current adaptive concurrency limit.",
            ["task_class"],
            registry=r,
        )
        self.inflight_tasks = Gauge(
            "orchestrator_inflight_tasks",
            "Tasks running now.",
            ["task_class"],
            registry=r,
        )
        self.task_errors_total = Counter(
            "orchestrator_task_errors_total",
            "Task attempts that ended in error.",
            ["task_class"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "env_queue_depth",
            "Tasks waiting for a slot.",
            ["task_class"],
            registry=r,
        )
        self.gpu_wait_seconds = Histogram(
            "gpu_wait_seconds",
            "Time gpu-class tasks waited for a slot.",
            ["task_class"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.error_rate = Gauge(
            "env_error_rate",
            "Recent error fraction seen by the adaptive limiter.",
            ["task_class"],
            registry=r,
        )
        self.tasks_total = Counter(
            "orchestrator_tasks_total",
            "Tasks that reached a terminal state.",
            ["task_class", "status"],
            registry=r,
        )
        self.task_duration_seconds = Histogram(
            "orchestrator_task_duration_seconds",
            "Run time of one task attempt.",
            ["task_class", "status"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.task_wait_seconds = Histogram(
            "orchestrator_task_wait_seconds",
            "Time from submit (or retry) to start.",
            ["task_class"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )

    def metric_names(self) -> set[str]:
        """The name of every metric this registry exports (a counter without its ``_total``,
        as Prometheus names metric families): what the operations docs must list."""
        return {family.name for family in self.registry.collect()}

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    def snapshot(self, names: list[str] | None = None) -> dict[str, float]:
        """Flat ``{series: value}`` map (as the wire's GetMetrics returns), optionally filtered
        by metric family name."""
        wanted = set(names or ())
        out: dict[str, float] = {}
        for family in self.registry.collect():
            if wanted and family.name not in wanted and not any(s.name in wanted for s in family.samples):
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
        return out
