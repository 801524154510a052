"""Float8 rows (quantize=fp8_weight_only): the numbers, the layer swap, joined projections."""

from __future__ import annotations

import torch

from stages import float8_rows
from stages.generate.joined_projections import MergeRepeatedOps, join


def test_rows_scale_to_e4m3s_largest_value_and_dequantize_within_its_precision():
    torch.manual_seed(0)
    weight = torch.randn(6, 40) * torch.logspace(-3, 1, 6)[:, None]  # rows of very different sizes
    weight[2] = 0.0
    q, scale = float8_rows.quantize_rows(weight)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (6,)
    assert scale[2] == 1.0 and not q[2].float().any()  # a zero row: nothing to divide, stays zero
    largest = q.float().abs().amax(1)
    assert torch.equal(largest[[0, 1, 3, 4, 5]], torch.full((5,), 448.0))  # each row's largest |w| → 448
    back = q.float() * scale[:, None]
    # e4m3 keeps 3 mantissa bits: a normal value rounds within 2^-4 of itself
    normal = weight.abs() > scale[:, None] * 2.0 ** -6
    assert ((back - weight).abs() <= weight.abs() * 2.0 ** -4 + 1e-12)[normal].all()


def test_the_layer_computes_x_times_the_dequantized_weight_plus_bias():
    torch.manual_seed(0)
    dense = torch.nn.Linear(32, 12)
    layer = float8_rows.Float8RowsLinear.from_linear(dense)
    x = torch.randn(3, 5, 32)
    expected = torch.nn.functional.linear(x, layer.dequantized(), dense.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer(x), dense(x), atol=0.05 * dense(x).abs().max().item())  # near the dense layer
    bf16 = float8_rows.Float8RowsLinear.from_linear(dense.bfloat16())
    assert bf16(x.bfloat16()).dtype == torch.bfloat16  # activations keep the model's dtype


def test_convert_replaces_linear_layers_and_leaves_a_tied_head_dense(tiny_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tiny_model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    n_linear = sum(type(m) is torch.nn.Linear for m in tiny_model.modules())
    assert float8_rows.convert(tiny_model) == n_linear
    assert not any(type(m) is torch.nn.Linear for m in tiny_model.modules())
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50, tie_word_embeddings=True)
    tied = LlamaForCausalLM(config)
    from stages.quantize import Float8WeightOnly
    from stages.settings import Float8RowsSettings

    stage = Float8WeightOnly(Float8RowsSettings())
    assert stage.head_state(tied) == "dense: tied to the input embedding"
    assert float8_rows.convert(tied, include_head=False) == 7 and type(tied.lm_head) is torch.nn.Linear
    assert Float8WeightOnly(Float8RowsSettings(include_head=False)).head_state(tiny_model) == "absent"  # converted


def test_joined_float8_rows_compile_to_one_matmul_per_group_with_the_same_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(config).eval()
    float8_rows.convert(model)
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        before = model(ids).logits
        assert join(model) == ["q_proj+k_proj+v_proj", "gate_proj+up_proj"]
        q = model.model.layers[0].self_attn.q_proj
        assert q.weight.untyped_storage().data_ptr() == q.joined_weight.untyped_storage().data_ptr()  # a view
        assert torch.equal(model(ids).logits, before)  # eager calls run each slice as before
        counted = []

        class Count(MergeRepeatedOps):
            def __call__(self, graph: torch.fx.Graph) -> None:
                super().__call__(graph)
                counted.append(sum(n.target is torch.ops.aten.mm.default for n in graph.nodes))

        torch._dynamo.reset()
        compiled = torch.compile(lambda x: model(x).logits, fullgraph=True,
                                 options={"post_grad_custom_pre_pass": Count()})
        # compile for real (a cached graph from an earlier run would skip the pass)
        with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
                enable_autograd_cache=False):
            got = compiled(ids)
    assert counted == [2 * 4 + 1]  # per layer: q/k/v, o, gate/up, down; and the head
    assert torch.allclose(got, before, atol=1e-5)
