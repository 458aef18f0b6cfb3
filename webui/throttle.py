"""Growing delays after failed sign-ins, per (account, address) and per account.

Every password login and every API token is checked through :class:`Throttle`:

* Each credential check is an *attempt* on two keys: the account at the client's
  address (an IPv6 client counts by its /64) and the account from anywhere. A key
  allows ``free`` failures; after that each further attempt must wait
  ``base * 2**(failures - free)`` seconds since the last failure, up to ``cap``
  (the per-account cap is short, so a guesser slows an account down but cannot
  lock its owner out for long). A key is forgotten ``forget`` seconds after its
  last failure; a success clears the (account, address) key.
* An address where an account has signed in before (the last ``GOOD_PER_ACCOUNT``
  of them) is spared that account's per-account delay: guesses from elsewhere do
  not lock the owner out, and a guesser there still meets the (account, address)
  delay.
* Attempts are counted when they *start*, under one lock: while the free failures
  are used up no second check runs in parallel on a key, so parallel guesses get
  no more checks than sequential ones.
* A refused attempt costs no password hash: the caller gets :class:`Throttled`
  with the seconds to wait (HTTP 429, ``Retry-After``).
* Memory is bounded: at most ``max_entries`` keys besides the per-account keys of
  configured users (those are never evicted, so flooding the table with other
  keys cannot reset a real account's count); the least recently used go first.

Why not Flask-Limiter: it limits requests per window, counts a request when its
response is known (parallel requests all pass the check first) and has no notion
of delays that grow with consecutive failures; the logic here is about 100 lines.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Key = tuple[str, ...]


class Throttled(Exception):
    """Too many failed attempts: retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after:.0f} s")
        self.retry_after = max(1, math.ceil(retry_after))


@dataclass
class _Entry:
    failures: int = 0
    pending: int = 0  # checks started and not yet finished
    last: float = 0.0  # time of the last failure


@dataclass(frozen=True)
class Policy:
    free: int  # failures allowed without delay
    base: float  # first delay (seconds); doubles with each further failure
    cap: float  # longest delay

    def delay(self, failures: int) -> float:
        if failures < self.free:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(failures - self.free, 64))


PAIR = Policy(free=5, base=1.0, cap=900.0)
ACCOUNT = Policy(free=20, base=1.0, cap=60.0)
GOOD_PER_ACCOUNT = 8


def address_key(remote: str | None) -> str:
    """The client's address as throttled: IPv4 as is, IPv6 by its /64."""
    try:
        addr = ipaddress.ip_address((remote or "").split("%")[0])
    except ValueError:
        return "?"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class Attempt:
    """One credential check in progress; report its outcome with :meth:`ok`."""

    def __init__(self) -> None:
        self.succeeded = False

    def ok(self, success: bool) -> bool:
        self.succeeded = success
        return success


class Throttle:
    def __init__(self, *, pair: Policy = PAIR, account: Policy = ACCOUNT,
                 forget: float = 3600.0, max_entries: int = 10_000,
                 protected: Callable[[str], bool] = lambda account: False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pair, self.account = pair, account
        self.forget, self.max_entries = forget, max_entries
        self.protected, self.clock = protected, clock
        self.lock = threading.Lock()
        self.entries: OrderedDict[Key, _Entry] = OrderedDict()  # bounded, LRU first
        self.accounts: dict[Key, _Entry] = {}  # configured users' per-account keys
        self.good: dict[Key, OrderedDict[str, None]] = {}  # where each signed in

    def __len__(self) -> int:
        return len(self.entries) + len(self.accounts)

    def _keys(self, kind: str, account: str, where: str) -> list[tuple[Key, Policy]]:
        keys: list[tuple[Key, Policy]] = [((kind, account, where), self.pair)]
        if where not in self.good.get((kind, account), ()):
            keys.append(((kind, account), self.account))
        return keys

    def _remember(self, kind: str, account: str, where: str) -> None:
        if not self.protected(account):
            return
        good = self.good.setdefault((kind, account), OrderedDict())
        good[where] = None
        good.move_to_end(where)
        while len(good) > GOOD_PER_ACCOUNT:
            good.popitem(last=False)

    def _table(self, key: Key) -> dict[Key, _Entry]:
        return self.accounts if len(key) == 2 and self.protected(key[1]) else self.entries

    def _get(self, key: Key, now: float) -> _Entry:
        table = self._table(key)
        entry = table.get(key)
        if entry is not None and not entry.pending and now - entry.last >= self.forget:
            entry = None  # forgotten: a fresh start
        if entry is None:
            entry = table[key] = _Entry()
        if table is self.entries:
            self.entries.move_to_end(key)
            self._evict(now)
        return entry

    def _evict(self, now: float) -> None:
        while len(self.entries) > self.max_entries:
            for key, entry in self.entries.items():  # oldest first
                if not entry.pending:
                    del self.entries[key]
                    break
            else:
                return

    def _wait(self, entry: _Entry, policy: Policy, now: float) -> float:
        """Seconds before another check may start on this key (0: now)."""
        if entry.failures + entry.pending < policy.free:
            return 0.0
        if entry.pending:  # past the free failures: one check at a time
            return max(policy.delay(entry.failures), 1.0)
        return max(0.0, entry.last + policy.delay(entry.failures) - now)

    @contextlib.contextmanager
    def attempt(self, kind: str, account: str, remote: str | None) -> Iterator[Attempt]:
        """Start a check or raise :class:`Throttled`; the ``with`` body checks the
        credential and calls ``ok(result)``. No call, or an exception: a failure."""
        where = address_key(remote)
        with self.lock:
            keys = self._keys(kind, account, where)
            now = self.clock()
            entries = [(self._get(k, now), p) for k, p in keys]
            wait = max(self._wait(e, p, now) for e, p in entries)
            if wait > 0:
                raise Throttled(wait)
            for e, _ in entries:
                e.pending += 1
        att = Attempt()
        try:
            yield att
        finally:
            with self.lock:
                now = self.clock()
                for e, _ in entries:
                    e.pending -= 1
                    if not att.succeeded:
                        e.failures += 1
                        e.last = now
                pair_key = keys[0][0]
                if att.succeeded:
                    self._remember(kind, account, where)
                    if not entries[0][0].pending:
                        self._table(pair_key).pop(pair_key, None)
