"""The model: GPT-2 presets on `transformers.GPT2LMHeadModel`, the language-model loss, optimizer groups."""

from __future__ import annotations

from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from pipeline.families import Shape, shape_of
from pipeline.stage import PipelineError

GPT2_VOCAB_SIZE = 50257  # OpenAI's GPT-2 BPE, <|endoftext|> last
# The output layer and the loss run over this many positions at a time: the fp32 logits of a whole GPT-2 batch
# (1.6 GB for 8 x 1024 tokens) would not fit beside the model on a small card.
LOSS_CHUNK_TOKENS = 2048

# (layers, width, heads, context). gpt2* are OpenAI's four GPT-2 sizes; tiny is for CPU runs and tests.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (6, 192, 6, 256),
    "gpt2": (12, 768, 12, 1024),
    "gpt2-medium": (24, 1024, 16, 1024),
    "gpt2-large": (36, 1280, 20, 1024),
    "gpt2-xl": (48, 1600, 25, 1024),
}


def preset_context(preset: str) -> int:
    return preset_shape(preset)[3]


def preset_shape(preset: str) -> tuple[int, int, int, int]:
    """(layers, width, heads, context) of a preset."""
    if preset not in PRESETS:
        raise PipelineError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[preset]


# GPT-2's own tanh-approximated GELU is `gelu_new`, a chain of Python-level elementwise ops; PyTorch's
# gelu(approximate="tanh") is the same function in one fused kernel.
FUSED_GELU, GPT2_GELU = "gelu_pytorch_tanh", "gelu_new"


def model_config(preset: str, vocab_size: int, eot_id: int, dropout: float = 0.0, activation: str = FUSED_GELU) -> Any:
    from transformers import GPT2Config

    n_layer, n_embd, n_head, n_positions = preset_shape(preset)
    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, activation_function=activation,
        bos_token_id=eot_id, eos_token_id=eot_id, use_cache=False,
    )


def build_model(preset: str, vocab_size: int, eot_id: int, dropout: float = 0.0, activation: str = FUSED_GELU,
                device: torch.device | str | None = None) -> torch.nn.Module:
    """A freshly initialised GPT-2 on `device` (default: the current default device; under
    `with torch.device("meta")` only the shapes). Call torch.manual_seed first for a reproducible init.

    The modules are made on the meta device and their weights drawn once, by GPT-2's own initialisation, where
    they will live: constructed the ordinary way each weight is drawn twice (PyTorch's default init, then
    GPT-2's), which for GPT-2 XL on a CPU takes 18 s instead of 13 (measured on the 2-core development machine);
    on a GPU it is a fraction of a second."""
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(model_config(preset, vocab_size, eot_id, dropout, activation))
    target = torch.device(device) if device is not None else torch.get_default_device()
    if target.type != "meta":
        model.to_empty(device=target)
        model.init_weights()
    return model


# What selective activation checkpointing keeps from the forward pass: the outputs of the matmuls and of
# attention, which cost the FLOPs; LayerNorm, GELU, dropout and the residual adds are recomputed.
KEPT_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._scaled_dot_product_efficient_attention.default,
            torch.ops.aten._scaled_dot_product_cudnn_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}


def _keep_matmuls(context: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def enable_activation_checkpointing(model: Any, every_n_layers: int, selective: bool = False,
                                    offload: bool = False) -> None:
    """Recompute the activations of every k-th transformer block in the backward pass; `selective` keeps the
    matmul and attention outputs of those blocks and recomputes only the cheap elementwise ops."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if selective:
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_matmuls)
    model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)


def lm_loss(model: Any, inputs: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy of a GPT2LMHeadModel; targets are the inputs shifted by one.

    With `chunk_tokens`, the output layer and the loss run over that many positions at a time and each chunk's
    logits are recomputed in the backward pass, so the fp32 `tokens x vocabulary` logits (1.6 GB for 8 x 1024
    tokens of GPT-2) never exist at once: the peak is one chunk's.
    """
    if not chunk_tokens:
        logits = model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
    hidden = model.transformer(input_ids=inputs, use_cache=False).last_hidden_state
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for hidden_chunk, target_chunk in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), strict=True):
        if torch.is_grad_enabled():
            total = total + checkpoint(_summed_loss, model.lm_head, hidden_chunk, target_chunk, use_reentrant=False)
        else:
            total = total + _summed_loss(model.lm_head, hidden_chunk, target_chunk)
    return total / targets.numel()


def _summed_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


class TrainingModel(torch.nn.Module):
    """The GPT-2 model and its loss in one module, so that `engine(inputs, targets)` returns the loss and
    DeepSpeed sees (and partitions, and hooks) everything the step computes."""

    def __init__(self, lm: torch.nn.Module, loss_chunk_tokens: int = 0) -> None:
        super().__init__()
        self.lm = lm
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(self.lm, inputs, targets, self.loss_chunk_tokens)


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token, as PaLM's appendix, nanoGPT and llm.c count them: 6 per parameter (forward and
    backward; position embeddings excluded, the tied output layer included) plus 12 x layers x width x T for
    attention. Activation recomputation is not counted: this is model FLOPs, the basis of MFU."""
    config = model.config
    params = sum(p.numel() for p in model.parameters()) - config.n_positions * config.n_embd
    return training_flops_per_token(params, config.n_layer, config.n_embd, seq_len)


def training_flops_per_token(params: float, n_layer: int, n_embd: int, seq_len: int) -> float:
    """6 FLOPs per parameter (2 forward, 4 backward) plus attention's 12 x layers x width x T."""
    return 6 * params + 12 * n_layer * n_embd * seq_len


@cache  # a meta build of GPT-2 XL takes seconds; plan and preflight ask for it once per config
def preset_model_shape(preset: str, vocab_size: int = GPT2_VOCAB_SIZE) -> Shape:
    """A preset's shape, its parameters counted on the meta device."""
    return shape_of(model_config(preset, vocab_size, vocab_size - 1))


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights) only, never on biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
