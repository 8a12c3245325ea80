"""Generation slots and the bounded line in front of them.

At most ``max_concurrency`` generations run at once. Up to ``max_queue`` more wait, each at most ``queue_timeout``
seconds; a request beyond the line is refused at once (429 with ``Retry-After``) and one that waited too long gets
503, so a burst is answered quickly instead of piling up unbounded latency. A slot is a ``Lease`` whose release is
idempotent: a stream releases it when its response ends, however it ends.
"""

from __future__ import annotations

import asyncio

from zhllama.serve.metrics import Metrics


class QueueRefused(Exception):
    """The line is full (429) or the wait timed out (503); ``app.py`` turns it into OpenAI's error shape."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class Lease:
    def __init__(self, slots: Slots):
        self.slots, self.held = slots, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.slots.metrics.running -= 1
            self.slots.semaphore.release()


class Slots:
    """At most ``n`` generations at once and ``max_queue`` waiting; the metrics see both numbers."""

    def __init__(self, n: int, metrics: Metrics, max_queue: int, queue_timeout: float):
        self.semaphore, self.metrics = asyncio.Semaphore(n), metrics
        self.max_queue, self.queue_timeout = max_queue, queue_timeout

    async def acquire(self) -> Lease:
        must_wait = self.semaphore.locked() or self.metrics.waiting > 0
        if must_wait and self.metrics.waiting >= self.max_queue:
            self.metrics.queue_full += 1
            raise QueueRefused(429, f"the server is busy: {self.metrics.running} requests running and "
                                    f"{self.metrics.waiting} waiting (--max-queue {self.max_queue}); retry later",
                               retry_after=1)
        self.metrics.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                await self.semaphore.acquire()
        except TimeoutError:
            self.metrics.queue_timeouts += 1
            raise QueueRefused(503, f"the request waited {self.queue_timeout:g} s for a generation slot "
                                    "(--queue-timeout); the server is overloaded, retry later", retry_after=1) \
                from None
        finally:
            self.metrics.waiting -= 1
        self.metrics.running += 1
        return Lease(self)
