"""Zero-shot scores as EleutherAI's lm-evaluation-harness computes them: HellaSwag, LAMBADA, held-out text.

Every score is a sum of next-token log-likelihoods of a continuation given a context, computed the way the
harness does for a Hugging Face causal LM (`HFLM.loglikelihood`):
- trailing spaces of the context move to the front of the continuation; the context and the whole string are
  tokenized separately, with the tokenizer's own special tokens as the harness (0.4.13) does (none for GPT-2; a
  Llama's <s> first), and the continuation is what the whole has beyond the context; an empty context is the
  harness's prefix token (the beginning-of-text token where the tokenizer has one, else end-of-text);
- context + continuation is cut from the left to the model's context length + 1, the last token dropped;
- the log-likelihood is the sum over the continuation's tokens, "greedy" when each is the argmax.

HellaSwag (`hellaswag_val.jsonl` of rowanz/hellaswag, or `hf:Rowan/hellaswag`): the query is
"<activity label>: <ctx_a> <Ctx_b>" and each of the four endings a continuation after a space, all cleaned of
WikiHow's "[title]"-style markup; acc picks the ending with the highest sum, acc_norm the highest sum per
character of the ending (GPT-3's and the harness's normalisation).
LAMBADA (`lambada_test.jsonl` of OpenAI's GPT-2 release, or `hf:EleutherAI/lambada_openai`): the last word,
after a space, continues the rest of the passage; accuracy is the share predicted greedily, perplexity
exp(-mean log-likelihood) per passage.
Held-out text is scored in windows of the model's context, stepping by a stride: each window scores only the
tokens the previous ones did not, so every token after the first window sees at least window - stride tokens.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.precision import detect
from pipeline.stage import PipelineError

HELLASWAG_HUB = ("Rowan/hellaswag", None, "validation")
LAMBADA_HUB = ("EleutherAI/lambada_openai", "default", "test")


@dataclass(frozen=True)
class MultipleChoice:
    query: str
    choices: list[str]
    gold: int


# --- reading the benchmarks in their published formats ---------------------------------------------------

def read_records(spec: str, hub: tuple[str, str | None, str], limit: int | None = None
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for the first `limit` JSON records of a local .jsonl (or .jsonl.gz) file — where is
    `path:line` — or of a hub dataset given as `hf:NAME`; nothing past the limit is read."""
    if limit is not None and limit < 1:
        raise PipelineError(f"--limit {limit}: give a number of items of at least 1.")
    if spec.startswith("hf:"):
        from datasets import load_dataset

        name = spec[3:] or hub[0]
        try:
            dataset = load_dataset(name, hub[1] if name == hub[0] else None, split=hub[2])
        except Exception as error:  # datasets raises many kinds for "not reachable"
            raise PipelineError(f"cannot load {name} from the Hugging Face hub ({error}). Offline, give the path "
                                "of the benchmark's .jsonl file instead.") from error
        for number, record in enumerate(dataset):
            if number == limit:
                return
            yield f"{name} item {number}", record
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        raise PipelineError(f"{path} is a folder. Give the path of the benchmark's .jsonl file in it, or hf: to "
                            "load it from the Hugging Face hub.")
    if not path.is_file():
        raise PipelineError(f"{path} does not exist. Give the path of the benchmark's .jsonl file, or hf: to load "
                            "it from the Hugging Face hub.")
    opener = gzip.open if path.suffix == ".gz" else open
    read = 0
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if read == limit:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PipelineError(f"{path}:{number} is not a JSON line ({error.msg}). Fix or remove that line, "
                                    "or give the benchmark's original file.") from error
            read += 1
            yield f"{path}:{number}", record


def _not_empty(items: list[Any], spec: str, benchmark: str) -> list[Any]:
    if not items:
        raise PipelineError(f"{spec} holds no {benchmark} items: there is nothing to score. Give the benchmark's "
                            ".jsonl file (one JSON object per line), or leave the option out.")
    return items


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_items(spec: str, limit: int | None = None) -> list[MultipleChoice]:
    items = []
    for where, record in read_records(spec, HELLASWAG_HUB, limit):
        try:
            context = record["ctx_a"] + " " + record["ctx_b"].capitalize()
            item = MultipleChoice(_hellaswag_clean(record["activity_label"] + ": " + context),
                                  [_hellaswag_clean(ending) for ending in record["endings"]], int(record["label"]))
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise PipelineError(f"{where} is not in HellaSwag's format (ctx_a, ctx_b, activity_label, endings, "
                                f"label): {error!r} in {str(record)[:200]}") from error
        if not 0 <= item.gold < len(item.choices):
            raise PipelineError(f"{where}: label {item.gold} is not the index of one of its {len(item.choices)} "
                                "endings (0 to 3 in HellaSwag). Fix that line, or give the benchmark's original "
                                "file.")
        items.append(item)
    return _not_empty(items, spec, "HellaSwag")


def lambada_items(spec: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, " " + last word) of each passage."""
    items = []
    for where, record in read_records(spec, LAMBADA_HUB, limit):
        if not isinstance(record.get("text"), str) or " " not in record["text"].strip():
            raise PipelineError(f"{where} is not in LAMBADA's format (a \"text\" of several words per line): "
                                f"{str(record)[:200]}")
        words = record["text"].split(" ")
        items.append((" ".join(words[:-1]), " " + words[-1]))
    return _not_empty(items, spec, "LAMBADA")


# --- scoring ---------------------------------------------------------------------------------------------

def autocast_for(device: torch.device) -> Any:
    """On a GPU, autocast to the type training picks there (bf16 from compute capability 8.0, fp16 on 7.x; fp32
    before); full precision on the CPU, where scoring is small."""
    if device.type != "cuda":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(detect().precision)
    return torch.autocast("cuda", dtype=dtype) if dtype else nullcontext()


def _encode_pair(tokenizer: Any, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [prefix_id], tokenizer.encode(continuation, add_special_tokens=False)
    prefix = tokenizer.decode(prefix_id)
    whole, context_ids = (_encode(tokenizer, text, prefix) for text in (context + continuation, context))
    return context_ids, whole[len(context_ids):]


def _encode(tokenizer: Any, text: str, prefix: str) -> list[int]:
    """A text as the harness encodes it: with the tokenizer's own special tokens (a Llama's <s> first; none for
    GPT-2), unless the text starts with the prefix token already."""
    return tokenizer.encode(text, **({"add_special_tokens": False} if text.startswith(prefix) else {}))


@torch.no_grad()
def loglikelihoods(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], prefix_id: int, max_length: int,
                   batch_size: int = 16, desc: str = "score") -> list[tuple[float, bool]]:
    """(sum of log-likelihoods of the continuation, whether it is the greedy one) for each (context,
    continuation); an empty context is `prefix_id` (lm-evaluation-harness's prefix token: the tokenizer's
    beginning-of-text token when it has one, else end-of-text). Batches are right-padded, which a causal model
    never attends to."""
    device = next(model.parameters()).device
    model.eval()
    requests = []
    for context, continuation in pairs:
        context_ids, continuation_ids = _encode_pair(tokenizer, context, continuation, prefix_id)
        if not continuation_ids:
            raise PipelineError(f"the continuation {continuation!r} is empty once tokenized: nothing to score.")
        requests.append(((context_ids + continuation_ids)[-(max_length + 1):][:-1], continuation_ids))
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))  # similar lengths share a batch
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit=" req", leave=False) as bar, autocast_for(device):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = len(requests[batch[0]][0])
            inputs = torch.full((len(batch), width), prefix_id, dtype=torch.long)
            for row, index in enumerate(batch):
                ids = requests[index][0]
                inputs[row, : len(ids)] = torch.tensor(ids)
            logits = model(input_ids=inputs.to(device)).logits.float()
            for row, index in enumerate(batch):
                ids, continuation_ids = requests[index]
                positions = slice(len(ids) - len(continuation_ids), len(ids))
                logprobs = F.log_softmax(logits[row, positions], dim=-1)
                target = torch.tensor(continuation_ids, device=device)
                results[index] = (float(logprobs.gather(1, target[:, None]).sum()),
                                  bool((logprobs.argmax(dim=-1) == target).all()))
            bar.update(len(batch))
    return results


def multiple_choice_scores(logliks: list[float], choices: list[str], gold: int) -> dict[str, float]:
    acc = max(range(len(choices)), key=lambda i: logliks[i]) == gold
    acc_norm = max(range(len(choices)), key=lambda i: logliks[i] / len(choices[i])) == gold
    return {"acc": float(acc), "acc_norm": float(acc_norm)}


def hellaswag(model: Any, tokenizer: Any, items: list[MultipleChoice], prefix_id: int, max_length: int,
              batch_size: int = 16) -> dict[str, Any]:
    pairs = [(item.query, " " + choice) for item in items for choice in item.choices]
    flat = [ll for ll, _ in loglikelihoods(model, tokenizer, pairs, prefix_id, max_length, batch_size, "hellaswag")]
    per_item, position = [], 0
    for item in items:
        per_item.append(multiple_choice_scores(flat[position : position + len(item.choices)], item.choices,
                                               item.gold))
        position += len(item.choices)
    return {"items": len(items), **{metric: sum(s[metric] for s in per_item) / len(items)
                                    for metric in ("acc", "acc_norm")}}


def lambada(model: Any, tokenizer: Any, items: list[tuple[str, str]], prefix_id: int, max_length: int,
            batch_size: int = 16) -> dict[str, Any]:
    scored = loglikelihoods(model, tokenizer, items, prefix_id, max_length, batch_size, "lambada")
    return {"items": len(items), "acc": sum(greedy for _, greedy in scored) / len(items),
            "perplexity": math.exp(-sum(ll for ll, _ in scored) / len(items))}


@torch.no_grad()
def sliding_window_nll(model: Any, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) of ids[1:] given what precedes each, in windows of
    `window` tokens stepping by `stride` (1 <= stride <= window)."""
    if not 1 <= stride <= window:
        raise PipelineError(f"the stride {stride} must be between 1 and the window of {window} tokens.")
    device = next(model.parameters()).device
    model.eval()
    total, scored = 0.0, 0
    with autocast_for(device), tqdm(total=len(ids) - 1, desc="text", unit=" tok", unit_scale=True,
                                    leave=False) as bar:
        for begin in _window_starts(len(ids), window, stride):
            end = min(begin + window, len(ids) - 1)
            inputs = torch.tensor(ids[begin:end], device=device)[None]
            targets = torch.tensor(ids[begin + 1 : end + 1], device=device)
            new = end - scored  # the targets no earlier window scored
            logits = model(input_ids=inputs).logits[0, -new:].float()
            total += float(F.cross_entropy(logits, targets[-new:], reduction="sum"))
            scored += new
            bar.update(new)
    return total, scored


def _window_starts(length: int, window: int, stride: int) -> Iterable[int]:
    begin = 0
    while True:
        yield begin
        if begin + window >= length - 1:
            return
        begin += stride


def read_text(path: Path) -> str:
    """An --eval-text file, checked: UTF-8, not empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PipelineError(f"cannot read --eval-text {path} as UTF-8 text: {error}. Give a UTF-8 text file."
                            ) from error
    if not text.strip():
        raise PipelineError(f"--eval-text {path} is empty: there is nothing to score. Give a file with text in it.")
    return text


def text_scores(model: Any, tokenizer: Any, text: str, path: Path, start_ids: list[int], window: int,
                stride: int) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of a text (the file `path`), scored as one document that starts as
    the shards' do (`start_ids`: end-of-text, then the beginning-of-text token where the tokenizer has one)."""
    ids = [*start_ids, *tokenizer.encode(text, add_special_tokens=False)]
    nll, tokens = sliding_window_nll(model, ids, window, stride)
    return {"path": str(path), "tokens": tokens, "bytes": len(text.encode("utf-8")), "window": window,
            "stride": stride, "loss": nll / tokens, "perplexity": math.exp(nll / tokens),
            "bits_per_byte": nll / math.log(2) / len(text.encode("utf-8"))}
