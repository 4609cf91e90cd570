"""What every benchmark prints with its figures, and how it measures them so that they can be trusted.

- `Machine`: CPU model, logical cores, the threads the benchmark uses, load average before and after
  (`Machine.start(threads)` ... `machine.finish()`; `str(machine)` is the line to print).
- `measure_until_stable(fn)`: `fn()` returns one sample (a rate or a time); samples are taken in rounds of
  `per_round`, and rounds repeat until two consecutive round medians agree within `tolerance` (5%), or
  `max_rounds` is reached, in which case the result says it could not (`stable=False`) and the benchmark must
  print that next to the figure.

Quote ratios measured in one run (both sides under the same load), the worst of three runs, with this line.
"""
from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Machine:
    """The machine a benchmark ran on, and how busy it was."""

    cpu: str
    cores: int
    threads: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] | None = None

    @classmethod
    def start(cls, threads: int) -> Machine:
        return cls(cpu_model(), os.cpu_count() or 1, threads, os.getloadavg())

    def finish(self) -> Machine:
        self.load_after = os.getloadavg()
        return self

    @property
    def busy(self) -> bool:
        """Another process probably competed for the cores (1-minute load above the cores this one uses)."""
        before = self.load_before[0] > max(0.5, self.cores - self.threads)  # ours had not started yet
        after = self.load_after is not None and self.load_after[0] > self.cores + 0.5  # ours counts here
        return before or after

    def to_json(self) -> dict:
        return {"cpu": self.cpu, "cores": self.cores, "threads": self.threads, "load_before": self.load_before,
                "load_after": self.load_after, "busy": self.busy}

    def __str__(self) -> str:
        fmt = lambda la: "/".join(f"{x:.2f}" for x in la)
        after = fmt(self.load_after) if self.load_after else "?"
        warn = "  (busy: other processes competed, ratios are indicative)" if self.busy else ""
        return (f"machine: {self.cpu}, {self.cores} logical core(s), {self.threads} thread(s) used; "
                f"load average (1/5/15 min) before {fmt(self.load_before)}, after {after}{warn}")


@dataclass
class Measurement:
    """A figure measured until stable: `value` is the last round's median."""

    value: float
    medians: list[float] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)
    stable: bool = True
    tolerance: float = 0.05

    @property
    def note(self) -> str:
        if self.stable:
            return f"stable: last two medians within {self.tolerance:.0%} ({len(self.medians)} round(s))"
        return (f"NOT stable: medians {[round(m, 4) for m in self.medians]} never agreed within "
                f"{self.tolerance:.0%} in {len(self.medians)} rounds")


def measure_until_stable(fn: Callable[[], float], per_round: int = 3, tolerance: float = 0.05,
                         max_rounds: int = 5) -> Measurement:
    """Rounds of `per_round` samples of `fn()` until two consecutive round medians differ by at most `tolerance`
    (relative to the larger), at most `max_rounds` rounds."""
    if per_round < 1 or max_rounds < 2:
        raise ValueError("measure_until_stable needs per_round >= 1 and max_rounds >= 2 (two medians to compare).")
    medians: list[float] = []
    samples: list[float] = []
    for _ in range(max_rounds):
        rnd = [float(fn()) for _ in range(per_round)]
        samples.extend(rnd)
        medians.append(statistics.median(rnd))
        if len(medians) >= 2:
            a, b = medians[-2:]
            if abs(a - b) <= tolerance * max(abs(a), abs(b)):
                return Measurement(b, medians, samples, True, tolerance)
    return Measurement(medians[-1], medians, samples, False, tolerance)


__all__ = ["Machine", "Measurement", "cpu_model", "measure_until_stable"]
