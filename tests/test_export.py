"""strfx.export: the ONNX file runs in onnxruntime like torch, the .pt2 reloads without strfx, failures leave nothing."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strfx
from strfx.errors import ExportError, OutputExistsError, VerificationError
from strfx.loader import load_model
from strfx.modules import channel_carriers
from strfx.testing import kill_channels
from strfx.verify import max_rel_error

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def ort_outputs(path: Path, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the thread count strfx.export verified with
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})


def _torchvision(name: str, size: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    from strfx._torchvision import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    for mod in model.modules():  # at random init the classifier's bias dominates the output: drop it
        if isinstance(mod, nn.Linear) and mod.bias is not None:
            nn.init.zeros_(mod.bias)
    return model, (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)


CASES = ["examples/lenet5.py", "examples/resnet20.py", "examples/custom_residual.py",
         "torchvision:shufflenet_v2_x0_5"]


@pytest.mark.parametrize("spec", CASES)
def test_shrunk_export_matches_torch_in_onnxruntime_and_pt2(spec: str, tmp_path: Path) -> None:
    if spec.startswith("torchvision:"):
        model, inputs = _torchvision(spec.split(":")[1], 64)
    else:
        loaded = load_model(str(EXAMPLES.parent / spec))
        model, inputs = loaded.model.eval(), loaded.example_inputs
    masked = strfx.sparsify(model, "structured", example_inputs=inputs)
    assert kill_channels(masked, (0.3, 0.5), seed=0)["channels"] > 0
    shrunk = strfx.shrink(masked, inputs)
    with torch.no_grad():
        expected = masked.eval()(*inputs)
        assert max_rel_error(expected, model(*inputs)) > 1e-3  # killing channels changed the function

    rep = strfx.export(shrunk, tmp_path / "m.onnx", inputs, pt2_path=tmp_path / "m.pt2", reference=masked, repeats=2)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt2"]  # no temp files left
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    fresh = tuple(torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) for x in inputs)
    with torch.no_grad():
        fresh_expected = masked(*fresh)
    assert max_rel_error(torch.from_numpy(ort_outputs(tmp_path / "m.onnx", fresh)[0]), fresh_expected) <= 1e-4
    with torch.no_grad():
        assert max_rel_error(torch.export.load(str(tmp_path / "m.pt2")).module()(*fresh), fresh_expected) <= 1e-4
    assert rep.onnx_max_error <= 1e-4 and rep.pt2_max_error is not None and rep.pt2_max_error <= 1e-4
    assert rep.reference_max_error is not None and rep.reference_max_error <= 1e-4
    assert rep.onnx_bytes == (tmp_path / "m.onnx").stat().st_size
    assert rep.pt2_bytes == (tmp_path / "m.pt2").stat().st_size
    assert rep.model.params == sum(p.numel() for p in shrunk.parameters())
    assert rep.reference is not None
    # the masked model computes with tensors shaped like the dense model's (STR vectors are training state)
    assert rep.reference.params == sum(p.numel() for p in model.parameters())
    assert rep.model.params < rep.reference.params
    assert 0 < rep.model.flops < rep.reference.flops
    assert rep.model.torch_latency_ms and rep.model.ort_latency_ms and rep.reference.ort_latency_ms


def test_export_of_sparsified_model_counts_gates_not_thresholds(tmp_path: Path) -> None:
    loaded = load_model(str(EXAMPLES / "custom_residual.py"))
    gm = strfx.sparsify(loaded.model, "structured", example_inputs=loaded.example_inputs)
    rep = strfx.export(gm, tmp_path / "m.onnx", repeats=1)  # inputs recorded by sparsify
    gates = sum(c.raw.numel() for c in channel_carriers(gm).values() if c.kind == "gate")
    assert gates > 0  # importance vectors are parametrizations: the model computes with the same params
    assert rep.model.params == sum(p.numel() for p in loaded.model.parameters())
    assert rep.onnx_max_error <= 1e-4 and rep.reference is None


def test_pt2_reloads_without_strfx_or_model_source(tmp_path: Path) -> None:
    loaded = load_model(str(EXAMPLES / "custom_residual.py"))
    gm = strfx.sparsify(loaded.model, "structured", example_inputs=loaded.example_inputs)
    kill_channels(gm, 0.4, seed=0)
    shrunk = strfx.shrink(gm)
    strfx.export(shrunk, tmp_path / "m.onnx", loaded.example_inputs, pt2_path=tmp_path / "m.pt2", repeats=1)
    x = torch.randn(loaded.example_inputs[0].shape, generator=torch.Generator().manual_seed(3))
    torch.save({"x": x, "y": gm.eval()(x).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        class Block:  # any import of strfx or of the example's module fails
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("strfx", "custom_residual") or name.startswith("strfx_user_model"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import torch
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        y = torch.export.load({str(tmp_path / 'm.pt2')!r}).module()(io["x"])
        err = ((y - io["y"]).abs().max() / io["y"].abs().max()).item()
        assert not any(m.startswith("strfx") for m in sys.modules), "strfx was imported"
        print(err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-4


def test_dynamo_exporter_and_exported_program_input(tmp_path: Path) -> None:
    loaded = load_model(str(EXAMPLES / "lenet5.py"))
    model = loaded.model.eval()
    ep = torch.export.export(model, loaded.example_inputs)
    rep = strfx.export(ep, tmp_path / "m.onnx", exporters=("dynamo",), repeats=1)  # inputs come from the program
    assert rep.exporter == "dynamo" and rep.onnx_max_error <= 1e-4
    with torch.no_grad():
        expected = model(*loaded.example_inputs)
    got = ort_outputs(tmp_path / "m.onnx", loaded.example_inputs)
    assert max_rel_error(torch.from_numpy(got[0]), expected) <= 1e-4


def test_mismatch_raises_and_writes_nothing(tmp_path: Path, perturbed_ort) -> None:
    """If onnxruntime disagreed with torch (simulated: its outputs are perturbed), nothing is published."""
    loaded = load_model(str(EXAMPLES / "lenet5.py"))
    with pytest.raises(VerificationError, match="max relative error"):
        strfx.export(loaded.model, tmp_path / "m.onnx", loaded.example_inputs, pt2_path=tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    loaded = load_model(str(EXAMPLES / "lenet5.py"))
    target = tmp_path / "m.onnx"
    target.write_text("user data")
    with pytest.raises(OutputExistsError):
        strfx.export(loaded.model, target, loaded.example_inputs)
    assert target.read_text() == "user data"
    (tmp_path / "m.pt2").write_text("user pt2")
    target.unlink()
    with pytest.raises(OutputExistsError):
        strfx.export(loaded.model, target, loaded.example_inputs, pt2_path=tmp_path / "m.pt2")
    assert not target.exists() and (tmp_path / "m.pt2").read_text() == "user pt2"
    rep = strfx.export(loaded.model, target, loaded.example_inputs, pt2_path=tmp_path / "m.pt2", force=True, repeats=1)
    assert rep.onnx_max_error <= 1e-4
    onnx.checker.check_model(str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt2"]


def test_large_models_get_external_data_next_to_the_onnx_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the protobuf limit (simulated by lowering the threshold) weights go to NAME.data, renamed with NAME."""
    ex = importlib.import_module("strfx.export")
    monkeypatch.setattr(ex, "_EXTERNAL_DATA_BYTES", 0)
    loaded = load_model(str(EXAMPLES / "lenet5.py"))
    rep = strfx.export(loaded.model, tmp_path / "net.onnx", loaded.example_inputs, repeats=1)
    assert rep.exporter == "dynamo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.onnx.data"]
    assert (tmp_path / "net.onnx").stat().st_size < 100_000 < (tmp_path / "net.onnx.data").stat().st_size
    assert rep.onnx_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
    with torch.no_grad():
        expected = loaded.model.eval()(*loaded.example_inputs)
    got = ort_outputs(tmp_path / "net.onnx", loaded.example_inputs)
    assert max_rel_error(torch.from_numpy(got[0]), expected) <= 1e-4


# ------------------------------------------------------------- dynamic batch, input set, metadata, latency


def test_dynamic_batch_by_default_in_onnx_and_pt2(tmp_path: Path) -> None:
    loaded = load_model(str(EXAMPLES / "lenet5.py"))  # example batch 2
    model = loaded.model.eval()
    rep = strfx.export(model, tmp_path / "m.onnx", loaded.example_inputs, pt2_path=tmp_path / "m.pt2", repeats=3)
    assert rep.exporter == "dynamo" and rep.dynamic_dims == {"x": [0]} and rep.batch_sizes == [2, 3]
    assert rep.checked_inputs == ["example input", "random input", "large-magnitude input",
                                  "non-negative input with zeros", "random input at batch 3"]
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x)
            assert max_rel_error(program(x), expected) <= 1e-4
        assert max_rel_error(torch.from_numpy(ort_outputs(tmp_path / "m.onnx", (x,))[0]), expected) <= 1e-4
    assert "dynamic dims: x dim 0" in rep.summary()


class _Tiny(nn.Module):
    def __init__(self, fixed_batch: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        # a per-sample offset for a fixed batch: only that batch size broadcasts
        self.offset = torch.randn(fixed_batch, 4, 6, 6) if fixed_batch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return (y + self.offset if self.offset is not None else y).flatten(1)


def test_batch_one_example_still_exports_a_dynamic_batch(tmp_path: Path) -> None:
    """torch.export specialises a size-1 dim; strfx captures at batch 2 so batch 1 is not baked in."""
    model = _Tiny().eval()
    rep = strfx.export(model, tmp_path / "m.onnx", (torch.randn(1, 3, 8, 8),), pt2_path=tmp_path / "m.pt2", repeats=1)
    assert rep.dynamic_dims == {"x": [0]} and rep.batch_sizes == [1, 3] and rep.input_shapes == [[1, 3, 8, 8]]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    assert max_rel_error(torch.from_numpy(ort_outputs(tmp_path / "m.onnx", (x,))[0]), expected) <= 1e-4
    assert max_rel_error(torch.export.load(str(tmp_path / "m.pt2")).module()(x), expected) <= 1e-4


def test_a_model_that_fixes_its_batch_exports_static_with_a_note(tmp_path: Path) -> None:
    rep = strfx.export(_Tiny(fixed_batch=2), tmp_path / "m.onnx", (torch.randn(2, 3, 8, 8),), repeats=1)
    assert rep.dynamic_dims == {} and rep.batch_sizes == []
    assert rep.notes and rep.notes[0].startswith("static batch for x")
    assert "dynamic dims: none (static shapes)" in rep.summary()
    assert ort_outputs(tmp_path / "m.onnx", (torch.randn(2, 3, 8, 8),))[0].shape == (2, 144)


def test_onnxruntime_is_checked_on_large_inputs_and_a_disagreement_writes_nothing(tmp_path: Path) -> None:
    """Both exporters write logsigmoid so that onnxruntime gives -inf on large negative inputs, where torch
    is finite; the example input alone would not show it."""

    class LogSigmoid(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.logsigmoid(x)

    from strfx.errors import ExportError

    with pytest.raises(ExportError, match=r"onnxruntime differs from torch on the large-magnitude input: output\[0\]: "
                                          "non-finite at") as err:
        strfx.export(LogSigmoid(), tmp_path / "m.onnx", (torch.randn(4, 256),), pt2_path=tmp_path / "m.pt2")
    assert isinstance(err.value, VerificationError) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_torchscript_is_the_named_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = importlib.import_module("strfx.export")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo exporter failure")

    monkeypatch.setattr(ex, "_export_dynamo", broken)
    model = _Tiny().eval()
    rep = strfx.export(model, tmp_path / "m.onnx", (torch.randn(2, 3, 8, 8),), repeats=1)
    assert rep.exporter == "torchscript" and rep.dynamic_dims == {"x": [0]}
    assert any("dynamo exporter: RuntimeError: simulated" in n and "used the torchscript exporter" in n
               for n in rep.notes)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert max_rel_error(torch.from_numpy(ort_outputs(tmp_path / "m.onnx", (x,))[0]), model(x)) <= 1e-4


def test_metadata_round_trips_through_onnx_load(tmp_path: Path) -> None:
    from strfx.errors import StrfxError

    meta = {"strfx.input.shape": "[-1, 3, 8, 8]", "strfx.input.mean": "[0.1307]", "strfx.classes": "10"}
    rep = strfx.export(_Tiny(), tmp_path / "m.onnx", (torch.randn(2, 3, 8, 8),), repeats=1, metadata=meta)
    assert rep.metadata == meta
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert {k: props[k] for k in meta} == meta
    with pytest.raises(StrfxError, match="metadata keys and values must be strings"):
        strfx.export(_Tiny(), tmp_path / "n.onnx", (torch.randn(2, 3, 8, 8),), metadata={"classes": 10})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_latency_rows_are_medians_with_a_spread_at_one_thread_count(tmp_path: Path) -> None:
    rep = strfx.export(_Tiny(), tmp_path / "m.onnx", (torch.randn(2, 3, 8, 8),), repeats=5)
    for lat, median in ((rep.model.torch_latency, rep.model.torch_latency_ms),
                        (rep.model.ort_latency, rep.model.ort_latency_ms)):
        assert lat is not None and lat.runs == 5 and lat.median_ms == median
        assert 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms
    assert rep.threads == torch.get_num_threads()
    assert "p10" in rep.summary() and "ms (" in str(_render(rep.table()))


def _render(table) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_a_model_that_writes_into_its_input_exports_and_leaves_the_example_alone(tmp_path: Path) -> None:
    class Doubling(_Tiny):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2)
            return super().forward(x)

    model = Doubling().eval()
    x = torch.randn(2, 3, 8, 8)
    before = x.clone()
    rep = strfx.export(model, tmp_path / "m.onnx", (x,), pt2_path=tmp_path / "m.pt2", reference=model, repeats=2)
    assert torch.equal(x, before)  # verification, timing and FLOP counting all ran on copies
    assert rep.onnx_max_error <= 1e-4 and rep.pt2_max_error == 0 and rep.reference_max_error == 0


@torch.library.custom_op("strfx_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_an_op_no_exporter_knows_is_named_in_one_plain_line(tmp_path: Path) -> None:
    """The dynamo exporter wraps the real cause (which op) in a generic, coloured ConversionError."""

    class UsesCustomOp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.strfx_test.twice(self.fc(x))

    with pytest.raises(ExportError) as err:
        strfx.export(UsesCustomOp().eval(), tmp_path / "m.onnx", example_inputs=(torch.randn(2, 4),))
    msg = str(err.value)
    assert "\n" not in msg and "\x1b" not in msg, msg
    assert "dynamo exporter:" in msg and "strfx_test.twice" in msg.split("torchscript exporter:")[0], msg
    assert not list(tmp_path.iterdir())
