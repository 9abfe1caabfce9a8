"""vLLM automatic prefix caching, per instance: an LRU of prompt blocks.

A trace that carries block hashes (Mooncake `hash_ids`, one per 512 prompt
tokens, chained so equal hashes mean equal prefixes) lets an instance skip the
prefill of the longest cached prefix, as vLLM's automatic prefix caching does.
The cache holds at most the instance's KV capacity in blocks (vLLM keeps freed
blocks cached until they are reallocated, least recently used first). A hit is
only ever a block this instance inserted.
"""
from __future__ import annotations

from collections import OrderedDict


class PrefixCache:
    __slots__ = ("cap", "lru", "hits", "queries", "inserted")

    def __init__(self, capacity_blocks: int):
        self.cap = max(0, capacity_blocks)
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.hits = 0  # blocks served from the cache
        self.queries = 0  # blocks looked up
        self.inserted: set[int] | None = None  # tests: every block ever inserted

    def peek(self, hashes: tuple) -> int:
        """Leading blocks cached, without touching the LRU or the counters."""
        k = 0
        for h in hashes:
            if h not in self.lru:
                break
            k += 1
        return k

    def lookup(self, hashes: tuple) -> int:
        """Number of leading blocks of `hashes` cached here (touched as used)."""
        k = 0
        lru = self.lru
        for h in hashes:
            if h not in lru:
                break
            lru.move_to_end(h)
            k += 1
        if self.inserted is not None:
            assert all(h in self.inserted for h in hashes[:k]), "served a block never inserted"
        self.hits += k
        self.queries += len(hashes)
        return k

    def insert(self, hashes: tuple) -> None:
        lru = self.lru
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                if self.inserted is not None:
                    self.inserted.add(h)
        while len(lru) > self.cap:
            lru.popitem(last=False)
