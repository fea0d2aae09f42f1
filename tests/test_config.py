"""DPSNRConfig: invariants are checked when the config is built, with errors naming the field."""

import pytest

from modeling_dpsnr import DPSNRConfig
from modeling_dpsnr.configuration_dpsnr import derive_phase_schedule

from conftest import TINY, tiny_config

BAD_CONFIGS = [
    (dict(hidden_size=0), "hidden_size"),
    (dict(hidden_size=-32), "hidden_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(intermediate_size=-1), "intermediate_size"),
    (dict(num_attention_heads=5), "num_attention_heads"),  # 32 % 5 != 0
    (dict(num_key_value_heads=3), "num_key_value_heads"),  # 4 % 3 != 0
    (dict(num_prelude_layers=4), "num_prelude_layers"),  # > num_hidden_layers (3)
    (dict(num_prelude_layers=-1), "num_prelude_layers"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(pool_size=0), "pool_size"),
    (dict(pool_topk=200), "pool_topk"),  # larger than the 'grammar' partition (30 entries)
    (dict(pool_topk=0), "pool_topk"),
    (dict(pool_heads=0), "pool_heads"),
    (dict(pool_key_dim=15), "pool_key_dim"),  # odd: cannot split in halves
    (dict(pool_partitions={"a": 0.5, "b": 0.4}), "sum to 1"),
    (dict(pool_partitions={"a": 1.5, "b": -0.5}), "pool_partitions"),
    (dict(pool_partitions={}), "pool_partitions"),
    (dict(pool_retrieval="hash"), "pool_retrieval"),
    (dict(pool_entry="expert"), "pool_entry"),
    (dict(pool_query_norm="batch"), "pool_query_norm"),
    (dict(pool_query_input="context"), "pool_query_input"),
    (dict(pool_balance="aux_loss"), "pool_balance"),
    (dict(loop_min_steps=5), "loop_min_steps"),  # > loop_max_steps (4)
    (dict(loop_max_steps=0), "loop_max_steps"),
    (dict(loop_phase_schedule=["knowledge", "memory", "grammar", "grammar"]), "unknown partition"),
    (dict(loop_phase_schedule=["knowledge"]), "loop_phase_schedule"),  # wrong length
    (dict(loop_halting="pondernet"), "loop_halting"),
    (dict(loop_halt_epsilon=0.0), "loop_halt_epsilon"),
    (dict(loop_halt_epsilon=1.0), "loop_halt_epsilon"),
    (dict(loop_ponder_weight=-0.1), "loop_ponder_weight"),
    (dict(hidden_act="swishy"), "hidden_act"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(attention_dropout=1.0), "attention_dropout"),
    (dict(pad_token_id=97), "pad_token_id"),  # outside the vocabulary of 97
    (dict(eos_token_id=[3, -1]), "eos_token_id"),
    (dict(pool_retrieval="coordinate", indexer_window=1000), "indexer_window"),
]


@pytest.mark.parametrize("overrides,needle", BAD_CONFIGS, ids=[str(o) for o, _ in BAD_CONFIGS])
def test_bad_config_raises_value_error_naming_the_field(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_config(**overrides)


def test_at_least_fifteen_distinct_bad_configurations():
    assert len({str(o) for o, _ in BAD_CONFIGS}) >= 15


def test_default_schedule_is_the_design_split_for_eight_steps():
    cfg = DPSNRConfig()
    assert cfg.loop_phase_schedule == ["knowledge"] * 2 + ["reasoning"] * 4 + ["grammar"] * 2
    assert cfg.partition_sizes() == {"knowledge": 70000, "reasoning": 20000, "grammar": 10000}


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 12])
def test_derived_schedule_has_one_partition_per_step(steps):
    sched = derive_phase_schedule(["knowledge", "reasoning", "grammar"], steps)
    assert len(sched) == steps
    # phases are contiguous and in partition order
    order = [p for i, p in enumerate(sched) if i == 0 or sched[i - 1] != p]
    assert order == [p for p in ["knowledge", "reasoning", "grammar"] if p in sched]
    if steps >= 3:
        assert set(sched) == {"knowledge", "reasoning", "grammar"}


def test_partition_sizes_cover_the_pool_and_do_not_depend_on_dict_order():
    a = tiny_config(pool_size=1001, pool_partitions={"x": 0.3, "y": 0.7})
    b = tiny_config(pool_size=1001, pool_partitions={"y": 0.7, "x": 0.3})
    assert a.partition_sizes() == b.partition_sizes()
    assert sum(a.partition_sizes().values()) == 1001


def test_save_load_round_trip(tmp_path):
    cfg = tiny_config(pool_partitions={"only": 1.0}, loop_max_steps=3)
    cfg.save_pretrained(tmp_path)
    loaded = DPSNRConfig.from_pretrained(tmp_path)
    for key in list(TINY) + ["pool_partitions", "loop_phase_schedule", "pool_retrieval", "loop_halt_bias_init"]:
        assert getattr(loaded, key) == getattr(cfg, key), key
    assert loaded.model_type == "dpsnr"


def test_loading_a_corrupted_config_fails_at_the_boundary(tmp_path):
    import json

    tiny_config().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["loop_phase_schedule"] = ["nowhere"] * data["loop_max_steps"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown partition"):
        DPSNRConfig.from_pretrained(tmp_path)
