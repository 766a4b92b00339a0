"""A tiny random-weight llama GGUF, written with the ``gguf`` package, for tests and the demo.

Two layers of 64 dimensions and a character-level SentencePiece-style vocabulary (356 tokens: the
control tokens, 256 byte-fallback tokens, ``▁`` and printable ASCII) with a ChatML-style chat
template in its metadata: about 0.5 MB, it loads in milliseconds and generates thousands of tokens a
second, and greedy decoding is deterministic for a given seed. It says nothing sensible.

The output rows of the control and byte tokens are zero while every other row is random with a
large scale, so greedy decoding never ends a reply early (no end-of-sequence) and only ever emits
printable characters: a reply always runs to ``max_tokens``, which tests rely on.

``write_tiny_llama_gguf``'s ``n_embd``, ``n_layer`` and ``n_ff`` write a wider or deeper model of the
same kind (the same vocabulary, template and never-ending greedy replies); ``bench/inference.py
--model tiny-wide`` (256 dimensions, 4 layers) is one whose llama.cpp decode takes most of a token.
"""

from __future__ import annotations

import math
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONTROL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX_TRAIN = 4096


def tiny_vocabulary() -> list[str]:
    """Control tokens, ``<0x00>``..``<0xFF>``, then ``▁`` and the printable ASCII characters."""
    return [*CONTROL_TOKENS, *(f"<0x{b:02X}>" for b in range(256)), "▁", *(chr(c) for c in range(33, 127))]


def write_tiny_llama_gguf(
    path: Path,
    seed: int = 0,
    chat_template: str = CHAT_TEMPLATE,
    *,
    n_embd: int = N_EMBD,
    n_layer: int = N_LAYER,
    n_ff: int = N_FF,
) -> Path:
    """Write the tiny model to ``path`` (same bytes for the same seed, template and sizes) and return ``path``.

    ``n_embd`` (a multiple of the 4 heads' 2 x 4 rotary pairs: of 8), ``n_layer`` and ``n_ff`` make a wider
    or deeper model with the same vocabulary and template, e.g. a stand-in whose llama.cpp decode takes
    most of a token as a GPU engine's does (``bench/inference.py --tiny-width``). The weights' scale
    follows the fan-in (the default's 0.2 at 64 inputs), so activations keep the default's size; the
    defaults write the same bytes as before the sizes were arguments."""
    import gguf
    import numpy as np

    if n_embd < 8 or n_embd % 8 or n_layer < 1 or n_ff < 1:
        raise ValueError("n_embd must be a positive multiple of 8, n_layer and n_ff positive")
    default_sizes = (n_embd, n_layer, n_ff) == (N_EMBD, N_LAYER, N_FF)

    rng = np.random.default_rng(seed)
    tokens = tiny_vocabulary()
    n_vocab = len(tokens)
    n_special = len(CONTROL_TOKENS) + 256
    types = (
        [gguf.TokenType.UNKNOWN]
        + [gguf.TokenType.CONTROL] * (len(CONTROL_TOKENS) - 1)
        + [gguf.TokenType.BYTE] * 256
        + [gguf.TokenType.NORMAL] * (n_vocab - n_special)
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"clawnode-tiny-{seed}" if default_sizes else f"clawnode-tiny-{n_embd}x{n_layer}-{seed}")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(n_embd // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types([int(t) for t in types])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)

    def normal(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # 0.2 at the default's 64 inputs (sqrt(64 / 64) is exactly 1.0: the default's bytes are unchanged).
    hidden_scale = 0.2 * math.sqrt(N_EMBD / n_embd)
    ff_scale = 0.2 * math.sqrt(N_FF / n_ff)

    # numpy shapes are ggml's ne reversed: token_embd is (n_vocab, n_embd) here, ne = [n_embd, n_vocab].
    writer.add_tensor("token_embd.weight", normal(n_vocab, n_embd, scale=1.0))
    for layer in range(n_layer):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}.{name}.weight", normal(n_embd, n_embd, scale=hidden_scale))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", normal(n_ff, n_embd, scale=hidden_scale))
        writer.add_tensor(f"{prefix}.ffn_up.weight", normal(n_ff, n_embd, scale=hidden_scale))
        writer.add_tensor(f"{prefix}.ffn_down.weight", normal(n_embd, n_ff, scale=ff_scale))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    output = normal(n_vocab, n_embd, scale=1.0)
    output[:n_special] = 0.0  # never chosen greedily: no early end, no stray bytes
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
