"""strfx.verify: whole-pytree comparison, the verification input set, float32 + float64 equivalence."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strfx.verify as verify
from strfx.errors import VerificationError
from strfx.verify import (INPUT_KINDS, NotEquivalentError, check_equivalent, compare_outputs, max_rel_error,
                          verification_inputs)


class LogitsAndWidth(nn.Module):
    """Returns (logits, y.shape[1]): a shrink that cuts y's channels changes the int silently."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 1)
        self.fc = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        y = self.conv(x)
        return self.fc(y.mean((2, 3))), y.shape[1]


def test_a_different_non_tensor_output_is_a_mismatch() -> None:
    ref = LogitsAndWidth(8).eval()
    cand = copy.deepcopy(ref)
    cand.conv = nn.Conv2d(3, 4, 1)  # as if four channels had been cut: the int output becomes 4
    cand.fc = nn.Linear(4, 4)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        c = compare_outputs(cand(x), ref(x))
    assert c.error == math.inf and c.leaf == "output[1]"
    assert c.reason == "output[1] is int 4, expected int 8"
    with pytest.raises(NotEquivalentError, match=r"on the example input: output\[1\] is int 4, expected int 8") as e:
        check_equivalent(cand, ref, verification_inputs((x,)))
    assert e.value.kind == "example input" and e.value.leaf == "output[1]"
    assert check_equivalent(copy.deepcopy(ref), ref, verification_inputs((x,))).float32_error == 0.0


def test_structure_shape_and_dtype_mismatches_name_the_leaf() -> None:
    t = torch.ones(2, 3)
    assert "output structure differs" in compare_outputs((t,), (t, t)).reason
    c = compare_outputs({"logits": t, "aux": t}, {"logits": t, "feat": t})
    assert c.reason is not None and "output['feat']" in c.reason
    assert compare_outputs({"logits": t[:, :2]}, {"logits": t}).reason == "output['logits'] has shape [2, 2], expected [2, 3]"
    assert "dtype" in compare_outputs([t.double()], [t]).reason
    assert compare_outputs((t, None), (t, None)).reason is None
    assert compare_outputs([t, 3], (t, 3)).reason is None  # a tracer may return a list for a tuple
    assert compare_outputs(t, (t,)).reason is not None
    # the old helpers keep working: inf on mismatch, relative to each expected tensor's max |e|
    assert max_rel_error(t * 1.001, t) == pytest.approx(1e-3, rel=1e-3)
    assert max_rel_error((t,), (t, t)) == math.inf


def test_non_finite_in_the_reference_only_says_so() -> None:
    """0·inf: a dead channel times a factor that overflows is NaN in the masked model, absent when shrunk."""

    class Masked(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dead = torch.zeros_like(x) * torch.exp(10 * x)  # NaN where exp overflows (x > 8.8 in float32)
            return x.sum(1, keepdim=True) + dead.sum(1, keepdim=True)

    class Shrunk(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(1, keepdim=True)

    with pytest.raises(NotEquivalentError, match="on the large-magnitude input: the masked model itself is "
                                                 r"non-finite on that input \(output: the reference is non-finite"):
        check_equivalent(Shrunk(), Masked(), verification_inputs((torch.randn(4, 16),)), what="the shrunk model",
                         against="the masked model")
    # the same non-finite pattern on both sides is agreement
    inf = torch.tensor([1.0, math.inf, math.nan])
    assert compare_outputs(inf.clone(), inf).reason is None
    assert "non-finite at 2 positions where the reference is finite" in compare_outputs(inf, torch.ones(3)).reason


def test_a_model_that_mutates_its_input_is_fed_a_fresh_copy_each_run() -> None:
    class Doubler(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2)
            return x + 1

    x = torch.randn(3, 4)
    before = x.clone()
    sets = verification_inputs((x,))
    res = check_equivalent(Doubler(), Doubler(), sets)
    assert res.float32_error == 0.0 and res.float64_error == 0.0 and res.inputs == list(INPUT_KINDS)
    assert torch.equal(x, before) and torch.equal(sets[0].inputs[0], before)


class Branchy(nn.Module):
    """y = conv(x) + 1e-5·hardtanh(conv(x), 0.5, 2.0): the second branch is tiny but not zero."""

    def __init__(self, keep_branch: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.keep_branch = keep_branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + 1e-5 * F.hardtanh(y, 0.5, 2.0) if self.keep_branch else y


def test_float64_catches_a_wrong_cut_that_hides_under_the_float32_tolerance() -> None:
    ref, cand = Branchy(True), Branchy(False)
    sets = verification_inputs((torch.randn(2, 3, 8, 8),))
    res = check_equivalent(cand, ref, sets, float64=False)  # what float32 alone accepts
    assert 1e-7 < res.float32_error <= 1e-4 and res.float64_error is None
    with pytest.raises(NotEquivalentError, match=r"float64 exposes a difference.*float64 \d") as e:
        check_equivalent(cand, ref, sets)
    assert e.value.float64_error is not None and e.value.float64_error > 1e-7
    # a float64 model: the "as given" run is float64 too, and the float64 tolerance is what catches it
    with pytest.raises(NotEquivalentError):
        check_equivalent(copy.deepcopy(cand).double(), copy.deepcopy(ref).double(), verification_inputs((torch.randn(2, 3, 8, 8, dtype=torch.float64),)))
    # identical models agree in float64 to rounding
    res = check_equivalent(copy.deepcopy(ref), ref, sets)
    assert res.float64_error is not None and res.float64_error <= 1e-12


def test_integer_token_inputs_stay_valid_and_other_inputs_are_kept() -> None:
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(2, 12) > 0.5
    sets = verification_inputs((ids, mask, 3, {"extra": torch.ones(2, 2)}))
    assert [s.kind for s in sets] == list(INPUT_KINDS)
    for s in sets:
        got_ids, got_mask, n, extra = s.inputs
        assert got_ids.dtype == torch.long and int(got_ids.min()) >= int(ids.min()) and int(got_ids.max()) <= int(ids.max())
        assert torch.equal(got_mask, mask) and n == 3 and extra["extra"].shape == (2, 2)
    assert torch.equal(sets[0].inputs[0], ids) and not torch.equal(sets[1].inputs[0], ids)
    emb = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 3))
    res = check_equivalent(copy.deepcopy(emb), emb, verification_inputs((ids,)))
    assert res.float32_error == 0.0  # every drawn id is a valid row
    large = sets[2].inputs[3]["extra"]
    assert large.abs().max() > 3  # 30·randn
    assert verification_inputs(torch.ones(1, 2))[0].inputs[0].shape == (1, 2)  # a bare tensor is one input


def test_non_negative_inputs_with_exact_zeros_expose_a_wrong_zero_claim() -> None:
    """hardtanh(·, 0.5, 2.0) maps 0 to 0.5; a rule that claims 0 ↦ 0 is only caught on inputs with exact zeros."""

    class Reference(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.hardtanh(x, 0.5, 2.0)

    class WrongZero(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.where(x == 0, torch.zeros_like(x), F.hardtanh(x, 0.5, 2.0))

    sets = verification_inputs((torch.randn(4, 32),))
    zeros = (sets[3].inputs[0] == 0).float().mean().item()
    assert 0.3 < zeros < 0.7 and bool((sets[3].inputs[0] >= 0).all())
    assert all(not bool((s.inputs[0] == 0).any()) for s in sets[:3])
    check_equivalent(WrongZero(), Reference(), sets[:3])  # passes without the zeros
    with pytest.raises(NotEquivalentError, match="on the non-negative input with zeros"):
        check_equivalent(WrongZero(), Reference(), sets)


def test_modes_are_restored_and_float64_is_skipped_only_without_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[2].eval()
    ref = copy.deepcopy(model)
    res = check_equivalent(model, ref, verification_inputs((torch.randn(3, 4),)))
    assert res.float32_error == 0.0  # dropout was off: both ran in eval mode
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert model[0].weight.dtype == torch.float32  # float64 ran on copies
    monkeypatch.setattr(verify, "available_memory", lambda: 10)
    res = check_equivalent(model, ref, verification_inputs((torch.randn(3, 4),)))
    assert res.float64_error is None and res.notes and res.notes[0].startswith("float64 check skipped")


def test_a_candidate_that_fails_to_run_and_a_bad_example_are_one_line_errors() -> None:
    with pytest.raises(NotEquivalentError, match="the candidate fails to run .*mat1 and mat2"):
        check_equivalent(nn.Linear(5, 2), nn.Linear(4, 2), verification_inputs((torch.randn(3, 4),)))
    with pytest.raises(VerificationError, match="the reference fails to run on the input set 0"):
        check_equivalent(nn.Linear(4, 2), nn.Linear(5, 2), [(torch.randn(3, 4),)])


def test_a_float32_fold_needs_the_float64_candidate_built_from_the_float64_reference() -> None:
    """Folding a scale into a weight rounds it to float32: cast to float64 that is a ~1e-8 difference the
    float64 check flags. The same fold computed from a float64 copy of the reference agrees to ~1e-16."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(16, 8)
            self.scale = nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale

    def fold(m: Scaled) -> nn.Linear:
        out = nn.Linear(16, 8).to(m.scale.dtype)
        with torch.no_grad():
            out.weight.copy_(m.fc.weight * m.scale[:, None])
            out.bias.copy_(m.fc.bias * m.scale)
        return out

    ref = Scaled()
    sets = verification_inputs((torch.randn(4, 16),))
    with pytest.raises(NotEquivalentError, match="float64 exposes"):
        check_equivalent(fold(ref), ref, sets)
    ref64 = copy.deepcopy(ref).double()
    res = check_equivalent(fold(ref), ref, sets, candidate64=fold(ref64), reference64=ref64)
    assert res.float64_error is not None and res.float64_error <= 1e-13 and res.float32_error <= 1e-6


class Cancels(nn.Module):
    """``x @ w − x @ w2`` with w2 ≈ w: catastrophic cancellation, so any float32 evaluation carries a rounding
    error of ~1e-4 relative; ``flip`` computes the same function with the sums in the other order."""

    def __init__(self, flip: bool = False, off: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.flip, self.off = flip, off
        self.w = nn.Parameter(torch.randn(64, 8))
        self.w2 = nn.Parameter(self.w.detach() + 1e-3 * torch.randn(64, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, w2 = (self.w.flip(0), self.w2.flip(0)) if self.flip else (self.w, self.w2)
        x = x.flip(-1) if self.flip else x
        return x @ w - x @ w2 + self.off


def test_float32_rounding_of_an_ill_conditioned_model_is_not_a_refusal_when_float64_proves_it_exact():
    """float64 agrees and the float32 gap is within 4× of the reference's own float32 rounding: accepted, noted."""
    ref, same = Cancels(), Cancels(flip=True)
    eq = check_equivalent(same, ref, verification_inputs((torch.randn(4, 64),)))
    assert eq.float32_error > 1e-4 and eq.float64_error <= 1e-9
    assert any("ill-conditioned op, not the cut" in n for n in eq.notes)
    with pytest.raises(VerificationError, match="differs"):  # a real difference is still refused
        check_equivalent(Cancels(flip=True, off=1e-2), ref, verification_inputs((torch.randn(4, 64),)))
