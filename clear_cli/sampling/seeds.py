"""The one seed rule for drawing a list of prompts: prompt i is drawn with a CPU generator seeded `seed + i`.

One generator per image, on the CPU: an image's noise depends on its seed only, on any device and in any batch,
so a cache of eval images, a check and a distillation's validation images stay comparable run to run. (The synth
job derives its seeds by hashing (seed, index) instead, so that neighbouring datasets never share one.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def prompt_seed(seed: int, index: int) -> int:
    """The seed prompt `index` is drawn with."""
    return int(seed) + int(index)


def generators(seed: int, indices: Sequence[int]) -> list:
    """One CPU generator per index, seeded `seed + i`."""
    import torch

    return [torch.Generator("cpu").manual_seed(prompt_seed(seed, i)) for i in indices]


def draw(pipe, indices: Sequence[int], seed: int, *, prompts: Sequence[str] | None = None,
         embeds: tuple[Any, Any] | None = None, **call: Any) -> Any:
    """One pipeline call for the prompts (or rows of `embeds` = (T5, pooled), Qwen-Image: (embeddings, mask)) at
    `indices`, each with its own
    generator seeded `seed + i`; returns the call's `.images`. `call`: the rest of the pipeline's arguments.
    """
    indices = list(indices)
    gens = generators(seed, indices)
    if embeds is not None:
        t5, pooled = embeds
        if not pooled.is_floating_point():   # Qwen-Image: (prompt embeddings, their [B, T] padding mask)
            call.update(prompt_embeds=t5[indices], prompt_embeds_mask=pooled[indices],
                        max_sequence_length=t5.shape[1])
        else:
            call.update(prompt_embeds=t5[indices], pooled_prompt_embeds=pooled[indices],
                        max_sequence_length=t5.shape[1])
    elif prompts is not None:
        batch = [prompts[i] for i in indices]
        call["prompt"] = batch[0] if len(batch) == 1 else batch
    else:
        raise ValueError("draw() needs prompts or embeds")
    return pipe(generator=gens[0] if len(gens) == 1 else gens, **call).images
