"""Evaluation tooling: sliding-window perplexity arithmetic, the steps/loss alignment, token
classes, pool usage statistics, and the three scripts end to end on the debug model."""

import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpsnr.eval.common import EvalArguments, eval_documents
from dpsnr.eval.perplexity import compute_perplexity, iter_scored_windows, sliding_windows

ROOT = Path(__file__).resolve().parents[1]
from dpsnr.eval.perplexity import main as perplexity_main
from dpsnr.eval.pool_health import evaluate_pool_usage, usage_statistics, write_pool_report
from dpsnr.eval.pool_health import main as pool_health_main
from dpsnr.eval.reasoning_analytics import (
    COMPLEX, MEDIUM, TRIVIAL, classify_tokens, collect_records, is_trivial_text, reasoning_analytics, spearman,
    tokenizer_text, write_analytics_report,
)
from dpsnr.eval.reasoning_analytics import main as analytics_main
from modeling_dpsnr import DPSNRForCausalLM
from dpsnr.training.tokenizer import load_gpt2_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
SENTENCES = (
    "The cat sat on the mat. It was a sunny day, and the children played in the park. "
    "Photosynthesis converts light into chemical energy; the cat did not care."
)


# ----------------------------------------------------------------------------- fake models


class KnownProbLM(nn.Module):
    """A causal LM whose probabilities are known: the right next token is (x + 1) mod V, and the
    logits at window position p give it probability q(p) (the rest shared uniformly).
    q=None: uniform over V at every position, so PPL = V whatever the windows."""

    def __init__(self, vocab: int, q=None):
        super().__init__()
        self.vocab, self.q = vocab, q

    def forward(self, input_ids, **kwargs):
        b, t = input_ids.shape
        if self.q is None:
            return SimpleNamespace(logits=torch.zeros(b, t, self.vocab))
        q = torch.tensor([self.q(p) for p in range(t)], dtype=torch.float64).view(1, t, 1)
        probs = ((1 - q) / (self.vocab - 1)).expand(b, t, self.vocab).clone()
        probs.scatter_(-1, ((input_ids + 1) % self.vocab).unsqueeze(-1), q.expand(b, t, 1))
        return SimpleNamespace(logits=probs.log().float())


def successor_ids(n: int, vocab: int) -> torch.Tensor:
    return torch.arange(3, 3 + n) % vocab


# ----------------------------------------------------------------------------- perplexity


def test_windows_of_the_guide_example():
    # 10 tokens, context 4, stride 2: every token but the first is scored exactly once.
    got = [(w.begin, w.end, w.first_target) for w in sliding_windows(10, 4, 2)]
    assert got == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]


@pytest.mark.parametrize("max_length,stride", [(4, 2), (4, 1), (5, 3), (8, 7), (16, 4), (64, 32), (2, 1)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_known_probabilities_give_exact_perplexity(max_length, stride, batch_size):
    n, vocab = 23, 11
    ids = successor_ids(n, vocab)
    half = compute_perplexity(KnownProbLM(vocab, q=lambda p: 0.5), ids, max_length, stride, batch_size)
    assert half.tokens_scored == n - 1
    assert half.ppl == pytest.approx(2.0, rel=1e-6)  # a shifted target would get (1/2)/(V−1)
    uniform = compute_perplexity(KnownProbLM(vocab), ids, max_length, stride, batch_size)
    assert uniform.tokens_scored == n - 1
    assert uniform.ppl == pytest.approx(vocab, rel=1e-6)


def test_each_target_is_scored_with_the_context_its_window_gives():
    # q depends on the context inside the window: position p has p + 1 tokens of context.
    vocab, ids = 7, successor_ids(10, 7)
    model = KnownProbLM(vocab, q=lambda p: (p + 1) / (p + 2))
    result = compute_perplexity(model, ids, max_length=4, stride=2)
    contexts = [1, 2, 3, 2, 3, 2, 3, 2, 3]  # by hand from the windows of the guide example
    expected = sum(math.log((c + 1) / c) for c in contexts)
    assert result.tokens_scored == 9 and result.windows == 4
    assert result.nll_sum == pytest.approx(expected, rel=1e-6)


def test_disjoint_windows_lose_the_first_token_of_each_window():
    ids = successor_ids(23, 11)
    result = compute_perplexity(KnownProbLM(11, q=lambda p: 0.5), ids, max_length=5, stride=5)
    assert result.windows == 5  # [0,5) [5,10) [10,15) [15,20) [20,23)
    assert result.tokens_scored == 23 - 5
    assert result.ppl == pytest.approx(2.0, rel=1e-6)


def test_bad_window_settings_are_rejected():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sliding_windows(1, 4, 2)
    with pytest.raises(ValueError, match="1-D"):
        next(iter_scored_windows(KnownProbLM(5), torch.zeros(2, 5, dtype=torch.long), 4, 2))


@pytest.fixture(scope="module")
def debug_model():
    torch.manual_seed(0)
    # ACT (the preset routes by threshold) so that `loss` carries a ponder term to tell apart from the LM loss
    return DPSNRForCausalLM.from_preset("debug", loop_halting="act", loop_halt_bias_init=1.0).eval()


def test_one_window_equals_a_full_context_pass_on_dpsnr(debug_model):
    torch.manual_seed(1)
    ids = torch.randint(0, debug_model.config.vocab_size, (40,))
    with torch.no_grad():
        out = debug_model(ids[None], labels=ids[None])
    direct = F.cross_entropy(out.logits[0, :-1].float(), ids[1:], reduction="sum").item()
    result = compute_perplexity(debug_model, ids, max_length=64, stride=32)
    assert result.windows == 1 and result.tokens_scored == 39
    assert result.nll_sum == pytest.approx(direct, rel=1e-5)
    assert result.nll == pytest.approx(out.lm_loss.item(), rel=1e-5)
    assert out.loss.item() > out.lm_loss.item()  # `loss` carries the ponder term: never a perplexity


def test_sliding_windows_on_dpsnr_do_not_depend_on_batching(debug_model):
    ids = torch.randint(0, debug_model.config.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    one = compute_perplexity(debug_model, ids, max_length=16, stride=8, batch_size=1)
    many = compute_perplexity(debug_model, ids, max_length=16, stride=8, batch_size=4)
    assert one.tokens_scored == many.tokens_scored == 29
    assert many.nll_sum == pytest.approx(one.nll_sum, rel=1e-5)


# ----------------------------------------------------------------------------- token classes


def test_token_classes_by_rule():
    words = "the cat sat . the cat ran , a dog".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    ids = torch.tensor([vocab[w] for w in words])
    text = {i: " " + w for w, i in vocab.items()}
    classes, info = classify_tokens(ids, text.__getitem__)
    # content occurrences cat, sat, cat, ran, dog have frequencies 2, 1, 2, 1, 1: median 1
    assert info["median_content_frequency"] == 1.0
    expected = {"the": TRIVIAL, ".": TRIVIAL, ",": TRIVIAL, "a": TRIVIAL, "cat": MEDIUM, "sat": COMPLEX,
                "ran": COMPLEX, "dog": COMPLEX}
    assert [int(c) for c in classes] == [expected[w] for w in words]


def test_trivial_text_with_the_gpt2_tokenizer():
    tok = load_gpt2_tokenizer()
    pieces = {tok.decode([i]): is_trivial_text(tok.decode([i])) for i in tok(" The cat, and\n\n the dog!")["input_ids"]}
    assert pieces == {" The": True, " cat": False, ",": True, " and": True, "\n\n": True, " the": True,
                      " dog": False, "!": True}
    classes, _ = classify_tokens(torch.tensor([tok.eos_token_id, 9246]), tokenizer_text(tok), tok.all_special_ids)
    assert int(classes[0]) == TRIVIAL  # special tokens are trivial


def test_spearman_with_ties_by_hand():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4] → r = 4.5 / sqrt(4.5 · 5)
    assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([2, 2, 2], [1, 2, 3]) is None  # constant steps: undefined, not 0


# ----------------------------------------------------------------------------- pool usage statistics


def test_uniform_usage():
    s = usage_statistics(torch.full((10,), 3), torch.full((10,), 1.5))
    assert s["frac_rows_read"] == 1.0 and s["reads"] == 30
    assert s["kl_uniform_counts"] == pytest.approx(0.0, abs=1e-12)
    assert s["kl_uniform_mass"] == pytest.approx(0.0, abs=1e-12)
    assert s["gini_counts"] == pytest.approx(0.0, abs=1e-12) and s["gini_mass"] == pytest.approx(0.0, abs=1e-12)
    assert (s["rows_mass_50"], s["rows_mass_90"], s["rows_mass_99"]) == (5, 9, 10)
    assert s["frac_rows_mass_50"] == 0.5


def test_all_usage_on_one_row():
    n = 50
    counts, mass = torch.zeros(n, dtype=torch.long), torch.zeros(n)
    counts[17], mass[17] = 9, 4.0
    s = usage_statistics(counts, mass)
    assert s["frac_rows_read"] == 1 / n
    assert s["gini_mass"] == pytest.approx((n - 1) / n) and s["gini_counts"] == pytest.approx((n - 1) / n)
    assert s["kl_uniform_counts"] == pytest.approx(math.log(n)) and s["kl_uniform_mass"] == pytest.approx(math.log(n))
    assert s["rows_mass_50"] == s["rows_mass_99"] == 1


def test_intermediate_usage_by_hand():
    s = usage_statistics(torch.tensor([2, 1, 1, 0]), torch.tensor([0.7, 0.1, 0.2, 0.0]))
    assert s["frac_rows_read"] == 0.75
    # counts p = (1/2, 1/4, 1/4, 0): KL = ½ log(4·½) = ½ log 2; Gini of (0, ¼, ¼, ½) = 2·3.25/4 − 5/4
    assert s["kl_uniform_counts"] == pytest.approx(0.5 * math.log(2))
    assert s["gini_counts"] == pytest.approx(0.375)
    kl_mass = 0.7 * math.log(2.8) + 0.1 * math.log(0.4) + 0.2 * math.log(0.8)
    assert s["kl_uniform_mass"] == pytest.approx(kl_mass)
    # mass sorted 0.7, 0.2, 0.1: 50 % in 1 row, 90 % in 2 (0.7 + 0.2 is a hair below 0.9 in float32), 99 % in 3
    assert (s["rows_mass_50"], s["rows_mass_90"], s["rows_mass_99"]) == (1, 2, 3)


def test_unread_partition_and_bad_input():
    s = usage_statistics(torch.zeros(8, dtype=torch.long), torch.zeros(8))
    assert s["frac_rows_read"] == 0.0 and s["kl_uniform_mass"] is None and s["rows_mass_50"] is None
    with pytest.raises(ValueError, match="one length"):
        usage_statistics(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="non-negative"):
        usage_statistics(torch.tensor([1, -1]), torch.tensor([1.0, 0.0]))


# ----------------------------------------------------------------------------- runners end to end


@pytest.fixture(scope="module")
def gpt2_model_and_ids():
    tok = load_gpt2_tokenizer()
    torch.manual_seed(0)
    model = DPSNRForCausalLM.from_preset("debug", vocab_size=50257, loop_halt_bias_init=1.0).eval()
    ids = torch.tensor(tok(SENTENCES)["input_ids"])
    return model, tok, ids


def test_analytics_pairs_steps_at_t_with_loss_of_t_plus_1(gpt2_model_and_ids):
    model, _, ids = gpt2_model_and_ids
    with torch.no_grad():
        out = model(ids[None])
    rec = collect_records(model, ids, max_length=128, stride=64)
    assert torch.equal(rec["positions"], torch.arange(ids.numel() - 1))
    assert torch.equal(rec["steps"], out.reasoning_steps[0, :-1])
    assert torch.equal(rec["active"], out.active_params[0, :-1])
    direct = F.cross_entropy(out.logits[0, :-1].float(), ids[1:], reduction="none")
    assert torch.allclose(rec["nll"], direct, atol=1e-5)


def test_reasoning_analytics_report(gpt2_model_and_ids, tmp_path):
    model, tok, ids = gpt2_model_and_ids
    report = reasoning_analytics(model, tok, ids, max_length=16, stride=8)
    n = ids.numel() - 1
    assert report["records"] == n
    assert sum(report["steps_histogram"].values()) == n
    for key in ("by_input_token", "by_target_token"):
        rows = {r["class"]: r for r in report[key]}
        assert sum(rows[c]["tokens"] for c in ("trivial", "medium", "complex")) == n
        assert rows["trivial"]["tokens"] > 0 and rows["complex"]["tokens"] > 0
    paths = write_analytics_report(report, tmp_path, "ra")
    assert json.loads(paths["json"].read_text())["records"] == n
    assert "| trivial |" in paths["md"].read_text() and paths["png"].stat().st_size > 1000


def test_pool_health_report(gpt2_model_and_ids, tmp_path):
    model, _, ids = gpt2_model_and_ids
    cfg = model.config
    report, usage = evaluate_pool_usage(model, ids, max_length=ids.numel(), stride=ids.numel())
    with torch.no_grad():
        steps = model(ids[None]).reasoning_steps
    # step s of a token reads heads × k rows of partition schedule[s], for each step the token ran
    assert set(report["partitions"]) == set(cfg.pool_partitions)
    for name, stats in report["partitions"].items():
        steps_on_part = sum(int((steps > s).sum()) for s, p in enumerate(cfg.loop_phase_schedule) if p == name)
        assert stats["reads"] == steps_on_part * cfg.pool_heads * cfg.pool_topk
        assert stats["rows"] == usage[name]["counts"].numel()
        assert stats["frac_rows_read"] == pytest.approx((usage[name]["counts"] > 0).double().mean().item())
    first = next(iter(cfg.pool_partitions))
    assert report["partitions"][first]["frac_rows_read"] > 0
    paths = write_pool_report(report, usage, tmp_path, "ph")
    assert first in paths["md"].read_text() and paths["png"].stat().st_size > 1000
    assert json.loads(paths["json"].read_text())["tokens_processed"] == ids.numel()


def test_tinystories_held_out_rule():
    path = DATA / "tinystories" / "tinystories_sample.cs336.txt"
    args = dict(model="unused", dataset="tinystories", data_file=str(path), validation_split_percentage=20)
    test_docs, sep, rule = eval_documents(EvalArguments(split="test", **args))
    train_docs, _, _ = eval_documents(EvalArguments(split="train", **args))
    assert sep == "eos" and len(test_docs) == 1 and len(train_docs) == 4  # 5 stories: the last one is held out
    assert path.read_text().split("<|endoftext|>")[4].strip() == test_docs[0]
    assert "last 1 of 5" in rule


def test_evaluation_holds_out_exactly_the_stories_training_held_out(tmp_path):
    from dpsnr.training.data import DataArguments, held_out_count, load_documents

    path = DATA / "tinystories" / "tinystories_sample.cs336.txt"
    for percentage in (3, 20, 50):  # 5 stories: 0.15 rounds up to one story, 2.5 down to two
        docs = load_documents(DataArguments(train_file=str(path), validation_split_percentage=percentage,
                                            cache_dir=str(tmp_path / f"c{percentage}")))
        held, _, _ = eval_documents(EvalArguments(model="unused", dataset="tinystories", data_file=str(path),
                                                  validation_split_percentage=percentage))
        assert list(docs["validation"]["text"]) == held and len(held) == held_out_count(5, percentage)
    with pytest.raises(ValueError, match="cannot hold out"):
        held_out_count(1, 50)


def test_clis_on_a_saved_model(gpt2_model_and_ids, tmp_path, capsys):
    model, tok, _ = gpt2_model_and_ids
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text(SENTENCES * 2, encoding="utf-8")
    common = ["--model", str(tmp_path / "m"), "--max-length", "32", "--device", "cpu"]

    record = perplexity_main([*common, "--dataset", str(text), "--stride", "16", "--output", str(tmp_path / "p.json")])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["tokens_scored"] == record["tokens"] - 1 == len(tok(SENTENCES * 2)["input_ids"]) - 1
    assert last["ppl"] == pytest.approx(math.exp(last["nll"]))
    assert last["bits_per_byte"] == pytest.approx(last["nll_sum"] / math.log(2) / len((SENTENCES * 2).encode()))
    assert json.loads((tmp_path / "p.json").read_text())["ppl"] == last["ppl"]

    perplexity_main([*common, "--dataset", "tinystories", "--max-tokens", "100"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["tokens_scored"] == 99 and last["bits_per_byte"] is None  # truncated: no bits per byte

    out = ["--dataset", str(text), "--output-dir", str(tmp_path / "res")]
    analytics_main([*common, *out])
    pool_health_main([*common, *out])
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [
        "pool_health.json", "pool_health.md", "pool_health.png",
        "reasoning_analytics.json", "reasoning_analytics.md", "reasoning_analytics.png",
    ]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        perplexity_main([*common[:2], "--max-length", "100000", "--dataset", str(text)])


def test_perplexity_cli_on_a_transformers_baseline_with_a_config_file(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_gpt2_tokenizer()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=64))
    llama.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    text = tmp_path / "text.txt"
    text.write_text(SENTENCES, encoding="utf-8")
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: {tmp_path / 'llama'}\ndataset: {text}\nmax_length: 16\ndevice: cpu\n", encoding="utf-8")

    record = perplexity_main(["--config", str(recipe), "--stride", "5"])  # flags override the file
    assert (record["context"], record["stride"]) == (16, 5)
    assert record["tokens_scored"] == len(tok(SENTENCES)["input_ids"]) - 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] == pytest.approx(record["ppl"])
    with pytest.raises(ValueError, match="DPSN-R"):
        analytics_main(["--config", str(recipe), "--output-dir", str(tmp_path / "res")])


# ---------------------------------------------------------------------------- comparison plumbing
def test_parallel_compare_children_get_the_shared_options_but_not_the_per_process_ones():
    from dpsnr.eval.compare import _drop_options

    argv = ["--jobs", "2", "--datasets", "tinystories", "wikitext2", "--train-tokens", "2048",
            "--variants", "dpsnr-micro", "dense-llama", "--threads=3", "--output-name", "x"]
    kept = _drop_options(argv, {"--jobs", "--datasets", "--threads", "--output-dir", "--output-name"})
    assert kept == ["--train-tokens", "2048", "--variants", "dpsnr-micro", "dense-llama"]


def test_seed_spread_section_by_hand(tmp_path):
    from dpsnr.eval.make_results_page import section_seed_spread

    def run(seed, micro, dense):
        rows = [{"variant": "dpsnr-micro", "heldout_perplexity": micro}, {"variant": "dense-llama", "heldout_perplexity": dense}]
        return {"command": "python -m eval.compare", "machine": "m", "train_tokens": 1024,
                "settings": {"seed": seed}, "results": {"tinystories": rows}}

    for seed, micro, dense in [(1, 50.0, 100.0), (2, 60.0, 100.0), (3, 70.0, 200.0)]:
        (tmp_path / f"compare_gpu_seed{seed}.json").write_text(json.dumps(run(seed, micro, dense)))
    lines = section_seed_spread(tmp_path, "compare_gpu_seed*.json")
    micro_row = next(line for line in lines if line.startswith("| dpsnr-micro"))
    # mean 60, sample sd 10, reductions 50 %, 40 %, 65 %
    assert micro_row == "| dpsnr-micro | 3 | 60 | 10 | 50 | 70 | 40.0 … 65.0 |"
    assert "--seed` 1, 2, 3" in "\n".join(lines)
    assert section_seed_spread(tmp_path / "none")[-2].startswith("_Not run yet")


def test_profile_step_writes_both_tables_and_a_summary(tmp_path):
    from dpsnr.eval.profile_step import main

    out = tmp_path / "profile.txt"
    summary = main(["--preset", "debug", "--batch", "2", "--block", "8", "--warmup", "1", "--steps", "1",
                    "--new-tokens", "2", "--rows", "5", "--output", str(out)])
    text = out.read_text()
    assert json.loads(text.splitlines()[0]) == summary
    assert "## training, two steps" in text and "## greedy decoding, 2 tokens" in text and text.count("Self CPU") >= 2
    assert all(v > 0 for v in summary["train_phases"].values())
    assert summary["train_per_step"]["aten_calls"] > summary["decode_per_token"]["aten_calls"] > 0
    assert "device_ms" not in summary["train_per_step"]  # a CPU run reports no device time
    # the optimizer's rows: each pool table's gradient holds some of its rows, none beyond them
    assert summary["pool_rows_per_step"] and all(0 < u <= n for u, n in summary["pool_rows_per_step"].values())


def test_throughput_benchmark_compiles_decoding_for_every_model_when_asked(tmp_path, monkeypatch):
    import dpsnr.eval.bench_throughput as bench
    from transformers import CompileConfig

    graphs = []
    original = bench.compiled_decoding

    def counting(device):  # the benchmark's kwargs with a backend that runs the captured graph as is, and counts it
        kwargs = original(device)
        config = CompileConfig(fullgraph=True, dynamic=False, backend=lambda gm, inputs: graphs.append(gm) or gm.forward, mode=None)
        config._compile_all_devices = True
        assert kwargs["cache_implementation"] == "static" and kwargs["compile_config"]._compile_all_devices
        return {**kwargs, "compile_config": config}

    monkeypatch.setattr(bench, "compiled_decoding", counting)
    torch._dynamo.reset()
    report = bench.main(["--preset", "debug", "--sizes", "--batch", "2", "--block", "16", "--steps", "1", "--warmup", "1",
                         "--repeats", "1", "--new-tokens", "4", "--prompt-len", "4", "--compile-decode",
                         "--output", str(tmp_path / "bench.json")])
    assert len(graphs) >= 2  # DPSN-R's decoding step and the dense twin's
    assert report["settings"]["compile_decode"] and report["twin"]["dpsnr"]["decode_tokens_per_second"] > 0


def test_throughput_benchmark_reports_every_model_and_the_halting_speed_up(tmp_path):
    from dpsnr.eval.bench_throughput import main

    out = tmp_path / "bench.json"
    report = main(["--preset", "debug", "--overrides", "{loop_halting: threshold}", "--sizes", "10", "11", "--batch", "2", "--block", "16", "--steps", "1",
                   "--warmup", "1", "--repeats", "1", "--new-tokens", "4", "--prompt-len", "4", "--output", str(out)])
    assert json.loads(out.read_text())["ratios"] == report["ratios"] and out.with_suffix(".png").exists()
    assert set(report["twin"]) == {"dpsnr", "dense_twin", "dpsnr_every_step"}  # adaptive: compared with every step
    every = report["twin"]["dpsnr_every_step"]
    assert every["mean_steps"] == every["decode_mean_steps"] == 4.0
    adaptive = report["twin"]["dpsnr"]
    assert 1.0 <= adaptive["mean_steps"] < 4.0  # threshold routing in training keeps a share of the tokens per step
    assert report["ratios"]["train_ideal_speedup_vs_every_step"] > 1.0
    assert set(report["pool_sweep"]) == {"pool_2^10", "pool_2^11"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert report["commit"] == (head or None) and "dirty" in report  # where the figures came from
    # trained exits: --exit-samples reaches the model's execution, and the cost model follows it
    from argparse import Namespace

    from dpsnr.eval.bench_throughput import Bench

    settings = Namespace(batch=1, block=8, prompt_len=2, exit_samples=1, compile_decode=False)
    exits = DPSNRForCausalLM.from_preset("debug", loop_halting="exits")
    assert Bench("exits", exits, True, settings).model.execution.exit_samples == 1
    every = Bench("every", DPSNRForCausalLM.from_preset("debug", loop_halting="exits"), True, Namespace(**{**vars(settings), "exit_samples": 0}))
    assert every.model.execution.exit_samples is None
    assert exits.estimate_flops(training=True) < every.model.estimate_flops(training=True)


def test_exit_curve_moves_steps_with_the_threshold_and_scores_like_perplexity(gpt2_model_and_ids, tmp_path, capsys):
    from dpsnr.eval.exit_curve import exit_curve
    from dpsnr.eval.exit_curve import main as exit_curve_main

    _, tok, ids = gpt2_model_and_ids
    torch.manual_seed(0)
    model = DPSNRForCausalLM.from_preset("debug", vocab_size=50257, loop_halting="exits").eval()
    with torch.no_grad():  # exit scores spread across tokens: their CDFs cross each q at different steps
        torch.nn.init.normal_(model.model.loop.policy.exit.weight, std=0.3)
    rows = exit_curve(model, ids, max_length=32, stride=16, thresholds=[0.1, 0.5, 0.95])
    steps = [r["mean_steps"] for r in rows]
    assert steps == sorted(steps) and steps[0] < steps[-1]
    assert model.model.loop.policy.threshold == model.config.loop_exit_threshold  # restored
    for r in rows:  # the same windows as `dpsnr perplexity` at that threshold
        model.model.loop.policy.threshold = r["threshold"]
        assert r["ppl"] == pytest.approx(compute_perplexity(model, ids, 32, 16).ppl, rel=1e-6)
        assert sum(r["steps_histogram"].values()) == r["tokens_scored"] == ids.numel() - 1
    model.model.loop.policy.threshold = model.config.loop_exit_threshold

    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text(SENTENCES, encoding="utf-8")
    common = ["--model", str(tmp_path / "m"), "--max-length", "32", "--device", "cpu", "--dataset", str(text)]
    exit_curve_main([*common, "--thresholds", "0.3", "0.7", "--output-dir", str(tmp_path / "res"),
                     "--decode-new-tokens", "3", "--decode-repeats", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["threshold"] for r in last["curve"]] == [0.3, 0.7]
    assert all(r["decode_tokens_per_second"] > 0 and 1 <= r["decode_mean_steps"] <= 4 for r in last["curve"])
    assert (tmp_path / "res" / "exit_curve.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        exit_curve_main([*common, "--thresholds", "1.5"])
    other = tmp_path / "fixed"
    DPSNRForCausalLM.from_preset("debug", vocab_size=50257).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="loop_halting='exits'"):
        exit_curve_main(["--model", str(other), "--max-length", "32", "--device", "cpu", "--dataset", str(text)])
