"""Train or fine-tune DPSN-R: `dpsnr train --config configuration/recipes/<name>.yaml [--key value ...]`.

The recipe YAML holds every argument; command-line flags override it. Arguments are parsed with
`HfArgumentParser` (dpsnr/scripting.py) into typed dataclasses: `ModelArguments` and `RunArguments`
(below), `DataArguments` (training/data.py) and `DPSNRTrainingArguments` (training/trainer.py, a
`TrainingArguments`).
Works the same under `accelerate launch --config_file configuration/accelerate/<setup>.yaml`.

At the end the model folder (weights, config, remote code, tokenizer) is in `output_dir`, and
the held-out loss, a generated sample and its reasoning statistics are printed; the last line of
output is one JSON object with the figures.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

import modeling_dpsnr  # noqa: F401  (registers the Auto classes)
from modeling_dpsnr import DPSNRConfig, DPSNRForCausalLM

from dpsnr.scripting import parse_dataclasses

from .data import DataArguments, build_datasets, check_tokenizer_matches_model, resolve_data_path
from .tokenizer import load_gpt2_tokenizer, train_bpe_tokenizer
from .trainer import DPSNRTrainer, DPSNRTrainingArguments

logger = logging.get_logger(__name__)


@dataclass
class ModelArguments:
    preset: str | None = field(default="micro", metadata={"help": "Architecture preset to train from scratch."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Fine-tune this model folder or Hub id instead of a fresh preset."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Config fields to override, as a YAML/JSON mapping, e.g. '{loop_max_steps: 2}' (ablations)."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "'gpt2' (shipped GPT-2 BPE), 'train' (train a byte-level BPE of the model's vocab_size on "
                          "the training file), or a tokenizer folder / Hub id. Default: the fine-tuned model's, else 'gpt2'."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub models with custom code."})


@dataclass
class RunArguments:
    config: str | None = field(default=None, metadata={"help": "Recipe YAML (configuration/recipes/*.yaml)."})
    resume: bool = field(default=False, metadata={"help": "Resume from the last complete checkpoint in output_dir."})
    sample_prompt: str = field(default="Once upon a time", metadata={"help": "Prompt of the sample printed at the end."})
    sample_max_new_tokens: int = field(default=80, metadata={"help": "Length of that sample (0: no sample)."})


PARSER_TYPES = (ModelArguments, DataArguments, DPSNRTrainingArguments, RunArguments)


def parse_args(argv: list[str] | None = None):
    """Recipe YAML first, then command-line overrides, into the four dataclasses."""
    model_args, data_args, train_args, run_args = parse_dataclasses(PARSER_TYPES, argv)
    if isinstance(model_args.config_overrides, str):  # from the command line; a recipe gives a mapping
        model_args.config_overrides = yaml.safe_load(model_args.config_overrides)
    if model_args.config_overrides is not None and not isinstance(model_args.config_overrides, dict):
        raise ValueError(f"config_overrides must be a mapping of config fields, got {model_args.config_overrides!r}")
    return model_args, data_args, train_args, run_args


def build_tokenizer(model_args: ModelArguments, data_args: DataArguments, output_dir: str, vocab_size: int):
    choice = model_args.tokenizer or (model_args.model_name_or_path if model_args.model_name_or_path else "gpt2")
    if choice == "gpt2":
        return load_gpt2_tokenizer()
    if choice == "train":
        if data_args.train_file is None:
            raise ValueError("tokenizer='train' needs data_args.train_file to learn the BPE from")
        files = [str(resolve_data_path(data_args.train_file, data_args.data_dir))]
        return train_bpe_tokenizer(files, vocab_size, output_dir=os.path.join(output_dir, "tokenizer"))
    return AutoTokenizer.from_pretrained(choice, trust_remote_code=model_args.trust_remote_code)


def build_model(model_args: ModelArguments, tokenizer):
    overrides = dict(model_args.config_overrides or {})
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **overrides
        )
        return model
    check_tokenizer_matches_model(tokenizer, DPSNRConfig.from_preset(model_args.preset, **overrides).vocab_size)
    config = DPSNRConfig.from_preset(
        model_args.preset,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    return DPSNRForCausalLM(config)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, train_args, run_args = parse_args(argv)
    logging.set_verbosity_info() if train_args.should_log else logging.set_verbosity_warning()
    set_seed(train_args.seed)

    last_checkpoint = None
    if run_args.resume:
        if os.path.isdir(train_args.output_dir):
            last_checkpoint = get_last_checkpoint(train_args.output_dir)
        if last_checkpoint is None:
            logger.warning(f"--resume: no complete checkpoint in {train_args.output_dir}; starting from scratch.")

    # Everything that can be wrong with the inputs is checked before the first step.
    preset_vocab = DPSNRConfig.from_preset(model_args.preset).vocab_size if model_args.preset else None
    # Rank 0 trains the tokenizer and fills the dataset cache; the other ranks then read them.
    with train_args.main_process_first(desc="tokenizer and datasets"):
        tokenizer = build_tokenizer(model_args, data_args, train_args.output_dir, preset_vocab or 0)
        model = build_model(model_args, tokenizer)
        check_tokenizer_matches_model(tokenizer, model.config.vocab_size)
        datasets = build_datasets(
            data_args, tokenizer,
            model_max_positions=model.config.max_position_embeddings, model_vocab_size=model.config.vocab_size,
        )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"DPSN-R {model_args.preset or model_args.model_name_or_path}: {n_params / 1e6:.1f}M parameters")

    trainer = DPSNRTrainer(
        model=model, args=train_args, train_dataset=datasets["train"], eval_dataset=datasets["validation"],
        data_collator=default_data_collator, processing_class=tokenizer,
    )
    start = time.time()
    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
    train_seconds = time.time() - start
    metrics = trainer.evaluate()
    trainer.save_model(train_args.output_dir)
    trainer.save_state()

    train_tokens = (trainer.state.global_step * train_args.per_device_train_batch_size * train_args.gradient_accumulation_steps
                    * max(train_args.world_size, 1) * len(datasets["train"][0]["input_ids"]))
    summary = {
        "model_dir": os.path.abspath(train_args.output_dir),
        "preset": model_args.preset,
        "steps": trainer.state.global_step,
        "train_tokens": train_tokens,
        "train_seconds": round(train_seconds, 1),
        "train_tokens_per_second": round(train_tokens / max(train_seconds, 1e-9)),
        "train_loss": round(train_result.training_loss, 4),
        "heldout_loss": metrics.get("eval_lm_loss"),
        "heldout_perplexity": metrics.get("eval_perplexity"),
        "heldout_avg_steps": metrics.get("eval_avg_steps"),
        "parameters": n_params,
        "device": str(train_args.device),
        "mixed_precision": trainer.accelerator.mixed_precision,  # from --bf16/--fp16 or the accelerate config
    }
    if run_args.sample_max_new_tokens > 0 and trainer.is_world_process_zero():
        summary.update(sample(model, tokenizer, run_args.sample_prompt, run_args.sample_max_new_tokens, train_args.seed))
    if trainer.is_world_process_zero():
        with open(os.path.join(train_args.output_dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary))
    return summary


def sample(model, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> dict:
    """Generate a sample and print it with its per-token reasoning statistics."""
    model.eval()
    set_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    out, stats = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8,
        pad_token_id=tokenizer.pad_token_id, return_reasoning_stats=True,
    )
    new = out[0, ids.shape[1]:]
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    steps = stats["steps"][0, : new.numel()].tolist()
    print("\n=== sample ===\n" + text + "\n")
    print("token              steps  active params")
    for tok, s, a in list(zip(new.tolist(), steps, stats["active_params"][0].tolist()))[:20]:
        print(f"{tokenizer.decode([tok])!r:18} {s:>5}  {a:>13,}")
    print(f"... avg_loops={stats['avg_loops']:.2f} over {new.numel()} generated tokens\n")
    return {"sample": text, "sample_avg_loops": round(stats["avg_loops"], 3),
            "sample_avg_active_params": round(stats["avg_active_params"])}


if __name__ == "__main__":
    main()
