"""Retrofitting a pool into a pretrained model, against plain fine-tuning at equal tokens.

The experiment of the TinyLlama report (Engram / PEER memories added to a pretrained model), with
an honest baseline and at this machine's scale:
1. pretrain: a transformers `LlamaForCausalLM` of the micro controller's shape (the study's
   `dense-4`) on TinyStories with the main job's recipe (716,800 tokens, --base-lr) and its 4,096-token
   BPE; held-out TinyStories perplexity recorded;
2. continue on WikiText-2 (same tokenizer: the pretrained model's), --tokens training tokens each:
   (a) plain fine-tuning of every parameter, (b) retrofitted with a product-key pool, (c) with a
   hashed n-gram memory, (d) with both — (b)-(d) train only the memory (`add_memory(...,
   freeze_base=True)`); every row at each learning rate of its sweep, best reported; (e)... a
   memory trained together with the whole base (`--joint`), each part at its best rate above;
3. metric: held-out WikiText-2 perplexity (valid.txt, the first 256 blocks of 256 tokens), the
   perplexity of the pretrained model before any continuation, trained parameters, training tokens/s.

    dpsnr retrofit-study [--tokens 358400] [--base-lr 1e-3]
Writes eval/results/retrofit_study.json (+ .md); prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from dpsnr.eval.study import BATCH, BLOCK, CACHE, MAIN_JOB_TOKENS, blocks_for, provenance, tokenizer_for

RESULTS = Path(__file__).resolve().parent / "results"
MEMORIES = {
    "product_key": dict(pool_size=65536, pool_heads=4, pool_topk=8, pool_key_dim=64),
    "hashed": dict(pool_size=65536, ngram_orders=[2, 3], ngram_heads=4),
    "both": dict(pool_size=131072, pool_heads=4, pool_topk=8, pool_key_dim=64, ngram_orders=[2, 3], ngram_heads=4),
}


def _train(model, blocks: np.ndarray, tokens: int, lr: float, seed: int, params=None, groups=None) -> float:
    """AdamW, cosine with 30/350 warmup, clip 1: the main job's schedule. Returns tokens/s.
    `groups` (AdamW parameter groups) overrides `params` / `lr` for a joint base + memory run."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    steps = tokens // (BLOCK * BATCH)
    order = np.random.default_rng(seed).permutation(len(blocks))[: steps * BATCH]
    if groups is None:
        # The main job's weight decay for a full fine-tune; none on a memory (DESIGN §4: no decay on the pool).
        decay = 0.1 if params is None else 0.0
        groups = [{"params": [p for p in (params if params is not None else model.parameters()) if p.requires_grad],
                   "lr": lr, "weight_decay": decay}]
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups)
    sched = get_cosine_schedule_with_warmup(opt, max(1, round(steps * 30 / 350)), steps)
    model.train()
    start = time.perf_counter()
    for i in range(steps):
        ids = torch.as_tensor(blocks[order[i * BATCH:(i + 1) * BATCH]], dtype=torch.long)
        model(ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return steps * BATCH * BLOCK / (time.perf_counter() - start)


@torch.no_grad()
def heldout_ppl(model, blocks: np.ndarray) -> float:
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(blocks), 32):
        ids = torch.as_tensor(blocks[i:i + 32], dtype=torch.long)
        logp = model(ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def pretrained_base(tok, base_lr: float, seed: int):
    """The dense twin trained on TinyStories (cached: the same base for every continuation)."""
    from transformers import LlamaForCausalLM

    from dpsnr.eval.study import RunSpec, build_model

    folder = CACHE / f"retrofit-base-lr{base_lr:g}-s{seed}"
    if (folder / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(folder), json.loads((folder / "base.json").read_text())
    data = blocks_for("tinystories", tok)
    _, _, model = build_model(RunSpec("tinystories", "dense-4", lr=base_lr, seed=seed), tok)
    speed = _train(model, data["train"], MAIN_JOB_TOKENS, base_lr, seed)
    record = {"tinystories_heldout_ppl": heldout_ppl(model, data["validation"]), "train_tokens_per_second": speed,
              "lr": base_lr, "tokens": MAIN_JOB_TOKENS}
    model.save_pretrained(folder)
    (folder / "base.json").write_text(json.dumps(record))
    return model, record


def wikitext_blocks(tok) -> dict[str, np.ndarray]:
    """WikiText-2 under the pretrained model's (TinyStories) tokenizer, cached."""
    from dpsnr.training.data import DataArguments, build_datasets

    path = CACHE / f"blocks-wikitext2-tstok-{BLOCK}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    ds = build_datasets(DataArguments(train_file="wikitext-2/train.txt", validation_file="wikitext-2/valid.txt",
                                      block_size=BLOCK, max_eval_samples=256), tok)
    out = {k: np.asarray(ds[k]["input_ids"], dtype=np.int32) for k in ("train", "validation")}
    np.savez(path, **out)
    return out


def main(argv=None) -> dict:
    from modeling_dpsnr.retrofit import add_memory

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=MAIN_JOB_TOKENS // 2, help="continuation tokens per row")
    p.add_argument("--base-lr", type=float, default=1e-3)
    p.add_argument("--finetune-lrs", type=float, nargs="+", default=[3e-4, 1e-3])
    p.add_argument("--memory-lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--after-layer", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--joint", nargs="*", default=["both"], choices=list(MEMORIES),
                   help="memories also trained together with the whole base (rows (e)...): base at the best "
                        "fine-tuning lr, memory at its best retrofit lr")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --output, run the others")
    p.add_argument("--output", default=str(RESULTS / "retrofit_study.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = tokenizer_for("tinystories")
    base, base_record = pretrained_base(tok, args.base_lr, args.seed)
    wt = wikitext_blocks(tok)
    out = Path(args.output)
    done = json.loads(out.read_text())["rows"] if args.resume and out.exists() else {}
    rows = {"pretrained (no continuation)": {"heldout_ppl": heldout_ppl(base, wt["validation"]), "trained_params": 0}}
    for variant, lrs in [("(a) plain fine-tuning", args.finetune_lrs)] + [(f"({c}) retrofit {m}", args.memory_lrs)
                                                                         for c, m in zip("bcd", MEMORIES)]:
        if variant in done:
            rows[variant] = done[variant]
            continue
        tries = {}
        for lr in lrs:
            model, _ = pretrained_base(tok, args.base_lr, args.seed)
            params = None
            if variant.startswith("(a)"):
                trained = sum(p.numel() for p in model.parameters())
            else:
                memory = variant.split("retrofit ")[1]
                model = add_memory(model, after_layer=args.after_layer, memory=memory, **MEMORIES[memory])
                params = model.memory_parameters()
                trained = sum(p.numel() for p in params)
                assert torch.equal(model(torch.as_tensor(wt["validation"][:1], dtype=torch.long)).logits,
                                   base(torch.as_tensor(wt["validation"][:1], dtype=torch.long)).logits)
            speed = _train(model, wt["train"], args.tokens, lr, args.seed, params)
            tries[f"{lr:g}"] = {"heldout_ppl": heldout_ppl(model, wt["validation"]), "train_tokens_per_second": speed}
            print(json.dumps({"variant": variant, "lr": lr, **tries[f"{lr:g}"]}), flush=True)
        best = min(tries, key=lambda k: tries[k]["heldout_ppl"])
        rows[variant] = {"heldout_ppl": tries[best]["heldout_ppl"], "best_lr": float(best), "by_lr": tries,
                         "trained_params": trained, "train_tokens_per_second": tries[best]["train_tokens_per_second"]}
    # Joint rows: does a memory add to the usual continuation (every base parameter trained too)?
    ft_lr = rows["(a) plain fine-tuning"]["best_lr"]
    for c, memory in zip("efg", args.joint):
        variant = f"({c}) fine-tuning + retrofit {memory}"
        if variant in done:
            rows[variant] = done[variant]
            continue
        mem_lr = rows[f"({'bcd'[list(MEMORIES).index(memory)]}) retrofit {memory}"]["best_lr"]
        model, _ = pretrained_base(tok, args.base_lr, args.seed)
        model = add_memory(model, after_layer=args.after_layer, memory=memory, freeze_base=False, **MEMORIES[memory])
        mem = {id(p) for p in model.memory_parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in mem], "lr": ft_lr, "weight_decay": 0.1},
                  {"params": model.memory_parameters(), "lr": mem_lr, "weight_decay": 0.0}]
        speed = _train(model, wt["train"], args.tokens, ft_lr, args.seed, groups=groups)
        rows[variant] = {"heldout_ppl": heldout_ppl(model, wt["validation"]), "best_lr": f"{ft_lr:g} base, {mem_lr:g} memory",
                         "trained_params": sum(p.numel() for p in model.parameters()), "train_tokens_per_second": speed}
        print(json.dumps({"variant": variant, **rows[variant]}), flush=True)
    report = {"metric": "held-out WikiText-2 perplexity after continuing a TinyStories-pretrained dense model",
              "continuation_tokens": args.tokens, "base": base_record, "memories": MEMORIES, "rows": rows,
              "settings": vars(args), "provenance": provenance("dpsnr retrofit-study")}
    out.write_text(json.dumps(report, indent=1))
    lines = [f"Continuation on WikiText-2: {args.tokens:,} tokens per row; base: dense-4 pretrained on TinyStories "
             f"({MAIN_JOB_TOKENS:,} tokens, lr {args.base_lr:g}, held-out TinyStories ppl {base_record['tinystories_heldout_ppl']:.2f}).",
             "", "| row | held-out WikiText-2 ppl | best lr | trained params | train tok/s |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['heldout_ppl']:.2f} | {r.get('best_lr', '–')} | {r['trained_params']:,} | "
                     f"{r.get('train_tokens_per_second', 0):.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plain = rows["(a) plain fine-tuning"]["heldout_ppl"]
    summary = {"metric": "held-out WikiText-2 ppl", **{k: round(v["heldout_ppl"], 2) for k, v in rows.items()},
               "retrofits_beating_plain": [k for k, v in rows.items() if "retrofit" in k and v["heldout_ppl"] < plain]}
    report["summary"] = summary
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary))
    return report


if __name__ == "__main__":
    main()
