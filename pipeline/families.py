"""The model families onecard knows, through transformers' own classes (never a model folder's own code): GPT-2,
Llama (SmolLM2, TinyLlama, Llama 3.2), Qwen2 (Qwen2.5) and Mistral. The planner, the preflight and the memory
model ask this module for a model's shape; none of them reads a family's attribute names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.stage import PipelineError

FAMILIES = ("gpt2", "llama", "qwen2", "mistral")  # transformers' model_type of each


@dataclass(frozen=True)
class Shape:
    """What the memory and compute models need of a decoder-only transformer."""

    family: str
    layers: int
    width: int
    kv_width: int  # the key and value projections' width: narrower than `width` under grouped-query attention
    intermediate: int  # the MLP's hidden width
    gated_mlp: bool  # SwiGLU (Llama, Qwen2, Mistral: three matrices) rather than GPT-2's two
    vocab_size: int
    context: int  # the most positions the config allows
    position_parameters: int  # learned absolute position embeddings (GPT-2); rotary embeddings have none
    tied_embeddings: bool  # the output layer is the token embedding (GPT-2, SmolLM2, Qwen2.5-1.5B; not Mistral)
    parameters: int  # counted on a model built on the meta device

    def activation_bytes_per_token(self) -> int:
        """What one layer keeps for its backward pass per token, in 16-bit values with fused attention
        (Korthikanti et al., 2022, whose 34 x width is GPT-2's case): attention 11 x width with grouped-query key
        and value projections, the MLP 3 x width plus 2 bytes for each intermediate tensor it keeps (GPT-2: two;
        SwiGLU: four), the two norms 4 x width."""
        attention = 7 * self.width + 4 * self.kv_width
        mlp = 3 * self.width + 2 * (4 if self.gated_mlp else 2) * self.intermediate
        return attention + mlp + 4 * self.width

    def layer_matrices(self) -> list[int]:
        """The sizes of one decoder layer's weight matrices, in the order its forward pass uses them: GPT-2's
        fused query-key-value, attention output, MLP in and out; the others' query, key, value, output, gate, up
        and down projections."""
        if not self.gated_mlp:
            return [3 * self.width * self.width, self.width * self.width, self.width * self.intermediate,
                    self.intermediate * self.width]
        return [self.width * self.width, self.kv_width * self.width, self.kv_width * self.width,
                self.width * self.width, *[self.intermediate * self.width] * 3]

    def matrices(self) -> list[int]:
        """The sizes of every weight matrix, in the order the forward pass first uses them (an untied output layer
        last; a tied one is the token embedding again). The vectors (biases, norms) are left out: under 1% of a
        model, and never large enough for DeepSpeed to swap to NVMe."""
        embeddings = [self.vocab_size * self.width] + ([self.position_parameters] if self.position_parameters else [])
        return embeddings + self.layers * self.layer_matrices() + \
            ([] if self.tied_embeddings else [self.vocab_size * self.width])

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, as PaLM's appendix, nanoGPT and llm.c count them: 6 per parameter that
        multiplies (2 forward, 4 backward: every parameter but the position embeddings and, when the output layer
        is a matrix of its own, the input embedding, which are lookups) plus 12 x layers x width x T for attention
        (grouped-query attention shares keys and values, not the score and mix products). Activation
        recomputation is not counted: this is model FLOPs, the basis of MFU."""
        lookups = self.position_parameters + (0 if self.tied_embeddings else self.vocab_size * self.width)
        return 6 * (self.parameters - lookups) + 12 * self.layers * self.width * seq_len


def config_from(values: dict[str, Any], source: str) -> Any:
    """A transformers config of one of the FAMILIES from a config.json's values."""
    from transformers import AutoConfig

    family = values.get("model_type")
    if family not in FAMILIES:
        raise PipelineError(f"{source}: model_type {family!r} is not a family onecard trains; it takes "
                            f"{', '.join(FAMILIES)} (transformers' own classes, never a folder's code).")
    return AutoConfig.for_model(family, **{key: value for key, value in values.items() if key != "model_type"})


def shape_of(config: Any, parameters: int | None = None) -> Shape:
    """The shape of a transformers config of one of the FAMILIES; its parameters counted on the meta device
    unless the caller has the model and counted them."""
    from transformers import AutoModelForCausalLM

    if parameters is None:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    tied = bool(config.tie_word_embeddings)
    if config.model_type == "gpt2":
        return Shape("gpt2", config.n_layer, config.n_embd, config.n_embd, config.n_inner or 4 * config.n_embd,
                     False, config.vocab_size, context_of(config), config.n_positions * config.n_embd, tied,
                     parameters)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shape(config.model_type, config.num_hidden_layers, config.hidden_size,
                 config.num_key_value_heads * head_dim, config.intermediate_size, True, config.vocab_size,
                 context_of(config), 0, tied, parameters)


def for_training(config: Any, dropout: float, gelu: str) -> Any:
    """`config` as onecard trains it: no key/value cache, `dropout` where the family has it (GPT-2: embeddings,
    residuals and attention; the others: attention only), GPT-2's GELU as `gelu` names it (the others' SiLU
    is one kernel already)."""
    config.use_cache = False
    if config.model_type == "gpt2":
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
        config.activation_function = gelu
    else:
        config.attention_dropout = dropout
    return config


def context_of(config: Any) -> int:
    """The most positions a config allows."""
    return config.n_positions if config.model_type == "gpt2" else config.max_position_embeddings


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM of one of the FAMILIES, in order."""
    return model.base_model.h if model.config.model_type == "gpt2" else model.base_model.layers


def read_config(spec: str) -> Any:
    """The config of `spec`: a config.json, a folder with one, or a hub id (see read_values)."""
    return config_from(*read_values(spec))


def read_values(spec: str) -> tuple[dict[str, Any], str]:
    """The values of the config.json of `spec` (a config.json, a folder with one, or a hub id: its config.json
    through the local Hugging Face cache, fetched into it first when the hub can be reached), and its path."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise PipelineError(f"--model {spec}: no config.json there. Give a model's config.json, its folder, or "
                                "a Hugging Face hub id such as Qwen/Qwen2.5-1.5B.")
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(spec, "config.json"))
        except Exception as error:  # the hub client raises many kinds for "not reachable" and "no such repo"
            raise PipelineError(f"--model {spec}: cannot get its config.json from the Hugging Face hub or its local "
                                f"cache ({error}). Check the name, or give a local config.json.") from error
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as error:
        raise PipelineError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}.") from error
