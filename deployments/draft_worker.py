"""The drafters in their own Ray actor, so they get their own GPU bundle instead of sharing the target's.

`DraftWorker` is a thin actor around the model-backed drafters the engine config names (a draft model, a learned
drafter `mlp` or `eagle`; under `speculator: auto` the plan's drafters of those kinds), each built exactly as the
engine builds it in-process (`speculator.factory`), plus the adapted drafters the adaptive loop installs
(`install`). The replica's side, `DraftWorkerClient`, gives the engine its proposer: a `RemoteDraftProposer` per
hosted drafter, bound to its name, and under `auto` a RoutedProposer of those and of the cheap lookups (n-gram,
suffix), which stay in the replica's process. A remote drafter makes one actor call per engine step for its
batch (under `auto`: one per remote drafter with requests in the step). One actor serves one engine (sequence ids
are per engine), so each replica starts its own worker.

Wire format, kept lean: each request carries only the tokens the actor has not seen yet (`base` = how many
it already mirrors; 0 = the full list, with the sampling params), and for a learned drafter the target's hidden
rows the engine hands over (`DraftRequest.hidden`, on CPU). The actor keeps a token mirror per (drafter,
sequence), so a sequence moved to another drafter never reads the mirror the first one left, and reports the
sequences it has no mirror for (a restarted actor) as `missing`; those get no draft this step and are sent in
full the next. The releases of all of a worker's drafters ride along with the next call of any of them.

Speculation never decides the output, only how fast it comes, so the proposer is fault tolerant: when the
actor is dead, slow or failing it answers empty drafts (the engine decodes one token per step, still exact),
marks itself degraded and pings the actor every `retry_interval_s` without blocking the step; when a ping
answers it takes the worker back. A restarted actor (another `ping` incarnation) has no draft KV and none of the
installed drafters. Calls carry the incarnation the replica knows, so the first ones a new process gets fail and
the proposers take it back through a ping: `DraftModelProposer` rebuilds its KV from the token ids on the next
call, and the client installs again the files it keeps of each drafter it installed (ahead of any later call).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.app_config import ActorResources
from model.config import EngineConfig
from sampling.controls import LogitsControls
from sampling.params import SamplingParams
from speculator.factory import MODEL_BACKED, drafter_configs, make_proposer, proposer_traits, released_drafter
from speculator.proposer import Draft, DraftRequest, HiddenRows, Proposer
from speculator.routed import RoutedProposer

log = logging.getLogger(__name__)

# One sequence on the wire: (seq_id, base, new token ids, k, params or None, logits controls or None, hidden
# rows or None). `base` is how many tokens the actor already mirrors for the sequence (0 = `new` is the full
# list and `params` is set).
WireRequest = tuple[int, int, list[int], int, SamplingParams | None, LogitsControls | None, torch.Tensor | None]
Released = tuple[str | None, int]  # (drafter name, None: the only one; seq id) whose state the actor may drop


@dataclass
class _Mirror:
    tokens: list[int]
    params: SamplingParams
    controls: LogitsControls | None = None


class DraftService:
    """The actor's logic as a plain class (the actor is this class under `ray.remote`)."""

    def __init__(self, config: EngineConfig, num_threads: int = 1):
        device: str | torch.device = config.device
        if config.device.startswith("cuda"):
            # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPU, so it is always device 0 here.
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
        else:
            # Stay within this actor's CPU share instead of spinning a thread per core of the host.
            torch.set_num_threads(max(1, num_threads))
        self.config, self.device = config, device
        self.proposers: dict[str, Proposer] = {
            name: make_proposer(one, device=device)
            for name, one in drafter_configs(config).items()
            if one.speculator in MODEL_BACKED
        }
        self.versions: dict[str, str] = {}  # installed drafter -> its release version
        self.seqs: dict[tuple[str, int], _Mirror] = {}
        self._workdir: Path | None = None
        # Changes on every (re)start: lets callers and tests tell a restarted actor from the old one.
        self.incarnation = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def propose(
        self,
        requests: list[WireRequest],
        released: list[Released] | None = None,
        drafter: str | None = None,
        incarnation: str | None = None,
    ) -> tuple[list[Draft], list[int]]:
        """Release `released`, then draft for every request with `drafter` (the only one when None) in one
        batched pass. Returns one draft per request (probs on CPU, as float32 as drawn) and the seq ids it has no
        mirror for (resend in full). Raises LookupError for a caller that knows another `incarnation` (this is a
        restarted process: the caller installs its drafters again) or a drafter this process does not host."""
        if incarnation is not None and incarnation != self.incarnation:
            raise LookupError(f"draft worker restarted (now {self.incarnation}, not {incarnation})")
        if released:
            self.release(released)
        name = self._name(drafter)
        proposer = self.proposers.get(name)
        if proposer is None:
            raise LookupError(f"no drafter {name!r} in this draft worker (restarted: it is installed again)")
        drafts = [Draft([]) for _ in requests]
        missing: list[int] = []
        batch: list[DraftRequest] = []
        where: list[int] = []
        for i, (seq_id, base, new, k, params, controls, hidden) in enumerate(requests):
            mirror = self.seqs.get((name, seq_id))
            if base == 0 and params is not None:
                mirror = self.seqs[name, seq_id] = _Mirror(list(new), params, controls)
            elif mirror is None or len(mirror.tokens) != base:
                self.seqs.pop((name, seq_id), None)
                missing.append(seq_id)
                continue
            else:
                mirror.tokens.extend(new)
            batch.append(DraftRequest(seq_id, mirror.tokens, k, mirror.params, hidden, mirror.controls))
            where.append(i)
        for i, draft in zip(where, proposer.propose(batch) if batch else []):
            if draft.probs is not None:
                draft.probs = draft.probs.cpu()
            drafts[i] = draft
        return drafts, missing

    def release(self, released: list[Released]) -> None:
        """Forget finished, preempted or moved sequences (their draft KV pages go back to the pool)."""
        for drafter, seq_id in released:
            name = self._name(drafter)
            self.seqs.pop((name, seq_id), None)
            if name in self.proposers:
                self.proposers[name].release(seq_id)

    def install(self, name: str, files: dict[str, bytes], version: str) -> tuple[HiddenRows, int | None, str]:
        """Host the optimizer's released drafter (its folder's `files`) as `name`, replacing any drafter of that
        name (its sequences start over with the new one). Returns its `hidden_rows`, `max_k` and this process's
        incarnation."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="specserve-draft-worker-"))
        folder = self._workdir / f"{name.replace(':', '-')}-v{version}"
        proposer = released_drafter(self.config, files, folder, device=self.device)
        for key in [key for key in self.seqs if key[0] == name]:
            del self.seqs[key]
        self.proposers[name] = proposer
        self.versions[name] = version
        return proposer.hidden_rows, proposer.max_k, self.incarnation

    def _name(self, drafter: str | None) -> str:
        return drafter if drafter is not None else next(iter(self.proposers), "")

    def ping(self) -> str:
        """Liveness probe, answered between calls: this process's incarnation id."""
        return self.incarnation


@ray.remote(max_restarts=-1)
class DraftWorker(DraftService):
    """The drafters' actor; restartable (a restart reloads the config's drafters; a draft model starts with an
    empty KV pool; installed drafters come back when the replica installs them again)."""


def start_draft_worker(
    engine_config: EngineConfig,
    resources: ActorResources | None = None,
    *,
    placement_group: Any = None,
    bundle_index: int = -1,
    name: str | None = None,
    namespace: str | None = None,
    max_restarts: int = -1,
    ready_timeout_s: float | None = None,
) -> Any:
    """Start a DraftWorker for `engine_config` (speculator 'draft', a learned one, or 'auto') and return its handle.

    On CUDA the worker needs a GPU of its own: `num_gpus` 0 becomes 1. With a `placement_group` the actor goes
    into bundle `bundle_index` (e.g. one the replica reserved for it). With `ready_timeout_s` this waits for the
    model to load (raising on failure), otherwise it returns at once."""
    if engine_config.speculator not in (*MODEL_BACKED, "auto"):
        raise ValueError(
            f"a draft worker needs speculator 'draft', 'mlp', 'eagle' or 'auto', not {engine_config.speculator!r}"
        )
    resources = resources or ActorResources()
    num_gpus = resources.num_gpus
    if engine_config.device.startswith("cuda") and num_gpus <= 0:
        num_gpus = 1
    options: dict[str, Any] = {"num_cpus": resources.num_cpus, "num_gpus": num_gpus, "max_restarts": max_restarts}
    if placement_group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group, placement_group_bundle_index=bundle_index
        )
    if name is not None:
        options["name"] = name
    if namespace is not None:
        options["namespace"] = namespace
    num_threads = max(1, int(resources.num_cpus))
    actor = DraftWorker.options(**options).remote(engine_config, num_threads)
    if ready_timeout_s is not None:
        ray.get(actor.ping.remote(), timeout=ready_timeout_s)
    return actor


class RemoteDraftProposer(Proposer):
    """A Proposer backed by one drafter (`name`; None: the actor's only one) of a DraftWorker actor; never fails
    a step, falls back to no drafts instead. The proposers of one actor share a `DraftWorkerClient` (its queue of
    releases, the drafters to install again in a restarted actor).

    Call it from one thread (the engine's). `healthy` is False from construction until the actor first
    answers a ping (the model may still be loading), and again while it is down. Plain counters for metrics
    (see `stats()`): `calls` to the actor, `failures` (failed or timed-out calls and pings), `fallback_steps`
    (steps answered without drafts because the worker was unavailable), `recoveries` (times it was taken
    back after being lost) and `resyncs` (sequences the actor had no mirror for, sent in full again)."""

    def __init__(
        self,
        actor: Any,
        *,
        device: torch.device | str = "cpu",
        timeout_s: float = 10.0,
        retry_interval_s: float = 2.0,
        ready_timeout_s: float = 0.0,
        hidden_rows: HiddenRows = "none",
        max_k: int | None = None,
        name: str | None = None,
        client: DraftWorkerClient | None = None,
    ):
        """`timeout_s` bounds one propose call (beyond it the step goes on without drafts); a degraded
        proposer pings the actor at most every `retry_interval_s`; `ready_timeout_s` > 0 waits that long for
        the first ping here instead of starting degraded. `hidden_rows` and `max_k` are the actor's proposer's
        (`speculator.factory.proposer_traits`; see `for_config`)."""
        self.actor, self.name = actor, name
        self.client = client if client is not None else DraftWorkerClient(actor)
        self.hidden_rows, self.max_k = hidden_rows, max_k
        self.device = torch.device(device)
        self.timeout_s, self.retry_interval_s = timeout_s, retry_interval_s
        self.healthy = False
        self.calls = self.failures = self.fallback_steps = self.recoveries = self.resyncs = 0
        self._sent: dict[int, tuple[int, int]] = {}  # seq_id -> (tokens the actor mirrors, the last of them)
        self._held: set[int] = set()  # seq ids the actor may hold state for (release them there)
        self._ping: ray.ObjectRef | None = None
        self._last_try = float("-inf")
        self._was_healthy = False  # the first answer is the worker getting ready, not a recovery
        self._send_ping()
        if ready_timeout_s > 0:
            ready, _ = ray.wait([self._ping], timeout=ready_timeout_s)
            if ready:
                self.poll()

    @classmethod
    def for_config(cls, actor: Any, engine_config: EngineConfig, **kwargs: Any) -> RemoteDraftProposer:
        """The stand-in for the proposer `engine_config` names, running in `actor`."""
        hidden_rows, max_k = proposer_traits(engine_config)
        return cls(actor, device=engine_config.device, hidden_rows=hidden_rows, max_k=max_k, **kwargs)

    # ---- Proposer -------------------------------------------------------------------------------------

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        if not self.poll():
            self.fallback_steps += 1
            return [Draft([]) for _ in requests]
        wire = [self._encode(r) for r in requests]
        released = self.client.take_released()
        self.calls += 1
        try:
            call = self.actor.propose.remote(wire, released, self.name, self.client.incarnation)
            drafts, missing = ray.get(call, timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure of the actor only costs this step's drafts
            self._degrade(e)
            self.client.put_back(released)
            self.fallback_steps += 1
            return [Draft([]) for _ in requests]
        for r, (seq_id, base, new, *_) in zip(requests, wire):
            self._sent[seq_id] = (base + len(new), r.token_ids[-1])
        for seq_id in missing:
            self._sent.pop(seq_id, None)
        self.resyncs += len(missing)
        for d in drafts:
            if d.probs is not None:
                d.probs = d.probs.to(self.device)
        return drafts

    def release(self, seq_id: int) -> None:
        """Queued, sent with the worker's next propose call (one round trip per step, not per finished
        sequence)."""
        self._sent.pop(seq_id, None)
        if seq_id in self._held:
            self._held.discard(seq_id)
            self.client.queue_release(self.name, seq_id)

    # ---- health ---------------------------------------------------------------------------------------

    def poll(self) -> bool:
        """Update `healthy` without blocking: collect an answered ping, or send a new one when due."""
        if self.healthy:
            return True
        if self._ping is not None:
            ready, _ = ray.wait([self._ping], timeout=0)
            if not ready:
                return False
            ping, self._ping = self._ping, None
            try:
                incarnation = ray.get(ping)
            except Exception as e:  # noqa: BLE001 - still down; retry later
                self.failures += 1
                log.debug("draft worker still unavailable: %s", e)
                return False
            self.client.taken_back(incarnation)
            self.healthy = True
            self._sent.clear()  # it may be a new process with no mirrors: send everything in full once
            if self._was_healthy:
                self.recoveries += 1
                log.info("draft worker is back; speculating again")
            self._was_healthy = True
            return True
        if time.monotonic() - self._last_try >= self.retry_interval_s:
            self._send_ping()
        return False

    def stats(self) -> dict[str, Any]:
        return {
            "draft_worker_healthy": self.healthy,
            "draft_worker_calls": self.calls,
            "draft_worker_failures": self.failures,
            "draft_worker_fallback_steps": self.fallback_steps,
            "draft_worker_recoveries": self.recoveries,
            "draft_worker_resyncs": self.resyncs,
        }

    def _send_ping(self) -> None:
        self._last_try = time.monotonic()
        try:
            self._ping = self.actor.ping.remote()
        except Exception as e:  # noqa: BLE001 - e.g. a handle whose actor is gone for good
            self.failures += 1
            self._ping = None
            log.debug("cannot ping the draft worker: %s", e)

    def _degrade(self, error: Exception) -> None:
        self.failures += 1
        if self.healthy:
            log.warning("draft worker failed (%s: %s); decoding without speculation", type(error).__name__, error)
        self.healthy = False
        # The call may or may not have reached the actor: no mirror can be trusted any more.
        self._sent.clear()
        self._send_ping()

    def _encode(self, r: DraftRequest) -> WireRequest:
        sent = self._sent.get(r.seq_id)
        self._held.add(r.seq_id)
        hidden = r.hidden.cpu() if r.hidden is not None else None
        if sent is not None:
            n, last = sent
            if 0 < n <= len(r.token_ids) and r.token_ids[n - 1] == last:
                return (r.seq_id, n, r.token_ids[n:], r.k, None, None, hidden)
        return (r.seq_id, 0, list(r.token_ids), r.k, r.params, r.controls, hidden)


class DraftWorkerClient:
    """The replica's side of one DraftWorker: the engine's proposer (`proposer_for`), the adapted drafters it
    installed there (`install`), kept as files to install again when a restarted actor is taken back, and the
    releases its remote drafters share. `install` runs on the adaptation thread, the rest on the engine's."""

    def __init__(self, actor: Any, *, install_timeout_s: float = 60.0, **proposer_kwargs: Any):
        """`proposer_kwargs` go to every RemoteDraftProposer (timeouts, `device`)."""
        self.actor, self.install_timeout_s, self.kwargs = actor, install_timeout_s, proposer_kwargs
        self.remotes: dict[str, RemoteDraftProposer] = {}  # by drafter name, the latest of each
        self.installed: dict[str, tuple[dict[str, bytes], str]] = {}  # name -> (files, version)
        self.incarnation: str | None = None  # the actor process the installs are known to be in
        self.reinstalls = 0
        self._released: list[Released] = []
        self._lock = threading.Lock()

    def proposer_for(self, config: EngineConfig) -> Proposer:
        """The engine's proposer for `config`: its model-backed drafters remote, under `auto` routed together
        with the lookups that run here."""
        proposers: dict[str, Proposer] = {}
        for name, one in drafter_configs(config).items():
            if one.speculator in MODEL_BACKED:
                hidden_rows, max_k = proposer_traits(one)
                proposers[name] = self._remote(name, hidden_rows, max_k)
            else:
                proposers[name] = make_proposer(one)
        if config.speculator != "auto":
            return proposers[config.speculator]
        return RoutedProposer(proposers, default=next(iter(proposers)))

    def install(self, name: str, files: dict[str, bytes], version: str) -> RemoteDraftProposer:
        """Build the released drafter (`files` of its folder) in the actor as `name`, keep its files, and return
        the proposer to swap into the engine (`LLMEngine.install_drafter`). Blocks until the actor has loaded it;
        raises if it cannot."""
        hidden_rows, max_k, incarnation = ray.get(
            self.actor.install.remote(name, files, version), timeout=self.install_timeout_s
        )
        with self._lock:
            self.installed[name] = (files, version)
        self.taken_back(incarnation)  # an actor restarted since the last ping lacks the others
        return self._remote(name, hidden_rows, max_k, ready_timeout_s=self.install_timeout_s)

    def taken_back(self, incarnation: str) -> None:
        """The actor answered as `incarnation`: if that is a new process, install again in it every drafter
        installed before. The calls are queued without waiting: Ray runs them before any later call from this
        process, so a drafter's next propose finds it."""
        with self._lock:
            if self.incarnation in (None, incarnation):
                self.incarnation = incarnation
                return
            self.incarnation = incarnation
            again = list(self.installed.items())
        for name, (files, version) in again:
            self.actor.install.remote(name, files, version)
        self.reinstalls += len(again)
        if again:
            log.info("draft worker restarted: installing %d adapted drafter(s) again", len(again))

    def queue_release(self, name: str | None, seq_id: int) -> None:
        self._released.append((name, seq_id))

    def take_released(self) -> list[Released]:
        released, self._released = self._released, []
        return released

    def put_back(self, released: list[Released]) -> None:
        self._released = released + self._released

    def stats(self) -> dict[str, Any]:
        """The remote drafters' counters, summed (healthy: all of them)."""
        remotes = list(self.remotes.values())  # `install` may add one meanwhile
        out: dict[str, Any] = {"draft_worker_healthy": all(p.healthy for p in remotes)}
        for p in remotes:
            for key, value in p.stats().items():
                if key != "draft_worker_healthy":
                    out[key] = out.get(key, 0) + value
        out["draft_worker_reinstalls"] = self.reinstalls
        return out

    def _remote(self, name: str, hidden_rows: HiddenRows, max_k: int | None, **kwargs: Any) -> RemoteDraftProposer:
        remote = RemoteDraftProposer(
            self.actor, hidden_rows=hidden_rows, max_k=max_k, name=name, client=self, **{**self.kwargs, **kwargs}
        )
        self.remotes[name] = remote
        return remote
