"""Every preset builds (meta device for the big ones) and measures what presets.py states."""

import pytest
import torch

from modeling_dpsnr import DPSNRConfig, DPSNRForCausalLM
from dpsnr.preset_counts import measure
from modeling_dpsnr.presets import MEASURED, PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_counts_match_the_preset_file(name):
    assert name in MEASURED, f"presets.py has no measured counts for {name!r}"
    assert measure(name) == MEASURED[name], "re-measure with `dpsnr presets`"


def test_tiny_is_141m_within_two_percent_and_reports_active_parameters():
    total, active = measure("tiny")
    assert abs(total - 141e6) / 141e6 < 0.02
    assert 10e6 < active < 20e6  # design: ≈15M; the preset file states the measured figure


def test_from_preset_with_overrides_and_unknown_name():
    cfg = DPSNRConfig.from_preset("debug", loop_max_steps=2)
    assert cfg.loop_max_steps == 2 and len(cfg.loop_phase_schedule) == 2
    with pytest.raises(ValueError, match="Unknown preset"):
        DPSNRConfig.from_preset("gigantic")


def test_debug_preset_runs_on_cpu():
    model = DPSNRForCausalLM.from_preset("debug")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    # active parameters reported per token equal the cost model of the preset file
    _, active_max = model.count_parameters()
    assert int(out.active_params.max()) <= active_max


def test_micro_takes_any_loop_depth_and_reads_its_ngram_memory_only_in_the_prelude():
    """micro's hashed n-gram partition is the prelude's: the derived loop schedule leaves it out at every depth
    (a fixed 4-step schedule in the preset made `loop_max_steps` overrides fail)."""
    for steps in (1, 2, 4, 6):
        cfg = DPSNRConfig.from_preset("micro", loop_max_steps=steps)
        assert cfg.loop_phase_schedule == ["shared"] * steps
        assert cfg.ngram_prelude_partition == "ngram" and cfg.partition_sizes() == {"shared": 65536, "ngram": 16384}
    named = DPSNRConfig.from_preset("micro", loop_phase_schedule=["shared", "ngram", "shared", "ngram"])
    assert named.loop_phase_schedule == ["shared", "ngram", "shared", "ngram"]  # still readable in the loop when named
