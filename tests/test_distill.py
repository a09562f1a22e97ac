"""Distillation: training samples, the training core on a synthetic target, the teacher-forced hidden states,
and `specserve distill` end to end on real HumanEval prompts."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from cli.main import main
from cli.prompts import humaneval_to_jsonl
from speculator.distill import (
    DistillOptions,
    DistillRecord,
    _samples,
    _train,
    distill,
    expected_tokens_per_step,
    split_by_prompt,
)
from speculator.distill_data import teacher_forced_records
from speculator.distill_labels import chain_labels
from speculator.mlp_checkpoint import load_speculator
from tests.conftest import HUMANEVAL


def test_samples_pair_the_hidden_state_at_t_with_tokens_t_plus_1_on():
    hidden = torch.arange(5.0)[:, None].repeat(1, 4)  # row j = position 3 + j
    s = _samples([DistillRecord([10, 11, 12, 13, 14, 15, 16, 17], hidden, 3)], n=3)
    # positions 3..5 have a label (t + 2 <= 7); position 3 reads 14 and learns 15, 16, 17
    assert s.hidden[:, 0].tolist() == [0.0, 1.0, 2.0]
    assert s.inputs.tolist() == [[14, 15, 16], [15, 16, 17], [16, 17, -1]]
    assert s.labels.tolist() == [[15, 16, 17], [16, 17, -1], [17, -1, -1]]


def test_labels_are_the_targets_greedy_choices_while_the_inputs_stay_on_its_greedy_path():
    """A sampled record: the target's argmax after positions 3..7 is 14, 99, 16, 77, 88 (it would not have
    chosen 15 or 17). Stage i learns the argmax after t+1+i, only while the tokens stages 1..i read (t+2..t+1+i)
    are the argmaxes the stages before them learnt."""
    tokens, greedy = [10, 11, 12, 13, 14, 15, 16, 17], torch.tensor([14, 99, 16, 77, 88])
    assert chain_labels(tokens, 3, 5, 3, greedy).tolist() == [
        [99, -1, -1],  # position 3: stage 0 learns 99; stage 1 would read 15, which the target would not emit
        [16, 77, -1],  # position 4: reads 15, learns 16; stage 1 reads 16 (= 16) and learns 77; stage 2 reads 17
        [77, -1, -1],
        [88, -1, -1],  # position 6 reads 17, the last token: the argmax after it is still a label
        [-1, -1, -1],  # position 7: no token after it to read
    ]
    # without argmaxes the labels are the record's tokens
    assert chain_labels(tokens, 3, 5, 3).tolist() == [[15, 16, 17], [16, 17, -1], [17, -1, -1]] + [[-1] * 3] * 2
    s = _samples([DistillRecord(tokens, torch.zeros(5, 4), 3, greedy_next=greedy)], n=3)
    assert s.labels.tolist() == chain_labels(tokens, 3, 4, 3, greedy).tolist()  # position 7: nothing to read


def test_expected_tokens_per_step_is_one_plus_cumulative_products():
    assert expected_tokens_per_step([0.5, 0.5, 1.0]) == pytest.approx(1 + 0.5 + 0.25 + 0.25)


def test_distill_learns_a_synthetic_target():
    """A target whose hidden state at t encodes token t+2: stage 0 must learn to read it, stage 1 to chain on."""
    torch.manual_seed(0)
    vocab, d = 40, 32
    code = torch.randn(vocab, d)
    records = []
    for _ in range(60):
        tokens = torch.randint(0, 20, (40,)).tolist()  # 20 of 40 ids used: the draft vocabulary finds them
        hidden = torch.stack([code[tokens[t + 2]] if t + 2 < 40 else torch.zeros(d) for t in range(40)])
        records.append(DistillRecord(tokens, hidden, 0))
    opts = DistillOptions(n_predict=2, draft_vocab=30, epochs=20, batch_size=64, lr=3e-3, tie_weights=False)
    result = distill(records, target_vocab_size=vocab, options=opts, progress=False)
    m = result.metrics
    assert m.accuracy_by_position[0] > 0.95
    assert m.unigram_accuracy_by_position[0] < 0.2
    assert set(result.model.draft_vocab.ids) == set(range(20))
    assert m.chain_acceptance_by_position[1] <= m.accuracy_by_position[0]
    assert m.heldout_samples == 6 * 38 and m.train_samples == 54 * 38
    kept = m.history[m.best_epoch - 1]
    assert kept["expected_tokens_per_step"] == max(h["expected_tokens_per_step"] for h in m.history)
    assert m.accuracy_by_position == kept["accuracy_by_position"]
    with pytest.raises(ValueError, match="needs the target"):
        distill(records, "eagle", target_vocab_size=vocab)


def test_training_keeps_the_weights_of_the_epoch_that_drafted_best_held_out():
    """Held-out expected tokens of 1.2, 1.9, 1.5 after epochs 1-3: the second epoch's weights are the ones kept."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 1), torch.randn(8, 4)
    scores, seen = iter([1.2, 1.9, 1.5]), []

    def evaluate() -> dict:
        seen.append(model.weight.detach().clone())
        return {"expected_tokens_per_step": next(scores), "accuracy_by_position": [0.0]}

    plan = [[0, 1]] * 3  # three epochs of two steps each
    trained = _train(model, plan, lambda _: (model(x) ** 2).mean(), evaluate, DistillOptions(), "mlp", False)
    assert len(trained.history) == 3 and trained.best == 1 and not torch.equal(seen[1], seen[2])
    assert torch.equal(model.weight, seen[1])


def test_teacher_forced_batches_equal_one_sequence_at_a_time(make_engine):
    engine = make_engine(max_model_len=256, kv_cache_gib=0.05)
    seqs = [(list(engine.prepare(f"def f{i}(x):\n    return x * {i}\n").prompt_token_ids), 5) for i in range(5)]
    batched = teacher_forced_records(engine.runner, seqs, max_batch_tokens=40)
    alone = [teacher_forced_records(engine.runner, [s])[0] for s in seqs]
    engine.reset_kv()
    for b, a, (tokens, first) in zip(batched, alone, seqs):
        assert b.hidden_start == first - 1 and b.hidden.shape == (len(tokens) - first + 1, engine.arch.hidden_size)
        assert not b.hidden.is_inference()
        assert torch.allclose(b.hidden, a.hidden, atol=1e-4)
        assert torch.equal(b.greedy_next, a.greedy_next) and b.greedy_next.shape == (len(tokens) - first + 1,)
        logits = engine.runner.model.logits(b.hidden)
        assert torch.equal(b.greedy_next, logits.argmax(-1))  # the target's argmax after each position


@pytest.mark.slow
def test_distill_command_beats_a_unigram_predictor(tmp_path, capsys):
    prompts = tmp_path / "humaneval.jsonl"
    humaneval_to_jsonl(HUMANEVAL, prompts)
    out = tmp_path / "drafter"
    argv = ["distill", "--prompts", str(prompts), "--limit", "40", "--max-tokens", "32", "--out", str(out)]
    assert main(argv + ["--epochs", "6"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_prompts"] == 40
    report = json.loads((out / "report.json").read_text())
    assert report["prompts_sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    assert report["generated_tokens"] <= 40 * 32 and report["heldout_samples"] > 50
    acc, uni = report["accuracy_by_position"], report["unigram_accuracy_by_position"]
    assert len(acc) == 3 and all(a > u for a, u in zip(acc, uni)), (acc, uni)
    assert report["expected_tokens_per_step"] == pytest.approx(expected_tokens_per_step(acc))
    assert 0 < report["cost"]["proposal_per_target_step"] < 1
    drafter = load_speculator(out)
    assert drafter.draft_vocab is not None and len(drafter.draft_vocab.ids) == report["draft_vocab_size"] <= 8192
    assert json.loads((out / "config.json").read_text())["model_type"] == "mlp_speculator"


def test_a_prompts_outputs_are_held_out_together_and_sampled_ones_never_count():
    """Greedy and sampled outputs of one prompt share most of their text: split by prompt, or the held-out
    accuracy would be measured on text the drafter trained on."""
    records = [
        DistillRecord([1, 2, 3, 4], torch.zeros(3, 4), 0, prompt=p, sampled=j > 0) for p in range(30) for j in range(3)
    ]
    train, held = split_by_prompt(records, 10)
    held_prompts, train_prompts = {r.prompt for r in held}, {r.prompt for r in train}
    assert len(held_prompts) == 3 and not held_prompts & train_prompts
    assert len(held) == 3 and not any(r.sampled for r in held)
    assert len(train) == 27 * 3
    alone = [DistillRecord([1, 2, 3, 4], torch.zeros(3, 4), 0) for _ in range(2)]  # no prompt: one each
    assert [len(side) for side in split_by_prompt(alone, 10)] == [1, 1]
    with pytest.raises(ValueError):
        split_by_prompt(records[:3], 10)  # one prompt: nothing to hold out
