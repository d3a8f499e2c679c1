"""The model pieces: chunked loss, activation checkpointing, FLOP counting."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.model import (
    GPT2_GELU,
    TrainingModel,
    build_model,
    enable_activation_checkpointing,
    flops_per_token,
    lm_loss,
)


def batch(vocab: int = 300, size: tuple[int, int] = (3, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.randint(0, vocab, (size[0], size[1] + 1), generator=torch.Generator().manual_seed(0))
    return rows[:, :-1], rows[:, 1:]


def loss_and_grads(model: torch.nn.Module, chunk_tokens: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = lm_loss(model, *batch(), chunk_tokens=chunk_tokens)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 120, 4096])
def test_chunked_loss_equals_the_full_loss_and_gradients(chunk_tokens: int) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 300, 0)
    full_loss, full_grads = loss_and_grads(model, 0)
    loss, grads = loss_and_grads(model, chunk_tokens)
    assert loss == pytest.approx(full_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_loss_never_builds_more_than_a_chunk_of_logits() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 300, 0)
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    lm_loss(model, *batch(), chunk_tokens=32).backward()
    assert max(rows) == 32 and sum(rows) == 2 * 3 * 40  # every chunk once forward, once recomputed


@pytest.mark.parametrize("every", [1, 2, 4])
def test_activation_checkpointing_recomputes_every_kth_block_and_changes_no_gradient(every: int) -> None:
    torch.manual_seed(0)
    plain = build_model("tiny", 300, 0).train()
    torch.manual_seed(0)
    checkpointed = build_model("tiny", 300, 0).train()
    checkpointed.activation_checkpointing_enable(every_n_layers=every)
    calls = [0] * 6
    for i, block in enumerate(checkpointed.transformer.h):
        # on a submodule: the block's own hooks stay outside the checkpoint by design
        block.mlp.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    _, expected = loss_and_grads(plain, 0)
    _, grads = loss_and_grads(checkpointed, 0)
    assert calls == [2 if i % every == 0 else 1 for i in range(6)]  # checkpointed blocks run again in backward
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


@pytest.mark.parametrize("selective", [False, True])
def test_selective_checkpointing_recomputes_only_the_cheap_ops(selective: bool) -> None:
    torch.manual_seed(0)
    plain = build_model("tiny", 300, 0).train()
    _, expected = loss_and_grads(plain, 0)
    with OpCounter() as plain_ops:
        lm_loss(plain, *batch()).backward()
    torch.manual_seed(0)
    checkpointed = build_model("tiny", 300, 0).train()
    enable_activation_checkpointing(checkpointed, 1, selective=selective)
    _, grads = loss_and_grads(checkpointed, 0)
    with OpCounter() as ops:
        lm_loss(checkpointed, *batch()).backward()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    layers = 6
    # LayerNorm (2 per block) and GELU (1) run again in the backward pass either way ...
    assert ops.counts["native_layer_norm.default"] == plain_ops.counts["native_layer_norm.default"] + 2 * layers
    assert ops.counts["gelu.default"] == plain_ops.counts["gelu.default"] + layers
    # ... the matmuls and attention only under full checkpointing
    matmuls = ("addmm.default", "_scaled_dot_product_flash_attention_for_cpu.default")
    recomputed = sum(ops.counts[op] - plain_ops.counts[op] for op in matmuls)
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
