"""Zero-shot scoring against log-likelihoods computed by hand, and the benchmarks' published formats."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import build_model
from pipeline.stage import PipelineError
from pipeline.zeroshot import (
    hellaswag,
    hellaswag_items,
    lambada,
    lambada_items,
    loglikelihoods,
    multiple_choice_scores,
    read_text,
    sliding_window_nll,
    text_scores,
)

EOT = 256


class ByteTokenizer:
    """One token per UTF-8 byte: token ids anyone can write down."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))  # it has no special tokens to add

    def decode(self, ids: list[int] | int) -> str:
        ids = [ids] if isinstance(ids, int) else ids
        return "".join("<|endoftext|>" if i == EOT else bytes([i]).decode("latin-1") for i in ids)


class Bigram(torch.nn.Module):
    """A model whose next-token logits depend on the current token only, through a known table."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(257, 257, generator=torch.Generator().manual_seed(seed)) * 3)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def by_hand(model: Bigram, ids: list[int]) -> float:
    """log P(ids[1:] | ids[0]) under the bigram table, one term at a time."""
    logprobs = F.log_softmax(model.table.detach().double(), dim=-1)
    return sum(float(logprobs[a, b]) for a, b in itertools.pairwise(ids))


def test_loglikelihoods_match_a_hand_computation() -> None:
    model, tokenizer = Bigram(), ByteTokenizer()
    pairs = [("The cat", " sat"), ("A dog ", "ran"), ("x", " yz and more"), ("", "hi")]
    scores = loglikelihoods(model, tokenizer, pairs, EOT, max_length=64, batch_size=3)
    expected = [  # a bigram scores the continuation from the context's last token on
        by_hand(model, list(b"t sat")),
        by_hand(model, list(b"g ran")),  # the context's trailing space moves to the continuation
        by_hand(model, list(b"x yz and more")),
        by_hand(model, [EOT, *b"hi"]),  # an empty context is the end-of-text token
    ]
    for (score, _), want in zip(scores, expected, strict=True):
        assert score == pytest.approx(want, rel=1e-5)


def test_greedy_flag_and_left_truncation() -> None:
    model, tokenizer = Bigram(), ByteTokenizer()
    greedy = list(b"quit")
    with torch.no_grad():
        for a, b in itertools.pairwise(greedy):
            model.table[a, b] = 50.0  # the argmax after each letter is the next letter of "quit"
    continuation = "uit"
    (ll_greedy, is_greedy), (_, not_greedy) = loglikelihoods(
        model, tokenizer, [("q", continuation), ("q", continuation[::-1] + "!")], EOT, max_length=64)
    assert is_greedy and not not_greedy
    assert ll_greedy == pytest.approx(by_hand(model, greedy), rel=1e-5)
    # A context longer than the model's window is cut from the left (a tiny GPT-2 of context 256 would fail
    # on 400 positions), and the continuation is scored on the last 256 tokens.
    torch.manual_seed(0)
    gpt = build_model("tiny", 257, EOT)
    long_context = "abcd " * 80
    (truncated, _), = loglikelihoods(gpt, tokenizer, [(long_context, "xyz")], EOT, max_length=256)
    window = torch.tensor([list((long_context + "xyz").encode())[-257:]])
    with torch.no_grad():
        logprobs = F.log_softmax(gpt(input_ids=window[:, :-1]).logits[0], dim=-1)
    assert truncated == pytest.approx(float(logprobs[torch.arange(252, 256), window[0, 253:]].sum()), rel=1e-5)


def test_batches_and_padding_do_not_change_scores() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 257, EOT)
    pairs = [("short", " one"), ("a much longer context than the others here", " two"), ("mid size", " three!")]
    one_by_one = [loglikelihoods(model, ByteTokenizer(), [pair], EOT, 256)[0][0] for pair in pairs]
    batched = [score for score, _ in loglikelihoods(model, ByteTokenizer(), pairs, EOT, 256, batch_size=3)]
    assert batched == pytest.approx(one_by_one, rel=1e-5)
    # and against the model's own loss on the whole string
    ids = torch.tensor([list(b"short one")])
    logprobs = F.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    direct = logprobs[torch.arange(4, 8), ids[0, 5:]].sum()
    assert one_by_one[0] == pytest.approx(float(direct), rel=1e-5)


def test_multiple_choice_acc_and_acc_norm() -> None:
    # the long ending has the lower sum but the higher per-character log-likelihood
    assert multiple_choice_scores([-10.0, -12.0], ["ab", "abcdefgh"], gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert multiple_choice_scores([-10.0, -12.0], ["ab", "abcdefgh"], gold=0) == {"acc": 1.0, "acc_norm": 0.0}


HELLASWAG_RECORDS = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "source_id": "x"},
    {"ind": 92, "activity_label": "Health", "ctx_a": "[header] How to stay warm [title] Wear layers.",
     "ctx_b": "", "ctx": "", "split": "val", "split_type": "zeroshot", "label": "0",
     "endings": ["[step] Layers  trap heat.", "Eat ice.", "Open the windows.", "Sleep outside."], "source_id": "y"},
]


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_hellaswag_items_follow_the_harness_preprocessing(tmp_path: Path) -> None:
    items = hellaswag_items(str(write_records(tmp_path / "hellaswag_val.jsonl", HELLASWAG_RECORDS)))
    assert items[0].query == "Roof shingle removal: A man is sitting on a roof. He"
    assert items[0].choices[3] == "starts pulling up roofing on a roof." and items[0].gold == 3
    assert items[1].query == "Health: How to stay warm. Wear layers."
    assert items[1].choices[0] == " Layers trap heat." and items[1].gold == 0


def test_hellaswag_and_lambada_scores_by_hand(tmp_path: Path) -> None:
    model, tokenizer = Bigram(), ByteTokenizer()
    items = hellaswag_items(str(write_records(tmp_path / "h.jsonl", HELLASWAG_RECORDS)))
    expected_acc, expected_norm = 0.0, 0.0
    for item in items:
        lls = [by_hand(model, list((item.query + " " + c).encode())) - by_hand(model, list(item.query.encode()))
               for c in item.choices]
        expected_acc += max(range(4), key=lambda i: lls[i]) == item.gold
        expected_norm += max(range(4), key=lambda i: lls[i] / len(item.choices[i])) == item.gold
    scores = hellaswag(model, tokenizer, items, EOT, 256)
    assert scores == {"items": 2, "acc": expected_acc / 2, "acc_norm": expected_norm / 2}

    passages = ["The old man walked to the river", "She opened the door and saw her brother"]
    lambada_file = write_records(tmp_path / "lambada_test.jsonl", [{"text": t} for t in passages])
    lambada_pairs = lambada_items(str(lambada_file))
    assert lambada_pairs[0] == ("The old man walked to the", " river")
    lls = [by_hand(model, list(t.encode())) - by_hand(model, list(t.rsplit(" ", 1)[0].encode())) for t in passages]
    scores = lambada(model, tokenizer, lambada_pairs, EOT, 256)
    assert scores["perplexity"] == pytest.approx(math.exp(-sum(lls) / 2), rel=1e-5)
    assert scores["items"] == 2 and scores["acc"] in (0.0, 0.5, 1.0)


def test_sliding_window_scores_every_token_once() -> None:
    model = Bigram()
    ids = [EOT, *b"a sliding window over a text longer than one window"]
    for window, stride in ((8, 3), (8, 8), (100, 50), (2, 1)):
        nll, tokens = sliding_window_nll(model, ids, window, stride)
        assert tokens == len(ids) - 1
        assert nll == pytest.approx(-by_hand(model, ids), rel=1e-5)  # a bigram needs no more context
    with pytest.raises(PipelineError, match="stride 9 must be between 1 and the window of 8"):
        sliding_window_nll(model, ids, 8, 9)


def test_sliding_window_context_is_what_the_stride_says() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 257, EOT)
    ids = [EOT, *b"the context each token sees depends on the stride"]
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0], dim=-1)
    full = -float(logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
    assert sliding_window_nll(model, ids, 256, 128)[0] == pytest.approx(full, rel=1e-5)  # one window
    # windows of 8 with stride 8 give less context than the whole: a different (worse on average) number
    assert sliding_window_nll(model, ids, 8, 8)[0] != pytest.approx(full, rel=1e-5)


def test_text_scores_report_bits_per_byte(tmp_path: Path) -> None:
    text = tmp_path / "held-out.txt"
    text.write_text("Some held-out text, naïve café.")
    scores = text_scores(Bigram(), ByteTokenizer(), read_text(text), text, [EOT], window=16, stride=8)
    assert scores["tokens"] == scores["bytes"] == len(text.read_bytes())
    assert scores["bits_per_byte"] == pytest.approx(scores["loss"] / math.log(2))  # one token per byte
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(PipelineError, match=r"latin1\.txt as UTF-8"):
        read_text(tmp_path / "latin1.txt")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(PipelineError, match=r"blank\.txt is empty"):
        read_text(tmp_path / "blank.txt")


def hellaswag_line(label: object) -> str:
    return json.dumps({**HELLASWAG_RECORDS[0], "label": label}) + "\n"


@pytest.mark.parametrize(("reader", "content", "message"), [
    (hellaswag_items, '{"ctx_a": "x"}\n', r"bench\.jsonl:1 is not in HellaSwag's format"),
    (hellaswag_items, hellaswag_line(0) + hellaswag_line(7), r"bench\.jsonl:2: label 7 is not the index of one of "
                                                             r"its 4 endings"),
    (hellaswag_items, hellaswag_line(-1), r"bench\.jsonl:1: label -1 is not the index"),
    (hellaswag_items, "", r"bench\.jsonl holds no HellaSwag items: there is nothing to score"),
    (lambada_items, '{"text": "oneword"}\n', r"bench\.jsonl:1 is not in LAMBADA's format"),
    (lambada_items, "\n\n", r"bench\.jsonl holds no LAMBADA items"),
    (lambada_items, "not json\n", r"bench\.jsonl:1 is not a JSON line"),
])
def test_malformed_benchmark_files_are_refused(tmp_path: Path, reader, content: str, message: str) -> None:
    (tmp_path / "bench.jsonl").write_text(content)
    with pytest.raises(PipelineError, match=message):
        reader(str(tmp_path / "bench.jsonl"))
    with pytest.raises(PipelineError, match="does not exist"):
        reader(str(tmp_path / "missing.jsonl"))
    with pytest.raises(PipelineError, match=r"is a folder\. Give the path of the benchmark's \.jsonl file in it"):
        reader(str(tmp_path))


def test_limit_reads_only_the_items_it_scores(tmp_path: Path) -> None:
    path = tmp_path / "lambada.jsonl"
    path.write_text('{"text": "one two"}\n{"text": "three four"}\nthe rest is not JSON\n')
    assert lambada_items(str(path), limit=2) == [("one", " two"), ("three", " four")]
    with pytest.raises(PipelineError, match=r"lambada\.jsonl:3 is not a JSON line"):
        lambada_items(str(path))


def test_hub_code_path_reads_the_same_items(tmp_path: Path) -> None:
    """`hf:NAME` goes through datasets.load_dataset; a local dataset folder exercises that path offline."""
    hub = tmp_path / "hellaswag-on-the-hub"
    hub.mkdir()
    write_records(hub / "validation.jsonl", HELLASWAG_RECORDS)
    local = write_records(tmp_path / "hellaswag_val.jsonl", HELLASWAG_RECORDS)
    assert hellaswag_items(f"hf:{hub}") == hellaswag_items(str(local))
    lambada_hub = tmp_path / "lambada-on-the-hub"
    lambada_hub.mkdir()
    write_records(lambada_hub / "test.jsonl", [{"text": "one two three"}])
    assert lambada_items(f"hf:{lambada_hub}") == [("one two", " three")]
    with pytest.raises(PipelineError, match=r"cannot load .*nothing-here.* from the Hugging Face hub"):
        hellaswag_items(f"hf:{tmp_path / 'nothing-here'}")
