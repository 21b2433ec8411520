"""Transformer units as channels: attention heads (MHA, SDPA, grouped-query) and MLP neurons, exact in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strfx
import strfx.modules
from strfx.surgery import analyze
from strfx.testing import kill_channels


class SelfAttention(nn.Module):
    """Hand-written multi-head attention (the way most model code writes it) with an MLP."""

    def __init__(self, dim: int = 24, heads: int = 4, kv_heads: int = 4) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 40), nn.Linear(40, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        if rep > 1:  # grouped-query attention, repeat_kv as HF writes it
            kv = k.shape[1]
            k = k[:, :, None].expand(b, kv, rep, n, self.head_dim).reshape(b, -1, n, self.head_dim)
            v = v[:, :, None].expand(b, kv, rep, n, self.head_dim).reshape(b, -1, n, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        x = x + self.o(y)
        return x + self.fc2(F.gelu(self.fc1(x)))


def _units(model: nn.Module, x: torch.Tensor) -> list[int]:
    _, analysis = analyze(model, (x,))
    return sorted(g.channels for g in analysis.groups if g.prunable)


def test_multi_query_attention_prunes_value_dims():
    """One key/value head cannot go; its value dims can (each removes a column of every head's output)."""
    model, x = SelfAttention(kv_heads=1).eval(), torch.randn(2, 5, 24)
    assert _units(model, x) == [6, 40]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_heads_are_units_and_shrink_exactly(kv_heads):
    torch.manual_seed(0)
    model, x = SelfAttention(kv_heads=kv_heads).eval(), torch.randn(2, 5, 24)
    assert _units(model, x) == [kv_heads, 40]  # a kv head goes with the query heads that share it
    sparse = strfx.sparsify(model, "structured", example_inputs=(x,))
    head_unit = next(c for c in strfx.modules.channel_carriers(sparse).values() if c.raw.numel() == kv_heads)
    with torch.no_grad():
        head_unit.raw[0] = 0.0
    small = strfx.shrink(sparse, (x,))
    rep = small.strfx_shrink
    assert rep["result"] == "eager", rep["note"]
    assert small.q.out_features == 24 - 24 // kv_heads and small.o.in_features == small.q.out_features
    assert small.k.out_features == small.v.out_features == 24 // 4 * (kv_heads - 1)
    assert rep["max_error64"] <= 1e-9
    with torch.no_grad():
        y = torch.randn(3, 5, 24)
        torch.testing.assert_close(small(y), sparse(y), rtol=1e-5, atol=1e-6)


def test_multihead_attention_heads_are_units():
    mha = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    assert _units(mha, x) == [4, 32]
    sparse = strfx.sparsify(mha, "structured", example_inputs=(x,))
    counts = kill_channels(sparse, 0.5, example_inputs=(x,))
    small = strfx.shrink(sparse, (x,))
    # nn.MultiheadAttention ties its inner width to embed_dim: the cut ATen graph is the result
    assert counts["channels"] > 0 and small.strfx_shrink["result"] == "exported"
    assert small.get_parameter("self_attn.in_proj_weight").shape[0] < 48
    assert small.strfx_shrink["max_error64"] <= 1e-9


# --- hidden size: the residual stream is a unit --------------------------------------------------
def _groups(model: nn.Module, x: torch.Tensor) -> list:
    _, analysis = analyze(model, (x,))
    return analysis.groups


def test_vision_transformer_has_no_group_blocked_but_the_output():
    """torchvision's ViT: heads (nn.MultiheadAttention), MLP neurons and the hidden size (patch
    embedding, class token, position embedding, every writer into the stream, LayerNorm γ/β) are all
    units; killed together they are cut exactly (the cut graph: MHA ties its width to embed_dim)."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48,
                              num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head
    x = torch.randn(2, 3, 32, 32)
    blocked = [g for g in _groups(model, x) if not g.prunable]
    assert [g.blocked_by for g in blocked] == [["model output"]]
    sparse = strfx.sparsify(model, "structured", example_inputs=(x,))
    carriers = strfx.modules.channel_carriers(sparse).values()
    assert sorted(c.raw.numel() for c in carriers if c.kind == "gate") == [4, 4, 32, 48, 48]
    assert sum(c.kind == "depth" for c in carriers) == 4  # one gate per residual branch
    counts = kill_channels(sparse, 0.25, example_inputs=(x,))
    small = strfx.shrink(sparse, (x,))
    rep = small.strfx_shrink
    assert rep["channels_removed"] == counts["channels"] == 1 + 1 + 8 + 12 + 12
    assert small.get_parameter("class_token").shape[-1] == 24 == small.get_parameter("encoder.pos_embedding").shape[-1]
    assert rep["max_error64"] <= 1e-9 and rep["params_after"] < 0.75 * rep["params_before"]


def test_bert_hidden_size_with_layernorm_stays_in_the_users_class():
    """HF BERT (post-norm, nn.LayerNorm): hidden channels go where every writer and every LayerNorm's
    γ, β are zero; the LayerNorms become WideLayerNorm (original width as divisor), in BERT's own class."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    x = torch.randint(0, 64, (2, 7))
    sparse = strfx.sparsify(model, "structured", example_inputs=(x,))
    kill_channels(sparse, 0.4, example_inputs=(x,))
    small = strfx.shrink(sparse, (x,))
    rep = small.strfx_shrink
    assert rep["result"] == "eager" and type(small) is type(model) and rep["max_error64"] <= 1e-9
    ln = small.bert.embeddings.LayerNorm
    assert type(ln) is strfx.modules.WideLayerNorm and ln.full_width == 32 and ln.weight.numel() < 32
    y = torch.randint(0, 64, (3, 11))  # another batch and length: the eager model is general
    with torch.no_grad():
        torch.testing.assert_close(small(y).logits, sparse(y).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_wide_norms_are_exact_in_float64_and_in_onnxruntime(kind, tmp_path):
    """A norm that lost zero channels, written with the original width as divisor, gives the original
    output on the kept channels — in float64 to rounding, and exported to ONNX."""
    torch.manual_seed(0)
    full = nn.LayerNorm(12) if kind == "layer" else nn.RMSNorm(12, eps=1e-6)
    with torch.no_grad():
        full.weight.uniform_(0.5, 1.5)
        if kind == "layer":
            full.bias.uniform_(-1, 1)
    keep = torch.tensor([0, 1, 3, 4, 6, 7, 8, 11])
    x = torch.randn(5, 12, dtype=torch.float64)
    x[:, [2, 5, 9, 10]] = 0.0
    wide_cls = strfx.modules.WideLayerNorm if kind == "layer" else strfx.modules.WideRMSNorm
    wide = wide_cls(8, 12, full.eps).double()
    with torch.no_grad():
        wide.weight.copy_(full.weight[keep])
        if kind == "layer":
            wide.bias.copy_(full.bias[keep])
    expected = full.double()(x)[:, keep]
    torch.testing.assert_close(wide(x[:, keep]), expected, rtol=1e-12, atol=1e-12)
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "wide.onnx"
    wide32 = wide.float().eval()
    report = strfx.export(wide32, path, (x[:, keep].float(),))  # verified against onnxruntime itself
    assert report.exporter == "dynamo"
    session = ort.InferenceSession(str(path))
    for seed in (0, 1):
        z = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))
        (got,) = session.run(None, {session.get_inputs()[0].name: z.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), wide32(z), rtol=1e-5, atol=1e-6)


def test_tied_embedding_and_head_are_gated_and_cut_together():
    """GPT-2 ties lm_head.weight to wte.weight: STR acts on both reads of the one tensor, and the cut
    of the hidden size keeps them one tensor."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.config.use_cache = False
    x = torch.randint(0, 64, (1, 9))
    sparse = strfx.sparsify(model, "structured", example_inputs=(x,))
    emb, head = sparse.transformer.wte, sparse.lm_head
    assert emb.parametrizations.weight.original is head.parametrizations.weight.original
    kill_channels(sparse, 0.3, example_inputs=(x,))
    assert torch.equal(emb.weight, head.weight)  # both reads see the gated tensor
    small = strfx.shrink(sparse, (x,))
    assert small.strfx_shrink["result"] == "eager" and small.strfx_shrink["max_error64"] <= 1e-9
    assert small.lm_head.weight is small.transformer.wte.weight and small.lm_head.weight.shape[1] < 32


# --- depth: a residual branch is a unit ---------------------------------------------------------
class ResidualMLP(nn.Module):
    """Plain residual MLP blocks in a ModuleList, the way most model code writes them."""

    def __init__(self, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
                                    for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_dead_residual_branch_is_removed_from_graph_and_model():
    """``x + block(x)`` with a dead gate: the branch leaves the graph, and the eager block becomes a
    stand-in returning zeros (the loop still calls it; a block that *is* the identity would leave the
    list, see the Llama test)."""
    torch.manual_seed(0)
    model, x = ResidualMLP().eval(), torch.randn(4, 16)
    sparse = strfx.sparsify(model, "structured", example_inputs=(x,))
    gates = {n: c for n, c in strfx.modules.channel_carriers(sparse).items() if c.kind == "depth"}
    assert sorted(gates) == ["blocks.0.depth", "blocks.1.depth", "blocks.2.depth"]
    with torch.no_grad():
        gates["blocks.1.depth"].raw.zero_()
    small = strfx.shrink(sparse, (x,))
    rep = small.strfx_shrink
    assert rep["result"] == "eager" and rep["max_error64"] <= 1e-9
    assert type(small.blocks[1]) is strfx.modules.RemovedBranch
    assert rep["params_after"] == rep["params_before"] - sum(p.numel() for p in model.blocks[1].parameters())
    with torch.no_grad():
        y = torch.randn(7, 16)
        torch.testing.assert_close(small(y), sparse(y), rtol=1e-5, atol=1e-6)


def test_hf_llama_loses_heads_neurons_hidden_and_a_layer_in_one_shrink():
    """Every unit kind of a HF Llama with GQA at once: a kv head (with its query heads), MLP neurons,
    hidden channels, an attention branch (a stand-in returns zeros) and a whole layer (it leaves the
    layer list; config and KV-cache indices follow). The shrunk model generates with its cache like
    the masked one and round-trips through save_pretrained/from_pretrained."""
    transformers = pytest.importorskip("transformers")
    from strfx.loader import load_model

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    x = (torch.randint(0, 64, (1, 8)),)
    sparse = strfx.sparsify(model, "structured", example_inputs=x)
    gates = {n: c for n, c in strfx.modules.channel_carriers(sparse).items() if c.kind == "depth"}
    assert len(gates) == 6
    units = {n: c for n, c in strfx.modules.channel_carriers(sparse).items() if c.kind == "gate"}
    with torch.no_grad():
        for name in ("model.layers.0.self_attn.depth", "model.layers.1.self_attn.depth", "model.layers.1.mlp.depth"):
            gates[name].raw.zero_()
        units["model.embed_tokens"].raw[:8] = 0.0  # hidden 32 → 24
        for k in (0, 2):
            units[f"model.layers.{k}.mlp.gate_proj"].raw[:10] = 0.0  # neurons 48 → 38
        units["model.layers.2.self_attn.q_proj"].raw[1] = 0.0  # one of two kv heads
    small = strfx.shrink(sparse, x)
    rep = small.strfx_shrink
    assert rep["result"] == "eager" and rep["max_error64"] <= 1e-9
    assert len(small.model.layers) == small.config.num_hidden_layers == 2
    assert small.config.hidden_size == 24 and small.model.layers[1].mlp.up_proj.out_features == 38
    assert small.model.layers[1].self_attn.k_proj.out_features == 8  # one kv head of 8 dims left
    assert type(small.model.layers[0].self_attn) is strfx.modules.RemovedBranch
    assert small.model.layers[1].self_attn.layer_idx == 1  # renumbered for the KV cache
    prompt = torch.tensor([[1, 5, 9, 13]])
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=True)
    assert torch.equal(small.generate(prompt, **kwargs), sparse.generate(prompt, **kwargs))
    with torch.no_grad():  # a whole layer gone is what a HF config can describe
        gates["model.layers.0.self_attn.depth"].raw.fill_(1.0)
    smaller = strfx.shrink(sparse, x, uniform=True)  # one kv-head count for all layers: a config can say it
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        smaller.save_pretrained(d)
        loaded = load_model(f"hf:{d}").model
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, smaller(prompt).logits, rtol=1e-5, atol=1e-6)


class MatmulAttention(nn.Module):
    """Attention written with matmuls, a learned relative bias per head, a shifted (rolled) window and
    NHWC padding, as Swin writes it."""

    def __init__(self, dim: int = 24, heads: int = 4, tokens: int = 6) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.embed, self.head = nn.Linear(dim, dim), nn.Linear(dim, 5)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C) with H·W = tokens after padding
        b = x.shape[0]
        x = torch.roll(F.pad(self.embed(x), (0, 0, 0, 1)), shifts=(1, 1), dims=(1, 2))
        t = x.reshape(b, -1, x.shape[-1])
        qkv = self.qkv(self.norm(t)).reshape(b, t.shape[1], 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.hd ** -0.5) @ k.transpose(-2, -1) + self.bias
        attn = attn + torch.zeros_like(attn)
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, t.shape[1], -1)
        t = t + self.proj(y)
        t = t + self.fc2(F.gelu(self.fc1(t)))
        return self.head(t.mean(1))


def test_matmul_attention_heads_roll_and_nhwc_pad_are_followed():
    torch.manual_seed(0)
    model, x = MatmulAttention().eval(), torch.randn(2, 2, 2, 24)
    groups = _groups(model, x)
    assert [g.blocked_by for g in groups if not g.prunable] == [["model output"]]
    sparse = strfx.sparsify(model, "structured", example_inputs=(x,))
    sizes = sorted(c.raw.numel() for c in strfx.modules.channel_carriers(sparse).values() if c.kind == "gate")
    assert sizes == [4, 24, 32]  # heads, the hidden stream, MLP neurons
    counts = kill_channels(sparse, 0.5, example_inputs=(x,))
    small = strfx.shrink(sparse, (x,))
    assert counts["channels"] > 0 and small.strfx_shrink["max_error64"] <= 1e-9
    assert small.get_parameter("bias").shape[0] == 2  # the relative bias lost its dead heads


class NormAfterNorm(nn.Module):
    """Two functional layer norms in a row over the hidden size, with a hard-coded normalized shape (so the
    eager model cannot follow a cut and the cut graph is the result)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        self.w1, self.b1 = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))
        self.w2, self.b2 = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(F.layer_norm(F.layer_norm(h, (16,), self.w1, self.b1), (16,), self.w2, self.b2))


def test_a_norm_after_a_cut_norm_is_cut_too():
    torch.manual_seed(0)
    model, x = NormAfterNorm().eval(), torch.randn(4, 8)
    sparse = strfx.sparsify(model, "structured", example_inputs=(x,))
    (hidden,) = [c for c in strfx.modules.channel_carriers(sparse).values() if c.raw.numel() == 16]
    with torch.no_grad():
        hidden.raw[:5] = 0.0
    small = strfx.shrink(sparse, (x,))
    rep = small.strfx_shrink
    assert rep["result"] == "exported" and rep["channels_removed"] == 5 and rep["max_error64"] <= 1e-9


class BiasedAttention(nn.Module):
    """Two attention layers sharing one per-head bias table (T5's relative position bias): the mask has a
    slice per head. ``table=False``: the per-head mask is a buffer strfx cannot cut."""

    def __init__(self, dim: int = 24, heads: int = 4, n: int = 5, table: bool = True) -> None:
        super().__init__()
        self.heads, self.head_dim, self.table = heads, dim // heads, table
        self.bias = nn.Embedding(2 * n - 1, heads)
        self.register_buffer("fixed", torch.randn(1, heads, n, n))
        self.register_buffer("pos", (torch.arange(n)[None, :] - torch.arange(n)[:, None]) + n - 1)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(2))
        self.o = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        mask = self.bias(self.pos).permute(2, 0, 1)[None] if self.table else self.fixed  # (1, heads, n, n)
        for qkv, o in zip(self.qkv, self.o):
            q, k, v = qkv(x).view(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + o(y.transpose(1, 2).reshape(b, n, -1))
        return x


def test_a_per_head_attention_bias_goes_with_its_head_in_every_layer_it_feeds():
    """The shared bias table couples head h of both layers; cutting a head slices the table's column h."""
    torch.manual_seed(0)
    model, x = BiasedAttention().eval(), torch.randn(2, 5, 24)
    _, analysis = analyze(model, (x,))
    heads = [g for g in analysis.groups if g.channels == 4]
    assert len(heads) == 1 and heads[0].prunable and any("bias.weight" in m for m in heads[0].members)
    sparse = strfx.sparsify(model, "structured", example_inputs=(x,))
    kill_channels(sparse, 0.5, example_inputs=(x,))
    small = strfx.shrink(sparse, (x,))
    rep = small.strfx_shrink
    assert rep["result"] == "eager" and small.bias.weight.shape[1] == 2 and small.qkv[1].out_features == 3 * 12
    assert rep["max_error64"] <= 1e-9


def test_a_per_head_mask_strfx_cannot_cut_keeps_every_head():
    model, x = BiasedAttention(table=False).eval(), torch.randn(2, 5, 24)
    _, analysis = analyze(model, (x,))
    assert not any(g.channels == 4 and g.prunable for g in analysis.groups)
    assert any("one slice per head" in r for g in analysis.groups for r in g.blocked_by)

