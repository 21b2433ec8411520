"""Low-rank STR: the math (values, gradients incl. ∂/∂s), exact insertion, exact factoring per layer kind."""

from __future__ import annotations

import copy
import importlib.util
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from strfx.lowrank import (
    FactoredRNN,
    LowRankConfig,
    STRLowRank,
    apply_lowrank,
    factor_lowrank,
    lowrank_parametrizations,
    lowrank_report,
    lowrank_sigma_parameters,
    lowrank_threshold_parameters,
    orthogonality_penalty,
    plot_ranks,
    ranks,
    selected_weights,
    sparsify_lowrank,
)

ROOT = Path(__file__).resolve().parents[1]


def _fastgrnn():
    spec = importlib.util.spec_from_file_location("fastgrnn_example", ROOT / "examples" / "fastgrnn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _first(y):
    return y[0] if isinstance(y, tuple) else y


def _rel(a, b) -> float:
    a, b = _first(a).detach(), _first(b).detach()
    return float((a - b).abs().max() / b.abs().max())


# (model, input) pairs in float64; each exercises one layer kind
def _cases():
    torch.manual_seed(0)
    fg = _fastgrnn()
    return {
        "linear": (nn.Linear(20, 30), torch.randn(4, 20)),
        "conv2d_grouped_strided_dilated_padded": (
            nn.Conv2d(8, 12, 3, groups=2, stride=2, padding=1, dilation=2), torch.randn(2, 8, 11, 11)),
        "conv1d_circular": (nn.Conv1d(6, 16, 5, stride=2, padding=2, padding_mode="circular"), torch.randn(2, 6, 17)),
        "conv3d": (nn.Conv3d(4, 10, 3, padding=1, bias=False), torch.randn(2, 4, 5, 5, 5)),
        "lstm_bidirectional_2layer": (nn.LSTM(30, 12, num_layers=2, bidirectional=True, batch_first=True),
                                      torch.randn(3, 5, 30)),
        "lstm_proj_unbatched": (nn.LSTM(24, 16, proj_size=6), torch.randn(5, 24)),
        "gru": (nn.GRU(24, 10), torch.randn(5, 3, 24)),
        "fastgrnn": (fg.SequentialMNIST(hidden_size=16, rows=7, cols=7), torch.randn(3, 1, 7, 7)),
    }


CASES = list(_cases())


def _kill_ranks(model: nn.Module, keep: int) -> None:
    """Make every low-rank weight rank ``keep`` by pushing its other raw σ below the threshold."""
    with torch.no_grad():
        for mod, tname, _ in lowrank_parametrizations(model).values():
            mod.parametrizations[tname].original1[keep:] = -1.0


# ----------------------------------------------------------------------------------------- math


@pytest.mark.parametrize("orth", ["none", "qr"])
def test_gradcheck_incl_threshold(orth):
    """Analytic gradients of U·diag(relu(σ − g(s)))·Vᵀ wrt U, σ, V and s match finite differences."""
    torch.manual_seed(1)
    w = torch.randn(5, 4, dtype=torch.float64)
    p = STRLowRank(w, s_init=-2.2, orthogonality=orth)  # g(s) ≈ 0.0998
    u, _, v = (t.clone() for t in p.right_inverse(w))
    sigma_raw = torch.tensor([1.5, 0.8, 0.45, 0.05], dtype=torch.float64)  # the last is dead, none near the kink
    s = p.s.detach().clone()
    args = tuple(t.requires_grad_() for t in (u, sigma_raw, v, s))

    def f(u, sigma_raw, v, s):
        return torch.func.functional_call(p, {"s": s, "scale": p.scale}, (u, sigma_raw, v))

    assert torch.autograd.gradcheck(f, args)
    f(*args).pow(2).sum().backward()
    assert args[3].grad.abs().item() > 0  # ∂/∂s flows through the live singular values
    assert args[1].grad[3] == 0  # a dead singular value gets no gradient (as a pruned weight in STR)


def test_threshold_zeroes_singular_values_and_rank():
    torch.manual_seed(2)
    lin = apply_lowrank(nn.Linear(6, 8).double(), LowRankConfig(s_init=-10))
    assert ranks(lin) == {"weight": (6, 6)}
    sigma_raw = lin.parametrizations.weight.original1.detach()  # σ + g(s_init), descending
    with torch.no_grad():
        lin.parametrizations.weight[0].s.fill_(torch.logit(sigma_raw[3] + 1e-9).item())
    r, full = ranks(lin)["weight"]
    assert (r, full) == (3, 6)  # σ₃..σ₅ (≤ threshold) are zero now
    assert torch.linalg.matrix_rank(lin.weight.detach()).item() == 3


def test_relative_threshold_scales_by_sigma_max():
    w = nn.Linear(10, 10).weight.detach().double() * 50  # all singular values well above 1
    p = STRLowRank(w, s_init=0.0, relative_threshold=True)
    assert p.threshold().item() == pytest.approx(0.5 * torch.linalg.matrix_norm(w, 2).item())


# ----------------------------------------------------------------------------------------- insertion


@pytest.mark.parametrize("orth", ["none", "qr", "penalty"])
@pytest.mark.parametrize("case", CASES)
def test_insertion_is_exact_float64(case, orth):
    model, x = _cases()[case]
    model, x = model.double(), x.double()
    ref = copy.deepcopy(model)
    lr = sparsify_lowrank(model, LowRankConfig(s_init=-3, orthogonality=orth), example_inputs=(x,))
    assert lowrank_parametrizations(lr), "nothing was reparameterised"
    assert not lowrank_parametrizations(model)  # the user's model is untouched
    assert _rel(lr(x), ref(x)) < 1e-12


def test_rnn_forward_uses_the_parametrized_weight():
    """nn.LSTM reads a cached weight list: the pre-hook must feed it the thresholded weights."""
    torch.manual_seed(3)
    lstm = nn.LSTM(8, 5).double()
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    lr = apply_lowrank(copy.deepcopy(lstm))
    lr(x)  # a forward before the change: the weight list must not go stale
    _kill_ranks(lr, 0)
    with torch.no_grad():
        lstm.weight_ih_l0.zero_()
    assert ranks(lr)["weight_ih_l0"][0] == 0
    assert _rel(lr(x), lstm(x)) < 1e-12
    copy.deepcopy(lr)  # no autograd-graph tensors are left on the module after a forward


def test_selection_exclude_depthwise_rnn_flag_and_gain():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16), nn.Flatten(), nn.Linear(16, 64), nn.Linear(64, 1),
        nn.GRU(8, 4, num_layers=2))
    names = lambda cfg: [f"{n}.{t}" for n, _, t in selected_weights(model, cfg)]  # noqa: E731
    # depthwise conv (no rank ≥ 1 pays) and the 64→1 layer are never selected
    assert names(LowRankConfig()) == ["0.weight", "3.weight", "5.weight_ih_l0", "5.weight_ih_l1"]
    assert names(LowRankConfig(exclude=["3", "5.weight_ih_l1"])) == ["0.weight", "5.weight_ih_l0"]
    assert names(LowRankConfig(rnn=False)) == ["0.weight", "3.weight"]
    # 3×3 conv 3→16: cols 27, break-even rank 10 of 16 (0.625); Linear 16→64: 12 of 16 (0.75)
    assert names(LowRankConfig(rnn=False, min_rank_gain=0.7)) == ["3.weight"]


def test_bad_config_and_nothing_to_do_are_one_line_errors():
    from strfx.errors import ConfigError

    with pytest.raises(ConfigError, match="lowrank: orthogonality"):
        apply_lowrank(nn.Linear(4, 4), {"orthogonality": "householder"})
    with pytest.raises(ConfigError, match="no layer to reparameterise"):
        sparsify_lowrank(nn.Sequential(nn.Linear(4, 4)), {"exclude": ["*"]})


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(4)
    model = _fastgrnn().SequentialMNIST(hidden_size=12, rows=6, cols=6)
    lr = apply_lowrank(copy.deepcopy(model), LowRankConfig(s_init=-4))
    opt = torch.optim.SGD(lr.parameters(), lr=0.5)
    x = torch.randn(5, 1, 6, 6)
    lr(x).square().sum().backward()
    opt.step()
    sd = lr.state_dict()
    assert {"cell.W.parametrizations.weight.original0", "cell.W.parametrizations.weight.original1",
            "cell.W.parametrizations.weight.original2", "cell.W.parametrizations.weight.0.s"} <= set(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.manual_seed(99)
    fresh = apply_lowrank(_fastgrnn().SequentialMNIST(hidden_size=12, rows=6, cols=6), LowRankConfig())
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), lr(x))


def _train_rank(threshold_decay: float, sigma_decay: float = 0.0) -> tuple[int, int]:
    torch.manual_seed(5)
    teacher = nn.Linear(8, 8)
    lin = apply_lowrank(copy.deepcopy(teacher), LowRankConfig(s_init=-3.0))
    thresholds, sigmas = lowrank_threshold_parameters(lin), lowrank_sigma_parameters(lin)
    assert sigmas[0] is lin.parametrizations.weight.original1
    rest = [p for p in lin.parameters() if all(p is not t for t in thresholds + sigmas)]
    opt = torch.optim.SGD([{"params": rest, "weight_decay": 0.0},
                           {"params": sigmas, "weight_decay": sigma_decay},
                           {"params": thresholds, "weight_decay": threshold_decay}], lr=0.1)
    x = torch.randn(64, 8)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.mse_loss(lin(x), teacher(x).detach()).backward()
        opt.step()
    return ranks(lin)["weight"]


def test_weight_decay_on_threshold_lowers_rank():
    """A few SGD steps with weight decay on s (against a loss that wants the original layer) remove ranks."""
    assert _train_rank(0.0) == (8, 8)  # control: the loss alone keeps every rank
    r, full = _train_rank(1.0)
    assert full == 8 and r <= 6
    r, _ = _train_rank(0.0, sigma_decay=3.0)  # decay on the raw σ pushes them under a fixed threshold
    assert r <= 6


def test_orthogonality_penalty():
    torch.manual_seed(6)
    lin = apply_lowrank(nn.Linear(10, 6).double(), LowRankConfig(orthogonality="penalty", penalty_weight=1.0))
    assert orthogonality_penalty(lin).item() < 1e-20  # U, V from the SVD are orthonormal
    with torch.no_grad():
        lin.parametrizations.weight.original0.mul_(1.1)
    pen = orthogonality_penalty(lin)
    assert pen.item() > 0.1 and pen.requires_grad
    assert orthogonality_penalty(apply_lowrank(nn.Linear(10, 6))).item() == 0  # only 'penalty' layers count


# ----------------------------------------------------------------------------------------- factoring


@pytest.mark.parametrize("case", CASES)
def test_factoring_is_exact_float64(case):
    model, x = _cases()[case]
    model, x = model.double(), x.double()
    dense_params = sum(p.numel() for p in model.parameters())
    lr = apply_lowrank(model, LowRankConfig(orthogonality="none" if case == "linear" else "qr"))
    _kill_ranks(lr, 2)
    ref = copy.deepcopy(lr)
    out = factor_lowrank(lr, (x,))
    assert not lowrank_parametrizations(out)
    assert _rel(out(x), ref(x)) < 1e-9
    rep = out.strfx_lowrank
    assert any(r.factored for r in rep.layers)
    assert rep.params_after < rep.params_dense
    assert sum(p.numel() for p in out.parameters()) < dense_params
    # a deep copy taken before factoring still works (parametrize's injected class is shared by copies)
    assert lowrank_parametrizations(ref) and _rel(ref(x), out(x)) < 1e-9


def test_factored_shapes_conv_grouped():
    conv = nn.Conv2d(8, 12, 3, groups=2, stride=2, padding=1, dilation=2).double()
    lr = apply_lowrank(conv)
    _kill_ranks(lr, 3)
    out = factor_lowrank(lr)
    first, second = out
    assert (first.out_channels, first.groups, first.stride, first.dilation, first.padding) == (6, 2, (2, 2), (2, 2), (1, 1))
    assert (second.kernel_size, second.groups, second.out_channels) == ((1, 1), 2, 12)


def test_factored_lstm_keeps_call_signature():
    torch.manual_seed(7)
    lstm = nn.LSTM(30, 12, num_layers=2, bidirectional=True, batch_first=True).double()
    lr = apply_lowrank(lstm)
    _kill_ranks(lr, 2)
    ref = copy.deepcopy(lr)
    out = factor_lowrank(lr)
    assert isinstance(out, FactoredRNN) and out.rnn.input_size == 4 and out.batch_first
    x = torch.randn(3, 5, 30, dtype=torch.float64)
    h0 = (torch.randn(4, 3, 12, dtype=torch.float64), torch.randn(4, 3, 12, dtype=torch.float64))
    (y, (h, c)), (yr, (hr, cr)) = out(x, h0), ref(x, h0)
    assert max(_rel(y, yr), _rel(h, hr), _rel(c, cr)) < 1e-9
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3, 2]), batch_first=True)
    assert _rel(out(packed)[0].data, ref(packed)[0].data) < 1e-9
    inner = {r.name: r for r in out.strfx_lowrank.layers}["weight_ih_l1"]
    assert not inner.factored and "inner" in inner.note


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_rnn_whose_input_projection_lost_every_rank_still_factors_exactly(kind):
    """Rank 0: the input adds nothing, yet an RNN needs input_size ≥ 1 — one zero column (was a raw ValueError)."""
    torch.manual_seed(9)
    rnn = kind(6, 5, batch_first=True).double()
    lr = apply_lowrank(rnn)
    _kill_ranks(lr, 0)
    ref = copy.deepcopy(lr)
    out = factor_lowrank(lr)
    assert isinstance(out, FactoredRNN) and out.rnn.input_size == 1
    assert not out.proj.weight.any() and not out.rnn.weight_ih_l0.any()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    assert _rel(out(x)[0], ref(x)[0]) < 1e-12


def test_fold_back_when_factoring_does_not_pay():
    torch.manual_seed(8)
    lin = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 20)).double()
    lr = apply_lowrank(copy.deepcopy(lin))
    with torch.no_grad():
        lr[2].parametrizations.weight.original1[3:] = -1.0  # rank 3 of 20: pays; layer 0 keeps full rank
    x = torch.randn(4, 20, dtype=torch.float64)
    ref = copy.deepcopy(lr)
    out = factor_lowrank(lr, (x,))
    assert type(out[0]) is nn.Linear and isinstance(out[2], nn.Sequential)
    assert _rel(out(x), ref(x)) < 1e-9
    rows = {r.name: r for r in out.strfx_lowrank.layers}
    assert not rows["0.weight"].factored and rows["0.weight"].params_after == 600
    assert rows["2.weight"].factored and rows["2.weight"].params_after == 3 * (30 + 20)


def test_multihead_attention_out_proj_is_left_dense_so_shrink_keeps_its_forward():
    """nn.MultiheadAttention reads out_proj.weight itself: a factored out_proj (two Linears) broke shrink."""
    torch.manual_seed(9)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    model = Block().double().eval()
    lr = apply_lowrank(copy.deepcopy(model))
    assert set(lowrank_parametrizations(lr)) == {"fc.weight"}
    _kill_ranks(lr, 4)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ref = copy.deepcopy(lr)
    out = factor_lowrank(lr, (x,))
    assert isinstance(out.fc, nn.Sequential) and type(out.attn.out_proj) is not nn.Sequential
    assert _rel(out(x), ref(x)) < 1e-9


def test_report_counts_params_and_flops():
    lin = apply_lowrank(nn.Linear(20, 30))
    _kill_ranks(lin, 3)
    rep = lowrank_report(lin, (torch.randn(5, 20),))
    (row,) = rep.layers
    assert (row.rank, row.full_rank, row.break_even_rank) == (3, 20, 11)
    assert (row.params_dense, row.params_after) == (600, 150)
    assert (row.flops_dense, row.flops_after) == (2 * 5 * 600, 2 * 5 * 150)
    assert lowrank_report(lin).flops_dense is None


def test_plot_ranks(tmp_path):
    lin = apply_lowrank(nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 5)))
    _kill_ranks(lin, 3)
    path = plot_ranks(lowrank_report(lin), tmp_path / "ranks.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
