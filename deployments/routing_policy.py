"""Which engine replica should take a request: prefix affinity first, load second, from published stats.

A replica that recently served a prompt with the same leading text holds that prefix's KV blocks in its
prefix cache, so sending the request there skips that part of the prefill. Affinity must not pile work on
one replica though: it loses when the replica is more than `imbalance_threshold` requests busier than the
least-loaded one. Without affinity, the least loaded wins (waiting + running, ties: more free KV blocks).

Prefix keys are hashes of a prompt's first 64 / 256 / 1024 / 4096 characters (or 16 / 64 / 256 / 1024 token
ids), longest first, so two prompts match at the longest length they share. Replicas publish the keys of
their recent requests (`RecentPrefixes`) in their stats; this module never touches Ray.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

CHAR_PREFIX_LENGTHS = (4096, 1024, 256, 64)
TOKEN_PREFIX_LENGTHS = (1024, 256, 64, 16)


def _digest(kind: str, payload: str) -> str:
    return hashlib.blake2b(f"{kind}\0{payload}".encode(), digest_size=8).hexdigest()


def prompt_text(prompt: str | Sequence[int] | Sequence[dict] | None) -> str | list[int] | None:
    """The text (or token ids) whose prefix identifies a request's cached KV; chat messages are flattened."""
    if prompt is None or isinstance(prompt, str):
        return prompt
    items = list(prompt)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return items
    parts = []
    for m in items:
        if not isinstance(m, dict):
            return None
        content = m.get("content")
        if isinstance(content, list):  # OpenAI text parts
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{m.get('role', '')}\x1f{content or ''}\x1e")
    return "".join(parts)


def prefix_keys(
    prompt: str | Sequence[int] | Sequence[dict] | None,
    char_lengths: Sequence[int] = CHAR_PREFIX_LENGTHS,
    token_lengths: Sequence[int] = TOKEN_PREFIX_LENGTHS,
) -> list[str]:
    """Affinity keys of a prompt, longest prefix first; only lengths the prompt fully covers (none if short).

    Strings (and chat messages) hash characters, token-id lists hash ids: the two never match each other.
    """
    body = prompt_text(prompt)
    if not body:
        return []
    if isinstance(body, str):
        return [_digest("c", body[:n]) for n in sorted(char_lengths, reverse=True) if len(body) >= n]
    return [_digest("t", ",".join(map(str, body[:n]))) for n in sorted(token_lengths, reverse=True) if len(body) >= n]


class RecentPrefixes:
    """Replica side: the prefix keys of the last requests, bounded, published in the routing stats."""

    def __init__(self, capacity: int = 512):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()

    def add(self, keys: Iterable[str]) -> None:
        for k in keys:
            self._keys[k] = None
            self._keys.move_to_end(k)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def snapshot(self) -> list[str]:
        """Most recent last."""
        return list(self._keys)


@dataclass(frozen=True)
class ReplicaStats:
    """What a replica publishes through `record_routing_stats` (as `to_dict()`), plus its id."""

    replica_id: str
    num_waiting: int = 0
    num_running: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    prefix_keys: frozenset[str] = field(default_factory=frozenset)

    @property
    def load(self) -> int:
        return self.num_waiting + self.num_running

    @property
    def free_kv_fraction(self) -> float:
        return self.free_kv_blocks / self.total_kv_blocks if self.total_kv_blocks else 1.0

    def to_dict(self) -> dict[str, Any]:
        """The routing-stats dict (the replica id is known to the router, so it is not sent)."""
        return {
            "num_waiting": self.num_waiting,
            "num_running": self.num_running,
            "free_kv_blocks": self.free_kv_blocks,
            "total_kv_blocks": self.total_kv_blocks,
            "prefix_keys": sorted(self.prefix_keys),
        }

    @classmethod
    def from_dict(cls, replica_id: str, d: dict[str, Any] | None) -> ReplicaStats:
        """Tolerant of missing keys: a replica that has published nothing yet looks idle."""
        d = d or {}
        return cls(
            replica_id=replica_id,
            num_waiting=int(d.get("num_waiting", 0)),
            num_running=int(d.get("num_running", 0)),
            free_kv_blocks=int(d.get("free_kv_blocks", 0)),
            total_kv_blocks=int(d.get("total_kv_blocks", 0)),
            prefix_keys=frozenset(d.get("prefix_keys", ())),
        )


class RoutingPolicy:
    """Ranks replicas for a request. Also remembers where it sent prefixes itself, because published stats
    lag by a stats period and a burst of same-prefix requests should not scatter meanwhile."""

    def __init__(self, imbalance_threshold: int = 4, remember: int = 4096, seed: int | None = None):
        if imbalance_threshold < 0 or remember < 0:
            raise ValueError("imbalance_threshold and remember must be >= 0")
        self.imbalance_threshold = imbalance_threshold
        self.remember_capacity = remember
        self._routed: OrderedDict[str, str] = OrderedDict()  # prefix key -> replica id, most recent last
        self._rng = random.Random(seed)

    def remember(self, keys: Iterable[str], replica_id: str) -> None:
        if not self.remember_capacity:
            return
        for k in keys:
            self._routed[k] = replica_id
            self._routed.move_to_end(k)
        while len(self._routed) > self.remember_capacity:
            self._routed.popitem(last=False)

    def forget_replica(self, replica_id: str) -> None:
        for k in [k for k, r in self._routed.items() if r == replica_id]:
            del self._routed[k]

    def _by_load(self, replicas: list[ReplicaStats]) -> list[ReplicaStats]:
        """Least loaded first; ties: more free KV blocks, then a random order (stale stats must not herd)."""
        shuffled = list(replicas)
        self._rng.shuffle(shuffled)
        return sorted(shuffled, key=lambda r: (r.load, -r.free_kv_blocks))

    def _affinity(self, replicas: list[ReplicaStats], keys: Sequence[str]) -> ReplicaStats | None:
        """The least-loaded holder of the longest matching prefix, if any."""
        by_id = {r.replica_id: r for r in replicas}
        for key in keys:  # longest first
            holders = [r for r in replicas if key in r.prefix_keys]
            routed = self._routed.get(key)
            if routed in by_id and by_id[routed] not in holders:
                holders.append(by_id[routed])
            if holders:
                return self._by_load(holders)[0]
        return None

    def rank(self, replicas: Sequence[ReplicaStats], keys: Sequence[str] = ()) -> list[list[str]]:
        """Replica ids in ranks, best first: [affinity holder], [near-least-loaded ...], [the rest].

        A rank with several replicas is a tie as far as the (lagging) stats can tell; the caller picks within
        it by fresher information (Serve probes live queue lengths). Empty ranks are left out.
        """
        if not replicas:
            return []
        ordered = self._by_load(list(replicas))
        least = ordered[0].load
        ranks: list[list[str]] = []
        chosen = self._affinity(ordered, keys)
        if chosen is not None and chosen.load - least <= self.imbalance_threshold:
            ranks.append([chosen.replica_id])
        taken = set(ranks[0]) if ranks else set()
        near = [r.replica_id for r in ordered if r.load <= least + 1 and r.replica_id not in taken]
        rest = [r.replica_id for r in ordered if r.load > least + 1 and r.replica_id not in taken]
        return [rank for rank in (*ranks, near, rest) if rank]

    def choose(self, replicas: Sequence[ReplicaStats], keys: Sequence[str] = ()) -> str | None:
        """The single best replica id (None if there are none)."""
        ranks = self.rank(replicas, keys)
        return ranks[0][0] if ranks else None
