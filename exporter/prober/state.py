"""Per-guest probe state: counters, up/down, and the RTT histogram (BUCKETS, bucket_index)."""
from __future__ import annotations

import collections
import socket
import time
from bisect import bisect_left
from itertools import accumulate

from .targets import Target

BUCKETS: tuple[float, ...] = tuple(10e-6 * 2 ** i for i in range(20))
RECENT = 256  # raw RTTs kept per guest: exact quantiles for /probe-style checks and tests, not exported


def bucket_index(rtt: float) -> int:
    """Index of the first bucket whose upper bound is >= rtt (len(BUCKETS) for +Inf)."""
    return bisect_left(BUCKETS, rtt)


class GuestState:
    """Counters of one target; survives target list replacements while (netns, name) stays."""

    __slots__ = ("target", "addr", "family", "requests", "replies", "send_errors", "lost_in_row", "up",
                 "last_reply", "buckets", "rtt_sum", "last_error", "recent", "last_result")

    def __init__(self, target: Target) -> None:
        self.requests = self.replies = self.send_errors = self.lost_in_row = 0
        self.up = False  # unknown until the first reply: never answered is not up
        self.last_reply = 0.0
        self.last_result = 0.0  # wall clock of the last reply or loss: how fresh `up` is
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.rtt_sum = 0.0
        self.last_error = ""
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT)  # raw RTTs, for quantiles
        self.retarget(target)

    def retarget(self, target: Target) -> None:
        self.target = target
        self.addr = str(target.address)
        self.family = socket.AF_INET if target.address.version == 4 else socket.AF_INET6

    def on_reply(self, rtt: float, now: float) -> None:
        self.replies += 1
        self.lost_in_row = 0
        self.up = True
        self.last_reply = self.last_result = now
        self.buckets[bucket_index(rtt)] += 1
        self.rtt_sum += rtt
        self.recent.append(rtt)

    def on_loss(self, down_after: int, now: float | None = None) -> None:
        self.last_result = time.time() if now is None else now
        self.lost_in_row += 1
        if self.lost_in_row >= down_after:
            self.up = False

    def cumulative(self) -> list[int]:
        return list(accumulate(self.buckets[:-1]))
