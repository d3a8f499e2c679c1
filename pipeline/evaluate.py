"""Stage 5, evaluate: score a run's latest checkpoint and export it as a Hugging Face model.

Loads the fp32 weights the trainer gathered from the ZeRO partitions into each checkpoint, measures the validation loss
and perplexity (token-weighted, over the first --eval-tokens of the val shards) next to the loss of the same
model at initialisation, and, when given, the loss on held-out text (--eval-text, sliding window) and zero-shot
HellaSwag and LAMBADA (--hellaswag, --lambada; the protocol is in `pipeline/zeroshot.py`). It writes generated
samples, and exports `data/export/<run>/` (config.json, model.safetensors, tokenizer files), which is reloaded with
`AutoModelForCausalLM.from_pretrained` and must give the same validation loss. The report goes to
`data/eval/<run>/`: report.json (every number), report.md and loss.png (the run's loss curves).

    python -m pipeline.evaluate --hellaswag hellaswag_val.jsonl --lambada lambada_test.jsonl --eval-text book.txt
    python -m pipeline.evaluate --hellaswag hf: --lambada hf:      # from the Hugging Face hub, when online
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline import checkpoint, pretrained, zeroshot
from pipeline.artifacts import StageOutput, sha256_file, write_json_atomic
from pipeline.data import TokenSequences
from pipeline.families import config_from, context_of
from pipeline.model import LOSS_CHUNK_TOKENS, build, lm_loss, model_config
from pipeline.report import markdown, plot_loss, read_curves
from pipeline.shard_format import load_index
from pipeline.stage import AT_LEAST_ONE, NON_NEGATIVE, DataDir, PipelineError, StageConfig, stage_main
from pipeline.tokenizer import differences_from, load_tokenizer, tokenizer_info

log = logging.getLogger("onecard")

FORMAT_VERSION = 1
PROMPTS = ("The", "In Python, a list is", "This function returns")


@dataclass
class EvaluateConfig(StageConfig):
    run: str | None = field(default=None, metadata={"help": "run to evaluate (default: the only run there is)"})
    eval_tokens: int = field(default=1_000_000, metadata={"range": AT_LEAST_ONE,
                                                          "help": "score at most this many val tokens"})
    batch_size: int = field(default=8, metadata={"range": AT_LEAST_ONE, "help": "sequences per evaluation batch"})
    sample_tokens: int = field(default=48, metadata={"range": NON_NEGATIVE,
                                                     "help": "tokens generated per sample prompt"})
    seed: int = field(default=1337, metadata={"range": NON_NEGATIVE, "help": "seed for sampling"})
    eval_text: str | None = field(default=None, metadata={"help": "a UTF-8 text file to score (sliding window)"})
    eval_stride: int | None = field(
        default=None, metadata={"range": AT_LEAST_ONE,
                                "help": "sliding-window stride for --eval-text (default: half the context)"})
    hellaswag: str | None = field(
        default=None, metadata={"help": "hellaswag_val.jsonl (rowanz/hellaswag's format), or hf: for the hub"})
    lambada: str | None = field(
        default=None, metadata={"help": "lambada_test.jsonl (OpenAI's GPT-2 release format), or hf: for the hub"})
    limit: int | None = field(default=None, metadata={"range": AT_LEAST_ONE,
                                                      "help": "score only the first N items of each benchmark"})


def resolve_run(data: DataDir, run: str | None) -> str:
    if run:
        return run
    runs = sorted(p.parent.name for p in (data.root / "checkpoints").glob("*/latest"))
    if len(runs) == 1:
        return runs[0]
    raise PipelineError(
        f"{data.root / 'checkpoints'} holds {len(runs)} trained runs ({', '.join(runs) or 'none'}): "
        + ("train one first with `make train`." if not runs else "choose one with --run NAME.")
    )


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def validation_loss(model: torch.nn.Module, sequences: TokenSequences, batch_size: int, max_tokens: int) -> float:
    """Mean next-token loss over the first max_tokens // T validation sequences (all of equal length)."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    n_sequences = min(len(sequences), max(1, max_tokens // sequences.seq_len))
    with zeroshot.autocast_for(device), tqdm(total=n_sequences * sequences.seq_len, desc="validation loss",
                                             unit=" tok", unit_scale=True, leave=False) as bar:
        for inputs, targets in sequences.in_order(batch_size, n_sequences):
            total += lm_loss(model, inputs.to(device), targets.to(device), LOSS_CHUNK_TOKENS).item() * len(inputs)
            count += len(inputs)
            bar.update(inputs.numel())
    return total / count


@torch.no_grad()
def generate_samples(model: Any, tokenizer: Any, seed: int, max_new_tokens: int) -> list[dict[str, str]]:
    device = next(model.parameters()).device
    samples = []
    for prompt in PROMPTS:
        torch.manual_seed(seed)
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        output = model.generate(**inputs, do_sample=True, top_k=40, temperature=0.8, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.eos_token_id)
        samples.append({"prompt": prompt, "text": tokenizer.decode(output[0], skip_special_tokens=True)})
    return samples


def _input_digest(spec: str | None) -> dict[str, Any] | None:
    """What a benchmark or text input is, for the output's fingerprint: its path and sha256, or its hub name."""
    if spec is None or spec.startswith("hf:"):
        return None if spec is None else {"hub": spec}
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PipelineError(f"{path} does not exist: give the path of a file to score.")
    return {"path": str(path.resolve()), "sha256": sha256_file(path)}


@dataclass
class Inputs:
    """The files the stage scores besides the shards, read and checked before anything is computed."""

    hellaswag: list[zeroshot.MultipleChoice] | None
    lambada: list[tuple[str, str]] | None
    text: str | None


def read_inputs(config: EvaluateConfig) -> Inputs:
    return Inputs(
        hellaswag=zeroshot.hellaswag_items(config.hellaswag, config.limit) if config.hellaswag else None,
        lambada=zeroshot.lambada_items(config.lambada, config.limit) if config.lambada else None,
        text=zeroshot.read_text(Path(config.eval_text)) if config.eval_text else None,
    )


def zero_shot(config: EvaluateConfig, inputs: Inputs, model: Any, tokenizer: Any,
              prefix_id: int) -> dict[str, dict[str, Any]]:
    context = context_of(model.config)
    results = {}
    if inputs.hellaswag:
        results["hellaswag"] = zeroshot.hellaswag(model, tokenizer, inputs.hellaswag, prefix_id, context,
                                                  config.batch_size)
    if inputs.lambada:
        results["lambada"] = zeroshot.lambada(model, tokenizer, inputs.lambada, prefix_id, context,
                                              config.batch_size)
    for name, scores in results.items():
        log.info("evaluate: %s %s", name, ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in scores.items()))
    return results


def run_model_config(ckpt_dir: Path, identity: dict[str, Any], eot_id: int) -> Any:
    """The transformers config the run built its model from (a run from before the train stage saved it: its
    GPT-2 preset's)."""
    path = ckpt_dir / checkpoint.MODEL_CONFIG
    if path.is_file():
        return config_from(json.loads(path.read_text()), str(path))
    return model_config(identity["preset"], identity["vocab_size"], eot_id, identity["dropout"])


def run(config: EvaluateConfig) -> Path:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    # The stage's own lines and bars say what happens; transformers' padding advice (the export's pad token is
    # the end-of-text token, which the validation text contains by design) and its save/load bars do not.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    inputs = read_inputs(config)  # a bad benchmark line is found now, not after minutes of scoring
    data = DataDir(config.data_dir)
    name = resolve_run(data, config.run)
    ckpt_dir = data.checkpoints(name)
    tag, ckpt_manifest = checkpoint.checkpoint_manifest(ckpt_dir)  # a finished run with a checkpoint
    saved = json.loads((ckpt_dir / checkpoint.RUN_FILE).read_text())
    identity = saved["identity"]
    params = {"eval_tokens": config.eval_tokens, "batch_size": config.batch_size,
              "sample_tokens": config.sample_tokens, "seed": config.seed, "prompts": list(PROMPTS),
              "eval_text": _input_digest(config.eval_text), "eval_stride": config.eval_stride,
              "hellaswag": _input_digest(config.hellaswag), "lambada": _input_digest(config.lambada),
              "limit": config.limit}
    outputs = [StageOutput(folder, "evaluate", FORMAT_VERSION, params, {"checkpoint": ckpt_dir / tag},
                           force=config.force, replace_stale=True) for folder in (data.eval(name), data.export(name))]
    if all(out.up_to_date() for out in outputs):
        return outputs[0].final
    eval_out, export_out = outputs

    shards_dir = data.shards(identity["corpus"])
    index = load_index(shards_dir)
    val = TokenSequences(shards_dir, index, "val", identity["seq_len"])
    scored_tokens = min(len(val), max(1, config.eval_tokens // val.seq_len)) * val.seq_len
    tokenizer_dir = data.tokenizer(saved["tokenizer"]["name"])
    tokenizer = load_tokenizer(tokenizer_dir)
    device = _device()

    torch.manual_seed(identity["seed"])
    built = run_model_config(ckpt_dir, identity, index["eot_id"])
    if "init" in identity:  # a run from released weights: what training changed is measured from them
        spec = identity["init"]["init_from"]
        model, start = pretrained.load(pretrained.locate(spec), built).to(device), f"the starting weights ({spec})"
    else:
        model, start = build(built).to(device), "the untrained model"
    start_loss = validation_loss(model, val, config.batch_size, config.eval_tokens)
    tag, weights = checkpoint.load_weights(ckpt_dir, tag)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(model.state_dict()) - {name for name, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise PipelineError(f"{ckpt_dir / tag} does not fit the model of {ckpt_dir / checkpoint.MODEL_CONFIG} (missing "
                            f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}).")
    step_info = ckpt_manifest["counts"]
    val_loss = validation_loss(model, val, config.batch_size, config.eval_tokens)
    log.info("evaluate %s at %s: val loss %.4f (perplexity %.2f); %s %.4f (perplexity %.2f)",
             name, tag, val_loss, math.exp(val_loss), start, start_loss, math.exp(start_loss))
    samples = generate_samples(model, tokenizer, config.seed, config.sample_tokens)
    # a document starts as in the shards; an empty context is the harness's prefix token
    eot_id, bos_id = index["eot_id"], tokenizer_info(tokenizer_dir).get("bos_id")
    start_ids = [eot_id] if bos_id is None else [eot_id, bos_id]
    text_scores = None
    if inputs.text is not None:
        window = context_of(model.config)
        text_scores = zeroshot.text_scores(model, tokenizer, inputs.text, Path(config.eval_text), start_ids, window,
                                           config.eval_stride or window // 2)
        log.info("evaluate: %s: loss %.4f, perplexity %.2f, %.3f bits/byte", config.eval_text, text_scores["loss"],
                 text_scores["perplexity"], text_scores["bits_per_byte"])
    benchmarks = zero_shot(config, inputs, model, tokenizer,
                           eot_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id)

    with export_out.building() as export_dir:
        model.config.pad_token_id = index["eot_id"]
        model.generation_config.pad_token_id = index["eot_id"]
        model.save_pretrained(export_dir, safe_serialization=True)
        tokenizer.model_max_length = context_of(model.config)
        tokenizer.save_pretrained(export_dir)
        exported = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=False).to(device)
        export_loss = validation_loss(exported, val, config.batch_size, config.eval_tokens)
        if not math.isclose(export_loss, val_loss, rel_tol=1e-4):
            raise PipelineError(
                f"the exported model in {export_dir} gives val loss {export_loss:.6f}, the checkpoint "
                f"{val_loss:.6f}: the export is not faithful. Please report this as a bug."
            )
        export_out.counts = {"parameters": sum(p.numel() for p in exported.parameters())}
        # transformers gives some families their own tokenizer class whatever the folder's tokenizer is (a qwen2
        # config.json gets Qwen2Tokenizer, with Qwen's pre-tokenizer and normalizer): say so when that is not the
        # run's tokenizer, and how to load the export's as it is
        tokenizer_differences = differences_from(str(export_dir), tokenizer_dir)
        if tokenizer_differences:
            log.warning("evaluate: AutoTokenizer.from_pretrained(%s) gives another tokenizer than the run's (it "
                        "differs in %s): transformers loads any tokenizer beside a %s config.json as that family's "
                        "own. Load the export's tokenizer with transformers.PreTrainedTokenizerFast.from_pretrained"
                        "(folder), which takes its tokenizer.json as it is.", export_out.final,
                        ", ".join(tokenizer_differences), built.model_type)

    report = {
        "run": name, "checkpoint": tag, "step": step_info["step"], "tokens_seen": step_info["tokens_seen"],
        "val_loss": val_loss, "val_perplexity": math.exp(val_loss),
        "start": start, "start_val_loss": start_loss, "start_val_perplexity": math.exp(start_loss),
        "export_val_loss": export_loss, "export_tokenizer_differences": tokenizer_differences,
        "eval_tokens": scored_tokens, "samples": samples,
        "export_dir": str(export_out.final), "tokenizer": saved["tokenizer"], "shards": identity["shards"],
        "tokenizer_sha256": sha256_file(tokenizer_dir / "tokenizer.json"),
        "preset": identity["preset"], "family": built.model_type, "seq_len": identity["seq_len"],
        "eval_text": text_scores, "benchmarks": benchmarks,
    }
    with eval_out.building() as eval_dir:
        drawn = plot_loss(read_curves(data.runs(name)), (report["step"], val_loss), eval_dir / "loss.png",
                          f"run {name}")
        report["loss_plot"] = "loss.png" if drawn else None
        write_json_atomic(eval_dir / "report.json", report)
        (eval_dir / "report.md").write_text(markdown(report, report["loss_plot"]))
        eval_out.counts = {"val_loss": val_loss, "eval_tokens": scored_tokens}
    _log_to_tensorboard(data.runs(name), report)
    return eval_out.final


def _log_to_tensorboard(log_dir: Path, report: dict[str, Any]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        writer.add_scalar("evaluate/val_loss", report["val_loss"], report["step"])
        writer.add_scalar("evaluate/val_perplexity", report["val_perplexity"], report["step"])
        for name, scores in report["benchmarks"].items():
            for metric, value in scores.items():
                if metric != "items":
                    writer.add_scalar(f"evaluate/{name}_{metric}", value, report["step"])
        if report["eval_text"]:
            writer.add_scalar("evaluate/eval_text_loss", report["eval_text"]["loss"], report["step"])
        for sample in report["samples"]:
            writer.add_text(f"samples/{sample['prompt']}", sample["text"], report["step"])


def main(argv: list[str] | None = None) -> None:
    stage_main(EvaluateConfig, run, argv)


if __name__ == "__main__":
    main()
