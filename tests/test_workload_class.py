"""The k-means workload classifier on the target's real embedding table: code and chat prompts apart."""

from __future__ import annotations

import torch

from speculator.workload_class import PromptClassifier, embedding_table, fit_kmeans, mean_embedding
from tests.conftest import humaneval_prompts

CHAT = [
    "What is the capital of France?",
    "How are you today?",
    "Tell me a joke about cats.",
    "What's a good name for a dog?",
    "Can you recommend a movie for tonight?",
    "Why is the sky blue?",
]


def chat_ids(tokenizer, question: str) -> list[int]:
    """A chat question as the engine sees it: in the model's chat template."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def test_kmeans_over_mean_embeddings_separates_code_from_chat(model_folder, tokenizer):
    table = embedding_table(model_folder)
    code = [tokenizer.encode(p) for p in humaneval_prompts(6)]
    chat = [chat_ids(tokenizer, p) for p in CHAT]
    center = table.mean(0)
    features = torch.stack([mean_embedding(table, ids, center) for ids in code + chat])
    spec, labels = fit_kmeans(features)  # k chosen by silhouette
    assert len(spec.names) == 2
    assert len(set(labels[:6])) == 1 and len(set(labels[6:])) == 1 and labels[0] != labels[6]
    assert fit_kmeans(features) == (spec, labels)  # deterministic
    clf = PromptClassifier(spec, table, tokenizer.decode)
    new_code, new_chat = tokenizer.encode(humaneval_prompts(8)[7]), chat_ids(tokenizer, "What should I cook tonight?")
    assert clf.classify(new_code) == spec.names[labels[0]]
    assert clf.classify(new_chat) == spec.names[labels[6]]
