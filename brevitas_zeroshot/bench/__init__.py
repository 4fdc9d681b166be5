from ._latency import bench_latency as bench_latency
from ._quality import QualityBenchConfig as QualityBenchConfig
from ._quality import bench_quality as bench_quality
from ._synthesis import benchmark_synthesis as benchmark_synthesis
from ._tasks import BENCH_TASKS as BENCH_TASKS
from ._tasks import BenchTask as BenchTask
from ._tasks import register_task as register_task

__all__ = [
    "BENCH_TASKS",
    "BenchTask",
    "QualityBenchConfig",
    "bench_latency",
    "bench_quality",
    "benchmark_synthesis",
    "register_task",
]
