"""Accepting a step's output for one sequence: verify its draft (a chain or a tree) against the target's rows,
then append what was emitted up to a stop, with the logprobs asked for and the grammar advanced. Mixed into
LLMEngine, whose scheduler, counters and output path it uses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from engine import hidden_rows
from engine.request_state import RequestOutput, RequestState
from engine.scheduler import ScheduledSeq
from engine.sequence import Sequence
from engine.spec_monitor import SpecMonitor
from model.kv_pages import SlotMove
from model.runner import StepInput
from sampling.logprobs import token_logprobs
from sampling.sampler import processed_probs
from speculator.proposer import Draft
from speculator.token_tree import TokenTree
from speculator.tree_verify import verify_tree_greedy, verify_tree_sampled
from speculator.verify import verify_greedy, verify_sampled

if TYPE_CHECKING:
    from engine.metrics import SpecCounters
    from engine.scheduler import Scheduler


class Acceptance:
    """Verification and appending, per sequence (see the module docstring)."""

    scheduler: Scheduler
    spec: SpecCounters
    monitor: SpecMonitor
    eos_token_ids: set[int]
    max_model_len: int
    runner: Any  # moves the accepted path's KV slots in place (ModelRunner.move_slots)

    def _keep_hidden(self, req: RequestState, item: StepInput, rows: torch.Tensor, num_valid: int) -> None: ...

    def _next_k(self, req: RequestState) -> int: ...

    def _finish(self, req: RequestState, new: list[int], delta: str, now: float) -> RequestOutput: ...

    def _output(self, req: RequestState, new: list[int], delta: str) -> RequestOutput: ...

    def _accept(
        self,
        req: RequestState,
        s: ScheduledSeq,
        item: StepInput,
        draft: Draft | TokenTree,
        logits: torch.Tensor,
        argmax: list[int],
        hidden: torch.Tensor | None,
        now: float,
    ) -> RequestOutput:
        """Verify the sequence's draft against its logits rows, keep the hidden rows of what was accepted, then
        append what was emitted. The logits controls process row i with draft tokens 0..i-1 in its context
        (sampling/controls.py), then a grammar masks row i in its state after those tokens (sampling/grammar.py);
        emitted token i came from row i, whose raw logits give its logprobs."""
        seq = req.seq
        if isinstance(draft, TokenTree):
            return self._accept_tree(req, item, draft, logits, argmax, hidden, now)
        raw = logits
        if req.controls is not None:
            logits = req.controls.apply(logits, seq.token_ids, draft.tokens)
        if req.grammar is not None:
            logits = req.grammar.mask(logits, draft.tokens, raw)
        if req.controls is not None or req.grammar is not None:
            argmax = logits.argmax(-1).tolist() if seq.params.greedy else argmax
        if seq.params.greedy:
            emitted = verify_greedy(argmax, draft.tokens)
        else:
            p = processed_probs(logits, seq.params)
            emitted = verify_sampled(p, draft.tokens, draft.probs, req.generator)
        accepted = len(emitted) - 1
        seq.num_computed += accepted
        if hidden is not None:
            self._keep_hidden(req, item, hidden, s.num_tokens + accepted)
        if s.num_lookahead or draft.tokens:
            self._record_step(req, len(draft.tokens), accepted, len(emitted))
        return self._append(req, emitted, now, raw)

    def _record_step(self, req: RequestState, drafted: int, accepted: int, emitted: int) -> None:
        """A verification step counted for the request, the engine and the monitor (under the key a drafter swap
        moved the request to, engine/drafter_swap.py), and told to the k controller."""
        req.metrics.spec.record(drafted, accepted, emitted)
        self.spec.record(drafted, accepted, emitted)
        if req.spec_track is not None:
            self.monitor.record(req.spec_track, drafted, accepted, emitted)
        if req.controller:
            req.controller.update(drafted, accepted)

    def _accept_tree(
        self,
        req: RequestState,
        item: StepInput,
        tree: TokenTree,
        logits: torch.Tensor,
        argmax: list[int],
        hidden: torch.Tensor | None,
        now: float,
    ) -> RequestOutput:
        """Verify a token tree (one logits row per node), move the accepted path's K/V into consecutive slots
        before the sequence's KV is committed, keep the path's hidden rows, then append what was emitted."""
        seq = req.seq
        if seq.params.greedy:
            verdict = verify_tree_greedy(tree, argmax)
        else:
            verdict = verify_tree_sampled(tree, processed_probs(logits, seq.params), None, req.generator)
        path = verdict.path
        if any(node != depth for depth, node in enumerate(path)):
            self.runner.move_slots([SlotMove(item.block_table, item.start, path)])
        accepted = len(path) - 1
        seq.num_computed += accepted  # the root's slot was counted with the step's fed tokens
        if hidden is not None:
            self._keep_hidden(req, *hidden_rows.along_path(item, tree.path_tokens(path), hidden, path), len(path))
        depth = int(tree.depths.max())
        self._record_step(req, depth, accepted, len(verdict.tokens))
        rows = logits[path] if self._scores_output(seq) else None  # emitted token i came from node path[i]
        return self._append(req, verdict.tokens, now, rows)

    def _score_prompt(self, seq: Sequence, start: int, rows: torch.Tensor) -> None:
        """Prompt logprobs of the tokens after positions start.. (a recompute overwrites what it scores again)."""
        scored = seq.token_ids[start + 1 : start + 1 + rows.shape[0]]
        seq.prompt_logprobs[start:] = token_logprobs(rows, scored, seq.params.prompt_logprobs or 0)

    @staticmethod
    def _scores_output(seq: Sequence) -> bool:
        """Output tokens are scored for the logprobs asked, and for n > 1 (best_of ranks by their sum)."""
        return seq.params.logprobs is not None or seq.params.n > 1

    def _append(self, req: RequestState, emitted: list[int], now: float, rows: torch.Tensor | None) -> RequestOutput:
        """Append the emitted tokens up to a finish; `rows` (emitted token i scored by row i, raw logits) give
        their logprobs when the request asks for them."""
        seq, params = req.seq, req.seq.params
        new: list[int] = []
        for tok in emitted:
            seq.token_ids.append(tok)
            new.append(tok)
            if (tok in self.eos_token_ids and not params.ignore_eos) or tok in params.stop_token_ids:
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
                seq.finish_reason = "length"
            if seq.finish_reason:
                break
        if rows is not None and self._scores_output(seq):
            scored = token_logprobs(rows, new, params.logprobs or 0)
            seq.cumulative_logprob += sum(lp.logprob for lp in scored)
            if params.logprobs is not None:
                seq.output_logprobs.extend(scored)
        if req.grammar is not None:
            req.grammar.advance(new)
            if req.grammar.terminated and not seq.finish_reason:
                seq.finish_reason = "stop"
        delta = req.detok.add(new)
        if req.detok.stopped:
            seq.finish_reason = "stop"
        req.metrics.on_tokens(len(new), now)
        seq.num_failed_steps = 0
        if seq.finish_reason:
            delta += req.detok.flush()
            return self._finish(req, new, delta, now)
        self.scheduler.commit(seq)
        if req.controller:
            seq.spec_k = self._next_k(req)
        return self._output(req, new, delta)
