"""IBM's MLP speculator: the network against a direct re-implementation, IBM's checkpoint format, the draft
vocabulary's id mapping, and the chain / tree proposals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import EngineConfig
from model.cpu_kernels import load_kernels
from speculator.draft_vocab import DraftVocab
from speculator.factory import quantize_for_drafting
from speculator.mlp_checkpoint import SpeculatorLoadError, load_speculator, save_speculator
from speculator.mlp_speculator import MLPSpeculator, MLPSpeculatorConfig


def _random(config: MLPSpeculatorConfig, vocab: DraftVocab | None = None, seed: int = 0) -> MLPSpeculator:
    torch.manual_seed(seed)
    model = MLPSpeculator(config, vocab)
    with torch.no_grad():  # norms away from 1/0 so their weights matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _reference(w: dict[str, torch.Tensor], n: int, inner: int, scale_input: bool, h, toks) -> list[torch.Tensor]:
    """IBM's stage written out: s = GELU(LN(W s * a + E[tok] * b)), LN RMS-style with weight and bias."""
    a = 0.5 ** (0.5 / n)
    b = math.sqrt((1 - a * a) * inner / 2)

    def rms(x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)

    s = rms(h) / math.sqrt(2) if scale_input else h
    out = []
    for i in range(n):
        pre = s @ w[f"proj.{i}.weight"].T * a + w[f"emb.{i}.weight"][toks[:, i]] * b
        s = torch.nn.functional.gelu(rms(pre) * w[f"ln.{i}.weight"] + w[f"ln.{i}.bias"])
        out.append(s @ w[f"head.{i}.weight"].T)
    return out


@pytest.mark.parametrize("tie, scale_input, inner", [(False, False, 0), (True, True, 24), (False, True, 24)])
def test_stages_match_a_direct_reimplementation(tie, scale_input, inner):
    config = MLPSpeculatorConfig(emb_dim=16, inner_dim=inner, vocab_size=50, n_predict=3, tie_weights=tie,
                                 scale_input=scale_input)  # fmt: skip
    model = _random(config)
    w = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    h, toks = torch.randn(7, 16) * 3, torch.randint(0, 50, (7, 3))
    with torch.no_grad():
        got = model(h, toks)
    ref = _reference(w, 3, config.width, scale_input, h, toks)
    assert got.shape == (3, 7, 50)
    for i in range(3):
        assert torch.allclose(got[i], ref[i], atol=1e-4), i
    if tie:
        assert model.emb[2].weight is model.emb[0].weight and model.proj[2].weight is model.proj[1].weight
        assert model.proj[1].weight is not model.proj[0].weight


def test_ibm_weights_and_constants():
    model = MLPSpeculator(MLPSpeculatorConfig(emb_dim=16, inner_dim=32, vocab_size=50, n_predict=4))
    assert model.state_weight == pytest.approx(0.5 ** (0.5 / 4))
    assert model.emb_weight == pytest.approx(math.sqrt((1 - 0.5 ** (1 / 4)) * 16))
    assert model.proj[0].weight.shape == (32, 16) and model.proj[1].weight.shape == (32, 32)
    assert model.emb[0].weight.shape == model.head[0].weight.shape == (50, 32)


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_in_ibm_format_round_trips(tmp_path, tie):
    config = MLPSpeculatorConfig(emb_dim=16, inner_dim=24, vocab_size=50, n_predict=3, tie_weights=tie,
                                 scale_input=True, top_k_tokens_per_head=[4, 3, 2], n_candidates=5)  # fmt: skip
    model = _random(config)
    save_speculator(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "mlp_speculator"
    for key in ("n_predict", "inner_dim", "emb_dim", "vocab_size", "top_k_tokens_per_head", "n_candidates",
                "tie_weights", "scale_input"):  # fmt: skip
        assert cfg[key] == getattr(config, key)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    stages = range(1) if tie else range(3)
    expected = {f"{m}.{i}.weight" for m in ("emb", "head", "ln") for i in stages} | {f"ln.{i}.bias" for i in stages}
    expected |= {f"proj.{i}.weight" for i in (range(2) if tie else range(3))}
    assert names == expected
    back = load_speculator(tmp_path)
    for (n, p), (n2, q) in zip(model.named_parameters(), back.named_parameters()):
        assert n == n2 and torch.equal(p, q)
    h, toks = torch.randn(5, 16), torch.randint(0, 50, (5, 3))
    with torch.no_grad():
        assert torch.equal(model(h, toks), back(h, toks))


def test_reads_prefixed_and_aliased_names_and_rejects_what_does_not_fit(tmp_path):
    config = MLPSpeculatorConfig(emb_dim=8, vocab_size=20, n_predict=2, tie_weights=True)
    model = _random(config)
    (tmp_path / "config.json").write_text(
        json.dumps(config.model_dump() | {"architectures": ["MLPSpeculatorPreTrainedModel"], "torch_dtype": "float16"})
    )
    full = {f"speculator.{n}": p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    save_file(full, str(tmp_path / "model.safetensors"))
    back = load_speculator(tmp_path)
    assert torch.equal(back.emb[1].weight, model.emb[0].weight)
    save_file({"emb.0.weight": torch.zeros(20, 8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(SpeculatorLoadError, match="lacks"):
        load_speculator(tmp_path)
    save_file({**{n.removeprefix("speculator."): p for n, p in full.items()}, "emb.0.weight": torch.zeros(21, 8)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    with pytest.raises(SpeculatorLoadError, match="emb.0.weight"):
        load_speculator(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SpeculatorLoadError, match="model_type"):
        load_speculator(tmp_path)


def test_draft_vocabulary_maps_ids_both_ways(tmp_path):
    tokens = [5, 5, 5, 9, 9, 2, 2, 7, 3]
    vocab = DraftVocab.most_frequent(tokens, 3, target_vocab_size=12)
    assert vocab.ids == (5, 2, 9)  # by count, ties to the lower id
    assert vocab.other == 3 and vocab.num_rows == 4
    assert vocab.to_draft(torch.tensor([5, 2, 9, 7, 0, 11])).tolist() == [0, 1, 2, 3, 3, 3]
    assert vocab.to_target(torch.tensor([2, 0, 1])).tolist() == [9, 5, 2]
    vocab.save(tmp_path)
    assert DraftVocab.load(tmp_path) == vocab
    assert DraftVocab.most_frequent([4, 4], 10, 12).ids == (4,)
    with pytest.raises(ValueError):
        DraftVocab((3, 3), 12)
    with pytest.raises(ValueError):
        DraftVocab((12,), 12)


def test_draft_vocabulary_speculator_never_proposes_outside_it(tmp_path):
    vocab = DraftVocab((10, 20, 30, 40), target_vocab_size=64)
    config = MLPSpeculatorConfig(emb_dim=8, vocab_size=vocab.num_rows, n_predict=3)
    model = _random(config, vocab)
    with torch.no_grad():
        for i in range(2):  # a constant positive state: stage 0 never picks the reserved row, stage 1 always...
            model.ln[i].weight.fill_(0.0)
            model.ln[i].bias.fill_(1.0)
        model.head[0].weight[vocab.other] = -100.0
        model.head[1].weight[vocab.other] = 100.0
    h, toks = torch.randn(6, 8), torch.tensor([10, 20, 63, 0, 40, 30])  # unknown inputs are accepted
    chain = model.propose_chain(h, toks)
    assert chain.lengths.tolist() == [1] * 6  # ...so every chain stops after stage 0
    assert set(chain.tokens[:, 0].tolist()) <= set(vocab.ids)
    tree = model.propose_tree(h, toks, [2, 2, 2], n_candidates=8)
    assert tree.paths.shape == (6, 8, 3)
    assert set(tree.paths.flatten().tolist()) <= set(vocab.ids)
    save_speculator(model, tmp_path)
    back = load_speculator(tmp_path)
    assert back.draft_vocab == vocab
    assert torch.equal(back.propose_chain(h, toks).tokens, chain.tokens)


def test_chain_is_top1_per_stage_and_tree_ranks_paths():
    config = MLPSpeculatorConfig(emb_dim=16, vocab_size=40, n_predict=3)
    model = _random(config, seed=1)
    h, toks = torch.randn(4, 16), torch.randint(0, 40, (4,))
    chain = model.propose_chain(h, toks)
    assert chain.lengths.tolist() == [3] * 4
    # teacher-forcing the chain's own tokens reproduces it: each stage's argmax is the next token
    with torch.no_grad():
        logits = model(h, torch.cat([toks[:, None], chain.tokens[:, :2]], dim=1))
    assert torch.equal(logits.argmax(-1).T, chain.tokens)
    assert model.propose_chain(h, toks, k=2).tokens.tolist() == chain.tokens[:, :2].tolist()
    tree = model.propose_tree(h, toks, [3, 2, 2], n_candidates=12)
    assert tree.paths.shape == (4, 12, 3)
    for b in range(4):  # all 12 paths are kept, so the greedy chain is one of them
        assert chain.tokens[b].tolist() in tree.paths[b].tolist()
    assert torch.all(tree.path_log_probs[:, :-1] >= tree.path_log_probs[:, 1:])
    assert torch.allclose(tree.token_log_probs.sum(-1), tree.path_log_probs)
    with torch.no_grad():  # a path's per-stage log-probs are the stages' own on that path
        lp = torch.log_softmax(model(h, torch.cat([toks[:, None], tree.paths[:, 5, :2]], dim=1)), -1)
    got = lp.gather(-1, tree.paths[:, 5].T[..., None])[..., 0].T
    assert torch.allclose(got, tree.token_log_probs[:, 5], atol=1e-5)
    assert len({tuple(p) for p in tree.paths[0].tolist()}) == 12  # distinct paths


@pytest.mark.parametrize("tie", [False, True])
def test_int8_stages_read_a_quarter_of_the_bytes_and_draft_as_the_float_stages(tie):
    config = MLPSpeculatorConfig(emb_dim=64, inner_dim=32, vocab_size=300, n_predict=3, tie_weights=tie)
    model, int8 = _random(config, seed=3), _random(config, seed=3)
    assert _random(MLPSpeculatorConfig(emb_dim=16, vocab_size=40)).quantize_int8(load_kernels()) == 0, "no blocks"
    assert not quantize_for_drafting(_random(config), EngineConfig(weights="fp32"), "cpu")
    assert quantize_for_drafting(_random(config), EngineConfig(), "cpu")  # the default on CPU
    nbytes = int8.quantize_int8(load_kernels())
    matrices = {id(m.weight): m.weight.numel() for m in [*model.proj, *model.head]}  # tied stages counted once
    assert nbytes == sum(matrices.values()) * 34 // 32  # 34 bytes a block of 32 weights
    g = torch.Generator().manual_seed(5)
    h, toks = torch.randn(48, 64, generator=g) * 3, torch.randint(0, 300, (48, 3), generator=g)
    with torch.no_grad():  # Q8_0's rounding (1/254 of a block's largest weight) leaves ~1% error
        want, got = model(h, toks), int8(h, toks)
    assert not torch.equal(want, got), "the int8 blocks, not the float layers, computed these"
    for a, b in zip(want, got):
        assert (a - b).norm() / a.norm() < 0.02
    same = (model.propose_chain(h, toks[:, 0]).tokens == int8.propose_chain(h, toks[:, 0]).tokens).float().mean()
    assert same >= 0.9, f"{same:.0%} of drafted tokens agree"
    tree = int8.propose_tree(h, toks[:, 0], [3, 2, 1], n_candidates=4)
    assert torch.all(tree.path_log_probs[:, :-1] >= tree.path_log_probs[:, 1:])
