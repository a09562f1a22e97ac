"""Structured output on the default model: JSON schemas, regexes and choices, with and without speculation.

Greedy with a grammar is the argmax of the masked logits, so n-gram speculation must give the same tokens as
plain decoding; sampled with a grammar, speculation must keep the target's masked distribution."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from engine.tokenization import RequestError
from sampling.grammar import GrammarState
from sampling.params import SamplingParams
from sampling.structured import StructuredOutput
from speculator.proposer import Draft, DraftRequest, Proposer
from tests.test_engine_sampling import TEMPERATURE, assert_two_token_law, target_probs

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "city": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "city", "age"],
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "express": {"type": "boolean"},
    },
    "required": ["items", "express"],
}
COLOUR = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "shade": {"type": "number"}},
    "required": ["colour", "shade"],
}
CASES = [
    (PERSON, "Alice Smith lives in Paris and is 30 years old. Give her name, city and age as JSON."),
    (ORDER, "Order: apples, pears and plums, sent express. Give the items and whether it is express as JSON."),
    (COLOUR, "The sky is blue with shade 0.5. Give the colour and its shade as JSON."),
]


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def schema_params(schema: dict, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=48, structured=StructuredOutput(kind="json_schema", spec=json.dumps(schema)), **kw)


@pytest.fixture(scope="module")
def plain(make_engine):
    return make_engine()


@pytest.fixture(scope="module")
def ngram(make_engine):
    return make_engine(speculator="ngram")


def test_json_schema_outputs_validate_and_ngram_speculation_gives_the_same_tokens(make_engine):
    prompts = [chat(text) for _, text in CASES]
    params = [schema_params(schema) for schema, _ in CASES]
    reference = make_engine().generate(prompts, params)
    engine = make_engine(speculator="ngram")
    accepted = engine.spec.accepted
    spec = engine.generate(prompts, params)
    assert engine.spec.accepted > accepted, "no draft token was accepted: speculation was not exercised"
    for (schema, _), ref, out in zip(CASES, reference, spec):
        assert out.output_token_ids == ref.output_token_ids
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_json_object_and_guided_choice_and_regex(plain):
    spec = StructuredOutput(kind="json_object")
    prompt = chat("Reply with a JSON object whose only key is name, set to Tom.")
    out = plain.generate([prompt], SamplingParams(max_tokens=32, structured=spec))[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict), out.text
    choices = ("yes", "no", "maybe so")
    spec = StructuredOutput(kind="choice", choices=choices)
    for q in ("Is the sky blue?", "Is fire cold?"):
        out = plain.generate([chat(q)], SamplingParams(max_tokens=8, structured=spec))[0]
        assert out.text in choices and out.finish_reason == "stop"
    pattern = r"[A-Z][a-z]+ is \d{1,3} years old\."
    spec = StructuredOutput(kind="regex", spec=pattern)
    sampled = [SamplingParams(max_tokens=24, temperature=1.0, seed=s, structured=spec) for s in range(3)]
    for out in plain.generate(
        [chat("How old is Bob?")] * 3, [SamplingParams(max_tokens=24, structured=spec)] + sampled
    ):
        assert re.fullmatch(pattern, out.text) and out.finish_reason == "stop", out.text


def test_each_of_n_sequences_follows_the_grammar_on_its_own(plain):
    """The n sequences fork after the prompt: each has a grammar state of its own."""
    spec = StructuredOutput(kind="regex", spec=r"(red|green|blue)( and (red|green|blue))?\.")
    params = SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=7, structured=spec)
    plain.add_request(messages=chat("Name a colour or two."), params=params, request_id="colours")
    final = [o for o in plain.run() if o.finished]
    assert sorted(o.index for o in final) == [0, 1, 2, 3]
    for out in final:
        assert re.fullmatch(spec.spec, out.text) and out.finish_reason == "stop", out.text


def test_the_grammars_end_outranks_min_tokens(plain):
    spec = StructuredOutput(kind="choice", choices=("yes", "no"))
    params = SamplingParams(max_tokens=8, min_tokens=6, structured=spec)
    out = plain.generate([chat("Is the sky blue?")], params)[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop" and out.error is None


@pytest.mark.parametrize(
    "spec, param, words",
    [
        (StructuredOutput(kind="json_schema", spec='{"type": "frobnicate"}'), "response_format", "frobnicate"),
        (StructuredOutput(kind="regex", spec="(ab"), "guided_regex", "parenthesis"),
        # compiles, but allows no first token: refused here rather than failing the request at its first step
        (StructuredOutput(kind="regex", spec=r"[^\s\S]"), "guided_regex", "no output can match it"),
    ],
)
def test_a_spec_the_engine_cannot_compile_is_refused_naming_it(plain, spec, param, words):
    with pytest.raises(RequestError, match=words) as err:
        plain.prepare("Hi", SamplingParams(max_tokens=4, structured=spec))
    assert err.value.param == param and str(err.value).startswith(param)
    assert not plain.has_unfinished()


class ForbiddenAfterOne(Proposer):
    """Drafts the reference's next token, then a token the grammar forbids, then the reference again."""

    def __init__(self, reference: list[int], forbidden: int):
        self.reference, self.forbidden = reference, forbidden

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for r in requests:
            i = len(r.token_ids)
            tokens = self.reference[i : i + 1] + [self.forbidden] + self.reference[i + 1 : i + 3]
            drafts.append(Draft(tokens[: r.k]))
        return drafts


def test_grammar_masks_rows_along_the_draft_and_cuts_it_at_a_forbidden_token(plain, tokenizer):
    spec = StructuredOutput(kind="choice", choices=("yes", "no"))
    grammar = GrammarState(plain.grammars.compile(spec), plain.arch.vocab_size)
    yes, bad = tokenizer.encode("yes"), tokenizer.encode("{")
    assert grammar.allowed_prefix(yes + bad + yes) == (len(yes), True)
    masked = grammar.mask(torch.zeros(len(yes) + 2, plain.arch.vocab_size), yes + bad)
    assert bool(torch.isfinite(masked[0, yes[0]])) and not bool(torch.isfinite(masked[0, bad[0]]))
    after_yes = set(torch.isfinite(masked[len(yes)]).nonzero().flatten().tolist())
    assert after_yes == set(plain.eos_token_ids)  # the grammar is complete: only its end is allowed
    assert grammar.allowed_prefix(yes) == (len(yes), False) and not grammar.terminated  # rolled back both times


def test_greedy_with_a_grammar_is_lossless_under_drafts_it_forbids(make_engine, tokenizer):
    params = schema_params(PERSON)
    prompt = chat(CASES[0][1])
    engine = make_engine()
    ref = engine.generate([prompt], params)[0]
    reference = ref.prompt_token_ids + ref.output_token_ids
    engine.proposer = ForbiddenAfterOne(reference, tokenizer.encode("<")[0])
    try:
        before = engine.spec.accepted, engine.spec.drafted
        out = engine.generate([prompt], params)[0]
        accepted, drafted = engine.spec.accepted - before[0], engine.spec.drafted - before[1]
    finally:
        engine.proposer = None
    assert out.output_token_ids == ref.output_token_ids
    assert accepted > 0, "no draft token was accepted"
    assert drafted <= accepted + 2, "forbidden draft tokens reached verification"


@pytest.mark.slow
def test_sampling_with_a_grammar_keeps_the_masked_target_distribution_under_draft_speculation(
    make_engine, hf_model, tokenizer
):
    """Joint law of the first two tokens under a lowercase-only regex; the draft model's q is not masked, so
    it often drafts tokens the grammar forbids, which end the draft (rejected there with the residual)."""
    text = tokenizer.apply_chat_template(chat("Name one fruit."), add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = 600
    engine = make_engine(speculator="draft", num_speculative_tokens=2, draft_num_layers=8, max_num_seqs=128)
    spec = StructuredOutput(kind="regex", spec="[a-z ]+")
    params = [SamplingParams(max_tokens=3, temperature=TEMPERATURE, seed=i, structured=spec) for i in range(n)]
    drafted = engine.spec.drafted
    outs = engine.generate([prompt] * n, params)
    assert engine.spec.drafted - drafted >= n // 2, "too few verification steps saw a draft"
    compiled = engine.grammars.compile(spec)

    def masked(context_output: list[int], p: torch.Tensor) -> torch.Tensor:
        allowed = torch.isfinite(GrammarState(compiled, p.shape[-1], context_output).mask(torch.zeros(1, p.shape[-1])))
        q = p * allowed[0]
        return q / q.sum()

    free = target_probs(hf_model, [prompt])[0]
    p1 = masked([], free)
    assert float(free[torch.topk(free, 3).indices].sum() - p1[torch.topk(free, 3).indices].sum()) > 0.1, (
        "the grammar hardly changes the distribution: not a useful test"
    )

    def second(firsts: list[int]) -> torch.Tensor:
        p2 = target_probs(hf_model, [prompt + [t] for t in firsts])
        return torch.stack([masked([t], p2[i]) for i, t in enumerate(firsts)])

    assert_two_token_law(outs, p1, second, 4, "samples under a grammar")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_grammar_that_allows_no_next_token_ends_its_request_alone_naming_the_field(ngram, temperature):
    """`ab` matches, then nothing can: the request ends with what matched and an error naming its own field
    (`error_param`: refused, not an engine failure); the request beside it is untouched."""
    spec = StructuredOutput(kind="regex", spec=r"ab[^\s\S]")
    params = [SamplingParams(max_tokens=8, temperature=temperature, structured=spec), SamplingParams(max_tokens=8)]
    bad, other = ngram.generate(["Say:", "def f():"], params)
    assert bad.text == "ab" and bad.finish_reason == "error" and bad.error_param == "guided_regex"
    assert bad.error.startswith("guided_regex: no output can continue to match it")
    alone = ngram.generate(["def f():"], SamplingParams(max_tokens=8))[0]
    assert other.error is None and other.output_token_ids == alone.output_token_ids


class Fixed(Proposer):
    """Drafts the same tokens every step, as a point mass or with `probs` (a sampled draft)."""

    def __init__(self, tokens: list[int], vocab_size: int, sampled: bool):
        self.tokens, self.vocab_size, self.sampled = tokens, vocab_size, sampled

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        probs = None
        if self.sampled:
            probs = torch.zeros(len(self.tokens), self.vocab_size)
            probs[range(len(self.tokens)), self.tokens] = 1.0
        return [Draft(self.tokens[: r.k], probs if probs is None else probs[: r.k]) for r in requests]


def test_a_draft_ends_before_the_token_that_leads_the_grammar_where_nothing_is_allowed(plain, tokenizer):
    spec = StructuredOutput(kind="regex", spec=r"ab[^\s\S]")
    grammar = GrammarState(plain.grammars.compile(spec), plain.arch.vocab_size)
    ab = tokenizer.encode("ab")
    assert grammar.allowed_prefix(ab + ab) == (len(ab) - 1, False)
    assert grammar.allowed_prefix(ab[:-1]) == (len(ab) - 1, False) and not grammar.terminated


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_draft_into_a_grammar_dead_end_is_refused_like_plain_decoding(ngram, tokenizer, temperature):
    """The drafter proposes exactly the tokens after which the grammar allows nothing: the request still ends
    refused naming its field, with the tokens plain decoding gives, and the request beside it is untouched."""
    spec = StructuredOutput(kind="regex", spec=r"ab[^\s\S]")
    params = [SamplingParams(max_tokens=8, temperature=temperature, structured=spec), SamplingParams(max_tokens=8)]
    saved = ngram.proposer
    ngram.proposer = Fixed(tokenizer.encode("ab") * 2, ngram.arch.vocab_size, sampled=temperature > 0)
    try:
        bad, other = ngram.generate(["Say:", "def f():"], params)
    finally:
        ngram.proposer = saved
    assert bad.text == "ab" and bad.finish_reason == "error" and bad.error_param == "guided_regex"
    alone = ngram.generate(["def f():"], SamplingParams(max_tokens=8))[0]
    assert other.error is None and other.output_token_ids == alone.output_token_ids
