"""Model cards for published DPSN-R folders, rendered with `huggingface_hub.ModelCard.from_template`.

Where each part of a card comes from, so that no figure is ever typed by hand:

| card part                          | source                                                          |
|------------------------------------|-----------------------------------------------------------------|
| words per preset                   | `model_cards/presets.yaml`                                      |
| layout                             | `model_cards/dpsnr.md.j2` (Jinja)                               |
| total / active parameters          | the published config built on the meta device and counted; a   |
|                                    | config equal to its preset must match `presets.MEASURED`        |
| pool bytes, shards, checksums      | the pool index the model's own `save_pretrained` wrote          |
|                                    | (`modeling_dpsnr/pool_files.py`), or its shard plan            |
| training figures                   | the checkpoint's `train_summary.json` (`dpsnr train`)           |
| evaluation (table + `model-index`) | JSON records of `dpsnr perplexity --output FILE`                |

`check_card` re-parses a rendered card offline with `huggingface_hub`'s own metadata classes (the
Hub's `RepoCard.validate()` is an HTTP call to the Hub, so it cannot run here).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index

from modeling_dpsnr import DPSNRConfig, DPSNRForCausalLM
from modeling_dpsnr.presets import MEASURED, POOL_STORAGE, PRESETS
from modeling_dpsnr.pool_files import DEFAULT_MAX_SHARD_SIZE, parse_size, plan_shards, pool_bytes, pool_table_shapes

CARDS_DIR = Path(__file__).resolve().parents[2] / "model_cards"
TEMPLATE = CARDS_DIR / "dpsnr.md.j2"
PRESET_TEXT = CARDS_DIR / "presets.yaml"

# Config fields that do not describe the architecture or its training behaviour: a published
# config may differ from its preset in these without the card listing an override.
NOT_ARCHITECTURE = {"bos_token_id", "eos_token_id", "pad_token_id", "use_cache"}
# Keys a record of `dpsnr perplexity` (eval/perplexity.py) always has; anything else is refused as an eval source.
PERPLEXITY_KEYS = {"ppl", "nll", "tokens_scored", "dataset", "split", "context", "stride", "model"}
# `dpsnr perplexity --dataset` keywords (eval/common.py) → (Hub dataset id, Hub config, display name).
HUB_DATASETS = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-v1", "WikiText-2"),
    "wikitext2-raw": ("Salesforce/wikitext", "wikitext-2-raw-v1", "WikiText-2 (raw)"),
    "wikitext103": ("Salesforce/wikitext", "wikitext-103-v1", "WikiText-103"),
    "tinystories": ("roneneldan/TinyStories", None, "TinyStories (held-out stories)"),
}
TRAIN_FIELDS = {  # train_summary.json key → card label
    "steps": "optimizer steps", "train_tokens": "training tokens", "train_seconds": "training time (s)",
    "train_loss": "mean training loss", "heldout_loss": "held-out LM loss (nats/token)",
    "heldout_perplexity": "held-out perplexity", "heldout_avg_steps": "held-out mean reasoning steps",
    "sample_avg_loops": "sample: mean reasoning steps", "sample_avg_active_params": "sample: mean active parameters",
}
COMMON_LIMITATIONS = [
    "No instruction tuning, no preference tuning and no filtering beyond that of the training data: outputs can be "
    "false, biased or offensive, and the model must not be relied on for facts or advice.",
    "The number of reasoning steps a token takes measures the compute spent on it, not the quality of the output.",
    "`trust_remote_code=True` runs the Python files of this repository; they are plain PyTorch with no network access, "
    "and worth reading before use.",
]


@dataclass
class CardInputs:
    """Everything a card says, gathered by the publish command."""

    config: DPSNRConfig
    preset: str
    repo_id: str
    has_weights: bool
    tokenizer: str | None = None  # description, or None when the folder has no tokenizer
    pool_index: dict | None = None  # the pool.safetensors.index.json written into the folder
    train_summary: dict | None = None
    eval_records: list[tuple[str, dict]] = field(default_factory=list)  # (file name, record)
    recipe_path: str | None = None
    recipe_text: str | None = None


# ---------------------------------------------------------------------------- sources
def preset_text(preset: str) -> dict:
    """The words of `model_cards/presets.yaml` for `preset`, over its defaults."""
    data = yaml.safe_load(PRESET_TEXT.read_text(encoding="utf-8"))
    if preset not in data:
        raise ValueError(f"{PRESET_TEXT} has no entry for preset {preset!r}; presets there: "
                         f"{sorted(k for k in data if k != 'defaults')}.")
    return {**data["defaults"], **data[preset]}


def preset_overrides(config: DPSNRConfig, preset: str) -> dict:
    """Architecture fields where `config` differs from the named preset (field → published value)."""
    base = DPSNRConfig.from_preset(preset)
    fields = [k for k in type(config).__annotations__ if k not in NOT_ARCHITECTURE]
    return {k: getattr(config, k) for k in fields if getattr(config, k) != getattr(base, k)}


def measured_counts(config: DPSNRConfig, preset: str) -> dict[str, int]:
    """Parameters of `config`, counted on the meta device (no memory), by part.

    A config equal to its preset must give the preset file's MEASURED numbers: if it does not,
    presets.py is stale and the card refuses to repeat either figure."""
    with torch.device("meta"):
        model = DPSNRForCausalLM(config)
    total, active = model.count_parameters()
    pool = sum(p.numel() for p in model.pool.entry_parameters())
    embedding = model.model.embed_tokens.weight.numel()
    if preset in MEASURED and not preset_overrides(config, preset) and MEASURED[preset] != (total, active):
        raise RuntimeError(f"presets.MEASURED[{preset!r}] = {MEASURED[preset]} but the preset counts {(total, active)}: "
                           "re-measure with `dpsnr presets`.")
    return {"total": total, "active": active, "pool": pool, "embedding": embedding}


def load_eval_record(path: str | Path) -> dict:
    """A JSON record written by `dpsnr perplexity --output FILE`, checked for its keys."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"eval result {path}: cannot read it as JSON ({err}).") from err
    missing = sorted(PERPLEXITY_KEYS - set(record)) if isinstance(record, dict) else sorted(PERPLEXITY_KEYS)
    if missing:
        raise ValueError(f"eval result {path} is not a record of `dpsnr perplexity`: it lacks {missing}.")
    if not (isinstance(record["ppl"], (int, float)) and math.isfinite(record["ppl"])):
        raise ValueError(f"eval result {path}: ppl is {record['ppl']!r}, not a finite number.")
    return record


def eval_results(records: list[tuple[str, dict]]) -> list[EvalResult]:
    """`model-index` entries of `dpsnr perplexity` records: perplexity, and bits per byte when the
    record has it (the whole text was scored). Values are the records' own, unrounded."""
    results = []
    for source, r in records:
        hub_id, hub_config, name = HUB_DATASETS.get(r["dataset"], (Path(str(r["dataset"])).name, None, None))
        split = r["split"]
        if r["dataset"] == "tinystories":
            # The held-out stories are the tail of a slice of TinyStories' *train* split.
            split = "train"
        elif split == "valid":
            split = "validation"
        common = dict(
            task_type="text-generation", task_name="Causal language modeling",
            dataset_type=hub_id, dataset_name=name or hub_id, dataset_config=hub_config, dataset_split=split,
            metric_args={"context": r["context"], "stride": r["stride"], "tokens_scored": r["tokens_scored"],
                         "text": r.get("text_rule"), "source": source},
        )
        results.append(EvalResult(metric_type="perplexity", metric_name="Perplexity", metric_value=r["ppl"], **common))
        if r.get("bits_per_byte") is not None:
            results.append(EvalResult(metric_type="bits_per_byte", metric_name="Bits per byte",
                                      metric_value=r["bits_per_byte"], **common))
    return results


def recipe_datasets(recipe_text: str | None) -> list[str] | None:
    """Hub ids of the data a training recipe names (`dataset_name`, or a known `train_file`); None
    when there is no recipe or its data is not a Hub dataset this code knows."""
    if not recipe_text:
        return None
    recipe = yaml.safe_load(recipe_text) or {}
    if recipe.get("dataset_name"):
        return [str(recipe["dataset_name"])]
    train_file = str(recipe.get("train_file") or "").lower()
    for marker, hub_id in (("tinystories", "roneneldan/TinyStories"), ("wikitext", "Salesforce/wikitext")):
        if marker in train_file:
            return [hub_id]
    return None


# ---------------------------------------------------------------------------- card text
def _n(value: int) -> str:
    """12,345,678 (12.3M)."""
    if value >= 1e9:
        return f"{value:,} ({value / 1e9:,.2f}B)"
    return f"{value:,} ({value / 1e6:,.1f}M)" if value >= 1e6 else f"{value:,}"


def _bytes(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def _step_words(c: DPSNRConfig) -> str:
    if c.loop_step == "block":
        return ("each step is one shared transformer block whose MLP is the pool read, so attention at every depth "
                "sees the sequence (a token that halted earlier is seen at its deepest state)")
    return "each step is a pool read on the token's own state, without attention"


def _halting_words(c: DPSNRConfig) -> str:
    if c.loop_halting == "threshold":
        shares = ", ".join(f"{x:g}" for x in c.loop_capacity)
        return (f"Halting is routed: after each step a router scores every token; in training the top share of the "
                f"batch continues (shares per step {shares}, {sum(c.loop_capacity):.2f} steps on average), at inference "
                "a token continues while its score exceeds a threshold tracked during training, so the decision "
                "depends on the token and its past only.")
    if c.loop_halting == "fixed":
        return f"Every token runs all {c.loop_max_steps} steps."
    if c.loop_halting == "exits":
        return (f"Every step is a trained exit (Ouro-style): training runs all {c.loop_max_steps} steps and minimises "
                f"the expected loss over the exits plus an entropy bonus (β={c.loop_ponder_weight}); at inference a "
                f"token stops at the first step where its exit distribution's CDF reaches {c.loop_exit_threshold}.")
    return f"Halting follows ACT (Graves 2016, ε={c.loop_halt_epsilon}) with a ponder cost."


def _norm_words(c: DPSNRConfig) -> str:
    if c.pool_retrieval != "product_key":
        return ""
    query = {"running": "normalised per head with running statistics (causal: fixed within a forward)",
             "layer": "layer-normalised", "rms": "RMS-normalised"}.get(c.pool_query_norm, c.pool_query_norm)
    keys = "; sub-keys scaled to unit length" if c.pool_key_norm == "unit" else ""
    return f"; queries {query}{keys}"


def architecture_lines(config: DPSNRConfig) -> list[str]:
    c = config
    entry = c.entry_kind.description  # each kind's own words (modeling_dpsnr/kinds.py)
    retrieval = c.retrieval_kind.describe(c)
    sizes = c.partition_sizes()
    parts = ", ".join(f"{name} {sizes[name]:,}" for name in sorted(sizes, key=lambda n: -sizes[n]))
    hashed = [name for name in sizes if c.partition_retrieval(name) == "hashed_ngram"]
    lines = [
        f"Controller: {c.num_hidden_layers} pre-norm decoder blocks (d={c.hidden_size}, {c.num_attention_heads} attention "
        f"heads, {c.num_key_value_heads} key/value heads, SwiGLU {c.intermediate_size}, RoPE, RMSNorm), "
        f"{c.num_prelude_layers} before the reasoning loop and {c.num_coda_layers} after it, so the last blocks' "
        "attention mixes what the loop retrieved across positions. Embedding and LM head are tied.",
        f"Reasoning loop: up to {c.loop_max_steps} steps (at least {c.loop_min_steps}); {_step_words(c)}; step s reads "
        f"partition {' → '.join(c.loop_phase_schedule)}, and the state is updated by a gated sum of what "
        f"{c.pool_heads} heads retrieved. {_halting_words(c)} A halted token costs nothing more.",
        f"Pool: {c.pool_size:,} entries in partitions {parts}; "
        + (f"entries are {entry}." if not hashed else f"entries of {', '.join(n for n in sizes if n not in hashed)} are {entry}."),
        f"Retrieval: {retrieval}{_norm_words(c)}.",
    ]
    for name in hashed:
        where = (f"read once in the prelude after block {c.ngram_prelude_layer}" if name == c.ngram_prelude_partition
                 else "read by the loop steps that name it")
        orders = " and ".join(str(o) for o in c.ngram_orders)
        lines.append(f"Hashed n-gram memory (after Engram, DeepSeek 2026): partition {name} ({sizes[name]:,} rows) is {where}, "
                     f"at {c.ngram_slots} rows per token hashed from the last {orders} token ids and gated by the state. "
                     "Its rows follow from the ids alone, so the model needs `input_ids`: calls with `inputs_embeds` only "
                     "raise an error.")
    lines.append("Outputs add `reasoning_steps`, `halting_probs` and `active_params` per token, and `lm_loss` / `ponder_loss` "
                 "when labels are given.")
    return lines


def storage_lines(inputs: CardInputs, preset_exact: bool) -> list[str]:
    c = inputs.config
    lines = []
    if inputs.pool_index is not None:
        files = inputs.pool_index["files"]
        size = sum(f["bytes"] for f in files.values())
        lines.append(f"The pool is in {len(files)} safetensors file(s) beside `model.safetensors` (the controller): "
                     f"{inputs.pool_index['dtype']}, {_bytes(size)}. `pool.safetensors.index.json` lists every shard's "
                     "size and sha256; `from_pretrained(..., pool_verify=True)` checks them.")
    else:
        shards = len(plan_shards(pool_table_shapes(c), 2, parse_size(DEFAULT_MAX_SHARD_SIZE)))
        lines.append(f"A checkpoint stores the pool in {shards} safetensors shard(s) of at most {DEFAULT_MAX_SHARD_SIZE} "
                     f"beside the controller: {_bytes(pool_bytes(c, torch.bfloat16))} in bfloat16, "
                     f"{_bytes(pool_bytes(c, torch.float32))} in float32.")
    lines.append("`from_pretrained(..., pool_mmap=True)` maps the pool read-only instead of loading it: only the pages "
                 "of the rows read enter memory, so a pool larger than RAM loads and generates.")
    if preset_exact and inputs.preset in POOL_STORAGE:
        lines.append(f"Machine: {POOL_STORAGE[inputs.preset]['machine']}.")
    return lines


def usage_snippet(inputs: CardInputs) -> str:
    repo = inputs.repo_id
    large = pool_bytes(inputs.config, torch.bfloat16) > 8e9
    if not inputs.has_weights:
        build = ('with torch.device("meta"):  # no memory: inspect and count only\n'
                 '    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)') if large \
            else "model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)  # random weights"
        return (f'import torch\nfrom transformers import AutoConfig, AutoModelForCausalLM\n\n'
                f'config = AutoConfig.from_pretrained("{repo}", trust_remote_code=True)\n{build}\n'
                'print(sum(p.numel() for p in model.parameters()), "parameters")')
    mmap = ", pool_mmap=True" if large else ""
    return (f'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)  # reads config.json\n'
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True{mmap})\n'
            'ids = tokenizer("Once upon a time", return_tensors="pt").input_ids\n'
            'output, stats = model.generate(ids, max_new_tokens=60, do_sample=True, top_k=40,\n'
            '                               return_reasoning_stats=True)\n'
            'print(tokenizer.decode(output[0], skip_special_tokens=True))\n'
            'print(f"{stats[\'avg_loops\']:.2f} reasoning steps per generated token")')


def weights_howto(inputs: CardInputs) -> str:
    c, p = inputs.config, inputs.preset
    shards = len(plan_shards(pool_table_shapes(c), 2, parse_size(DEFAULT_MAX_SHARD_SIZE)))
    return (
        f"The pool of this preset is {_bytes(pool_bytes(c, torch.bfloat16))} in bfloat16: too large to build in memory "
        "and save. `dpsnr pool-tool` streams it to disk a chunk at a time, never holding a table in memory:\n\n"
        f"```bash\ndpsnr pool-tool init --preset {p} --out dpsnr-{p} --dtype bfloat16\n"
        f"dpsnr pool-tool verify --dir dpsnr-{p}     # headers, sizes and sha256 of every shard\n```\n\n"
        f"`init` writes {shards} pool shards of at most {DEFAULT_MAX_SHARD_SIZE} (`--shards N` for another count) with "
        "their sha256 in `pool.safetensors.index.json`, then a freshly initialised controller beside them; the folder "
        "loads with `from_pretrained(path, pool_mmap=True)` with RAM for the controller alone. Its weights are random: it shows the "
        "layout and the cost of inference, not a trained model. `dpsnr pool-tool grow` enlarges the pool of an existing "
        "checkpoint. A checkpoint is published with\n\n"
        f"```bash\ndpsnr publish --checkpoint dpsnr-{p} --preset {p} --output-dir hub/{p} --push ORG/NAME\n```\n\n"
        "which uploads the pool shards in several commits and the index, config, code and this card in the last one.")


def train_rows(summary: dict | None) -> list[tuple[str, str]]:
    rows = []
    for key, label in TRAIN_FIELDS.items():
        value = (summary or {}).get(key)
        if value is None:
            continue
        rows.append((label, f"{value:,}" if isinstance(value, int) else f"{value:.4g}" if isinstance(value, float) else str(value)))
    return rows


def eval_rows(records: list[tuple[str, dict]]) -> list[dict]:
    return [{"dataset": HUB_DATASETS.get(r["dataset"], (None, None, Path(str(r["dataset"])).name))[2], "split": r["split"],
             "context": r["context"], "stride": r["stride"], "tokens_scored": f"{r['tokens_scored']:,}",
             "ppl": f"{r['ppl']:.3f}", "bpb": "—" if r.get("bits_per_byte") is None else f"{r['bits_per_byte']:.4f}",
             "source": source} for source, r in records]


# ---------------------------------------------------------------------------- the card
def build_card(inputs: CardInputs) -> ModelCard:
    """Render the card of `inputs` and check it (see `check_card`)."""
    if inputs.eval_records and not inputs.has_weights:
        raise ValueError("evaluation results were given for a folder without weights: there is nothing they could measure.")
    text = preset_text(inputs.preset)
    config = inputs.config
    overrides = preset_overrides(config, inputs.preset) if inputs.preset in PRESETS else {}
    counts = measured_counts(config, inputs.preset)
    trained = inputs.has_weights and inputs.train_summary is not None
    tags = list(text["tags"]) + list(config.retrieval_kind.hub_tags) + list(config.entry_kind.hub_tags)
    results = eval_results(inputs.eval_records)
    model_name = inputs.repo_id.split("/")[-1]
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", license=text["license"], language=text["language"],
        tags=tags, datasets=(recipe_datasets(inputs.recipe_text) or text.get("datasets") or None) if trained else None,
        model_name=model_name if results else None, eval_results=results or None,
    )
    limitations = list(text.get("limitations") or []) + (list(text.get("limitations_trained") or []) if trained else [])
    if not inputs.has_weights:
        limitations.insert(0, "No trained weights are published here: every output of a model built from this "
                              "repository is that of random parameters.")
    elif not trained:
        limitations.insert(0, "No training record came with these weights; treat them as untrained.")
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATE),
        title=f"DPSN-R `{inputs.preset}`" + ("" if inputs.has_weights else " (configuration and code, no weights)"),
        repo_id=inputs.repo_id, preset=inputs.preset, summary=text["summary"].strip(),
        intended_use=text["intended_use"].strip(), has_weights=inputs.has_weights, trained=trained,
        overrides=", ".join(f"`{k}={v}`" for k, v in overrides.items()),
        total_params=_n(counts["total"]), active_params=_n(counts["active"]), pool_params=_n(counts["pool"]),
        pool_entries=f"{config.pool_size:,}", pool_entry=config.pool_entry, max_steps=config.loop_max_steps,
        context=f"{config.max_position_embeddings:,}", vocab=f"{config.vocab_size:,}", tokenizer=inputs.tokenizer,
        architecture=architecture_lines(config), storage=storage_lines(inputs, preset_exact=not overrides),
        usage=usage_snippet(inputs),
        weights_howto=weights_howto(inputs) if text.get("weights_howto") and not inputs.has_weights else None,
        train_rows=train_rows(inputs.train_summary) if trained else [],
        sample=" ".join(str(inputs.train_summary.get("sample", "")).split()) if trained else None,
        recipe_path=inputs.recipe_path or text.get("recipe"), recipe_text=inputs.recipe_text,
        eval_rows=eval_rows(inputs.eval_records), limitations=limitations + COMMON_LIMITATIONS,
    )
    check_card(str(card), results)
    return card


def check_card(content: str, expected: list[EvalResult] | None = None) -> ModelCard:
    """Parse a card as the Hub's client does and check what the Hub indexes, offline.

    `ModelCard(content)` parses the YAML header into `ModelCardData`, which raises on a malformed
    `model-index`; the parsed eval results must equal `expected` (so every value in the metadata is
    the eval JSON's). `RepoCard.validate()` would send the card to the Hub's validate-yaml endpoint:
    that is the one check that needs the network, and `upload_folder` repeats it server-side.
    """
    card = ModelCard(content)
    data = card.data
    problems = []
    if data.library_name != "transformers":
        problems.append(f"library_name is {data.library_name!r}, not 'transformers'")
    if data.pipeline_tag != "text-generation":
        problems.append(f"pipeline_tag is {data.pipeline_tag!r}, not 'text-generation'")
    if "custom_code" not in (data.tags or []):
        problems.append("tags lack 'custom_code' (the Hub's marker for trust_remote_code models)")
    if not data.license:
        problems.append("no license")
    got = data.eval_results or []
    want = expected or []
    if eval_results_to_model_index(data.model_name or "", got) != eval_results_to_model_index(data.model_name or "", want):
        problems.append("model-index entries differ from the eval records")
    if problems:
        raise ValueError("model card metadata: " + "; ".join(problems) + ".")
    return card
