"""Tiny models for tests and GPU smoke runs: a random Llama and an offline byte-level BPE tokenizer.

Its own module (not conftest.py) so tests and bench scripts can import it by a unique name.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VOCAB = 512

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Anarchism is a political philosophy and movement that is sceptical of authority.",
    "Autism is a neurodevelopmental disorder characterized by difficulties with social interaction.",
    "Albedo is the measure of the diffuse reflection of solar radiation out of the total radiation.",
    "A is the first letter and the first vowel of the Latin alphabet.",
    "Alabama is a state in the southeastern region of the United States of America.",
    "Achilles was a hero of the Trojan War and the central character of Homer's Iliad.",
    "Abraham Lincoln was the 16th president of the United States from 1861 until 1865.",
    "Aristotle was a Greek philosopher and polymath during the Classical period in Ancient Greece.",
    "An American in Paris is a jazz-influenced orchestral piece by composer George Gershwin.",
    "The numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear in dates, counts and measurements.",
]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences: encodes any text, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def build_tiny_model(vocab_size: int, seed: int = 0):
    """A 2-layer random Llama: hidden 64, intermediate 128, 4 heads (2 KV heads), tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def stage_context(tmp_path: Path, model_dir: Path, base_dir: Path, text: Path):
    """A StageContext on the CPU with `model` and `base_model` inputs and one local text for both splits."""
    from pipelines.recipe import DataSpec
    from pipelines.stage import StageContext

    return StageContext(workdir=tmp_path / "w", inputs={"model": model_dir, "base_model": base_dir},
                        data=DataSpec(calibration=str(text), evaluation=str(text)), cache_dir=tmp_path / "cache")
