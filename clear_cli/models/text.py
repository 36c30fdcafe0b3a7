"""The T5 text length a pipeline samples at (FLUX pads T5 to it and does not mask the padding: DESIGN.md §8)."""

from __future__ import annotations

from clear_cli.flux import TEXT_LEN


def text_len(pipe) -> int:
    """The T5 text length a pipeline's model expects (its tokenizer's model_max_length, at most 512)."""
    tok = getattr(pipe, "tokenizer_2", None)
    if tok is None and hasattr(pipe, "tokenizer_max_length"):   # Qwen-Image: one tokenizer, the pipeline's cap
        n = int(pipe.tokenizer_max_length)
        return min(n, TEXT_LEN) if n > 0 else TEXT_LEN
    n = getattr(tok, "model_max_length", TEXT_LEN) if tok is not None else TEXT_LEN
    return int(min(n, TEXT_LEN)) if n and n > 0 else TEXT_LEN
