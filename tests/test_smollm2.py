"""The embedded default: GGUF conversion, and parity with transformers on the real model."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hybrid_sd import factory
from hybrid_sd.config import EngineConfig
from hybrid_sd.engine import Engine
from hybrid_sd.models import embedded
from hybrid_sd.models.loading import encode_prompt, load_target

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis to a ten-year-old.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
    "Give me a JSON object with keys name and age for a person called Ana who is 31.",
    "Write a haiku about autumn.",
    "Who wrote Romeo and Juliet?",
    "How do I sort a list in Python?",
    "What causes rain?",
    "Name the planets of the solar system.",
    "Summarize the plot of Cinderella in one sentence.",
    "What is the boiling point of water in Fahrenheit?",
    "Write a SQL query that selects all users older than 30.",
    "Why is the sky blue?",
    "Give two tips for better sleep.",
    "What is a linked list?",
    "Convert 5 kilometers to miles.",
    "Hi!",
    "Write a bash command that counts lines in a file.",
    "What is the difference between a list and a tuple?",
]


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, eos = load_target(None, max_len=1024)
    return model, tokenizer, eos


def test_conversion_is_cached_and_complete():
    out = embedded.default_target_dir()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    out = tmp_path / "converted"
    with pytest.raises(KeyboardInterrupt):
        embedded.convert_gguf(embedded.gguf_path(), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_logits_equal_transformers(smollm2):
    model, tokenizer, _ = smollm2
    hf = AutoModelForCausalLM.from_pretrained(embedded.default_target_dir(), dtype=torch.float32).eval()
    ids = torch.tensor([encode_prompt(tokenizer, PROMPTS[1])])
    ref = hf(ids).logits
    hidden, _ = model(ids, torch.arange(ids.shape[1]))
    torch.testing.assert_close(model.logits(hidden), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("part", [slice(0, 8), pytest.param(slice(8, None), marks=pytest.mark.slow)])
def test_greedy_equals_transformers_generate(smollm2, part):
    """Plain decoding through the packed compact target = transformers' generate, token for
    token (8 prompts by default, the rest in the slow suite)."""
    model, tokenizer, eos = smollm2
    hf = AutoModelForCausalLM.from_pretrained(embedded.default_target_dir(), dtype=torch.float32).eval()
    packed, _, _ = factory.load_packed_target(None, max_len=1024, load_tokenizer=False)
    engine = Engine(packed, eos, config=EngineConfig(1024))
    for text in PROMPTS[part]:
        ids = encode_prompt(tokenizer, text)
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        got = engine.generate(ids, 24).token_ids
        assert got == expected, f"prompt {text!r}: diverged at {next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b) if got[:len(expected)] != expected[:len(got)] else min(len(got), len(expected))}: expected {expected}, got {got}"
