"""Prometheus text-format metrics, kept by hand: a handful of counters, two gauges and two histograms.

The server runs one event loop, so plain integers need no locks.
"""

from __future__ import annotations

from collections import Counter

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.n += 1
        self.total += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound:g}"}} {count}' for bound, count in zip(BUCKETS, self.counts, strict=True)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


class Metrics:
    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.disconnects = 0
        self.server_errors = 0  # 5xx answers, and streams that failed after their 200 went out
        self.queue_full = 0  # refused with 429: the line in front of the slots was full
        self.queue_timeouts = 0  # refused with 503: waited longer than --queue-timeout
        self.running = 0  # requests holding a generation slot
        self.waiting = 0  # requests queued for a slot
        self.latency = Histogram()
        self.time_to_first_token = Histogram()

    def render(self) -> str:
        lines = ["# HELP zhllama_requests_total HTTP requests by endpoint and status code.",
                 "# TYPE zhllama_requests_total counter"]
        lines += [f'zhllama_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}'
                  for (endpoint, status), n in sorted(self.requests.items())]
        for name, kind, value, help_ in (
                ("zhllama_prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens processed."),
                ("zhllama_completion_tokens_total", "counter", self.completion_tokens, "Tokens generated."),
                ("zhllama_client_disconnects_total", "counter", self.disconnects,
                 "Generations cancelled because the client went away."),
                ("zhllama_server_errors_total", "counter", self.server_errors,
                 "Answers with a 5xx status, and streams that failed after their 200."),
                ("zhllama_queue_rejected_total", "counter", self.queue_full,
                 "Requests refused with 429 because the queue was full (--max-queue)."),
                ("zhllama_queue_timeouts_total", "counter", self.queue_timeouts,
                 "Requests refused with 503 after waiting --queue-timeout for a slot."),
                ("zhllama_requests_running", "gauge", self.running, "Requests holding a generation slot."),
                ("zhllama_queue_length", "gauge", self.waiting, "Requests waiting for a generation slot.")):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        for name, hist, help_ in (
                ("zhllama_request_latency_seconds", self.latency, "Time from request to last token."),
                ("zhllama_time_to_first_token_seconds", self.time_to_first_token, "Time from request to first token.")):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"] + hist.lines(name)
        return "\n".join(lines) + "\n"
