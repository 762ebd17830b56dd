"""Side-by-side benchmarking on a small, noisy machine.

The figures that matter are ratios measured in the same run (the engine against a naive
baseline on the same two cores, minutes apart at most), not absolute numbers copied from
another day. Everything here serves that: a closed-loop driver with per-operation latency,
a result type that merges across client processes, a table with a ratio column, and a
writer that keeps one section per benchmark in ``BENCHMARKS.md``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import platform
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import msgspec
import psutil

OpFn = Callable[[], Awaitable[object]]
"""One independent request: awaited once per operation by one closed-loop client."""

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"

# A client that fails this many times in a row is broken (dead connection, dropped schema),
# not unlucky: stop it instead of spinning and inflating the error count.
MAX_CONSECUTIVE_ERRORS = 1000
_ERROR_SAMPLES = 5


class Exhausted(Exception):
    """Raised by an operation when its client has nothing left to do (e.g. its codes ran out).

    The client stops quietly; the run reports how many clients ran dry, because a client that
    stops early makes the throughput figure an underestimate.
    """


class BenchResult(msgspec.Struct, frozen=True):
    name: str
    ops: int
    seconds: float
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    clients: int = 0
    processes: int = 1
    exhausted_clients: int = 0
    error_samples: list[str] = msgspec.field(default_factory=list)
    # CPU seconds the client processes burned during the window: near ``seconds × processes``
    # means the client, not the system under test, set the pace.
    client_cpu_s: float = 0.0


class RunStats(msgspec.Struct):
    """Raw outcome of a closed-loop run; mergeable across processes (it pickles cheaply)."""

    ops: int
    errors: int
    seconds: float
    latencies_ns: list[int]
    clients: int
    exhausted_clients: int = 0
    error_samples: list[str] = msgspec.field(default_factory=list)
    cpu_s: float = 0.0

    @classmethod
    def merge(cls, parts: Sequence[RunStats]) -> RunStats:
        """Combine runs that shared one measurement window (one per client process)."""
        if not parts:
            return cls(ops=0, errors=0, seconds=0.0, latencies_ns=[], clients=0)
        latencies: list[int] = []
        samples: list[str] = []
        for part in parts:
            latencies.extend(part.latencies_ns)
            samples.extend(part.error_samples)
        return cls(
            ops=sum(p.ops for p in parts),
            errors=sum(p.errors for p in parts),
            # The windows overlap (they start at one barrier), so the slowest one bounds them.
            seconds=max(p.seconds for p in parts),
            latencies_ns=latencies,
            clients=sum(p.clients for p in parts),
            exhausted_clients=sum(p.exhausted_clients for p in parts),
            error_samples=samples[:_ERROR_SAMPLES],
            cpu_s=sum(p.cpu_s for p in parts),
        )

    def to_result(self, name: str, *, processes: int = 1) -> BenchResult:
        ordered = sorted(self.latencies_ns)
        return BenchResult(
            name=name,
            ops=self.ops,
            seconds=round(self.seconds, 3),
            ops_per_s=round(self.ops / self.seconds, 1) if self.seconds > 0 else 0.0,
            p50_ms=round(percentile(ordered, 50.0) / 1e6, 3),
            p99_ms=round(percentile(ordered, 99.0) / 1e6, 3),
            errors=self.errors,
            clients=self.clients,
            processes=processes,
            exhausted_clients=self.exhausted_clients,
            error_samples=self.error_samples,
            client_cpu_s=round(self.cpu_s, 3),
        )


def percentile(ordered: Sequence[int] | Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0.0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


async def run_clients(ops: Sequence[OpFn], duration_s: float, *, warmup_s: float = 0.0) -> RunStats:
    """Run one closed-loop client per element of ``ops`` until the deadline.

    Each client awaits its operation, then immediately the next one: the offered load is
    whatever the system under test can absorb, which is the honest way to compare a
    baseline with the engine. Operations that *start* during the warm-up are run but not
    counted; operations that start before the deadline are counted when they finish, and
    the window is stretched to the last finish so no completion is credited for free.
    """
    start = time.perf_counter_ns()
    measure_from = start + int(warmup_s * 1e9)
    deadline = measure_from + int(duration_s * 1e9)
    per_client: list[list[int]] = [[] for _ in ops]
    errors = 0
    exhausted = 0
    samples: list[str] = []
    last_end = measure_from

    async def client(op: OpFn, latencies: list[int]) -> None:
        nonlocal errors, exhausted, last_end
        consecutive = 0
        append = latencies.append
        clock = time.perf_counter_ns
        while (t0 := clock()) < deadline:
            try:
                await op()
            except Exhausted:
                exhausted += 1
                return
            except Exception as exc:  # noqa: BLE001 - a failed request is data, not a crash
                t1 = clock()
                if t0 >= measure_from:
                    errors += 1
                    last_end = max(last_end, t1)
                if len(samples) < _ERROR_SAMPLES:
                    samples.append(f"{type(exc).__name__}: {exc}")
                consecutive += 1
                if consecutive >= MAX_CONSECUTIVE_ERRORS:
                    return
                continue
            consecutive = 0
            if t0 >= measure_from:
                t1 = clock()
                append(t1 - t0)
                last_end = max(last_end, t1)

    cpu_from = 0.0

    async def mark_cpu() -> None:
        nonlocal cpu_from
        await asyncio.sleep(max(0.0, (measure_from - time.perf_counter_ns()) / 1e9))
        cpu_from = time.process_time()

    await asyncio.gather(
        mark_cpu(), *(client(op, lat) for op, lat in zip(ops, per_client, strict=True))
    )
    cpu_s = time.process_time() - cpu_from
    latencies = [x for lat in per_client for x in lat]
    # If every client ran dry early, the window ends at the last completion, not the deadline.
    end = last_end if ops and exhausted == len(ops) else max(last_end, deadline)
    return RunStats(
        ops=len(latencies),
        errors=errors,
        seconds=(end - measure_from) / 1e9,
        latencies_ns=latencies,
        clients=len(ops),
        exhausted_clients=exhausted,
        error_samples=samples,
        cpu_s=cpu_s,
    )


async def run_closed_loop(
    fn: OpFn, clients: int, duration_s: float, *, warmup_s: float = 0.0, name: str = "closed-loop"
) -> BenchResult:
    """``clients`` concurrent tasks, each awaiting ``fn()`` in a loop until the deadline.

    ``fn`` is shared by all tasks, so it must be safe to call concurrently (e.g. take a
    connection from a pool). When each client needs its own state, build one op per client
    and call :func:`run_clients`.
    """
    stats = await run_clients([fn] * clients, duration_s, warmup_s=warmup_s)
    return stats.to_result(name)


def ratio(a: float | BenchResult, b: float | BenchResult) -> float:
    """``a / b`` in ops/s; ``inf`` when b is zero and a is not, ``nan`` when both are zero."""
    num = a.ops_per_s if isinstance(a, BenchResult) else float(a)
    den = b.ops_per_s if isinstance(b, BenchResult) else float(b)
    if den == 0.0:
        return math.nan if num == 0.0 else math.inf
    return num / den


def _fmt_ratio(value: float) -> str:
    if math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞"
    return f"{value:.2f}×"


def format_table(results: Sequence[BenchResult], baseline: str | BenchResult | None = None) -> str:
    """A markdown table: ``name | ops/s | p50 | p99 | ratio vs baseline``.

    ``baseline`` is a result or the name of one in ``results``; without it the first row is
    the baseline. Errors and short-running clients are flagged in the name column, because a
    fast run that failed half its requests is not fast.
    """
    if not results:
        return ""
    if baseline is None:
        base = results[0]
    elif isinstance(baseline, BenchResult):
        base = baseline
    else:
        matches = [r for r in results if r.name == baseline]
        if not matches:
            raise KeyError(f"baseline {baseline!r} is not among the results")
        base = matches[0]
    header = f"| name | ops/s | p50 ms | p99 ms | ratio vs {base.name} |"
    lines = [header, "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        label = r.name
        notes = []
        if r.clients:
            procs = f" in {r.processes} procs" if r.processes > 1 else ""
            notes.append(f"{r.clients} clients{procs}")
        if r.errors:
            notes.append(f"{r.errors} errors")
        if r.exhausted_clients:
            notes.append(f"{r.exhausted_clients} clients ran dry")
        if notes:
            label = f"{label} ({', '.join(notes)})"
        lines.append(
            f"| {label} | {r.ops_per_s:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {_fmt_ratio(ratio(r, base))} |"
        )
    return "\n".join(lines)


def median_result(results: Iterable[BenchResult]) -> BenchResult:
    """The run with the median throughput: on a noisy machine, repeat and keep the middle."""
    ordered = sorted(results, key=lambda r: r.ops_per_s)
    if not ordered:
        raise ValueError("no results")
    return ordered[(len(ordered) - 1) // 2]


def rss_bytes(pid: int | None = None, *, include_children: bool = False) -> int:
    """Resident set size of a process (this one by default), optionally with its children."""
    proc = psutil.Process(pid if pid is not None else os.getpid())
    total = int(proc.memory_info().rss)
    if include_children:
        for child in proc.children(recursive=True):
            try:
                total += int(child.memory_info().rss)
            except psutil.NoSuchProcess:
                continue
    return total


def machine_summary() -> str:
    """One line that says what the figures were measured on."""
    return (
        f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}"
    )


def report(section_title: str, module: str, table: str, notes: str, write: bool) -> None:
    """Print a benchmark's ``table`` and ``notes``; with ``write``, also :func:`record`
    them, with the command line that ran ``module`` (this process's arguments)."""
    print(table)
    print(notes)
    if write:
        record(section_title, " ".join(["python -m", module, *sys.argv[1:]]), table, notes=notes)


def cpu_ticks() -> tuple[int, int]:
    """``(stolen, total)`` CPU ticks of the whole machine so far (``/proc/stat``; zeros
    elsewhere). Stolen ticks are the time a virtual machine's CPUs were runnable but the
    host ran something else: the share of a window stolen says how much a noisy neighbour
    slowed every process measured in it."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def stolen_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the CPU time between two :func:`cpu_ticks` readings the host took."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def process_cpu(*names: str) -> dict[str, float]:
    """CPU seconds used so far (user + system, ``/proc/<pid>/stat``) by the processes
    whose command line holds each of ``names``, summed per name (empty elsewhere)."""
    out = dict.fromkeys(names, 0.0)
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for name in names:
            if name in cmd:
                out[name] += (int(fields[11]) + int(fields[12])) / hz
    return out


_SECTION_RE = re.compile(r"^## (?P<title>.+?)\s*$", re.MULTILINE)


def record(
    section_title: str,
    command: str,
    markdown_table: str,
    *,
    notes: str = "",
    path: Path | None = None,
) -> Path:
    """Write a ``## section_title`` section into BENCHMARKS.md, replacing one of that title.

    Other sections keep their order; a new section goes at the end. The section says how to
    reproduce the figures (the command) and what they were measured on.
    """
    target = path if path is not None else BENCHMARKS_MD
    title = section_title.strip()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"## {title}",
        "",
        f"Measured {stamp} on {machine_summary()}.",
        "",
        "```sh",
        command.strip(),
        "```",
        "",
        markdown_table.strip(),
        "",
    ]
    if notes.strip():
        body += [notes.strip(), ""]
    section = "\n".join(body)

    text = target.read_text() if target.exists() else "# Benchmarks\n"
    headings = list(_SECTION_RE.finditer(text))
    for i, match in enumerate(headings):
        if match.group("title").strip() == title:
            end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
            text = text[: match.start()] + section + ("\n" if end < len(text) else "") + text[end:]
            break
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = target.with_suffix(".md.tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    tmp.replace(target)
    return target
