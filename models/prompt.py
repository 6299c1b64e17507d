"""The fixed restoration prompt, embedded once and cached (the text encoder never enters training).

For FLUX.2 klein the embedding is Qwen3's hidden states of layers (9, 18, 27), stacked on the feature
axis, for the chat-templated prompt padded to 512 tokens: (1, 512, 7680). `encode_with_qwen` computes
it from a local Qwen3 folder; `synthetic_prompt` gives the tiny backbone a fixed stand-in (a seeded
Gaussian with the right shape) since the embedded default has no text encoder. Both are cached as
safetensors {"prompt", "empty"} by `save_prompt_cache`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from models.safetensors_io import save_file

RESTORATION_PROMPT = "A high-quality, sharp, natural photo of a person's face."
QWEN_LAYERS = (9, 18, 27)


def synthetic_prompt(length: int, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt": torch.randn(1, length, dim, generator=g, device=g.device),
        "empty": torch.zeros(1, length, dim),
    }


@torch.no_grad()
def encode_with_qwen(
    path: str | Path, prompt: str = RESTORATION_PROMPT, max_length: int = 512
) -> dict[str, torch.Tensor]:
    """Embed the prompt and the empty prompt with a local Qwen3 (AutoModel + AutoTokenizer, offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).exists():
        raise FileNotFoundError(f"text encoder {path} not found (a local Qwen3 folder)")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    out = {}
    for name, text in (("prompt", prompt), ("empty", "")):
        chat = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(chat, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
        hs = model(**ids, output_hidden_states=True).hidden_states
        out[name] = torch.cat([hs[i] for i in QWEN_LAYERS], dim=-1).float()  # (1, L, 3·hidden)
    return out


def save_prompt_cache(path: str | Path, emb: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in emb.items()}, str(path))


def load_prompt_cache(path: str | Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompt cache {path} not found")
    return load_file(str(path))
