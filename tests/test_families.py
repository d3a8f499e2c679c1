"""Model families by their config.json alone: shapes and parameter counts of the published configs, and
`onecard plan --model` for them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env

from pipeline import families
from pipeline.model import preset_model_shape
from pipeline.plan import PlanConfig, plan
from pipeline.stage import PipelineError

# The published config.json of each model (the fields that shape it, as their hub repositories have them).
PUBLISHED = {
    "Qwen2.5-1.5B": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "vocab_size": 151936, "max_position_embeddings": 131072, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28},
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "vocab_size": 128256, "max_position_embeddings": 131072, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"},
    "SmolLM2-1.7B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49152,
        "max_position_embeddings": 8192, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 130000,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"},
    "Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "max_position_embeddings": 32768, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "sliding_window": 4096, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16"},
}
# Parameters as the model cards give them (1.54B, 1.24B, 1.71B, 7.24B), exactly as transformers builds them;
# key/value width: heads x head dimension of the grouped-query projections.
EXPECTED = {"Qwen2.5-1.5B": (1_543_714_304, 256), "Llama-3.2-1B": (1_235_814_400, 512),
            "SmolLM2-1.7B": (1_711_376_384, 2048), "Mistral-7B-v0.1": (7_241_732_096, 1024)}


@pytest.mark.parametrize("name", PUBLISHED)
def test_a_published_config_gives_the_models_shape(name: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    shape = families.shape_of(families.read_config(str(tmp_path)))  # the folder; its config.json the same
    assert shape == families.shape_of(families.read_config(str(tmp_path / "config.json")))
    assert (shape.parameters, shape.kv_width) == EXPECTED[name]
    assert shape.family == PUBLISHED[name]["model_type"] and shape.gated_mlp and shape.position_parameters == 0
    assert (shape.layers, shape.width, shape.intermediate, shape.vocab_size) == (
        PUBLISHED[name]["num_hidden_layers"], PUBLISHED[name]["hidden_size"], PUBLISHED[name]["intermediate_size"],
        PUBLISHED[name]["vocab_size"])


def test_gpt2s_activations_are_korthikantis_34_bytes_per_width() -> None:
    shape = preset_model_shape("gpt2-xl")
    assert shape.activation_bytes_per_token() == 34 * shape.width
    assert (shape.family, shape.position_parameters, shape.parameters) == ("gpt2", 1024 * 1600, 1_557_611_200)
    # SwiGLU keeps four intermediate tensors, grouped-query attention narrower keys and values
    llama = families.shape_of(families.config_from(PUBLISHED["Llama-3.2-1B"], "x"))
    assert llama.activation_bytes_per_token() == 14 * 2048 + 4 * 512 + 8 * 8192


@pytest.mark.parametrize("name", ["Qwen2.5-1.5B", "Llama-3.2-1B", "SmolLM2-1.7B"])
def test_plan_takes_a_model_by_its_config(name: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    result = plan(PlanConfig(model=str(tmp_path / "config.json"), gpu="RTX 4070 Ti", host_ram_gib=64))
    assert result["model"]["parameters"] == EXPECTED[name][0] and result["model"]["family"] != "gpt2"
    assert result["compute"]["compute_optimal_tokens"] == 20 * EXPECTED[name][0]
    for entry in result["configs"]:
        memory = entry["gpu_gib"]
        assert 0 < memory["activations"] < memory["total"] and memory["logits"] > 0, entry["config"]
    # DeepSpeed's estimate for ZeRO-2 with the optimizer offloaded: 2 bytes per parameter on the GPU
    zero2 = next(c for c in result["configs"] if c["config"] == "ds_configs/zero2_offload.json")
    assert zero2["gpu_gib"]["model_states"] * (1 << 30) == pytest.approx(2 * EXPECTED[name][0])
    # the output layer's logits chunk grows with the vocabulary: Qwen2.5's 151,936 against GPT-2's 50,257
    gpt2 = plan(PlanConfig(preset="gpt2-xl", gpu="RTX 4070 Ti", micro_batch_size=zero2["micro_batch_size"]))
    gpt2_zero2 = next(c for c in gpt2["configs"] if c["config"] == zero2["config"])
    ratio = zero2["gpu_gib"]["logits"] / gpt2_zero2["gpu_gib"]["logits"]
    assert ratio == pytest.approx(PUBLISHED[name]["vocab_size"] / 50257)


def test_a_model_onecard_does_not_know_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(PipelineError, match=r"model_type 'bert' is not a family onecard trains; it takes gpt2, llama"):
        plan(PlanConfig(model=str(tmp_path)))
    with pytest.raises(PipelineError, match=r"--model ./nowhere: no config.json there"):
        families.read_config("./nowhere")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(PipelineError, match=r"config.json is not valid JSON"):
        families.read_config(str(tmp_path))


def test_a_hub_id_is_read_from_the_local_hub_cache(tmp_path: Path) -> None:
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-1.5B"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "config.json").write_text(json.dumps(PUBLISHED["Qwen2.5-1.5B"]))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {**subprocess_env(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline.plan", "--model", "Qwen/Qwen2.5-1.5B", "--json",
                             str(tmp_path / "plan.json")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "plan.json").read_text())["model"]["parameters"] == EXPECTED["Qwen2.5-1.5B"][0]
    assert "Qwen/Qwen2.5-1.5B (qwen2, 28 layers, width 1536): 1,543.7M parameters" in result.stderr
