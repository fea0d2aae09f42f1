"""Generate with a DPSN-R model and show how much it reasoned for every token.

    dpsnr generate --model runs/micro-tinystories --prompt "Once upon a time" --max-new-tokens 40 \
        [--do-sample --top-k 40 --temperature 0.8 --seed 0] [--pool-mmap] [--device cuda]

`--model` is a folder or a Hub id. Prints the text, a table of the generated tokens with their
reasoning steps, active parameters and pool rows read, and, last, one JSON line with the totals.
The installed `modeling_dpsnr` package is registered first, so a Hub checkpoint runs on the local
code and none of its Python files is executed unless `--trust-remote-code` is given.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class GenerateArguments:
    model: str = field(metadata={"help": "DPSN-R model folder or Hub id."})
    prompt: str = field(default="Once upon a time", metadata={"help": "Text to continue."})
    max_new_tokens: int = field(default=40, metadata={"help": "Tokens to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=50, metadata={"help": "Sample from the k most likely tokens."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width (statistics are per beam slot)."})
    seed: int = field(default=0, metadata={"help": "Random seed (sampling)."})
    device: str | None = field(default=None, metadata={"help": "Default: cuda if available, else cpu."})
    dtype: str = field(default="float32", metadata={"help": f"One of {', '.join(DTYPES)}."})
    pool_mmap: bool = field(default=False, metadata={"help": "Keep the pool on disk, memory-mapped (large pools)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the checkpoint's own code instead of the "
                                                                       "installed package's."})
    table_rows: int = field(default=40, metadata={"help": "Generated tokens shown in the table."})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be positive, got {self.max_new_tokens}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}.")
        if self.num_beams < 1:
            raise ValueError(f"--num-beams must be positive, got {self.num_beams}.")


def load(args: GenerateArguments):
    """(model, tokenizer) of `args.model`, refusing models that are not DPSN-R."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from modeling_dpsnr import DPSNRForCausalLM  # registers the Auto classes: the local code is used

    config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if config.model_type != "dpsnr":
        raise ValueError(f"{args.model} is a {config.model_type!r} model; dpsnr generate reports reasoning statistics "
                         "of DPSN-R models only.")
    extra = {"pool_mmap": True} if args.pool_mmap else {}
    # The installed class is what AutoModelForCausalLM resolves to once the package is registered.
    model_class = AutoModelForCausalLM if args.trust_remote_code else DPSNRForCausalLM
    model = model_class.from_pretrained(args.model, trust_remote_code=args.trust_remote_code,
                                        dtype=getattr(torch, args.dtype), **extra)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.place_controller(device) if args.pool_mmap else model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(f"{args.model} has no tokenizer to encode the prompt with: {err}") from err
    return model.eval(), tokenizer


def generate(model, tokenizer, args: GenerateArguments) -> dict:
    """Generate from `args.prompt`; the record holds the text and per-token statistics."""
    import torch
    from transformers import set_seed

    set_seed(args.seed)
    enc = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    if enc.input_ids.numel() == 0:
        raise ValueError("--prompt encodes to no tokens; give some text.")
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) \
        if args.do_sample else dict(do_sample=False)
    start = time.perf_counter()
    with torch.inference_mode():
        output, stats = model.generate(
            **enc, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            return_reasoning_stats=True, **sampling,
        )
    seconds = time.perf_counter() - start
    new = output[0, enc.input_ids.shape[1]:].tolist()
    n = min(len(new), stats["steps"].shape[1])
    return {
        "model": args.model, "prompt": args.prompt, "text": tokenizer.decode(output[0], skip_special_tokens=True),
        "new_tokens": new, "tokens": [tokenizer.decode([t]) for t in new],
        "steps": stats["steps"][0, :n].tolist(), "active_params": stats["active_params"][0, :n].tolist(),
        "rows_read": stats["rows_read"][0, :n].tolist(),
        "avg_loops": stats["avg_loops"], "avg_active_params": stats["avg_active_params"],
        "max_steps": model.config.loop_max_steps, "seconds": seconds,
        "tokens_per_second": len(new) / seconds if seconds > 0 else None,
    }


def print_report(record: dict, table_rows: int) -> None:
    print(record["text"] + "\n")
    print(f"{'token':<18} {'steps':>5} {'active params':>14} {'rows read':>10}")
    rows = list(zip(record["tokens"], record["steps"], record["active_params"], record["rows_read"]))
    for tok, steps, active, read in rows[:table_rows]:
        print(f"{tok!r:<18} {steps:>5} {active:>14,} {read:>10,}")
    if len(rows) > table_rows:
        print(f"... {len(rows) - table_rows} more")
    print(f"mean {record['avg_loops']:.2f} of {record['max_steps']} steps, {record['avg_active_params']:,.0f} active "
          f"parameters per generated token\n")
    summary = {k: record[k] for k in ("model", "prompt", "text", "avg_loops", "avg_active_params", "seconds",
                                      "tokens_per_second")}
    summary.update(new_tokens=len(record["new_tokens"]), rows_read=sum(record["rows_read"]))
    print(json.dumps(summary))


def run(argv: list[str] | None = None) -> dict:
    from dpsnr.scripting import parse_dataclasses

    (args,) = parse_dataclasses((GenerateArguments,), argv, description=__doc__.split("\n\n")[0])
    model, tokenizer = load(args)
    record = generate(model, tokenizer, args)
    print_report(record, args.table_rows)
    return record


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit status 0 on success (the record is printed, not returned)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
