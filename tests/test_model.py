"""The model pieces, for every family: chunked loss, activation checkpointing, optimizer groups, FLOP counting."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.families import FAMILIES, decoder_layers
from pipeline.model import (
    GPT2_GELU,
    TrainingModel,
    build_model,
    compile_layers,
    default_seq_len,
    enable_activation_checkpointing,
    flops_per_token,
    lm_loss,
    model_config,
    optimizer_groups,
    preset_model_shape,
)


def batch(vocab: int = 300, size: tuple[int, int] = (3, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.randint(0, vocab, (size[0], size[1] + 1), generator=torch.Generator().manual_seed(0))
    return rows[:, :-1], rows[:, 1:]


def loss_and_grads(model: torch.nn.Module, chunk_tokens: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = lm_loss(model, *batch(), chunk_tokens=chunk_tokens)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 120, 4096])
def test_chunked_loss_equals_the_full_loss_and_gradients(family: str, chunk_tokens: int) -> None:
    model = tiny_model(family, 300, 0)
    full_loss, full_grads = loss_and_grads(model, 0)
    loss, grads = loss_and_grads(model, chunk_tokens)
    assert loss == pytest.approx(full_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_never_builds_more_than_a_chunk_of_logits(family: str) -> None:
    model = tiny_model(family, 300, 0)
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    lm_loss(model, *batch(), chunk_tokens=32).backward()
    assert max(rows) == 32 and sum(rows) == 2 * 3 * 40  # every chunk once forward, once recomputed


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("every", [1, 2, 4])
def test_activation_checkpointing_recomputes_every_kth_layer_and_changes_no_gradient(family: str, every: int) -> None:
    plain = tiny_model(family, 300, 0).train()
    checkpointed = tiny_model(family, 300, 0).train()
    enable_activation_checkpointing(checkpointed, every)
    layers = decoder_layers(checkpointed)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        # on a submodule: the layer's own hooks stay outside the checkpoint by design
        layer.mlp.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    _, expected = loss_and_grads(plain, 0)
    _, grads = loss_and_grads(checkpointed, 0)
    assert calls == [2 if i % every == 0 else 1 for i in range(len(layers))]  # checkpointed ones run again
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a forward and backward run, recomputation included."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__] = self.counts.get(func.__name__, 0) + 1
        return func(*args, **(kwargs or {}))


# The cheap ops of a layer, each run this many times per layer: GPT-2's two LayerNorms and GELU; RMSNorm's
# rsqrt (two norms) and SwiGLU's SiLU in the others.
CHEAP_OPS = {"gpt2": {"native_layer_norm.default": 2, "gelu.default": 1},
             **{family: {"rsqrt.default": 2, "silu.default": 1} for family in ("llama", "qwen2", "mistral")}}
MATMULS = ("mm.default", "addmm.default", "bmm.default", "_scaled_dot_product_flash_attention_for_cpu.default")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("selective", [False, True])
def test_selective_checkpointing_recomputes_only_the_cheap_ops(family: str, selective: bool) -> None:
    plain = tiny_model(family, 300, 0).train()
    _, expected = loss_and_grads(plain, 0)
    with OpCounter() as plain_ops:
        lm_loss(plain, *batch()).backward()
    checkpointed = tiny_model(family, 300, 0).train()
    enable_activation_checkpointing(checkpointed, 1, selective=selective)
    _, grads = loss_and_grads(checkpointed, 0)
    with OpCounter() as ops:
        lm_loss(checkpointed, *batch()).backward()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    layers = len(decoder_layers(checkpointed))
    # the norms and the activation run again in the backward pass either way ...
    for op, per_layer in CHEAP_OPS[family].items():
        assert ops.counts[op] == plain_ops.counts[op] + per_layer * layers, op
    # ... the matmuls and attention only under full checkpointing
    recomputed = sum(ops.counts.get(op, 0) - plain_ops.counts.get(op, 0) for op in MATMULS)
    assert recomputed == 0 if selective else recomputed >= 4 * layers


def test_the_fused_gelu_is_gpt2s_gelu() -> None:
    """PyTorch's tanh-GELU kernel against GPT-2's own op-by-op gelu_new, from the same weights: the same loss
    and gradients to float32 rounding."""
    torch.manual_seed(0)
    gpt2 = build_model("tiny", 300, 0, activation=GPT2_GELU)
    torch.manual_seed(0)
    fused = build_model("tiny", 300, 0)
    assert fused.config.activation_function == "gelu_pytorch_tanh"
    expected_loss, expected = loss_and_grads(gpt2, 0)
    loss, grads = loss_and_grads(fused, 0)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_weight_decay_on_any_norm_or_bias(family: str) -> None:
    model = tiny_model(family, 300, 0)
    decayed, kept = optimizer_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    undecayed = {names[id(p)] for p in kept["params"]}
    assert undecayed == {n for n in names.values() if "norm" in n or ".ln_" in n or n.endswith(".bias")}
    assert undecayed and all(p.dim() == 2 for p in decayed["params"])
    if family == "qwen2":  # its query, key and value projections have biases
        assert any("q_proj.bias" in n for n in undecayed)


def test_training_model_returns_the_loss() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 300, 0)
    assert TrainingModel(model, 16)(*batch()).item() == pytest.approx(lm_loss(model, *batch()).item(), rel=1e-6)


@pytest.mark.parametrize(("preset", "expected"), [
    # 6 x (parameters - position embeddings) + 12 x layers x width x 1024, worked out by hand
    ("gpt2", 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024),
    ("gpt2-xl", 6 * (1_557_611_200 - 1024 * 1600) + 12 * 48 * 1600 * 1024),
])
def test_flops_per_token(preset: str, expected: int) -> None:
    with torch.device("meta"):
        model = build_model(preset, 50257, 50256)
    assert flops_per_token(model, 1024) == expected
    assert flops_per_token(model, 1024) == pytest.approx({"gpt2": 0.855e9, "gpt2-xl": 10.28e9}[preset], rel=1e-3)


def test_flops_per_token_of_the_other_families() -> None:
    # SmolLM2-1.7B's shape (the llama-1.7b preset, its 49,152-token vocabulary): tied, no position embeddings
    smollm2 = preset_model_shape("llama-1.7b", 49152)
    assert smollm2.parameters == 1_711_376_384
    assert smollm2.flops_per_token(2048) == 6 * 1_711_376_384 + 12 * 24 * 2048 * 2048
    # an untied output layer multiplies, the input embedding is a lookup: not counted
    mistral = tiny_model("mistral", 300, 0)
    params, width, layers = sum(p.numel() for p in mistral.parameters()), TINY["mistral"]["hidden_size"], 4
    assert flops_per_token(mistral, 32) == 6 * (params - 300 * width) + 12 * layers * width * 32


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_wraps_each_decoder_layer(family: str) -> None:
    model = tiny_model(family, 300, 0)
    compile_layers(model)  # compiled lazily, at the first call: here only which modules are wrapped
    compiled = {name for name, module in model.named_modules() if module._compiled_call_impl is not None}
    assert compiled == {name for name, module in model.named_modules() if module in set(decoder_layers(model))}
    assert len(compiled) == len(decoder_layers(model)) == TINY[family].get("n_layer", TINY[family].get(
        "num_hidden_layers"))


def test_the_default_sequence_length_is_the_context_up_to_2048() -> None:
    assert default_seq_len(model_config("gpt2-xl", 50257, 50256)) == 1024
    assert default_seq_len(model_config("tiny", 300, 0)) == 256
    assert default_seq_len(model_config("llama-1.7b", 49152, 0)) == 2048  # not SmolLM2's 8192
