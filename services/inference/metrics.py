"""What the inference service measures, on the service's Prometheus registry."""

from __future__ import annotations

from libs.common.http import ServiceMetrics

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class InferenceMetrics:
    def __init__(self, metrics: ServiceMetrics) -> None:
        self.requests = metrics.counter(
            "flywheel_inference_requests_total", "Chat completion requests", ("stream", "outcome")
        )
        self.latency = metrics.histogram(
            "flywheel_inference_request_seconds", "Chat completion latency, end to end", ("stream",),
            buckets=_LATENCY_BUCKETS,
        )
        self.prompt_tokens = metrics.counter("flywheel_inference_prompt_tokens_total", "Prompt tokens processed")
        self.completion_tokens = metrics.counter("flywheel_inference_completion_tokens_total", "Tokens generated")
        self.reloads = metrics.counter("flywheel_inference_reloads_total", "Model loads", ("outcome",))
        self.pending = metrics.gauge("flywheel_inference_pending_requests", "Requests admitted and not finished")
        self.refused = metrics.counter("flywheel_inference_refused_total", "Requests refused: max_pending were in flight")
