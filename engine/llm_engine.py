"""The engine: requests in, tokens out, one scheduler step at a time.

A step schedules a mixed batch (prefill chunks, decodes), asks the proposer for drafts for the decoding
sequences, verifies everything in ONE target forward over the paged cache, then accepts, commits the KV of
accepted tokens (rejected slots are simply overwritten later) and streams text.

Failures: one request never takes another down (engine/recovery.py says how).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pydantic import ValidationError

from engine import hidden_rows
from engine.acceptance import Acceptance
from engine.detokenizer import IncrementalDetokenizer
from engine.drafter_swap import DrafterSwap
from engine.k_choice import SpeculationLength
from engine.metrics import RequestMetrics, SpecCounters
from engine.recovery import SEQUENCE_FAILED, Recovery
from engine.request_state import RequestOutput, RequestState, seq_key
from engine.scheduler import ScheduledSeq, Scheduler
from engine.sequence import SeqStatus, Sequence
from engine.spec_monitor import DEFAULT_CLASS, FIRST_VERSION, SpecKey, SpecMonitor, SpecStats
from engine.tokenization import EngineRequest, ModelLimits, RequestError, prepare_request
from engine.traffic_log import TrafficLog
from engine.workload_routing import make_router
from kv_cache.block_batch import BatchedBlockManager, BlockService
from model.config import EngineConfig
from model.loader import eos_token_ids, load_arch, load_tokenizer, resolve_model
from model.runner import ModelRunner, StepInput, context_length
from sampling.controls import LogitsControls
from sampling.grammar import GrammarCompiler, GrammarDeadEnd, GrammarState
from sampling.params import SamplingParams, describe_validation_error
from sampling.sampler import make_generator
from speculator.adaptation import TrafficRecord
from speculator.cost_model import StepTimes
from speculator.factory import make_proposer
from speculator.plan import NONE
from speculator.proposer import Draft, DraftRequest, Proposer
from speculator.routed import RoutedProposer
from speculator.token_tree import TokenTree

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NO_DRAFT = Draft([])
log = logging.getLogger(__name__)


class LLMEngine(SpeculationLength, DrafterSwap, Acceptance, Recovery):
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        runner: ModelRunner | None = None,
        proposer: Proposer | None = None,
        make_block_manager: Callable[[int, int, bool], BlockService] | None = None,
        step_times: StepTimes | None = None,
        **overrides,
    ):
        """`runner` replaces the in-process target runner (e.g. one that drives tensor-parallel shard actors);
        it must have been built for this config's model, dtype, block size and max_model_len. `proposer`
        replaces the one the config names (e.g. a draft model in its own actor). `make_block_manager(num_blocks,
        block_size, enable_prefix_caching)` replaces the in-process block manager (e.g. with an actor's client).
        `step_times` replaces the start-up measurement of the target's step time by rows (the speculation cost
        model's)."""
        try:
            cfg = self.config = EngineConfig(**{**(config.model_dump() if config else {}), **overrides})
        except ValidationError as e:
            raise ValueError(describe_validation_error(e, unknown="unknown key")) from None
        self.device = torch.device(cfg.device)
        self.folder = resolve_model(cfg.model)
        self.arch = load_arch(self.folder)
        self.tokenizer = load_tokenizer(self.folder)
        self.max_model_len = context_length(cfg, self.arch)
        self.runner = runner or ModelRunner.from_config(cfg)
        self.limits = ModelLimits(self.arch.vocab_size, self.max_model_len, cfg.block_size, self.num_kv_blocks)
        self.block_manager = (make_block_manager or BatchedBlockManager)(
            self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            self.runner.num_blocks,
            cfg.block_size,
            cfg.max_num_seqs,
            cfg.max_num_batched_tokens,
            self.max_model_len,
        )
        self.proposer = proposer or make_proposer(cfg, target=getattr(self.runner, "model", None))
        # Trees need a proposer that gives candidates and a runner that compacts the accepted path in place.
        if self._gives_trees(self.proposer) and hasattr(self.runner, "move_slots"):
            self.scheduler.num_candidates = cfg.num_candidates
        max_k = self.proposer.max_k if self.proposer else None
        if max_k and max_k < cfg.num_speculative_tokens:  # no lookahead slot for a token that cannot come
            self.config = cfg = cfg.model_copy(update={"num_speculative_tokens": max_k})
        self.k_policy = self._make_k_policy(step_times)
        self.router = make_router(cfg, self.proposer, self.runner, self.folder, self.arch.vocab_size, self.tokenizer)
        self.eos_token_ids = eos_token_ids(self.folder, self.tokenizer)
        self.grammars = GrammarCompiler(self.tokenizer, self.arch.vocab_size, self.eos_token_ids)
        self.requests: dict[str, RequestState] = {}  # by sequence key (`seq_key`), the n sequences of a request apart
        self.groups: dict[str, list[str]] = {}  # caller's request id -> keys of its unfinished sequences
        self.spec = SpecCounters()
        self.monitor = SpecMonitor()  # speculation by workload class, drafter and version (spec_snapshot)
        routed = isinstance(self.proposer, RoutedProposer)
        drafters = list(self.proposer.proposers) if routed else [cfg.speculator] if self.proposer else []
        self.drafter_versions: dict[str, str] = {name: FIRST_VERSION for name in drafters}
        self._swaps = deque()  # drafters to swap in before the next step (engine/drafter_swap.py)
        self.traffic: TrafficLog | None = None  # adaptation: finished sequences, for retraining
        self.num_failed_requests = 0  # requests ended with finish_reason "error"
        self._seq_ids = itertools.count()
        # Isolation (see the module docstring): the head suspect is the only sequence in the scheduler; the
        # other suspects and the held sequences wait outside it, without KV.
        self._suspects: deque[Sequence] = deque()
        self._held: list[Sequence] = []
        # The sequences the running step involves (blamed if it fails); None: all in the scheduler.
        self._in_step: list[Sequence] | None = []
        self._ended: list[RequestOutput] = []  # see `_take_ended`

    # ---- requests -------------------------------------------------------------------------------------

    def prepare(
        self,
        prompt: str | list[int] | None = None,
        params: SamplingParams | dict | None = None,
        *,
        messages: list[dict] | None = None,
        fit_context: bool = False,
    ) -> EngineRequest:
        """Tokenize and check a request against this model (tokenization.py); safe on any thread."""
        return prepare_request(self.tokenizer, self.limits, prompt, params, messages, fit_context, self.grammars)

    def add_request(
        self,
        prompt: str | list[int] | EngineRequest | None = None,
        params: SamplingParams | dict | None = None,
        *,
        messages: list[dict] | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; `prompt` may be an EngineRequest from `prepare` (then nothing is encoded or checked
        again). RequestError (one line) for a request the engine cannot serve."""
        request = prompt if isinstance(prompt, EngineRequest) else self.prepare(prompt, params, messages=messages)
        params = request.params
        request_id = request_id or f"req-{next(self._seq_ids)}"
        if request_id in self.groups or request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id}")
        if params.n > self.config.max_num_seqs:
            raise RequestError(f"{params.n} sequences is more than the engine runs at once", param="n")
        reqs = [self._new_request(request, request_id, i) for i in range(params.n)]
        for req in reqs:
            self.requests[req.seq.request_id] = req
        self.groups[request_id] = [req.seq.request_id for req in reqs]
        req = reqs[0]
        req.pending, req.seq.num_pending_forks = reqs[1:], len(reqs) - 1
        seq = req.seq
        if self._suspects:
            self._held.append(seq)
        else:
            self.scheduler.add(seq)
        return request_id

    def _new_request(self, request: EngineRequest, group: str, index: int) -> RequestState:
        """Sequence `index` of a request: its own tokens, detokenizer, random stream (a seeded request's
        sequence i > 0 seeds from the seed and i, so it repeats too) and speculation state."""
        ids, params = list(request.prompt_token_ids), request.params
        metrics = RequestMetrics()
        seq = Sequence(next(self._seq_ids), seq_key(group, index), ids, len(ids), params, metrics.arrival)
        seed = params.seed if params.seed is None or index == 0 else hash((params.seed, index))
        output_start = len(ids) if request.output_start is None else request.output_start
        route = self.router.route(ids) if self.router else None
        grammar = None
        if request.grammar is not None:  # a resumed request's grammar is past the output already streamed
            grammar = GrammarState(request.grammar, self.arch.vocab_size, ids[output_start:])
        drafter = route.drafter if route else (self.config.speculator if self.proposer else NONE)
        version = self.drafter_versions.get(drafter, FIRST_VERSION)
        workload_class = route.workload_class if route else None
        track = self.monitor.track(SpecKey(workload_class or DEFAULT_CLASS, drafter, version))
        return RequestState(
            seq,
            IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens),
            None if params.greedy else make_generator(seed, self.device),
            self._make_controller(route) if self.proposer and (route is None or route.drafter != NONE) else None,
            metrics,
            controls=LogitsControls.for_request(params, output_start, self.eos_token_ids),
            grammar=grammar,
            group=group,
            index=index,
            drafter=route.drafter if route else None,
            workload_class=workload_class,
            spec_track=track,
        )

    def has_request(self, request_id: str) -> bool:
        """Whether a request (any of its n sequences) is unfinished."""
        return request_id in self.groups

    def abort(self, request_id: str) -> None:
        """Cancel a request (all its n sequences) wherever it is (waiting, prefilling, decoding, held); its KV
        blocks go back with the next step, or before this returns when no other request holds any. A sequence's
        key aborts its whole request. Unknown or finished requests are ignored."""
        req = self.requests.get(request_id)
        keys = self.groups.pop(req.group if req else request_id, [])
        for key in keys:
            req = self.requests.pop(key, None)
            if req is None:
                continue
            seq = req.seq
            self.scheduler.finish(seq)
            self._forget_isolated(seq)
            if self.proposer:
                self.proposer.release(seq.seq_id)

    def reset_kv(self) -> None:
        """Every KV page is lost (rebuilt shards or block manager): unfinished requests are recomputed from
        their tokens so far, and no output already streamed changes."""
        for req in self.requests.values():
            req.hidden = None
            if self.proposer:
                self.proposer.release(req.seq.seq_id)
        self.scheduler.reset()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._suspects)

    @property
    def num_requests(self) -> int:
        """Requests not finished yet (waiting, running or held)."""
        return len(self.requests)

    @property
    def num_kv_blocks(self) -> int:
        """KV blocks requests can use (the pool's block 0 is reserved)."""
        return self.runner.num_blocks - 1

    def num_free_kv_blocks(self) -> int:
        """Free KV blocks as the block manager counts them (one call to it)."""
        return self.block_manager.stats()["num_free_blocks"]

    def block_manager_stats(self) -> dict[str, Any]:
        """The block manager's own counters (one call to it; an actor's may raise while it is being repaired)."""
        return self.block_manager.stats()

    def stats(self) -> dict[str, int]:
        """Counters for routing and metrics, read from this process's state alone (no block-manager call):
        cheap, and safe to read from another thread (plain ints, possibly a step old)."""
        return {
            "num_waiting": len(self.scheduler.waiting),
            "num_running": len(self.scheduler.running),
            "free_kv_blocks": self.scheduler.num_free_blocks,
            "total_kv_blocks": self.runner.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_failed_requests": self.num_failed_requests,
            "spec_drafted": self.spec.drafted,
            "spec_accepted": self.spec.accepted,
            "prefix_queried_tokens": self.scheduler.num_prefix_queried_tokens,
            "prefix_hit_tokens": self.scheduler.num_prefix_hit_tokens,
        }

    def spec_snapshot(self) -> dict[SpecKey, SpecStats]:
        """Speculation by workload class, drafter and version, cumulative and over recent requests; safe to read
        from another thread (engine/spec_monitor.py)."""
        return self.monitor.snapshot()

    # ---- adaptation (speculator/adaptation.py) ----------------------------------------------------------

    def log_traffic(self, max_records: int, window_requests: int | None = None) -> None:
        """Keep the newest `max_records` finished sequences (prompt + output ids, workload class) for retraining;
        with `window_requests`, watch speculation over that many finished requests per key (before any request)."""
        self.traffic = TrafficLog(max_records)
        if window_requests is not None:
            self.monitor = SpecMonitor(window_requests)

    def take_traffic(self) -> list[TrafficRecord]:
        """The sequences logged since the last call (none unless `log_traffic` was called)."""
        return self.traffic.take() if self.traffic is not None else []

    # ---- the step -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, propose, run the one forward, postprocess each sequence. Raises only when the step fails
        as a whole (see the module docstring); a failure of one sequence ends that request alone."""
        self._in_step = None  # schedule() failing blames every sequence in the scheduler (see `recover`)
        if self._swaps:
            self._apply_swaps()
        out = self.scheduler.schedule()
        self._in_step = [s.seq for s in out.scheduled]
        if self.proposer:
            for seq in out.preempted:
                self.proposer.release(seq.seq_id)
                self.requests[seq.request_id].hidden = None
        if not out.scheduled:
            outputs = self._drop_unschedulable()
            if self._suspects:
                self._after_isolated_step(outputs)
            return outputs
        drafts = self._propose(out.scheduled)
        mode = self._hidden_rows
        items = []
        for s in out.scheduled:
            self.runner.copy_blocks(s.copies)
            seq = s.seq
            draft = drafts.get(seq.seq_id, NO_DRAFT)
            table = self.scheduler.tables[seq.seq_id]
            if isinstance(draft, TokenTree):  # its root is the pending token (a tree only goes with a decode)
                n = len(draft)
                n_hidden = hidden_rows.rows_wanted(mode, n, n)
                items.append(StepInput(list(draft.tokens), seq.num_computed, table, n, n_hidden, list(draft.parents)))
                continue
            feed = seq.token_ids[seq.num_computed : seq.num_computed + s.num_tokens] + draft.tokens
            n_logits = 1 + len(draft.tokens) if s.completes_prefill else 0
            n_hidden = hidden_rows.rows_wanted(mode, len(feed), n_logits)
            n_logits += self._prompt_rows(s)
            items.append(StepInput(feed, seq.num_computed, table, n_logits, n_hidden))
        if mode == "none":
            logits, hidden = self.runner.execute(items), None
        else:
            result = self.runner.execute_with_hidden(items)
            logits, hidden = result.logits, result.hidden
        self._in_step = []
        outputs = self._postprocess(out.scheduled, items, drafts, logits, hidden) + self._take_ended()
        if self._suspects:
            self._after_isolated_step(outputs)
        return outputs

    @staticmethod
    def _prompt_rows(s: ScheduledSeq) -> int:
        """Logits rows a prefill step needs before its sampling row to score prompt tokens (prompt_logprobs):
        the row of position p scores token p + 1, so every fed prompt position but the last one's."""
        seq = s.seq
        if not seq.wants_prompt_logits:
            return 0
        return max(0, min(seq.num_computed + s.num_tokens, seq.num_prompt_tokens - 1) - seq.num_computed)

    @property
    def _hidden_rows(self) -> str:
        """The target's hidden rows the proposer reads ("none", "last", "all"; see speculator/proposer.py)."""
        return self.proposer.hidden_rows if self.proposer else "none"

    @staticmethod
    def _gives_trees(proposer: Proposer | None) -> bool:
        return proposer is not None and type(proposer).propose_trees is not Proposer.propose_trees

    def _propose(self, scheduled: list[ScheduledSeq]) -> dict[int, Draft | TokenTree]:
        """A draft chain per decoding sequence; with num_candidates > 1 and a proposer that gives them, a token
        tree of candidates instead, cut to the sequence's lookahead slots (a tree that is one chain stays a
        chain, on the chain's path)."""
        decoding = [s for s in scheduled if s.num_lookahead]
        if not (decoding and self.proposer):
            return {}
        reqs = [
            DraftRequest(
                s.seq.seq_id,
                s.seq.token_ids,
                s.depth,
                s.seq.params,
                self._take_hidden(s.seq),
                self.requests[s.seq.request_id].controls,
                self.requests[s.seq.request_id].drafter,
            )
            for s in decoding
        ]
        n = self.scheduler.num_candidates
        trees = self.proposer.propose_trees(reqs, n) if n > 1 else None
        if trees is None:
            return {s.seq.seq_id: self._within_grammar(s.seq, d) for s, d in zip(decoding, self.proposer.propose(reqs))}
        drafts: dict[int, Draft | TokenTree] = {}
        for s, tree in zip(decoding, trees):
            n = min(len(tree), 1 + s.num_lookahead)
            if n < len(tree):  # parents come before their children: the first n nodes are a tree
                tree = TokenTree(tree.tokens[:n], tree.parents[:n])
            req = self.requests[s.seq.request_id]
            if tree.is_chain or req.controls is not None or req.grammar is not None:
                # logits controls and grammars score each row in its chain's context: such a request verifies one
                # path
                tree = TokenTree.chain(tree.tokens[0], tree.path_tokens(tree.paths()[0])[1:])
            drafts[s.seq.seq_id] = self._within_grammar(s.seq, Draft(list(tree.tokens[1:]))) if tree.is_chain else tree
        return drafts

    def _within_grammar(self, seq: Sequence, draft: Draft) -> Draft:
        """A structured-output request's draft ends where its grammar forbids a token: that token's target row
        has p = 0 for it, so nothing after it could be accepted. A point-mass draft drops the token (its residual
        is p itself); a sampled draft keeps it as its last, whose residual max(p - q, 0) keeps verification exact.
        It also ends before a token after which the grammar allows none (the row after it could emit nothing):
        verifying fewer draft tokens is exact too."""
        grammar = self.requests[seq.request_id].grammar
        if grammar is None or not draft.tokens:
            return draft
        n, forbidden = grammar.allowed_prefix(draft.tokens)
        if n == len(draft.tokens):
            return draft
        keep = n + 1 if forbidden and draft.probs is not None else n
        return Draft(draft.tokens[:keep], None if draft.probs is None else draft.probs[:keep])

    def _take_hidden(self, seq: Sequence) -> torch.Tensor | None:
        """Hand over the sequence's hidden rows since its last proposal."""
        req = self.requests[seq.request_id]
        pending, req.hidden = req.hidden, None
        return hidden_rows.take(pending, len(seq.token_ids))

    def _keep_hidden(self, req: RequestState, item: StepInput, rows: torch.Tensor, num_valid: int) -> None:
        if self.router and not self.proposer.reads_hidden(req.drafter):  # its class's drafter reads no rows
            return
        req.hidden = hidden_rows.keep(req.hidden, self._hidden_rows, item, rows, num_valid)

    def _postprocess(
        self,
        scheduled: list[ScheduledSeq],
        items: list[StepInput],
        drafts: dict[int, Draft | TokenTree],
        logits: torch.Tensor,
        hidden: torch.Tensor | None = None,
    ) -> list[RequestOutput]:
        """Each sequence on its own: an exception ends that request (see the module docstring)."""
        greedy_rows = logits.argmax(-1).tolist() if any(s.seq.params.greedy for s in scheduled) else []
        now = time.perf_counter()
        outputs, row, hrow = [], 0, 0
        for s, item in zip(scheduled, items):
            seq = s.seq
            n_prompt, start = self._prompt_rows(s), seq.num_computed
            seq.num_computed += s.num_tokens
            h = None
            if hidden is not None:
                h = hidden[hrow : hrow + item.num_hidden]
                hrow += item.num_hidden
            req = self.requests[seq.request_id]
            if n_prompt:
                try:
                    self._score_prompt(seq, start, logits[row : row + n_prompt])
                except Exception:  # noqa: BLE001 - this request's failure must not reach the others
                    log.exception("request %s failed while its prompt was scored", seq.request_id)
                    outputs.append(self._fail(req, SEQUENCE_FAILED))
                    row += item.num_logits
                    continue
                row += n_prompt
            if item.num_logits == n_prompt:  # a prefill chunk: nothing to sample yet
                if h is not None:
                    self._keep_hidden(req, item, h, s.num_tokens)
                self.scheduler.commit(seq)
                continue
            rows = slice(row, row + item.num_logits - n_prompt)
            row += item.num_logits - n_prompt
            for child in self._fork_pending(req):  # each samples its first token from the prompt's last row
                try:
                    outputs.append(self._accept(child, s, item, NO_DRAFT, logits[rows], greedy_rows[rows], h, now))
                except Exception as e:  # noqa: BLE001 - this request's failure must not reach the others
                    outputs.append(self._failed_processing(child, e))
            try:
                draft = drafts.get(seq.seq_id, NO_DRAFT)
                outputs.append(self._accept(req, s, item, draft, logits[rows], greedy_rows[rows], h, now))
            except Exception as e:  # noqa: BLE001 - this request's failure must not reach the others
                outputs.append(self._failed_processing(req, e))
        return outputs

    def _failed_processing(self, req: RequestState, error: Exception) -> RequestOutput:
        """End a request whose step output could not be processed: refused when its grammar allows no next token
        (its spec's fault, named), failed otherwise (logged; the client gets a fixed line)."""
        structured = req.seq.params.structured
        if isinstance(error, GrammarDeadEnd) and structured is not None:
            return self._fail(req, f"{structured.param}: {error}", structured.param)
        log.exception("request %s failed while its step output was processed", req.seq.request_id, exc_info=error)
        return self._fail(req, SEQUENCE_FAILED)

    def _fork_pending(self, req: RequestState) -> list[RequestState]:
        """The prompt of a request with n > 1 is prefilled once: its other sequences fork from its blocks (shared
        by reference count, copied when written) with the KV computed so far, the hidden rows pending and the
        prompt's logprobs."""
        children, req.pending = req.pending, []
        req.seq.num_pending_forks = 0
        for child in children:
            child.seq.prompt_logprobs = list(req.seq.prompt_logprobs)
            if req.hidden is not None:
                child.hidden = hidden_rows.PendingHidden(list(req.hidden.rows), req.hidden.end)
            self.scheduler.fork(req.seq, child.seq)
        return children

    def _finish(
        self, req: RequestState, new: list[int], delta: str, now: float, error: str | None = None
    ) -> RequestOutput:
        """End a request: its KV and proposer state go, its last output is returned. With `error` (one line) it
        ends with finish_reason "error"; tolerant of a half-done step (the request may have finished already)."""
        seq = req.seq
        req.metrics.finished = now
        req.metrics.scheduled = seq.first_scheduled
        track, req.spec_track = req.spec_track, None  # its stretch enters the monitor's window once
        if track is not None:
            self.monitor.finish(track)
        if error is not None:
            self.num_failed_requests += 1
            seq.finish_reason = "error"
        self.requests.pop(seq.request_id, None)
        if self.traffic is not None and error is None and req.workload_class is not None:
            self.traffic.add(TrafficRecord(req.workload_class, list(seq.token_ids), seq.num_prompt_tokens))
        self.scheduler.finish(seq)
        self._close_in_group(req)
        if self.proposer:
            try:
                self.proposer.release(seq.seq_id)
            except Exception:  # noqa: BLE001 - the proposer forgets it on its next reset at worst
                log.exception("could not release the proposer state of request %s", seq.request_id)
        out = self._output(req, new, delta)
        out.error = error
        for child in req.pending:  # siblings not forked yet end with it (an error ends the whole request anyway)
            child.seq.finish_reason = seq.finish_reason
            self._ended.append(self._finish(child, [], "", now, error))
        req.pending = []
        return out

    def _close_in_group(self, req: RequestState) -> None:
        keys = self.groups.get(req.group)
        if keys is not None and req.seq.request_id in keys:
            keys.remove(req.seq.request_id)
            if not keys:
                del self.groups[req.group]

    def _fail(self, req: RequestState, message: str, param: str | None = None) -> RequestOutput:
        """End a request whose own processing failed (`param`: the request field at fault, if it is the request's)."""
        out = self._finish(req, [], "", time.perf_counter(), message)
        out.error_param = param
        return out

    def _output(self, req: RequestState, new: list[int], delta: str) -> RequestOutput:
        seq = req.seq
        out = RequestOutput(
            req.group,
            seq.token_ids[: seq.num_prompt_tokens],
            seq.output_token_ids,
            req.detok.text,
            delta,
            new,
            seq.status is SeqStatus.FINISHED,
            seq.finish_reason,
            req.metrics,
            index=req.index,
            all_finished=req.group not in self.groups,
            cumulative_logprob=seq.cumulative_logprob,
        )
        if seq.params.logprobs is not None:
            out.logprobs = seq.output_logprobs[len(seq.output_logprobs) - len(new) :]
        if seq.params.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            out.prompt_logprobs, req.prompt_logprobs_sent = list(seq.prompt_logprobs), True
        return out

    def _drop_unschedulable(self) -> list[RequestOutput]:
        """Nothing could run: the oldest waiting sequence alone outgrew the KV cache. End it as 'length'."""
        if self.scheduler.running or not self.scheduler.waiting:
            return []
        req = self.requests[self.scheduler.waiting[0].request_id]
        req.seq.finish_reason = "length"
        return [self._finish(req, [], req.detok.flush(), time.perf_counter()), *self._take_ended()]

    def _take_ended(self) -> list[RequestOutput]:
        """Outputs of unforked siblings that ended with their first sequence (see `_finish`)."""
        ended, self._ended = self._ended, []
        return ended

    # ---- conveniences ---------------------------------------------------------------------------------

    def generate(
        self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts (strings, token-id lists or message lists) concurrently to completion, in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for p, sp in zip(prompts, params_list):
            if isinstance(p, list) and p and isinstance(p[0], dict):
                ids.append(self.add_request(messages=p, params=sp))
            else:
                ids.append(self.add_request(p, sp))
        final = {}
        for out in self.run():
            if out.finished and out.index == 0:
                final[out.request_id] = out
        return [final[i] for i in ids]

    def run(self) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step()

    def kv_waste_slots(self) -> int:
        """Allocated minus used KV slots over the live sequences (lookahead slots count as waste)."""
        used = sum(r.seq.num_computed for r in self.requests.values() if r.seq.seq_id in self.scheduler.tables)
        return self.scheduler.num_allocated_slots() - used
