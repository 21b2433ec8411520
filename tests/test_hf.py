"""HuggingFace transformers 5 models, captured with torch.export: sparsify, train, shrink, generate, reload."""

from __future__ import annotations

import pytest
import torch

import strfx
import strfx.modules
from strfx.loader import hf_example_inputs, load_model
from strfx.testing import kill_channels

transformers = pytest.importorskip("transformers")


def _llama() -> tuple[torch.nn.Module, object]:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model, cfg


def _gpt2() -> tuple[torch.nn.Module, object]:
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.config.use_cache = False
    return model, cfg


def _bert() -> tuple[torch.nn.Module, object]:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval(), cfg


def _logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("build", [_llama, _gpt2, _bert])
def test_hf_models_sparsify_train_and_shrink_mlp_neurons_exactly(build):
    model, cfg = build()
    x = hf_example_inputs(cfg)
    unstructured = strfx.sparsify(model, "unstructured", example_inputs=x)
    assert len(strfx.modules.str_weights(unstructured)) >= 4 * cfg.num_hidden_layers
    sparse = strfx.sparsify(model, "structured", example_inputs=x)
    assert type(sparse) is type(model)
    opt = torch.optim.SGD(strfx.param_groups(sparse, threshold_decay=1e-2), lr=0.05)
    sparse.train()
    for _ in range(3):  # a few steps in the model's own train mode (dropout on)
        opt.zero_grad()
        _logits(sparse(*x)).float().pow(2).mean().backward()
        opt.step()
    sparse.eval()
    counts = kill_channels(sparse, 0.4, example_inputs=x)
    assert counts["channels"] > 0
    small = strfx.shrink(sparse, x)
    rep = small.strfx_shrink
    assert rep["params_after"] < rep["params_before"] and rep["channels_removed"] == counts["channels"]
    # an exported result (GPT-2's attention hard-codes its split size) takes inputs shaped like the example
    shape = (2, 11) if rep["result"] == "eager" else tuple(x[0].shape)
    ids = torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(_logits(small(ids)), _logits(sparse(ids)), rtol=1e-4, atol=1e-5)


def test_hf_llama_loses_heads_neurons_and_hidden_size_and_still_generates(tmp_path):
    model, cfg = _llama()
    x = hf_example_inputs(cfg)
    sparse = strfx.sparsify(model, "structured", example_inputs=x)
    prompt = torch.tensor([[1, 5, 9, 13]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kwargs)
    assert torch.equal(sparse.generate(prompt, **kwargs), expected)  # insertion is exact
    carriers = {n: c for n, c in strfx.modules.channel_carriers(sparse).items() if c.kind == "gate"}
    # heads are units (one per key/value head, which goes with the query heads sharing it: GQA), MLP
    # neurons, and the hidden size: one importance vector for the whole residual stream
    assert sorted(c.raw.numel() for c in carriers.values()) == [2, 2, 32, 48, 48]
    with torch.no_grad():  # the same 20 MLP neurons and 1 kv head of every layer: uniform, as HF configs need
        for carrier in carriers.values():
            n = {48: 20, 32: 8, 2: 1}[carrier.raw.numel()]
            carrier.raw[torch.randperm(carrier.raw.numel(), generator=torch.Generator().manual_seed(0))[:n]] = 0.0
    small = strfx.shrink(sparse, x)
    attn = small.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (16, 8, 16)
    assert attn.q_proj.in_features == attn.o_proj.out_features == small.model.embed_tokens.embedding_dim == 24
    rep = small.strfx_shrink
    assert rep["result"] == "eager" and type(small) is type(model) and rep["max_error64"] <= 1e-9
    assert torch.equal(small.generate(prompt, **kwargs), sparse.generate(prompt, **kwargs))
    # the shrunk model is still a HF model: it saves and reloads locally (RMSNorm ε rescaled in the config)
    small.save_pretrained(tmp_path / "small")
    loaded = load_model(f"hf:{tmp_path / 'small'}")
    assert small.config.intermediate_size == 28 == loaded.model.model.layers[1].mlp.up_proj.out_features
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    assert (small.config.hidden_size, small.config.head_dim) == (24, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(prompt).logits, small(prompt).logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(small(prompt).logits, sparse(prompt).logits, rtol=1e-4, atol=1e-5)


def test_uniform_widths_make_a_per_layer_budget_a_hf_config(tmp_path):
    """STR learns per-layer budgets; ``uniform=True`` keeps back dead units so every layer keeps the
    widest layer's count (exact: a kept dead unit is zero), which a HF config can describe."""
    model, cfg = _llama()
    x = hf_example_inputs(cfg)
    sparse = strfx.sparsify(model, "structured", example_inputs=x)
    carriers = strfx.modules.channel_carriers(sparse)
    with torch.no_grad():  # layer 0 loses 20 neurons and a kv head, layer 1 only 10 neurons
        carriers["model.layers.0.mlp.gate_proj"].raw[:20] = 0.0
        carriers["model.layers.1.mlp.gate_proj"].raw[:10] = 0.0
        carriers["model.layers.0.self_attn.q_proj"].raw[0] = 0.0
    per_layer = strfx.shrink(sparse, x)
    widths = [layer.mlp.up_proj.out_features for layer in per_layer.model.layers]
    assert widths == [28, 38] and per_layer.config.intermediate_size == 48  # a config cannot say that
    small = strfx.shrink(sparse, x, uniform=True)
    assert [layer.mlp.up_proj.out_features for layer in small.model.layers] == [38, 38]
    assert [layer.self_attn.k_proj.out_features for layer in small.model.layers] == [16, 16]
    rep = small.strfx_shrink
    assert rep["uniform"] and rep["max_error64"] <= 1e-9 and rep["params_after"] > per_layer.strfx_shrink["params_after"]
    assert small.config.intermediate_size == 38
    small.save_pretrained(tmp_path / "u")
    loaded = load_model(f"hf:{tmp_path / 'u'}")
    prompt = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(prompt).logits, small(prompt).logits, rtol=1e-5, atol=1e-6)


def test_flops_count_attention_inside_sdpa_on_the_cpu():
    """torch's flop counter has no formula for the CPU SDPA kernel; strfx registers one, so a Llama
    counts the same FLOPs with SDPA as with eager attention (what --target-sparsity steers)."""
    from strfx.export import count_flops

    model, cfg = _llama()
    eager = transformers.LlamaForCausalLM(cfg).eval()
    eager.config._attn_implementation = "eager"
    x = (torch.randint(0, 64, (1, 16)),)
    assert count_flops(model, x) == count_flops(eager, x) > 0


def test_hf_eager_attention_heads_are_units_and_shrink_exactly():
    """HF's eager attention (``q @ kᵀ · scale``, softmax, ``@ v`` with RoPE) has the same head units as SDPA."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    x = (torch.randint(0, 64, (1, 8)),)
    sparse = strfx.sparsify(model, "structured", example_inputs=x)
    carriers = strfx.modules.channel_carriers(sparse)
    with torch.no_grad():
        carriers["model.layers.0.self_attn.q_proj"].raw[0] = 0.0
        carriers["model.embed_tokens"].raw[:4] = 0.0
    small = strfx.shrink(sparse, x)
    rep = small.strfx_shrink
    assert rep["result"] == "eager" and rep["max_error64"] <= 1e-9
    assert small.model.layers[0].self_attn.k_proj.out_features == 8 and small.config.hidden_size == 28


def test_every_head_dead_removes_attention_and_its_rotary_tables():
    """All heads dead (no depth gates): the attention branches leave the graph, and so does the rotary
    embedding only they read; the eager model keeps working on other batch sizes and lengths."""
    model, cfg = _llama()
    x = (torch.randint(0, 64, (2, 8)),)
    sparse = strfx.sparsify(model, "structured", example_inputs=x, config={"depth": False})
    with torch.no_grad():
        for name, carrier in strfx.modules.channel_carriers(sparse).items():
            if ".self_attn." in name:
                carrier.raw.zero_()
    small = strfx.shrink(sparse, x)
    assert small.strfx_shrink["result"] == "eager", small.strfx_shrink["note"]
    assert type(small.model.rotary_emb) is strfx.modules.RemovedBranch
    y = torch.randint(0, 64, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(small(y).logits, sparse(y).logits, rtol=1e-5, atol=1e-6)
