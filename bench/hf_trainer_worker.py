"""Benchmark worker: what most people would run instead — the Hugging Face Trainer with DeepSpeed.

    deepspeed bench/hf_trainer_worker.py --config bench/hf_configs/zero2_offload.json ...

The DeepSpeed configs in bench/hf_configs/ are the ZeRO-2 and ZeRO-3 CPU-offload examples of the transformers
documentation (its DeepSpeed guide), "auto" values and all. The model, the sequences and the learning rate
are onecard's; the Trainer does everything else its own way (its sampler, its loss, AdamW through DeepSpeed).
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch
from common import BenchConfig, StepLog, train_batches, write_result

from pipeline.hardware import cap_gpu_memory
from pipeline.model import GPT2_GELU, build_model
from pipeline.stage import parse_config


class Sequences(torch.utils.data.Dataset):
    """The train split's sequences, which the Trainer samples in its own (shuffled) order."""

    def __init__(self, config: BenchConfig) -> None:
        batches, self.index = train_batches(config)
        self.sequences = batches.sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = torch.from_numpy(self.sequences.get(np.array([i]))[0, :-1])
        return {"input_ids": row, "labels": row}  # the Trainer's model shifts the labels itself


def main() -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    config = parse_config(BenchConfig, sys.argv[1:])
    command = [sys.executable, *sys.argv]
    if config.gpu_mem_cap is not None:
        cap_gpu_memory(config.gpu_mem_cap)
    data = Sequences(config)
    log = StepLog()

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            log.start()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            log.end(float("nan"))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and log.losses:
                log.losses[-1] = logs["loss"]

    error = None
    try:
        torch.manual_seed(1337)
        # GPT-2 as a user of the Trainer has it: transformers' GPT-2 config, with its own gelu_new
        model = build_model(config.preset, data.index["vocab_size"], data.index["eot_id"], activation=GPT2_GELU)
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="hf-trainer-"), deepspeed=config.config,
            per_device_train_batch_size=config.micro_batch_size, gradient_accumulation_steps=config.grad_accum,
            max_steps=config.steps, learning_rate=config.lr, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
            bf16=config.precision == "bf16", gradient_checkpointing=config.gradient_checkpointing,
            torch_compile=config.torch_compile,
            logging_steps=1, save_strategy="no", report_to=[],
            dataloader_drop_last=True, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Timing()])
        trainer.train()
    except Exception as caught:
        error = caught
    write_result(config.result, log.result("hf-trainer", config, data.index, command, error))


if __name__ == "__main__":
    main()
