"""Per-model circuit breaker: after N consecutive failures a model is skipped for a cooldown."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0


class CircuitBreaker:
    def __init__(self, failures: int = 3, cooldown_s: float = 30.0, clock=time.monotonic) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._states: dict[str, _State] = {}

    def configure(self, failures: int, cooldown_s: float) -> None:
        self.threshold, self.cooldown_s = failures, cooldown_s

    def open_reason(self, model: str) -> str | None:
        st = self._states.get(model)
        if st is None or st.open_until == 0.0:
            return None
        left = st.open_until - self._clock()
        if left > 0:
            return f"circuit open for {left:.1f}s after {st.failures} failures"
        return None  # half-open: the next call is a trial

    def success(self, model: str) -> None:
        st = self._states.get(model)
        if st is not None:
            st.failures, st.open_until = 0, 0.0

    def failure(self, model: str) -> None:
        st = self._states.setdefault(model, _State())
        st.failures += 1
        if st.failures >= self.threshold:
            st.open_until = self._clock() + self.cooldown_s

    def snapshot(self) -> dict[str, dict[str, float]]:
        now = self._clock()
        return {m: {"failures": s.failures, "open_for_s": max(0.0, s.open_until - now)}
                for m, s in self._states.items()}
