"""Tables keyed by peer identity, bounded: identities cost nothing to make, so anything kept per identity
(counters, names, strikes) would otherwise grow with every throwaway id a hostile peer invents, and every
per-round metrics row that lists them with it. The least recently written key is forgotten first."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

MAX_PEERS = 4096  # per-identity state a node keeps: far more than the peers it exchanges with in an hour


class Recent(dict):
    """A dict of at most `maxsize` keys; setting a key (or creating it through `factory` on a missing read)
    makes it the newest, and the oldest goes when there are too many."""

    def __init__(self, maxsize: int = MAX_PEERS, factory: Callable[[], Any] | None = None):
        super().__init__()
        self.maxsize, self.factory = maxsize, factory

    def __getitem__(self, key):
        value = super().__getitem__(key)  # __missing__ on a new key
        if self.factory is not None:  # a table of mutable values is written through reads: a read is a use
            self.touch(key)
        return value

    def __missing__(self, key):
        if self.factory is None:
            raise KeyError(key)
        self[key] = value = self.factory()
        return value

    def __setitem__(self, key, value) -> None:
        if key in self:
            super().__delitem__(key)  # re-inserted last: the newest
        super().__setitem__(key, value)
        while len(self) > self.maxsize:
            super().__delitem__(next(iter(self)))

    def touch(self, key) -> None:
        """Make `key` the newest without changing its value (a counter object mutated in place)."""
        if key in self:
            super().__setitem__(key, super().pop(key))


class RecentCounter(Counter):
    """A Counter of at most `maxsize` keys, the least recently written forgotten first."""

    def __init__(self, maxsize: int = MAX_PEERS):
        super().__init__()
        self.maxsize = maxsize

    def __setitem__(self, key, value) -> None:
        if key in self:
            super().__delitem__(key)
        super().__setitem__(key, value)
        while len(self) > self.maxsize:
            super().__delitem__(next(iter(self)))
