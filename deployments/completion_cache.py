"""A bounded cache of whole completions for deterministic requests, with frequency-based admission.

Only deterministic requests (greedy, or sampled with a fixed seed) can be replayed: the same model, version,
prompt and parameters give the same tokens. Most requests are seen once, so storing every completion would
only churn the cache; a key must have been looked up `admit_after` times (counted in a small count-min sketch
whose counters halve periodically, so memory stays fixed and old popularity fades) before its completion is
stored. When full, the victim is the least frequent of the few least recently used entries (sampled LFU over
an LRU order), and a newcomer that is rarer than the victims it would displace is turned away (TinyLFU).

Plain Python, not thread-safe: one owner (a Ray actor, see completion_cache_actor.py) serializes the calls.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

# Keys of a request's parameters that never change its output; they are left out of the cache key.
NON_OUTPUT_KEYS = frozenset({"stream", "stream_options", "user", "request_id", "n"})
_ENTRY_OVERHEAD_BYTES = 256  # dict slot, key tuple, dataclass: a rough, fixed per-entry cost
_HALVE = bytes(c >> 1 for c in range(256))  # byte -> byte // 2, for aging the sketch in one pass


class CacheKey(NamedTuple):
    """The model it belongs to travels with the digest, so a model's entries can be dropped together."""

    model_id: str
    model_version: str
    digest: str


@dataclass(frozen=True)
class CachedCompletion:
    """What replaying a completion needs: the text, its tokens, why it ended and the usage to report."""

    text: str
    output_token_ids: tuple[int, ...] = ()
    finish_reason: str | None = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CachedCompletion:
        return cls(
            text=d["text"],
            output_token_ids=tuple(d.get("output_token_ids", ())),
            finish_reason=d.get("finish_reason", "stop"),
            prompt_tokens=d.get("prompt_tokens", 0),
            completion_tokens=d.get("completion_tokens", len(d.get("output_token_ids", ()))),
        )

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def nbytes(self) -> int:
        """Approximate memory: UTF-8 text + 8 bytes per token id + a fixed overhead."""
        return len(self.text.encode("utf-8")) + 8 * len(self.output_token_ids) + _ENTRY_OVERHEAD_BYTES


def _canonical(v: Any) -> Any:
    """JSON-stable form: integral floats as ints (temperature 1 == 1.0), tuples as lists, None-valued keys out."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return int(v) if v.is_integer() else v
    if isinstance(v, dict):
        return {str(k): _canonical(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    if hasattr(v, "model_dump"):  # pydantic models (SamplingParams, messages)
        return _canonical(v.model_dump())
    raise TypeError(f"cannot hash a {type(v).__name__} into a cache key")


def make_key(model_id: str, model_version: str, params: dict[str, Any], scope: str = "") -> CacheKey:
    """Hash every output-affecting field: the prompt (text, token ids or messages) and all sampling settings.

    `params` should hold the request as the engine sees it (prompt or messages, plus the SamplingParams kwargs
    with defaults resolved, e.g. max_tokens filled in): a value left implicit cannot be told from another
    default. A key whose value is None counts as absent; NON_OUTPUT_KEYS are ignored. `scope` (see
    `cache_scope`) keeps callers apart: the same request in another scope is another entry.
    """
    body = {k: v for k, v in params.items() if k not in NON_OUTPUT_KEYS}
    blob = json.dumps(_canonical(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    head = f"{model_id}\0{model_version}\0{blob}" if not scope else f"{model_id}\0{model_version}\0{scope}\0{blob}"
    digest = hashlib.sha256(head.encode("utf-8", "surrogatepass")).hexdigest()
    return CacheKey(model_id, model_version, digest)


def cache_scope(key_id: str, user: str | None, shared: bool) -> str:
    """Whose entries a request may see: its API key's and `user`'s own, or everyone's when `shared` (a public
    deployment). A replayed answer otherwise tells a caller that someone else asked the same thing."""
    if shared:
        return ""
    return json.dumps([key_id, user or ""], ensure_ascii=True)


def is_cacheable(params: dict[str, Any]) -> bool:
    """Deterministic requests only: temperature 0 (greedy), or sampling with a fixed seed, one choice, no logprobs.

    A missing temperature is not assumed to be greedy (OpenAI's default is 1): the caller must say.
    """
    if params.get("n", 1) != 1:
        return False
    if params.get("logprobs") is not None or params.get("prompt_logprobs") is not None:
        return False  # a cached completion holds text and tokens only
    temperature = params.get("temperature")
    if temperature is None:
        return False
    return temperature == 0 or params.get("seed") is not None


class FrequencySketch:
    """Count-min sketch of how often keys were seen: fixed memory, overestimates only, ages by halving."""

    def __init__(self, width: int = 4096, depth: int = 4, max_count: int = 15, reset_after: int | None = None):
        if width < 1 or not 1 <= depth <= 8 or not 1 <= max_count <= 255:
            raise ValueError("width must be >= 1, depth in [1, 8] and max_count in [1, 255]")
        self.width, self.depth, self.max_count = width, depth, max_count
        self.reset_after = reset_after or 10 * width
        self._rows = [bytearray(width) for _ in range(depth)]
        self._additions = 0

    def _slots(self, digest: str) -> list[int]:
        raw = hashlib.blake2b(digest.encode(), digest_size=32).digest()
        return [int.from_bytes(raw[4 * i : 4 * i + 4], "little") % self.width for i in range(self.depth)]

    def add(self, digest: str) -> None:
        for row, slot in zip(self._rows, self._slots(digest)):
            if row[slot] < self.max_count:
                row[slot] += 1
        self._additions += 1
        if self._additions >= self.reset_after:
            self._age()

    def estimate(self, digest: str) -> int:
        return min(row[slot] for row, slot in zip(self._rows, self._slots(digest)))

    def _age(self) -> None:
        """Halve every counter so that yesterday's popular keys do not block today's."""
        for row in self._rows:
            row[:] = row.translate(_HALVE)
        self._additions //= 2

    def nbytes(self) -> int:
        return self.width * self.depth


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    admissions: int = 0
    rejections: int = 0
    evictions: int = 0
    invalidations: int = 0


class CompletionCache:
    """Completions by CacheKey, bounded by entry count AND bytes; see the module docstring for the policy."""

    def __init__(
        self,
        max_entries: int = 4096,
        max_bytes: int = 64 << 20,
        admit_after: int = 2,
        sketch_width: int | None = None,
        victim_sample: int = 8,
    ):
        if max_entries < 1 or max_bytes < 1 or victim_sample < 1 or not 1 <= admit_after <= 255:
            raise ValueError("max_entries, max_bytes and victim_sample must be >= 1, admit_after in [1, 255]")
        self.max_entries, self.max_bytes, self.admit_after = max_entries, max_bytes, admit_after
        self.victim_sample = victim_sample
        # Collisions only ever admit early. Halving every width/2 sightings keeps under half a key per counter,
        # so a key seen once passes as seen twice rarely (~1%), and a repeat must come within ~width sightings.
        width = sketch_width or max(16384, 8 * max_entries)
        self._sketch = FrequencySketch(width=width, max_count=max(15, admit_after), reset_after=width // 2)
        self._entries: OrderedDict[CacheKey, tuple[CachedCompletion, int]] = OrderedDict()  # LRU first
        self._bytes = 0
        self._versions: dict[str, str] = {}
        self._stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    # ---- lookups and offers ----------------------------------------------------------------------------

    def get(self, key: CacheKey) -> CachedCompletion | None:
        """The cached completion, or None; every call counts as one sighting of the key for admission."""
        self._sketch.add(key.digest)
        known = self._versions.get(key.model_id)
        if known is not None and known != key.model_version:
            self._stats.misses += 1  # asked for an old (or future) version: never served
            return None
        hit = self._entries.get(key)
        if hit is None:
            self._stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self._stats.hits += 1
        return hit[0]

    def offer(self, key: CacheKey, value: CachedCompletion | dict[str, Any]) -> bool:
        """Store `value` if the key has been seen often enough and it is worth its room; True if stored."""
        if isinstance(value, dict):
            value = CachedCompletion.from_dict(value)
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        known = self._versions.get(key.model_id)
        size = value.nbytes() + len(key.digest) + len(key.model_id) + len(key.model_version)
        freq = self._sketch.estimate(key.digest)
        if (known is not None and known != key.model_version) or freq < self.admit_after or size > self.max_bytes:
            self._stats.rejections += 1
            return False
        victims = self._victims(size, freq)
        if victims is None:
            self._stats.rejections += 1
            return False
        for victim in victims:
            self._remove(victim)
            self._stats.evictions += 1
        self._entries[key] = (value, size)
        self._bytes += size
        self._stats.admissions += 1
        return True

    def _victims(self, size: int, freq: int) -> list[CacheKey] | None:
        """Entries to evict so that `size` more bytes and one more entry fit; None if the newcomer is rarer."""
        need_entries = len(self._entries) + 1 - self.max_entries
        need_bytes = self._bytes + size - self.max_bytes
        victims: list[CacheKey] = []
        order = iter(self._entries)  # least recently used first
        window: list[CacheKey] = []
        while need_entries > 0 or need_bytes > 0:
            while len(window) < self.victim_sample:
                nxt = next(order, None)
                if nxt is None:
                    break
                window.append(nxt)
            if not window:
                return None
            victim = min(window, key=lambda k: self._sketch.estimate(k.digest))  # ties: the least recent
            if self._sketch.estimate(victim.digest) > freq:
                return None
            window.remove(victim)
            victims.append(victim)
            need_entries -= 1
            need_bytes -= self._entries[victim][1]
        return victims

    def _remove(self, key: CacheKey) -> None:
        _, size = self._entries.pop(key)
        self._bytes -= size

    # ---- invalidation ----------------------------------------------------------------------------------

    def invalidate_model(self, model_id: str) -> int:
        """Drop every entry of a model (e.g. its weights were reloaded); returns how many."""
        doomed = [k for k in self._entries if k.model_id == model_id]
        for k in doomed:
            self._remove(k)
        self._stats.invalidations += len(doomed)
        return len(doomed)

    def set_model_version(self, model_id: str, version: str) -> int:
        """Declare a model's current version: entries of other versions are dropped and never served."""
        self._versions[model_id] = version
        doomed = [k for k in self._entries if k.model_id == model_id and k.model_version != version]
        for k in doomed:
            self._remove(k)
        self._stats.invalidations += len(doomed)
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    # ---- reporting -------------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, Any]:
        s = self._stats
        looked = s.hits + s.misses
        return {
            "hits": s.hits,
            "misses": s.misses,
            "hit_rate": s.hits / looked if looked else 0.0,
            "entries": len(self._entries),
            "bytes": self._bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "admissions": s.admissions,
            "rejections": s.rejections,
            "evictions": s.evictions,
            "invalidations": s.invalidations,
            "sketch_bytes": self._sketch.nbytes(),
        }


def replay_pieces(value: CachedCompletion, max_chars: int = 16) -> Iterator[tuple[str, str | None]]:
    """A cached completion as stream pieces: (text delta, None) ... then ("", finish_reason) last.

    Pieces break after whitespace where possible so a replayed stream looks like a generated one.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    text, start = value.text, 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            if cut > start:
                end = cut + 1
        yield text[start:end], None
        start = end
    yield "", value.finish_reason
