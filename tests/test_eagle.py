"""The EAGLE head: the layer against a direct re-implementation, its chained window pass against the proposer's
cached drafting, KV rollback, the checkpoint folder, and `specserve distill --kind eagle` on real HumanEval prompts
with its drafts verified greedily by the target."""

from __future__ import annotations

import json

import pytest
import torch

from cli.main import main
from cli.prompts import humaneval_to_jsonl, load_prompts
from model.config import EngineConfig
from model.cpu_kernels import load_kernels
from model.runner import StepInput
from sampling.params import SamplingParams
from speculator.distill import expected_tokens_per_step
from speculator.draft_vocab import DraftVocab
from speculator.eagle import EagleConfig, EagleHead, EagleLoadError, TargetParts, load_eagle, save_eagle
from speculator.eagle_proposer import EagleProposer
from speculator.factory import proposer_traits, quantize_for_drafting
from speculator.proposer import DraftRequest
from speculator.verify import verify_greedy
from tests.conftest import HUMANEVAL

V, D = 50, 32
CONFIG = EagleConfig(hidden_size=D, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6,
                     attn_scale=8**-0.5, vocab_size=V)  # fmt: skip
GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


def _target(seed: int = 1) -> TargetParts:
    g = torch.Generator().manual_seed(seed)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2) / 8))
    freqs = torch.outer(torch.arange(512.0), inv)
    emb = torch.cat([freqs, freqs], -1)
    return TargetParts(torch.randn(V, D, generator=g), torch.randn(V, D, generator=g), emb.cos(), emb.sin())


def _head(vocab: DraftVocab | None = None, seed: int = 0, config: EagleConfig = CONFIG) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead(config, vocab, _target())
    with torch.no_grad():  # norms away from 1 so their weights matter
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return head.eval()


def _reference(w: dict[str, torch.Tensor], t: TargetParts, rows: list[tuple[torch.Tensor, int, int]]) -> torch.Tensor:
    """The layer written out for one sequence of (feature, token, position) rows, causal: outputs [n, D]."""

    def rms(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * weight

    def rope(x, pos):  # x [H, 8], rotate-half pairs (i, i + 4)
        c, s = t.cos[pos], t.sin[pos]
        return x * c + torch.cat([-x[:, 4:], x[:, :4]], -1) * s

    p = "layer."
    xs = torch.stack([torch.cat([f, t.embed[tok]]) @ w["fc.weight"].T + w["fc.bias"] for f, tok, _ in rows])
    h = rms(xs, w[p + "input_layernorm.weight"])
    qs = [rope((h[i] @ w[p + "q_proj.weight"].T).view(4, 8), pos) for i, (_, _, pos) in enumerate(rows)]
    ks = [rope((h[i] @ w[p + "k_proj.weight"].T).view(2, 8), pos) for i, (_, _, pos) in enumerate(rows)]
    vs = [(h[i] @ w[p + "v_proj.weight"].T).view(2, 8) for i in range(len(rows))]
    out = []
    for i in range(len(rows)):
        heads = []
        for hq in range(4):
            kv = hq // 2  # query heads 0, 1 read KV head 0
            scores = torch.stack([qs[i][hq] @ ks[j][kv] for j in range(i + 1)]) * 8**-0.5
            heads.append(sum(a * vs[j][kv] for j, a in enumerate(torch.softmax(scores, 0))))
        x = xs[i] + torch.cat(heads) @ w[p + "o_proj.weight"].T
        hh = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = hh @ w[p + "gate_proj.weight"].T, hh @ w[p + "up_proj.weight"].T
        out.append(x + (torch.nn.functional.silu(gate) * up) @ w[p + "down_proj.weight"].T)
    return torch.stack(out)


def test_window_pass_matches_a_direct_reimplementation_step_by_step():
    head, target = _head(), _target()
    w = {n: p.detach() for n, p in head.named_parameters()}
    feats, toks = torch.randn(9, D) * 2, torch.randint(0, V, (9 + 3,))
    steps_tokens = torch.stack([toks[torch.arange(9) + 1 + m] for m in range(3)], -1)  # x_{t+1+m}
    with torch.no_grad():
        outs = head.window_forward(feats[None], steps_tokens[None], steps=3)
    true_rows = [(feats[p], int(toks[p + 1]), p) for p in range(9)]
    assert torch.allclose(outs[0][0], _reference(w, target, true_rows), atol=1e-4)
    for t in (0, 4, 8):  # step m at row t: true pairs 0..t, then the head's own features
        rows = true_rows[: t + 1]
        for m in range(1, 3):
            prev = _reference(w, target, rows)[-1]
            rows = rows + [(prev, int(toks[t + 1 + m]), t + m)]
            assert torch.allclose(outs[m][0, t], _reference(w, target, rows)[-1], atol=1e-4), (t, m)


def _request(seq_id: int, tokens: list[int], hidden: torch.Tensor, k: int = 3) -> DraftRequest:
    return DraftRequest(seq_id, tokens, k, GREEDY, hidden=hidden)


def test_proposer_drafts_equal_the_window_pass_on_its_own_chain():
    head = _head(DraftVocab.most_frequent(torch.arange(30), 30, V))
    feats, toks = torch.randn(12, D), torch.randint(0, V, (13,)).tolist()
    proposer = EagleProposer(head)
    (draft,) = proposer.propose([_request(0, toks, feats, k=4)])
    assert len(draft.tokens) == 4 and all(t < 30 for t in draft.tokens) and draft.probs is None
    # the last row of a window whose step tokens are the drafts themselves makes the same picks
    steps = torch.tensor([toks[1:]] + [[0] * 12] * 3).T.clone()
    steps[-1, 1:] = torch.tensor(draft.tokens[:3])
    with torch.no_grad():
        outs = head.window_forward(feats[None], steps[None], steps=4)
    picks = [int(head.target_ids(head.token_logits(o[0, -1]).argmax())) for o in outs]
    assert picks == draft.tokens
    assert proposer.hidden_rows == "all"


def test_kv_rollback_leaves_the_head_as_a_fresh_run_over_the_accepted_tokens():
    head = _head()
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, D, generator=g)  # the target's features at positions 0..19
    toks = torch.randint(0, V, (21,), generator=g).tolist()
    kept = EagleProposer(head)
    kept.propose([_request(7, toks[:10], hidden[:9])])  # prompt of 10: rows 0..8; drafts at 9..
    kept.propose([_request(7, toks[:12], hidden[9:11], k=2)])  # 1 accepted + bonus: rows 9, 10
    kept.propose([_request(7, toks[:13], hidden[11:12], k=0)])  # k = 0 still follows the target
    (again,) = kept.propose([_request(7, toks[:16], hidden[12:15], k=3)])
    fresh = EagleProposer(head)
    (once,) = fresh.propose([_request(7, toks[:16], hidden[:15], k=3)])
    assert again.tokens == once.tokens
    a, b = kept.seqs[7], fresh.seqs[7]
    assert a.tokens == b.tokens == toks[1:16] and a.length == b.length == 15 + 2
    assert torch.allclose(a.k[:, : a.length], b.k[:, : b.length], atol=1e-5)
    assert torch.allclose(a.v[:, : a.length], b.v[:, : b.length], atol=1e-5)
    kept.release(7)
    assert 7 not in kept.seqs


def test_batched_proposals_equal_one_sequence_at_a_time():
    head = _head()
    g = torch.Generator().manual_seed(5)
    reqs = [_request(i, torch.randint(0, V, (n,), generator=g).tolist(), torch.randn(n - 1, D, generator=g), k)
            for i, (n, k) in enumerate([(5, 3), (300, 2), (2, 4), (9, 0), (40, 1)])]  # fmt: skip
    together = EagleProposer(head).propose(reqs)
    alone = [EagleProposer(head).propose([r])[0] for r in reqs]
    assert [d.tokens for d in together] == [d.tokens for d in alone]
    assert [len(d.tokens) for d in together] == [3, 2, 4, 0, 1]
    nothing = EagleProposer(head).propose([DraftRequest(0, [1, 2, 3], 3, GREEDY)])  # no hidden rows: no draft
    assert nothing[0].tokens == []


def test_trees_are_the_chain_and_its_most_probable_branches():
    """propose_trees: the first path is propose's chain; the others leave it once, at the depth and with the token
    whose path log-probability (the head's own, along the chain) is highest, best first."""
    head = _head(DraftVocab.most_frequent(torch.arange(30), 30, V))
    g = torch.Generator().manual_seed(8)
    feats, toks = torch.randn(12, D, generator=g), torch.randint(0, V, (13,), generator=g).tolist()
    (chain,) = EagleProposer(head).propose([_request(0, toks, feats, k=3)])
    (tree,) = EagleProposer(head).propose_trees([_request(0, toks, feats, k=3)], 4)
    # the head's distribution at each depth of the chain, from the window pass over the chain's own tokens
    steps = torch.tensor([toks[1:]] + [[0] * 12] * 2).T.clone()
    steps[-1, 1:] = torch.tensor(chain.tokens[:2])
    with torch.no_grad():
        outs = head.window_forward(feats[None], steps[None], steps=3)
    logps = [torch.log_softmax(head.token_logits(o[0, -1]), -1) for o in outs]
    own = [int(head.own_ids(torch.tensor(t))) for t in chain.tokens]
    branches = []
    for depth, lp in enumerate(logps):
        base = sum(float(logps[j][own[j]]) for j in range(depth))
        tokens = head.target_ids(torch.arange(30)).tolist()
        branches += [(base + float(lp[i]), depth, tokens[i]) for i in range(30) if i != own[depth]]
    best = sorted(branches, reverse=True)[:3]
    expected = [chain.tokens] + [chain.tokens[:d] + [t] for _, d, t in best]
    assert sorted(tree.path_tokens(p)[1:] for p in tree.paths()) == sorted(expected)
    assert not tree.is_chain
    (one,) = EagleProposer(head).propose_trees([_request(0, toks, feats, k=3)], 1)
    assert one.is_chain and one.tokens[1:] == tuple(chain.tokens)


def test_int8_head_reads_a_quarter_of_the_bytes_and_drafts_as_the_float_head():
    config = CONFIG.model_copy(update={"intermediate_size": 64})  # every width a multiple of Q8_0's 32
    vocab = DraftVocab.most_frequent(torch.arange(40), 40, V)
    head, int8 = _head(vocab, config=config), _head(vocab, config=config)
    assert _head(vocab).quantize_int8(load_kernels()) == 0, "a width of 48 has no Q8_0 blocks: left float"
    assert not quantize_for_drafting(_head(vocab, config=config), EngineConfig(weights="fp32"), "cpu")
    nbytes = int8.quantize_int8(load_kernels())
    assert quantize_for_drafting(_head(vocab, config=config), EngineConfig(), "cpu")  # the default on CPU
    floats = sum(p.numel() for n, p in head.named_parameters() if n.endswith("weight") and "norm" not in n)
    assert nbytes == (floats + 40 * D) * 34 // 32  # 34 bytes a block of 32 weights, the LM head's 40 rows too
    g = torch.Generator().manual_seed(4)
    feats, toks = torch.randn(3, 24, D, generator=g), torch.randint(0, V, (3, 24, 3), generator=g)
    with torch.no_grad():
        want, got = head.window_forward(feats, toks, 3), int8.window_forward(feats, toks, 3)
        for a, b in zip(want, got):  # Q8_0's rounding (1/254 of a block's largest weight) leaves ~1% error
            assert (a - b).norm() / a.norm() < 0.02
            assert (head.token_logits(a) - int8.token_logits(b)).abs().max() < 0.05 * head.token_logits(a).abs().max()
    reqs = [_request(i, toks[i % 3, :, 0].tolist()[: 8 + i], feats[i % 3, : 7 + i], k=3) for i in range(12)]
    same = sum(a == b for x, y in zip(EagleProposer(head).propose(reqs), EagleProposer(int8).propose(reqs))
               for a, b in zip(x.tokens, y.tokens))  # fmt: skip
    assert same >= 0.9 * 36, f"{same} of 36 drafted tokens agree"


def test_checkpoint_round_trip(tmp_path):
    vocab = DraftVocab((4, 9, 2), V)
    head = _head(vocab)
    save_eagle(head, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "specserve_eagle" and config["hidden_size"] == D
    back = load_eagle(tmp_path, _target())
    assert back.draft_vocab == vocab
    for (n, p), (m, q) in zip(head.named_parameters(), back.named_parameters()):
        assert n == m and torch.equal(p, q)
    assert not any(n.startswith("target") or "embed" in n for n in dict(back.named_parameters()))
    feats, toks = torch.randn(1, 6, D), torch.randint(0, V, (1, 6, 1))
    with torch.no_grad():
        assert torch.equal(head.window_forward(feats, toks)[0], back.window_forward(feats, toks)[0])
    wrong = TargetParts(torch.zeros(V + 1, D), torch.zeros(V + 1, D), _target().cos, _target().sin)
    with pytest.raises(EagleLoadError, match="vocabulary"):
        load_eagle(tmp_path, wrong)
    (tmp_path / "config.json").write_text(json.dumps(config | {"intermediate_size": 64}))
    with pytest.raises(EagleLoadError, match="intermediate|gate_proj|up_proj|down_proj"):
        load_eagle(tmp_path)


def _greedy_with_drafts(runner, proposer, prompt: list[int], max_tokens: int, k: int) -> tuple[list[int], int, int]:
    """Greedy decoding of one prompt by the target with the proposer's drafts verified in each forward:
    (output, drafted, accepted). Writes KV pages from block 1 on (the caller resets the engine's pages)."""
    table = list(range(1, 2 + (len(prompt) + max_tokens + k) // runner.block_size))
    out = runner.execute_with_hidden([StepInput(prompt, 0, table, 1, num_hidden=len(prompt))])
    tokens, hidden = prompt + [int(out.logits[0].argmax())], out.hidden
    drafted = accepted = 0
    while len(tokens) - len(prompt) < max_tokens:
        (draft,) = proposer.propose([DraftRequest(0, tokens, k, GREEDY, hidden=hidden)])
        feed = [tokens[-1]] + draft.tokens
        out = runner.execute_with_hidden([StepInput(feed, len(tokens) - 1, table, len(feed), num_hidden=len(feed))])
        emitted = verify_greedy(out.logits.argmax(-1).tolist(), draft.tokens)
        drafted, accepted = drafted + len(draft.tokens), accepted + len(emitted) - 1
        tokens, hidden = tokens + emitted, out.hidden[: len(emitted)]
    proposer.release(0)
    return tokens[len(prompt) : len(prompt) + max_tokens], drafted, accepted


@pytest.mark.slow
def test_distill_eagle_beats_a_unigram_predictor_and_its_drafts_are_accepted(tmp_path, capsys, make_engine):
    prompts = tmp_path / "humaneval.jsonl"
    humaneval_to_jsonl(HUMANEVAL, prompts)
    out = tmp_path / "eagle"
    argv = ["distill", "--prompts", str(prompts), "--limit", "40", "--max-tokens", "32", "--out", str(out)]
    assert main(argv + ["--kind", "eagle", "--epochs", "6", "--draft-vocab", "2048"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_prompts"] == 40
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "eagle" and report["heldout_samples"] > 50
    acc, uni = report["accuracy_by_position"], report["unigram_accuracy_by_position"]
    assert len(acc) == 3 and all(a > u for a, u in zip(acc, uni)), (acc, uni)
    assert report["expected_tokens_per_step"] == pytest.approx(expected_tokens_per_step(acc))
    cost = report["cost"]
    assert cost["int8"], "timed as the engine drafts on CPU: in int8"
    assert 0 < cost["proposal_per_target_step"] < 1
    assert cost["proposal_per_target_step"] == pytest.approx(cost["proposal_s"] / cost["target_step_s"])
    # a sanity bound, not a speed goal: a drafted token costs less than a target step (measured about 0.25)
    assert 0 < cost["per_token_per_target_step"] < 1
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "specserve_eagle" and config["draft_steps"] == 3  # the depth it was trained on

    engine = make_engine(max_model_len=512, kv_cache_gib=0.05)
    head = load_eagle(out, TargetParts.from_model(engine.runner.model))
    assert len(head.draft_vocab.ids) == report["draft_vocab_size"] <= 2048
    proposer = EagleProposer(head)
    assert proposer.max_k == 3  # the engine drafts it no deeper than it was trained
    served = engine.config.model_copy(update={"speculator": "eagle", "speculator_model": str(out)})
    assert proposer_traits(served) == ("all", 3)  # what the draft worker's stand-in declares
    specs = load_prompts(str(prompts), 4)
    encoded = [list(engine.prepare(s.prompt, messages=s.messages).prompt_token_ids) for s in specs]
    plain = engine.generate(encoded, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    drafted = accepted = 0
    try:
        for ids, ref in zip(encoded, plain):
            tokens, d, a = _greedy_with_drafts(engine.runner, proposer, ids, 24, k=3)
            assert tokens == ref.output_token_ids  # drafts never change greedy output
            drafted, accepted = drafted + d, accepted + a
    finally:
        engine.reset_kv()
    assert drafted > 0 and accepted / drafted > 0.1, (accepted, drafted)
