"""The model: GPT-2 presets on `transformers.GPT2LMHeadModel`, the language-model loss, optimizer groups."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.config import PipelineError

# (layers, width, heads, context). gpt2* are OpenAI's four GPT-2 sizes; tiny is for CPU runs and tests.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (6, 192, 6, 256),
    "gpt2": (12, 768, 12, 1024),
    "gpt2-medium": (24, 1024, 16, 1024),
    "gpt2-large": (36, 1280, 20, 1024),
    "gpt2-xl": (48, 1600, 25, 1024),
}


def preset_context(preset: str) -> int:
    return _preset(preset)[3]


def _preset(preset: str) -> tuple[int, int, int, int]:
    if preset not in PRESETS:
        raise PipelineError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[preset]


def model_config(preset: str, vocab_size: int, eot_id: int, dropout: float = 0.0) -> Any:
    from transformers import GPT2Config

    n_layer, n_embd, n_head, n_positions = _preset(preset)
    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=eot_id, eos_token_id=eot_id, use_cache=False,
    )


def build_model(preset: str, vocab_size: int, eot_id: int, dropout: float = 0.0) -> torch.nn.Module:
    """A freshly initialised GPT-2 (call torch.manual_seed first for a reproducible init)."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(model_config(preset, vocab_size, eot_id, dropout))


def lm_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets are the inputs shifted by one, prepared by the data loader."""
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights) only, never on biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
