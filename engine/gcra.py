"""GCRA, the one rate-limiting algorithm of the engine: its Lua script and its in-memory twin.

GCRA (the generic cell rate algorithm) keeps one number per key, the "theoretical arrival
time" (TAT). A request of cost ``c`` is allowed when ``TAT + c*T - burst*T <= now`` (with
``T = 1/rate``), and then moves TAT forward by ``c*T``. That is a token bucket with a
refill of ``rate`` per second and a capacity of ``burst``, without a background refill.

The script runs in Redis on the server's clock (``TIME``), so processes on different hosts
agree without clock sync; :class:`LocalGcra` runs the same algorithm in a process's memory
and answers in the script's shape, for while Redis is unreachable. The gateway's limiter
(``serve/ratelimit.py``) and the delivery workers' send permits (``actors/ratelimit.py``)
both call this script.

Script protocol. KEYS: the buckets, then optionally a flag key and an epoch key. ARGV[1]:
the mode, ARGV[2]: how many of those trail KEYS (0, 1: the flag key, whose existence is
reported, or 2: the flag key and the epoch key, whose value is reported, created from the
server's clock when missing), then (rate, burst, cost, charge) per bucket.

* ``all``: charge every key if every key allows, none otherwise
* ``each``: charge each key that allows, independently
* ``peek``: charge nothing, answer as if cost were charged
* ``take``: charge each key as much of cost as it holds now (partial grants)

Answer, per key: allowed (0/1; in ``take`` mode the permits granted), remaining,
reset_after_s, retry_after_s (in ``take`` mode: the wait for one more permit when fewer
than asked were granted). Floats travel as strings because Redis truncates Lua numbers to
integers. With a flag key, one more value: 1 if it exists, else 0; with an epoch key,
then its value.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from engine.errors import ConfigError

Check = tuple[str, float, int, int]
"""One limit to apply: (key, rate per second, burst, cost)."""

_FUNCTION = r"""
local function gcra(KEYS, ARGV, now)
  local mode = ARGV[1]
  local nflag = tonumber(ARGV[2])
  local n = #KEYS - nflag
  local res = {}
  local tats = {}
  local all_ok = true
  for i = 1, n do
    local rate = tonumber(ARGV[3 + (i - 1) * 4])
    local burst = tonumber(ARGV[4 + (i - 1) * 4])
    local cost = tonumber(ARGV[5 + (i - 1) * 4])
    local charge = ARGV[6 + (i - 1) * 4] == '1'
    local interval = 1 / rate
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat == nil or tat < now then tat = now end
    local want = cost
    if mode == 'take' then
      cost = math.max(0, math.min(cost, math.floor((now - tat) / interval + burst + 1e-4)))
    end
    local new_tat = tat + cost * interval
    local allow_at = new_tat - burst * interval
    local diff = now - allow_at
    -- now is ~1e8 s with microsecond resolution: compare with a microsecond's slack
    local ok = diff >= -1e-6
    local remaining, reset_after, retry_after
    if ok then
      remaining = math.floor(diff / interval + 1e-4)
      reset_after = new_tat - now
      retry_after = 0
      if mode == 'peek' or not charge then reset_after = tat - now; remaining = math.floor((now - (tat - burst * interval)) / interval + 1e-4) end
      if mode == 'take' and cost < want then retry_after = interval - diff end
    else
      all_ok = false
      remaining = 0
      reset_after = tat - now
      retry_after = -diff
    end
    tats[i] = {ok and charge, new_tat}
    if mode == 'take' then res[#res + 1] = cost else res[#res + 1] = ok and 1 or 0 end
    res[#res + 1] = remaining
    res[#res + 1] = string.format('%.6f', reset_after)
    res[#res + 1] = string.format('%.6f', retry_after)
  end
  if mode ~= 'peek' then
    for i = 1, n do
      if tats[i][1] and (mode == 'each' or all_ok) then
        local ttl = math.ceil((tats[i][2] - now) * 1000) + 1000
        redis.call('SET', KEYS[i], string.format('%.6f', tats[i][2]), 'PX', ttl)
      end
    end
  end
  if nflag >= 1 then res[#res + 1] = redis.call('EXISTS', KEYS[n + 1]) end
  if nflag == 2 then
    local e = redis.call('GET', KEYS[n + 2])
    if not e then
      e = string.format('%.6f', now)
      redis.call('SET', KEYS[n + 2], e)
    end
    res[#res + 1] = e
  end
  return res
end
"""
_NOW = r"""
local t = redis.call('TIME')
-- seconds since 2024-01-01: keeps microsecond precision well inside a double
local now = (tonumber(t[1]) - 1704067200) + tonumber(t[2]) / 1000000
"""
GCRA_LUA = _FUNCTION + _NOW + "return gcra(KEYS, ARGV, now)\n"
"""One check: KEYS and ARGV as described above."""

GCRA_MULTI_LUA = _FUNCTION + _NOW + r"""
local out = {}
local ki, ai = 1, 2
for g = 1, tonumber(ARGV[1]) do
  local nk, na = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
  ai = ai + 2
  local keys, argv = {}, {}
  for j = 1, nk do keys[j] = KEYS[ki]; ki = ki + 1 end
  for j = 1, na do argv[j] = ARGV[ai]; ai = ai + 1 end
  local res = gcra(keys, argv, now)
  out[#out + 1] = #res
  for j = 1, #res do out[#out + 1] = res[j] end
end
return out
"""
"""Several independent checks in one call (the gateway coalesces the checks of concurrent
requests): ARGV[1] = number of groups, then per group its key count, its ARGV count and its
ARGV; KEYS are the groups' keys in order. Groups run one after the other, exactly as
separate calls would (a later group sees what an earlier one charged). Returns, per group,
the length of its answer and then the answer (:func:`multi_args`, :func:`split_multi`)."""

GCRA_SHA = hashlib.sha1(GCRA_LUA.encode()).hexdigest()
GCRA_MULTI_SHA = hashlib.sha1(GCRA_MULTI_LUA.encode()).hexdigest()


def check_args(
    mode: str, checks: Sequence[tuple[str, float, float, int]], peek_from: int | None, trailing: int
) -> list[Any]:
    """ARGV of one check: the mode, the trailing key count, and per bucket its rate, burst,
    cost and whether it is charged (buckets from ``peek_from`` on are only looked at)."""
    args: list[Any] = [mode, trailing]
    for i, (_key, rate, burst, cost) in enumerate(checks):
        charge = 0 if peek_from is not None and i >= peek_from else 1
        args += [repr(float(rate)), burst, int(cost), charge]
    return args


def multi_args(groups: list[tuple[list[str], list[Any]]]) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the multi-group script: per group its key count, arg count, args."""
    keys: list[str] = []
    args: list[Any] = [len(groups)]
    for k, a in groups:
        keys += k
        args += [len(k), len(a), *a]
    return keys, args


def split_multi(raw: Any, groups: int) -> list[list[Any]]:
    """The multi-group script's answer, one list per group."""
    out: list[list[Any]] = []
    i = 0
    for _ in range(groups):
        n = int(raw[i])
        out.append(list(raw[i + 1 : i + 1 + n]))
        i += 1 + n
    return out


def permits(raw: Sequence[Any]) -> tuple[int, float]:
    """A one-key ``take`` answer as (permits granted, seconds until one more)."""
    return int(raw[0]), float(raw[3])


class LocalGcra:
    """The script's GCRA in this process's memory: a process's own limits while Redis is
    unreachable. Answers in the script's shape, so one decoder serves both."""

    MAX_KEYS = 100_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tat: dict[str, float] = {}

    def run(
        self,
        mode: str,
        checks: Sequence[tuple[str, float, float, int]],
        peek_from: int | None = None,
    ) -> list[Any]:
        now = self.clock()
        res: list[Any] = []
        todo: list[tuple[str, float, bool]] = []
        all_ok = True
        for i, (key, rate, burst, want) in enumerate(checks):
            charge = peek_from is None or i < peek_from
            interval = 1 / rate
            tat = max(self._tat.get(key, now), now)
            cost = want
            if mode == "take":
                cost = max(0, min(want, math.floor((now - tat) / interval + burst + 1e-4)))
            new_tat = tat + cost * interval
            diff = now - (new_tat - burst * interval)
            ok = diff >= -1e-6
            if ok:
                remaining = math.floor(diff / interval + 1e-4)
                reset_after, retry_after = new_tat - now, 0.0
                if mode == "peek" or not charge:
                    reset_after = tat - now
                    remaining = math.floor((now - (tat - burst * interval)) / interval + 1e-4)
                if mode == "take" and cost < want:
                    retry_after = interval - diff
            else:
                all_ok = False
                remaining, reset_after, retry_after = 0, tat - now, -diff
            todo.append((key, new_tat, ok and charge))
            first = cost if mode == "take" else int(ok)
            res += [first, remaining, f"{reset_after:.6f}", f"{retry_after:.6f}"]
        if mode != "peek":
            for key, new_tat, charged in todo:
                if charged and (mode == "each" or all_ok):
                    self._tat[key] = new_tat
            if len(self._tat) > self.MAX_KEYS:
                self._shrink(now)
        return res

    def _shrink(self, now: float) -> None:
        """Forget full buckets; if that is not enough, keep the emptiest half (forgetting
        a nearly full bucket forgives the least)."""
        self._tat = {k: t for k, t in self._tat.items() if t > now}
        if len(self._tat) > self.MAX_KEYS:
            keep = sorted(self._tat.items(), key=lambda kv: kv[1], reverse=True)[: self.MAX_KEYS // 2]
            self._tat = dict(keep)


# --- limits as configured -----------------------------------------------------------------


class Limit(msgspec.Struct, frozen=True):
    """A rate (per second) and a burst."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number")
        if self.burst < 1:
            raise ValueError("burst must be >= 1")


_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
          "h": 3600.0, "hour": 3600.0}


def parse_limit(text: str, name: str = "rate limit") -> Limit:
    """``"2000/4000"`` (2000 per second, burst 4000) or ``"10/min/20"`` (unit s, min or h)."""
    parts = [p.strip() for p in text.strip().split("/")]
    try:
        if len(parts) == 2:
            rate, burst = float(parts[0]), int(parts[1])
        elif len(parts) == 3 and parts[1].lower() in _UNITS:
            rate, burst = float(parts[0]) / _UNITS[parts[1].lower()], int(parts[2])
        else:
            raise ValueError("expected RATE/BURST or RATE/UNIT/BURST")
        return Limit(rate, burst)
    except ValueError as exc:
        raise ConfigError(
            f"{name}={text!r}: {exc} (e.g. '2000/4000' per second, or '10/min/20')"
        ) from None


def parse_limits(text: str, name: str) -> tuple[Limit, ...]:
    """Tiers of one budget, comma-separated: ``"5/min/10,30/h/50"``."""
    tiers = tuple(parse_limit(t, name) for t in text.split(",") if t.strip())
    if not tiers:
        raise ConfigError(f"{name}={text!r}: expected at least one RATE/BURST")
    return tiers


def format_limit(limit: Limit) -> str:
    """The text :func:`parse_limit` reads back: per second, else per minute or hour."""
    for unit, seconds in (("", 1.0), ("min/", 60.0), ("h/", 3600.0)):
        count = limit.rate * seconds
        if abs(count - round(count)) < 1e-9:
            return f"{round(count)}/{unit}{limit.burst}"
    return f"{limit.rate!r}/{limit.burst}"
