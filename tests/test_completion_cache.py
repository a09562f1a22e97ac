"""CompletionCache: keys, cacheability, admission after repeated sightings, bounds, eviction, invalidation."""

from __future__ import annotations

import random

import pytest

from deployments.completion_cache import (
    CachedCompletion,
    CompletionCache,
    FrequencySketch,
    is_cacheable,
    make_key,
    replay_pieces,
)

BASE = {
    "prompt": "def add(a, b):",
    "max_tokens": 32,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "seed": None,
    "stop": ["\n\n"],
    "stop_token_ids": [],
    "ignore_eos": False,
    "skip_special_tokens": True,
}


def key(i: int = 0, model: str = "m", version: str = "v1"):
    return make_key(model, version, {**BASE, "prompt": f"prompt {i}"})


def value(text: str = "return a + b", n_tokens: int = 5) -> CachedCompletion:
    return CachedCompletion(text, tuple(range(n_tokens)), "stop", 7, n_tokens)


def seen(cache: CompletionCache, k, times: int) -> None:
    for _ in range(times):
        cache.get(k)


# ---- keys ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, other",
    [
        ("prompt", "def sub(a, b):"),
        ("max_tokens", 33),
        ("temperature", 0.5),
        ("top_p", 0.9),
        ("top_k", 5),
        ("seed", 1),
        ("stop", ["\n"]),
        ("stop_token_ids", [2]),
        ("ignore_eos", True),
        ("skip_special_tokens", False),
    ],
)
def test_key_changes_with_every_output_affecting_param(field, other):
    assert make_key("m", "v1", BASE) != make_key("m", "v1", {**BASE, field: other})


def test_key_depends_on_model_and_version():
    keys = {make_key("m", "v1", BASE), make_key("m", "v2", BASE), make_key("other", "v1", BASE)}
    assert len(keys) == 3


def test_key_is_canonical():
    reordered = dict(reversed(list(BASE.items())))
    assert make_key("m", "v1", reordered) == make_key("m", "v1", BASE)
    assert make_key("m", "v1", {**BASE, "top_p": 1}) == make_key("m", "v1", BASE)  # 1 == 1.0
    assert make_key("m", "v1", {**BASE, "stop": ("\n\n",)}) == make_key("m", "v1", BASE)
    without_seed = {k: v for k, v in BASE.items() if k != "seed"}
    assert make_key("m", "v1", without_seed) == make_key("m", "v1", BASE)  # None == absent
    # transport-only fields do not split the cache
    assert make_key("m", "v1", {**BASE, "stream": True, "user": "u1"}) == make_key("m", "v1", BASE)


def test_key_covers_chat_messages():
    a = {**BASE, "prompt": None, "messages": [{"role": "user", "content": "hi"}]}
    b = {**BASE, "prompt": None, "messages": [{"role": "user", "content": "hi!"}]}
    c = {**BASE, "prompt": None, "messages": [{"role": "system", "content": "hi"}]}
    assert len({make_key("m", "v", a), make_key("m", "v", b), make_key("m", "v", c)}) == 3


# ---- cacheability ------------------------------------------------------------------------------------------


def test_only_deterministic_requests_are_cacheable():
    assert is_cacheable({**BASE, "temperature": 0.0})
    assert is_cacheable({**BASE, "temperature": 0})
    assert is_cacheable({**BASE, "temperature": 0.8, "seed": 3})
    assert not is_cacheable({**BASE, "temperature": 0.8, "seed": None})
    assert not is_cacheable({**BASE, "temperature": 1.0})
    assert not is_cacheable({k: v for k, v in BASE.items() if k != "temperature"})  # OpenAI default is 1
    assert not is_cacheable({**BASE, "n": 2})


@pytest.mark.parametrize("temperature", [0.1, 0.7, 1.0, 2.0])
def test_sampled_requests_without_seed_are_never_cacheable(temperature):
    for top_k in (0, 1, 50):
        assert not is_cacheable({**BASE, "temperature": temperature, "top_k": top_k, "seed": None})


# ---- admission ---------------------------------------------------------------------------------------------


def test_admission_only_after_two_sightings():
    cache = CompletionCache(admit_after=2)
    k = key()
    assert cache.get(k) is None  # sighting 1
    assert cache.offer(k, value()) is False
    assert cache.get(k) is None  # still not stored
    assert cache.offer(k, value()) is True  # sighting 2 happened
    assert cache.get(k) == value()
    s = cache.stats()
    assert (s["hits"], s["misses"], s["admissions"], s["rejections"], s["entries"]) == (1, 2, 1, 1, 1)


def test_offer_without_any_lookup_is_rejected():
    cache = CompletionCache(admit_after=1)
    assert cache.offer(key(), value()) is False
    cache.get(key())
    assert cache.offer(key(), value()) is True


def test_admit_after_three():
    cache = CompletionCache(admit_after=3)
    k = key()
    seen(cache, k, 2)
    assert not cache.offer(k, value())
    seen(cache, k, 1)
    assert cache.offer(k, value())


def test_offer_accepts_a_plain_dict():
    cache = CompletionCache(admit_after=1)
    k = key()
    cache.get(k)
    cache.offer(k, {"text": "hi", "output_token_ids": [1, 2], "finish_reason": "length", "prompt_tokens": 4})
    got = cache.get(k)
    assert got.text == "hi" and got.output_token_ids == (1, 2) and got.finish_reason == "length"
    assert got.usage == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_sketch_is_bounded_and_ages():
    sketch = FrequencySketch(width=64, depth=4, reset_after=100)
    for _ in range(10):
        sketch.add("hot")
    assert sketch.estimate("hot") == 10
    for i in range(200):  # other traffic triggers halving
        sketch.add(f"k{i}")
    assert sketch.estimate("hot") < 10
    assert sketch.nbytes() == 64 * 4
    for _ in range(100):
        sketch.add("capped")
    assert sketch.estimate("capped") <= 15


def test_memory_stays_bounded_under_a_stream_of_unique_keys():
    cache = CompletionCache(max_entries=50, max_bytes=1 << 20)
    sketch_bytes = cache.stats()["sketch_bytes"]
    for i in range(5000):
        k = key(i)
        cache.get(k)
        cache.offer(k, value())
    s = cache.stats()
    # nothing was seen twice: only rare sketch collisions (an overestimate) may have let a key in
    assert s["admissions"] < 0.01 * 5000
    assert s["entries"] <= 50
    assert s["sketch_bytes"] == sketch_bytes


def test_a_true_repeat_is_admitted_after_thousands_of_other_lookups():
    cache = CompletionCache(max_entries=50)
    cache.get(key(-1))
    for i in range(5000):
        cache.get(key(i))
    cache.get(key(-1))
    assert cache.offer(key(-1), value())


# ---- bounds and eviction -----------------------------------------------------------------------------------


def test_entry_bound_holds():
    cache = CompletionCache(max_entries=10, admit_after=1)
    for i in range(100):
        cache.get(key(i))
        cache.offer(key(i), value())
        assert len(cache) <= 10
    assert cache.stats()["evictions"] >= 90


def test_byte_bound_holds_after_many_inserts():
    rng = random.Random(0)
    cache = CompletionCache(max_entries=10_000, max_bytes=20_000, admit_after=1)
    for i in range(500):
        k = key(i)
        cache.get(k)
        cache.offer(k, value("x" * rng.randint(10, 2000), rng.randint(1, 300)))
        assert cache.nbytes <= 20_000
        assert cache.stats()["bytes"] == cache.nbytes
    assert 0 < len(cache) < 500


def test_value_larger_than_the_cache_is_rejected():
    cache = CompletionCache(max_bytes=1000, admit_after=1)
    cache.get(key())
    assert not cache.offer(key(), value("x" * 5000))
    assert len(cache) == 0


def test_frequent_entries_survive_a_scan_of_rarer_ones():
    cache = CompletionCache(max_entries=4, admit_after=2)
    hot = [key(i) for i in range(4)]
    for k in hot:
        seen(cache, k, 5)
        assert cache.offer(k, value())
    for i in range(100, 140):  # each seen twice: admissible, but rarer than the hot ones
        seen(cache, key(i), 2)
        cache.offer(key(i), value())
    assert all(k in cache for k in hot)


def test_eviction_prefers_the_least_frequent_then_least_recent():
    cache = CompletionCache(max_entries=3, admit_after=1)
    a, b, c, d = key(1), key(2), key(3), key(4)
    for k, n in ((a, 3), (b, 1), (c, 3)):
        seen(cache, k, n)
        assert cache.offer(k, value())
    seen(cache, d, 2)
    assert cache.offer(d, value())
    assert b not in cache and all(k in cache for k in (a, c, d))
    # equal frequency: the least recently used goes
    cache2 = CompletionCache(max_entries=2, admit_after=1)
    x, y, z = key(10), key(11), key(12)
    for k in (x, y):
        cache2.get(k)
        cache2.offer(k, value())
    cache2.get(x)  # x: 2 sightings, y: 1
    cache2.get(y)  # now equal (2 each), y used most recently
    seen(cache2, z, 2)
    assert cache2.offer(z, value())
    assert x not in cache2 and y in cache2 and z in cache2


# ---- invalidation ------------------------------------------------------------------------------------------


def test_invalidate_model_drops_only_that_model():
    cache = CompletionCache(admit_after=1)
    keys = [key(i, model="a") for i in range(3)] + [key(i, model="b") for i in range(2)]
    for k in keys:
        cache.get(k)
        cache.offer(k, value())
    assert cache.invalidate_model("a") == 3
    assert len(cache) == 2 and all(k in cache for k in keys[3:])
    assert cache.stats()["invalidations"] == 3


def test_version_change_drops_old_entries_and_refuses_old_keys():
    cache = CompletionCache(admit_after=1)
    old = key(0, version="v1")
    cache.get(old)
    cache.offer(old, value())
    assert cache.set_model_version("m", "v2") == 1
    assert old not in cache
    assert cache.get(old) is None
    assert not cache.offer(old, value())  # a late writer of the old version cannot sneak back in
    new = key(0, version="v2")
    cache.get(new)
    assert cache.offer(new, value())
    assert cache.get(new) is not None


# ---- replay -----------------------------------------------------------------------------------------------


def test_replay_pieces_reassemble_the_text_and_end_with_the_finish_reason():
    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))"
    pieces = list(replay_pieces(CachedCompletion(text, (), "length"), max_chars=8))
    assert "".join(p for p, _ in pieces) == text
    assert all(len(p) <= 8 for p, _ in pieces)
    assert [f for _, f in pieces[:-1]] == [None] * (len(pieces) - 1)
    assert pieces[-1] == ("", "length")


def test_replay_of_empty_text():
    assert list(replay_pieces(CachedCompletion("", (), "stop"))) == [("", "stop")]


# ---- scopes: one caller's answers are not replayed to another ------------------------------------------------


def test_cache_scope_separates_api_keys_and_users_unless_shared():
    from deployments.completion_cache import cache_scope

    scopes = {
        cache_scope("key-a", None, shared=False),
        cache_scope("key-a", "alice", shared=False),
        cache_scope("key-a", "bob", shared=False),
        cache_scope("key-b", "alice", shared=False),
        cache_scope("key-a\0", "alice", shared=False),  # no ambiguity from separators
        cache_scope("key-a", "\0alice", shared=False),
    }
    assert len(scopes) == 6
    assert cache_scope("key-a", "alice", shared=True) == cache_scope("key-b", None, shared=True) == ""
    assert cache_scope("key-a", "", shared=False) == cache_scope("key-a", None, shared=False)


def test_keys_differ_per_scope_and_an_empty_scope_keeps_the_old_keys():
    from deployments.completion_cache import cache_scope

    a = make_key("m", "v1", BASE, scope=cache_scope("key-a", "alice", shared=False))
    b = make_key("m", "v1", BASE, scope=cache_scope("key-b", "alice", shared=False))
    assert a != b and a.model_id == b.model_id == "m"
    assert make_key("m", "v1", BASE, scope="") == make_key("m", "v1", BASE)
    cache = CompletionCache(admit_after=1)
    cache.get(a)
    assert cache.offer(a, value())
    assert cache.get(a) is not None and cache.get(b) is None
