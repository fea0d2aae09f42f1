"""The loop/pool study's bookkeeping: grid expansion, what a variant name builds, and how records
become the report's rows (best learning rate, seeds averaged). No training here."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpsnr.eval.study import FIRST_DESIGN, RunSpec, build_model, load_grid
from dpsnr.eval.study_report import DEFAULT_VARIANT, aggregate, markdown, pool_scaling

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


class _Tok:
    eos_token_id = bos_token_id = pad_token_id = 0


def test_the_repository_grid_expands_to_uniquely_named_valid_runs():
    specs = load_grid(ROOT / "configuration" / "studies" / "loop_pool.yaml")
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) > 20
    assert "tinystories.block-fixed4.lr0.003.716k.s42" in names
    assert all(s.tokens % (256 * 8) == 0 for s in specs)


def test_list_fields_expand_to_their_product_and_duplicates_are_refused(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("defaults: {tokens: 2048}\nruns:\n  - {variant: [block-fixed1, dense-4], dataset: [tinystories, wikitext2], lr: [1.0e-3, 3.0e-3]}\n")
    assert len(load_grid(grid)) == 8
    grid.write_text("runs:\n  - {variant: dense-4, dataset: tinystories}\n  - {variant: dense-4, dataset: tinystories}\n")
    with pytest.raises(ValueError, match="named twice"):
        load_grid(grid)


def test_bad_specs_are_rejected_by_name():
    with pytest.raises(ValueError, match="unknown dataset"):
        RunSpec("c4", "dense-4")
    with pytest.raises(ValueError, match="unknown variant"):
        RunSpec("tinystories", "block-fixed9")
    with pytest.raises(ValueError, match="multiple of"):
        RunSpec("tinystories", "dense-4", tokens=1000)


def test_a_variant_name_builds_the_first_design_whatever_the_presets_default():
    _, cfg, _ = build_model(RunSpec("tinystories", "block-fixed4"), _Tok())
    assert (cfg.loop_step, cfg.loop_halting, cfg.loop_max_steps) == ("block", "fixed", 4)
    assert cfg.pool_partitions == FIRST_DESIGN["pool_partitions"]
    assert (cfg.pool_query_norm, cfg.pool_key_norm) == ("rms", "none")
    # a run's overrides win over the base
    _, cfg, _ = build_model(RunSpec("tinystories", "F", overrides={"pool_partitions": {"shared": 1.0}, "loop_halting": "threshold"}), _Tok())
    assert cfg.pool_partitions == {"shared": 1.0} and cfg.loop_phase_schedule == ["shared"] * 4
    kind, dense_cfg, model = build_model(RunSpec("tinystories", "dense-6"), _Tok())
    assert kind == "dense" and dense_cfg.num_hidden_layers == 6 and type(model).__name__ == "LlamaForCausalLM"


def _record(variant, lr, seed, ppl, tokens=716800, dataset="tinystories", overrides=None, read=0.5, tps=100.0):
    metrics = dict(heldout_perplexity=ppl, heldout_loss=0.0, mean_steps=2.0, step_histogram=[1, 1],
                   train_tokens_per_second=tps, decode_tokens_per_second=tps, flops_per_token_train=3e7,
                   flops_per_token_forward=1e7, total_params=1, active_params=1,
                   pool_usage={"shared": {"frac_rows_read": read, "frac_rows_mass_90": 0.1}})
    spec = dict(dataset=dataset, variant=variant, lr=lr, seed=seed, tokens=tokens, overrides=overrides or {},
                name=f"{dataset}.{variant}.lr{lr:g}.s{seed}")
    return dict(spec=spec, metrics=metrics, kind="dpsnr", provenance=dict(commit="abc"))


def test_rows_take_the_best_rate_and_average_its_seeds():
    rows = aggregate([_record("v", 1e-3, 42, 40.0), _record("v", 3e-3, 42, 30.0), _record("v", 3e-3, 7, 32.0),
                      _record("v", 3e-3, 42, 50.0, tokens=2 * 716800)])
    assert len(rows) == 2  # one per budget
    row = next(r for r in rows if r["tokens"] == 716800)
    assert row["best_lr"] == 3e-3 and row["heldout_perplexity"] == pytest.approx(31.0)
    assert sorted(row["ppl_by_seed"]) == [30.0, 32.0] and row["lrs"] == {"0.001": 40.0, "0.003": 31.0}
    assert "| v | 31.00 |" in markdown(rows)


def test_pool_scaling_orders_the_default_and_its_larger_pools():
    recs = [_record("F-fixed4-pool-x16", 3e-3, 42, 33.0, read=0.1), _record(DEFAULT_VARIANT, 3e-3, 42, 35.0, read=0.5),
            _record("F-fixed4-pool-x4", 3e-3, 42, 34.0, read=0.3), _record("F-fixed4-pool-x4", 3e-3, 42, 20.0, tokens=2 * 716800)]
    scaling = pool_scaling(recs)["tinystories, lr 0.003"]
    assert [p["pool_entries"] for p in scaling] == [65_536, 262_144, 1_048_576]
    assert [p["heldout_perplexity"] for p in scaling] == [35.0, 34.0, 33.0]
    # a rate only the smallest pool ran (its best) is left out: every size at a rate they share, one curve each
    at_1e3 = [_record(v, 1e-3, 42, p) for v, p in (("F-fixed4-pool-x4", 31.0), ("F-fixed4-pool-x16", 29.0))]
    assert list(pool_scaling([*recs, _record(DEFAULT_VARIANT, 1e-3, 42, 30.0)])) == ["tinystories, lr 0.003"]
    scaling = pool_scaling([*recs, _record(DEFAULT_VARIANT, 1e-3, 42, 30.0), *at_1e3])
    assert [p["heldout_perplexity"] for p in scaling["tinystories, lr 0.001"]] == [30.0, 31.0, 29.0]
    assert [p["heldout_perplexity"] for p in scaling["tinystories, lr 0.003"]] == [35.0, 34.0, 33.0]
    assert aggregate([*recs, _record(DEFAULT_VARIANT, 1e-3, 42, 30.0)])[0]["heldout_perplexity"] == 30.0  # the table's best rate


def test_a_trained_exit_model_records_its_halting_curve():
    import numpy as np
    import torch

    from dpsnr.eval.study import evaluate, exit_curve_on_blocks

    model = tiny_model(loop_halting="exits")
    with torch.no_grad():
        torch.nn.init.normal_(model.model.loop.policy.exit.weight, std=0.5)
    blocks = np.random.default_rng(0).integers(0, 97, size=(6, 12))
    rows = exit_curve_on_blocks(model.eval(), blocks, thresholds=(0.2, 0.5, 0.9))
    steps = [r["mean_steps"] for r in rows]
    assert steps == sorted(steps) and steps[0] < steps[-1]
    assert model.model.loop.policy.threshold == model.config.loop_exit_threshold
    record = evaluate(model, "dpsnr", blocks, model.config.loop_max_steps)
    at_default = [r for r in record["exit_curve"] if r["threshold"] == 0.5][0]
    assert at_default["heldout_perplexity"] == pytest.approx(record["heldout_perplexity"], rel=1e-6)
    assert at_default["mean_steps"] == pytest.approx(record["mean_steps"], rel=1e-6)
    assert "exit_curve" not in evaluate(tiny_model(loop_halting="fixed"), "dpsnr", blocks, 4)


def test_the_report_tables_a_trained_exit_curve_against_the_fixed_loops():
    def record(variant, ppl, curve=None):
        metrics = {"heldout_perplexity": ppl, "heldout_loss": 3.0, "mean_steps": 4.0, "train_tokens_per_second": 1.0,
                   "decode_tokens_per_second": 1.0, "flops_per_token_train": 1e9, "flops_per_token_forward": 1e9,
                   "total_params": 1, "active_params": 1}
        if curve:
            metrics["exit_curve"] = curve
        spec = {"dataset": "tinystories", "variant": variant, "tokens": 716800, "lr": 3e-3, "seed": 42,
                "name": variant, "overrides": {"loop_halting": "exits"} if curve else {}}
        return {"spec": spec, "metrics": metrics, "kind": "dpsnr", "provenance": {"commit": "x"}}

    rows = aggregate([record("F-fixed4", 30.0), record("F-fixed2", 32.0),
                      record("F-exits", 31.0, [{"threshold": 0.4, "heldout_perplexity": 30.3, "mean_steps": 2.4}])])
    text = markdown(rows)
    assert "| 0.4 | 30.30 | 2.40 | 1.010 | 0.947 |" in text


def test_a_rows_exit_curves_are_averaged_over_its_seeds():
    from dpsnr.eval.study_report import _mean_curve

    a = [{"threshold": 0.4, "heldout_perplexity": 30.0, "mean_steps": 2.0}, {"threshold": 0.5, "heldout_perplexity": 29.0, "mean_steps": 3.0}]
    b = [{"threshold": 0.4, "heldout_perplexity": 32.0, "mean_steps": 3.0}]
    assert _mean_curve([a, b]) == [{"threshold": 0.4, "heldout_perplexity": 31.0, "mean_steps": 2.5, "seeds": 2}]
    assert _mean_curve([None, None]) is None


def test_exit_curves_are_compared_with_the_fixed_loops_at_their_own_learning_rate():
    exits = _record("F-exits", 3e-3, 42, 35.0)
    exits["metrics"]["exit_curve"] = [{"threshold": 0.4, "heldout_perplexity": 35.0, "mean_steps": 2.5}]
    rows = aggregate([exits, _record("F-fixed4", 3e-3, 42, 35.0), _record("F-fixed4", 1e-3, 42, 30.0),
                      _record("F-fixed2", 3e-3, 42, 40.0)])
    text = markdown(rows)
    assert "F-fixed4 35.00" in text  # not the 30.00 of the rate the exits never ran at
    assert "| 0.4 | 35.00 | 2.50 | 1.000 | 0.875 |" in text


def test_the_results_page_lists_pool_health_per_partition_for_every_dpsnr_row():
    from dpsnr.eval.make_results_page import _study_pool_health

    rec = _record("F-fixed4-hashed", 3e-3, 42, 30.0)
    rec["metrics"]["pool_usage"] = {
        "shared": {"frac_rows_read": 0.652, "kl_uniform_counts": 2.5, "gini_counts": 0.9, "frac_rows_mass_50": 0.02,
                   "frac_rows_mass_90": 0.142, "frac_rows_mass_99": 0.31},
        "ngram": {"frac_rows_read": 0.983, "kl_uniform_counts": 0.4, "gini_counts": 0.5}}
    dense = _record("dense-4", 1e-3, 42, 40.0)
    dense["metrics"]["pool_usage"] = None
    lines = _study_pool_health(aggregate([rec, dense]))
    assert "| F-fixed4-hashed | shared | 65.2 | 2.5 | 0.9 | 2.0 | 14.2 | 31.0 |" in lines
    assert "| F-fixed4-hashed | ngram | 98.3 | 0.4 | 0.5 | – | – | – |" in lines  # a measure it lacks is a dash
    assert not any("dense-4" in line for line in lines)
    assert _study_pool_health(aggregate([dense])) == []
