"""Publishing: the Hub-ready folder, its card, the upload plan, and loading it as users would.

One small model (the `debug` preset with GPT-2's vocabulary and tokenizer) is trained-free but
real: saved by its own `save_pretrained` with the pool in several shards, evaluated by
`dpsnr perplexity`, published by `dpsnr publish`, put into a Hub-layout cache and loaded by repo
id in a fresh process where `modeling_dpsnr` cannot be imported and the Hub is offline.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.repocard_data import model_index_to_eval_results

from modeling_dpsnr import DPSNRForCausalLM
from modeling_dpsnr.presets import MEASURED
from modeling_dpsnr.pool_files import PoolStorageError
from dpsnr.eval import generate
from dpsnr.hub import publish
from dpsnr.hub.model_card import check_card
from dpsnr.training.tokenizer import load_gpt2_tokenizer

REPO = "testorg/dpsnr-debug"
TINY_REPO = "testorg/dpsnr-tiny"
SHARD = 300_000  # bytes: forces the debug pool (2.1 MB) into several shards
PROMPT = "Once upon a time there was"
TEXT = ("Once upon a time there was a little dog named Max. Max liked to run in the park with his friend Sue. "
        "One day the sun was very hot, and Max was thirsty, so Sue gave him some water.\n")
RECIPE = Path(__file__).resolve().parents[1] / "configuration" / "recipes" / "debug-tinystories.yaml"


def put_in_hub_cache(folder: Path, cache: Path, repo_id: str) -> str:
    """Lay `folder` out as `hf_hub_download` leaves a downloaded repo: blobs named by content hash,
    snapshots/<commit>/ of relative symlinks to them, refs/main holding the commit."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo_dir = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo_dir / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = repo_dir / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from dpsnr.eval import perplexity

    root = tmp_path_factory.mktemp("publish")
    tokenizer = load_gpt2_tokenizer()
    torch.manual_seed(0)
    # halting bias 0 (σ = 0.5): tokens halt after a varying number of steps, so the statistics differ per token
    model = DPSNRForCausalLM.from_preset("debug", vocab_size=len(tokenizer), loop_halt_bias_init=0.0,
                                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id).eval()
    checkpoint = root / "checkpoint"
    model.save_pretrained(checkpoint, pool_max_shard_size=SHARD)
    tokenizer.save_pretrained(checkpoint)
    summary = {"preset": "debug", "steps": 1234, "train_tokens": 567_890, "heldout_loss": 4.321}
    (checkpoint / "train_summary.json").write_text(json.dumps(summary))
    (checkpoint / "training_args.bin").write_bytes(b"a pickle that must never be published")

    (root / "text.txt").write_text(TEXT)
    eval_json = root / "ppl.json"
    perplexity.main(["--model", str(checkpoint), "--dataset", str(root / "text.txt"), "--max_length", "16",
                     "--stride", "8", "--output", str(eval_json)])

    out, tiny = root / "hub-debug", root / "hub-tiny"
    assert publish.main(["--checkpoint", str(checkpoint), "--preset", "debug", "--output-dir", str(out),
                         "--eval-results", str(eval_json), "--repo-id", REPO, "--pool-max-shard-size", str(SHARD),
                         "--recipe", str(RECIPE)]) == 0
    assert publish.main(["--preset", "tiny", "--output-dir", str(tiny), "--repo-id", TINY_REPO]) == 0
    cache = root / "hub-cache"
    put_in_hub_cache(out, cache, REPO)
    put_in_hub_cache(tiny, cache, TINY_REPO)
    return dict(root=root, model=model, tokenizer=tokenizer, checkpoint=checkpoint, out=out, tiny=tiny,
                cache=cache, eval=json.loads(eval_json.read_text()), eval_json=eval_json, summary=summary)


def card_yaml(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


# ---------------------------------------------------------------------------- the folder
def test_folder_holds_the_model_its_code_sharded_pool_tokenizer_and_card_and_no_pickles(published):
    out = published["out"]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_dpsnr.DPSNRConfig",
                                  "AutoModelForCausalLM": "modeling_dpsnr.DPSNRForCausalLM"}
    for name in ("configuration_dpsnr.py", "modeling_dpsnr.py", "pool.py", "reasoning.py", "storage.py", "pool_files.py",
                 "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "train_summary.json", "README.md", "eval/ppl.json"):
        assert name in files, name
    index = json.loads((out / "pool.safetensors.index.json").read_text())
    assert len(index["files"]) > 1, "the pool should be cut into several shards"
    for name, info in index["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"]
        assert (out / name).stat().st_size == info["bytes"]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tokenizer_config  # this machine's offline flag is not published


def test_published_model_equals_the_original_and_a_damaged_shard_is_refused(published, tmp_path):
    out = published["out"]
    loaded = DPSNRForCausalLM.from_pretrained(out, pool_verify=True).eval()
    ids = torch.tensor([[11, 2000, 318, 257, 1332]])
    torch.testing.assert_close(loaded(ids).logits, published["model"](ids).logits)

    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    shard = damaged / sorted(json.loads((out / "pool.safetensors.index.json").read_text())["files"])[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte inside the data
    shard.write_bytes(bytes(data))
    with pytest.raises(PoolStorageError, match="sha256"):
        DPSNRForCausalLM.from_pretrained(damaged, pool_verify=True)


def test_auto_class_loads_the_published_pool_memory_mapped(published):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(published["out"], pool_mmap=True, pool_verify=True)
    ids = torch.tensor([[11, 2000, 318, 257, 1332]])
    torch.testing.assert_close(loaded(ids).logits, published["model"](ids).logits)


# ---------------------------------------------------------------------------- the card
def test_card_metadata_validates_and_its_eval_entries_are_the_eval_json(published):
    out, record = published["out"], published["eval"]
    content = (out / "README.md").read_text()
    card = ModelCard(content)  # parses the YAML header with ModelCardData (raises on a bad model-index)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert "custom_code" in data.tags and data.license == "apache-2.0"
    name, results = model_index_to_eval_results(card_yaml(out)["model-index"])
    assert name == REPO.split("/")[1]
    by_metric = {r.metric_type: r for r in results}
    assert by_metric["perplexity"].metric_value == record["ppl"]
    assert by_metric["bits_per_byte"].metric_value == record["bits_per_byte"]
    for r in results:
        assert r.metric_args["context"] == record["context"] and r.metric_args["stride"] == record["stride"]
        assert r.metric_args["tokens_scored"] == record["tokens_scored"] and r.dataset_split == record["split"]
    check_card(content, data.eval_results)  # offline round trip through huggingface_hub's model-index code
    with pytest.raises(ValueError, match="model-index"):
        check_card(content, [])  # a card whose metadata differs from the eval records is refused


def test_card_states_measured_counts_and_the_training_record(published):
    text = (published["out"] / "README.md").read_text()
    total, active = published["model"].count_parameters()
    assert f"{total:,}" in text and f"{active:,}" in text
    assert "`vocab_size=50257`" in text  # the override of the debug preset is stated
    assert "1,234" in text and "567,890" in text  # train_summary.json, as recorded
    assert RECIPE.read_text().strip() in text  # the recipe, verbatim
    assert card_yaml(published["out"])["datasets"] == ["roneneldan/TinyStories"]  # the recipe's data
    assert "trust_remote_code=True" in text and "return_reasoning_stats=True" in text


def test_a_preset_without_weights_gets_config_code_and_a_card_that_says_so(published):
    tiny = published["tiny"]
    files = {p.name for p in tiny.iterdir()}
    assert {"config.json", "modeling_dpsnr.py", "configuration_dpsnr.py", "generation_config.json",
            "tokenizer.json", "README.md"} <= files
    assert not [f for f in files if f.endswith(".safetensors") or f.endswith(".index.json")]
    text = (tiny / "README.md").read_text()
    assert "No trained weights" in text and "model-index" not in card_yaml(tiny)
    total, active = MEASURED["tiny"]
    assert f"{total:,}" in text and f"{active:,}" in text


def test_large_preset_card_explains_how_its_pool_shards_are_produced(tmp_path):
    assert publish.main(["--preset", "1.5b-100b", "--output-dir", str(tmp_path / "big")]) == 0
    text = (tmp_path / "big" / "README.md").read_text()
    assert "dpsnr pool-tool init --preset 1.5b-100b" in text
    assert "43 pool shards" in text and "No trained weights" in text
    assert f"{MEASURED['1.5b-100b'][0]:,}" in text


def test_bad_inputs_are_refused_at_the_boundary(published, tmp_path):
    ckpt, out = str(published["checkpoint"]), tmp_path / "o"
    other = dict(published["eval"], model="some/other-model")
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="measured on 'some/other-model'"):
        publish.main(["--checkpoint", ckpt, "--preset", "debug", "--output-dir", str(out),
                      "--eval-results", str(tmp_path / "other.json")])
    assert not out.exists()  # inputs are checked before anything is written
    (tmp_path / "bad.json").write_text(json.dumps({"ppl": 3.0}))
    with pytest.raises(ValueError, match="not a record of `dpsnr perplexity`"):
        publish.main(["--checkpoint", ckpt, "--preset", "debug", "--output-dir", str(tmp_path / "o2"),
                      "--eval-results", str(tmp_path / "bad.json")])
    with pytest.raises(FileExistsError, match="not empty"):
        publish.main(["--preset", "tiny", "--output-dir", str(published["out"])])
    with pytest.raises(ValueError, match="--checkpoint"):
        publish.main(["--preset", "tiny", "--output-dir", str(tmp_path / "o3"),
                      "--eval-results", str(published["eval_json"])])


# ---------------------------------------------------------------------------- upload
def test_push_plans_shard_commits_then_the_model_and_card_without_any_network_call(published, monkeypatch):
    out = published["out"]
    index = json.loads((out / "pool.safetensors.index.json").read_text())
    commits = []
    stale = "pool-00001-of-00099.safetensors"  # left by an earlier upload with other shards
    monkeypatch.setattr("socket.socket.connect", mock.Mock(side_effect=AssertionError("network call")))
    with mock.patch.object(HfApi, "create_repo", return_value=mock.Mock(repo_id=REPO)) as create_repo, \
            mock.patch.object(HfApi, "list_repo_files", return_value=["README.md", stale]), \
            mock.patch.object(HfApi, "create_commit", side_effect=lambda repo_id, operations, **kw:
                              commits.append((repo_id, list(operations), kw))):
        publish.push_folder(out, REPO, token="hf_test", max_commit_size=700_000)
    assert create_repo.call_args.kwargs["exist_ok"] is True

    shard_commits, (_, final, _) = commits[:-1], commits[-1]
    assert len(shard_commits) > 1  # a large pool goes up as several files over several commits
    sent_shards = [op.path_in_repo for _, ops, _ in shard_commits for op in ops]
    assert sent_shards == list(index["files"])
    for _, ops, _ in shard_commits:
        assert sum(op.upload_info.size for op in ops) <= 700_000 or len(ops) == 1
        for op in ops:  # the Hub's LFS hash of a shard is the checksum the index recorded
            assert op.upload_info.sha256.hex() == index["files"][op.path_in_repo]["sha256"]
    adds = [op for op in final if hasattr(op, "upload_info")]
    deletes = [op.path_in_repo for op in final if not hasattr(op, "upload_info")]
    assert deletes == [stale]
    assert adds[-1].path_in_repo == "README.md"
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    sent = {op.path_in_repo: op.upload_info.size for _, ops, _ in commits for op in ops if hasattr(op, "upload_info")}
    assert sent == files


def test_push_without_a_token_says_how_to_get_one(published, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ValueError, match="HF_TOKEN"):
        publish.push_folder(published["out"], REPO)


# ---------------------------------------------------------------------------- loading as users would
def test_loads_by_repo_id_offline_where_the_package_is_not_importable(published):
    model, tok, root = published["model"], published["tokenizer"], published["root"]
    cache = published["cache"]
    assert try_to_load_from_cache(REPO, "config.json", cache_dir=cache) is not None  # huggingface_hub reads our layout
    ids = tok(PROMPT, return_tensors="pt").input_ids
    expected, stats = model.generate(ids, max_new_tokens=6, do_sample=False, return_reasoning_stats=True)
    expected_logits = model(ids).logits
    script = textwrap.dedent(f"""
        import json, sys, torch
        sys.modules["modeling_dpsnr"] = None  # the installed package must not be used
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline
        config = AutoConfig.from_pretrained({REPO!r}, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained({REPO!r}, trust_remote_code=True)  # as the card says
        model = AutoModelForCausalLM.from_pretrained({REPO!r}, trust_remote_code=True, pool_verify=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = tok({PROMPT!r}, return_tensors="pt").input_ids
        out, stats = model.generate(ids, max_new_tokens=6, do_sample=False, return_reasoning_stats=True)
        pipe = pipeline("text-generation", model={REPO!r}, trust_remote_code=True)
        text = pipe({PROMPT!r}, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
        tiny = AutoConfig.from_pretrained({TINY_REPO!r}, trust_remote_code=True)
        with torch.device("meta"):
            tiny_model = AutoModelForCausalLM.from_config(tiny, trust_remote_code=True)
        print(json.dumps(dict(model_type=config.model_type, ids=ids.tolist(), out=out.tolist(),
                              steps=stats["steps"].tolist(), active=stats["active_params"].tolist(),
                              avg_loops=stats["avg_loops"], logits=model(ids).logits.tolist(), text=text,
                              tiny_total=sum(p.numel() for p in tiny_model.parameters()))))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_CACHE=str(cache),
               HF_HOME=str(root / "hf-home"), HF_MODULES_CACHE=str(root / "hf-home" / "modules"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["model_type"] == "dpsnr" and got["ids"] == ids.tolist()
    assert got["out"] == expected.tolist()
    assert got["steps"] == stats["steps"].tolist() and got["active"] == stats["active_params"].tolist()
    assert got["avg_loops"] == stats["avg_loops"]
    torch.testing.assert_close(torch.tensor(got["logits"]), expected_logits)
    assert got["text"] == tok.decode(expected[0])[len(tok.decode(ids[0])):]
    assert got["tiny_total"] == MEASURED["tiny"][0]


def test_generate_cli_prints_text_statistics_and_a_json_line(published, capsys):
    model, tok = published["model"], published["tokenizer"]
    record = generate.run(["--model", str(published["out"]), "--prompt", PROMPT, "--max-new-tokens", "5"])
    ids = tok(PROMPT, return_tensors="pt").input_ids
    expected, stats = model.generate(ids, max_new_tokens=5, do_sample=False, return_reasoning_stats=True)
    assert record["new_tokens"] == expected[0, ids.shape[1]:].tolist()
    assert record["steps"] == stats["steps"][0].tolist()
    assert record["rows_read"] == stats["rows_read"][0].tolist()
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])
    assert last["new_tokens"] == 5 and last["avg_loops"] == stats["avg_loops"]
    assert any(line.startswith("token") and "steps" in line for line in lines)


def test_card_describes_the_loop_the_config_builds():
    from dpsnr.hub.model_card import architecture_lines
    from modeling_dpsnr import DPSNRConfig

    micro = " ".join(architecture_lines(DPSNRConfig.from_preset("micro")))
    assert "shared transformer block" in micro and "all 4 steps" in micro and "ACT" not in micro
    assert "running statistics" in micro and "unit length" in micro
    assert "partition ngram (16,384 rows) is read once in the prelude" in micro and "`input_ids`" in micro
    assert "Hashed n-gram" not in " ".join(architecture_lines(DPSNRConfig.from_preset("tiny")))
    routed = " ".join(architecture_lines(DPSNRConfig.from_preset("micro", loop_halting="threshold")))
    assert "router" in routed and "2.50 steps on average" in routed
    first = " ".join(architecture_lines(DPSNRConfig()))
    assert "without attention" in first and "ACT" in first and "router" not in first
    assert "all 3 steps" in " ".join(architecture_lines(DPSNRConfig(loop_halting="fixed", loop_max_steps=3)))
