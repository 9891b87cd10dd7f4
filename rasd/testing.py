"""Helpers for tests: tiny randomly initialised causal LMs built in code (no files, no downloads).

They are real transformers models (same modeling code, caches and attention paths as the packaged
ones), just small enough that a forward pass takes a millisecond. Use them for fast unit tests; every
feature also has at least one test on a real packaged model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TINY_ARCHITECTURES = ("llama", "qwen2", "gpt2")


def tiny_model(
    arch: str = "qwen2",
    *,
    vocab_size: int = 96,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    init_std: float = 0.2,
) -> PreTrainedModel:
    """A small random causal LM of the given architecture, in eval mode, fp32, on CPU.

    ``init_std`` is larger than the default 0.02 so that next-token distributions are peaked and
    diverse (a near-uniform random model would make greedy ties and accepted lengths meaningless).
    """
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"arch must be one of {TINY_ARCHITECTURES}, got {arch!r}")
    common = {"vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    if arch == "gpt2":
        config = GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=1024,
            initializer_range=init_std,
            **common,
        )
    else:
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        config = cls(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            initializer_range=init_std,
            tie_word_embeddings=False,
            **common,
        )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()
