"""Graph capture: torch.export, torch.compile(fullgraph=True), the ONNX dynamo exporter and static-cache
generation give the numbers of the eager model (which runs the early-exit loop driver)."""

import pytest
import torch
from torch import nn
from transformers import CompileConfig

from conftest import tiny_model

V = 97


def _model(**overrides):
    """A tiny model whose tokens halt after different numbers of steps, so that the static (masked)
    driver a graph holds and the eager early-exit driver really take different paths."""
    model = tiny_model(**overrides).eval()
    policy = model.model.loop.policy
    with torch.no_grad():
        for t in model.pool.entry_parameters():
            t.normal_(std=0.5)  # pool reads matter for the logits
        if hasattr(policy, "halt"):
            policy.halt.weight.normal_(std=0.5)
            policy.halt.bias.fill_(-0.5)
        if hasattr(policy, "router"):  # threshold routing: scores spread around the thresholds (0)
            policy.router.weight.normal_(std=0.5)
    return model


def _padded_batch(batch=2, length=9, pad=3, seed=0):
    """Random ids with the last row left-padded by `pad` tokens (mask 0, id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    ids[-1, :pad] = 0
    mask[-1, :pad] = 0
    return ids, mask


class LogitsAndSteps(nn.Module):
    """The forward as exporters want it: tensors in, tensors out (no ModelOutput, no cache)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits, out.reasoning_steps


def _assert_same(got, expected, mask):
    """Logits of real tokens (padding positions attend to nothing, their logits mean nothing) and every
    token's step count (0 for padding)."""
    logits, steps = got
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[0][real], atol=1e-5, rtol=1e-4)
    assert torch.equal(steps, expected[1])


@pytest.mark.parametrize("loop, capacity", [({}, None), ({"loop_step": "block", "loop_halting": "threshold"}, None),
                                            ({"loop_step": "block", "loop_halting": "threshold"}, 1.5)],
                         ids=["token-act", "block-threshold", "block-threshold-capacity-bounded"])
def test_exported_program_equals_eager_with_and_without_left_padding(loop, capacity):
    model = _model(**loop)
    model.set_execution(loop_static_capacity=capacity)  # the static driver gathers a bounded number of rows
    wrapped = LogitsAndSteps(model)
    ids, _ = _padded_batch()
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=32)
    program = torch.export.export(wrapped, (ids, torch.ones_like(ids)),
                                  dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    # Data-dependent host syncs would show up as these ops (or have failed the export).
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not ops & {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}, ops

    for ids, mask in (_padded_batch(pad=0), _padded_batch(batch=3, length=12, pad=5, seed=1)):
        expected = wrapped(ids, mask)
        assert expected[1][mask.bool()].unique().numel() > 1  # tokens halt at different steps
        assert (expected[1][~mask.bool()] == 0).all()
        _assert_same(program.module()(ids, mask), expected, mask)


def test_compiled_fullgraph_forward_and_backward_equal_eager():
    # backend "aot_eager": dynamo captures the whole forward (fullgraph: any graph break is an error) and
    # AOTAutograd traces the backward, exactly what inductor receives; only inductor's C++ code generation
    # is skipped, which takes ~50 s for this tiny model on the project's 2-core CPU machine (measured).
    model = _model()
    model.train()  # dropout is 0: train mode changes the loss path, not the numbers
    ids, mask = _padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    eager = model(input_ids=ids, attention_mask=mask, labels=labels)
    grads_eager = torch.autograd.grad(eager.loss, list(model.parameters()), allow_unused=True)
    out = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)

    assert eager.reasoning_steps[mask.bool()].unique().numel() > 1
    assert torch.equal(out.reasoning_steps, eager.reasoning_steps)
    torch.testing.assert_close(out.loss, eager.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.ponder_loss, eager.ponder_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[mask.bool()], eager.logits[mask.bool()], atol=1e-5, rtol=1e-4)
    for (name, p), g, g_eager in zip(model.named_parameters(), grads, grads_eager):
        # The eager driver never runs a step no token reaches (no gradient); the static one adds zeros.
        g = torch.zeros_like(p) if g is None else g
        g_eager = torch.zeros_like(p) if g_eager is None else g_eager
        torch.testing.assert_close(g, g_eager, atol=1e-5, rtol=1e-4, msg=name)


def test_onnx_export_runs_in_onnxruntime_like_eager():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _model()
    wrapped = LogitsAndSteps(model)
    ids, mask = _padded_batch()
    # Static shapes: dynamic ones double the export time (13 s here); test_exported_program_... covers
    # them on the torch.export graph the ONNX exporter starts from.
    program = torch.onnx.export(wrapped, (ids, mask), dynamo=True, input_names=["input_ids", "attention_mask"],
                                output_names=["logits", "reasoning_steps"])
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for ids, mask in ((ids, mask), _padded_batch(pad=0, seed=1)):
        logits, steps = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            expected = wrapped(ids, mask)
        _assert_same((torch.from_numpy(logits), torch.from_numpy(steps)), expected, mask)


def test_exporting_what_cannot_be_captured_fails_with_a_clear_error():
    ids, mask = _padded_batch()
    eager_driver = LogitsAndSteps(_model(execution={"loop_mode": "eager"}))
    with pytest.raises(RuntimeError, match='loop_mode="eager" cannot be exported.*set_execution'):
        torch.export.export(eager_driver, (ids, mask))
    dynamic_rope = _model(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert dynamic_rope._can_compile_fullgraph is False and _model()._can_compile_fullgraph is True
    with pytest.raises(RuntimeError, match="rope_type='dynamic' cannot be exported"):
        torch.export.export(LogitsAndSteps(dynamic_rope), (ids, mask))


# The presets' layout: the block step keeps a cache layer per reasoning step, and a hashed n-gram partition read in
# the prelude keeps the ids; both add layers to a cache built from the config.
PRESET_LAYOUT = dict(loop_step="block", pool_partitions={"shared": 0.8, "ngram": 0.2}, pool_partition_retrieval={"ngram": "hashed_ngram"},
                     ngram_prelude_partition="ngram", ngram_heads=2, loop_phase_schedule=["shared"] * 4,
                     pool_query_norm="running", pool_key_norm="unit")


def test_a_cache_that_cannot_grow_the_layers_the_loop_needs_is_refused_by_name():
    from transformers.cache_utils import Cache, StaticSlidingWindowLayer

    model = _model(**PRESET_LAYOUT)
    ids, mask = _padded_batch()
    cache = Cache(layers=[StaticSlidingWindowLayer(max_cache_len=16, sliding_window=4) for _ in range(model.config.num_hidden_layers)])
    with pytest.raises(ValueError, match="Cache cannot add them.*DynamicCache.*StaticCache"):
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("layout", [{}, PRESET_LAYOUT], ids=["token-step", "block-step-hashed"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_static_cache_generation_equals_dynamic_cache_generation(compiled, layout):
    model = _model(**layout)
    ids, mask = _padded_batch(length=6, pad=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    graphs = []
    if compiled:
        def backend(graph_module, example_inputs):  # runs the captured graph as is, and counts it
            graphs.append(graph_module)
            return graph_module.forward

        # generate compiles the decoding steps of a static cache itself; `_compile_all_devices` is
        # transformers' switch for doing so off GPU ("useful for testing purposes").
        config = CompileConfig(fullgraph=True, backend=backend, mode=None)
        config._compile_all_devices = True
        kwargs["compile_config"] = config
    torch._dynamo.reset()
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert len(graphs) == (1 if compiled else 0)  # one decoding graph for every new token: nothing recompiles per token
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dynamic.scores), atol=1e-5, rtol=1e-4)
    assert torch.equal(static.reasoning_stats["steps"], dynamic.reasoning_stats["steps"])
    assert dynamic.reasoning_stats["steps"].unique().numel() > 1
