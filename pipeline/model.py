"""The model: a transformers causal LM of one of the families (pipeline/families.py) built from a preset or a
config, the language-model loss through its own output layer, optimizer groups."""

from __future__ import annotations

from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from pipeline.families import Shape, config_from, context_of, decoder_layers, for_training, shape_of
from pipeline.stage import PipelineError

GPT2_VOCAB_SIZE = 50257  # OpenAI's GPT-2 BPE, <|endoftext|> last
# The output layer and the loss run over this many positions at a time: the fp32 logits of a whole GPT-2 batch
# (1.6 GB for 8 x 1024 tokens) would not fit beside the model on a small card.
LOSS_CHUNK_TOKENS = 2048
# The default sequence length is the model's context up to this: GPT-2's 1024 as it is, not Llama 3.2's 131,072.
MAX_DEFAULT_SEQ_LEN = 2048


def _gpt2(layers: int, width: int, heads: int, context: int) -> dict[str, Any]:
    return {"model_type": "gpt2", "n_layer": layers, "n_embd": width, "n_head": heads, "n_positions": context}


def _llama(layers: int, width: int, heads: int, kv_heads: int, intermediate: int, context: int,
           rope_theta: float) -> dict[str, Any]:
    return {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "max_position_embeddings": context,
            "rope_theta": rope_theta, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


# A preset is a config's shape; the vocabulary is the tokenizer's. gpt2* are OpenAI's four GPT-2 sizes, tiny is
# GPT-2 for CPU runs and tests; llama-1.7b is SmolLM2-1.7B's Llama shape (its published config.json), llama-tiny
# a Llama with grouped-query attention for the CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _gpt2(6, 192, 6, 256),
    "gpt2": _gpt2(12, 768, 12, 1024),
    "gpt2-medium": _gpt2(24, 1024, 16, 1024),
    "gpt2-large": _gpt2(36, 1280, 20, 1024),
    "gpt2-xl": _gpt2(48, 1600, 25, 1024),
    "llama-tiny": _llama(6, 192, 6, 2, 512, 256, 10000.0),
    "llama-1.7b": _llama(24, 2048, 32, 32, 8192, 8192, 130000.0),
}


def preset_values(preset: str) -> dict[str, Any]:
    """The config values of a preset."""
    if preset not in PRESETS:
        raise PipelineError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[preset]


def default_seq_len(config: Any) -> int:
    return min(context_of(config), MAX_DEFAULT_SEQ_LEN)


# GPT-2's own tanh-approximated GELU is `gelu_new`, a chain of Python-level elementwise ops; PyTorch's
# gelu(approximate="tanh") is the same function in one fused kernel.
FUSED_GELU, GPT2_GELU = "gelu_pytorch_tanh", "gelu_new"


def model_config(preset: str, vocab_size: int, eot_id: int, dropout: float = 0.0, activation: str = FUSED_GELU) -> Any:
    """The transformers config of a preset with the tokenizer's vocabulary and end-of-text token."""
    values = {**preset_values(preset), "vocab_size": vocab_size, "bos_token_id": eot_id, "eos_token_id": eot_id}
    return for_training(config_from(values, f"--preset {preset}"), dropout, activation)


def build_model(preset: str, vocab_size: int, eot_id: int, dropout: float = 0.0, activation: str = FUSED_GELU,
                device: torch.device | str | None = None) -> torch.nn.Module:
    """A freshly initialised model of a preset (see `build`)."""
    return build(model_config(preset, vocab_size, eot_id, dropout, activation), device)


def build(config: Any, device: torch.device | str | None = None) -> torch.nn.Module:
    """A freshly initialised causal LM of `config` on `device` (default: the current default device; under
    `with torch.device("meta")` only the shapes). Call torch.manual_seed first for a reproducible init.

    The modules are made on the meta device and their weights drawn once, by the family's own initialisation
    (rotary frequencies included), where they will live: constructed the ordinary way each weight is drawn twice
    (PyTorch's default init, then the family's), which for GPT-2 XL on a CPU takes 18 s instead of 13 (measured
    on the 2-core development machine); on a GPU it is a fraction of a second."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
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
    """Recompute the activations of every k-th decoder layer in the backward pass (transformers' own switch,
    the same for every family); `selective` keeps the matmul and attention outputs of those layers and recomputes
    only the cheap elementwise ops."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if selective:
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_matmuls)
    model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)


def lm_loss(model: Any, inputs: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM; targets are the inputs shifted by one.

    With `chunk_tokens`, the model's body runs whole and its output layer (tied or not) and the loss run over
    that many positions at a time, each chunk's logits recomputed in the backward pass, so the fp32
    `tokens x vocabulary` logits (1.6 GB for 8 x 1024 tokens of GPT-2, 5 GB at Qwen2.5's 151,936) never exist at
    once: the peak is one chunk's.
    """
    if not chunk_tokens:
        logits = model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
    hidden = model.base_model(input_ids=inputs, use_cache=False).last_hidden_state
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    output_layer = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for hidden_chunk, target_chunk in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), strict=True):
        if torch.is_grad_enabled():
            total = total + checkpoint(_summed_loss, output_layer, hidden_chunk, target_chunk, use_reentrant=False)
        else:
            total = total + _summed_loss(output_layer, hidden_chunk, target_chunk)
    return total / targets.numel()


def _summed_loss(output_layer: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output_layer(hidden).float(), targets, reduction="sum")


class TrainingModel(torch.nn.Module):
    """The causal LM and its loss in one module, so that `engine(inputs, targets)` returns the loss and
    DeepSpeed sees (and partitions, and hooks) everything the step computes."""

    def __init__(self, lm: torch.nn.Module, loss_chunk_tokens: int = 0) -> None:
        super().__init__()
        self.lm = lm
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(self.lm, inputs, targets, self.loss_chunk_tokens)


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token of a built model (Shape.flops_per_token)."""
    return shape_of(model.config, parameter_count(model)).flops_per_token(seq_len)


@cache  # a meta build of GPT-2 XL takes seconds; plan and preflight ask for it once per config
def preset_model_shape(preset: str, vocab_size: int = GPT2_VOCAB_SIZE) -> Shape:
    """A preset's shape, its parameters counted on the meta device."""
    return shape_of(model_config(preset, vocab_size, vocab_size - 1))


def compile_layers(model: Any) -> None:
    """torch.compile each decoder layer: the elementwise work between the matmuls (norms, activations, bias and
    residual adds, rotary embeddings) fuses, and a graph break in one layer costs only that layer."""
    for layer in decoder_layers(model):
        layer.compile()


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights) only, never on biases or on any norm's weights
    (LayerNorm's gains and biases, RMSNorm's gains): every family keeps those as vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
