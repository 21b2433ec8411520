"""Which ONNX exporter should ``strfx.export`` use?  Measure, don't guess.

Exports torchvision models captured as strfx captures them (the ATen GraphModule of ``torch.export``) with
both of torch's ONNX exporters — the TorchScript-based one (``dynamo=False``) and the
torch.export-based one (``dynamo=True``, onnxscript) — runs each file in onnxruntime (CPU) and
reports success, max relative error against torch, and export time, side by side in one run.

    python benchmarks/onnx_exporters.py [--models resnet18,swin_t] [--out exporters.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
import warnings

import torch

from strfx._torchvision import torchvision
from strfx.passes import capture
from strfx.verify import max_rel_error

DEFAULT = ("resnet18,mobilenet_v3_small,efficientnet_b0,shufflenet_v2_x0_5,squeezenet1_0,densenet121,"
           "convnext_tiny,swin_t,vit_b_16,maxvit_t,regnet_x_400mf,inception_v3,googlenet,mnasnet0_5")


def size_for(name: str) -> int:
    if name.startswith(("vit_", "maxvit")):
        return 224
    if name.startswith("inception"):
        return 96
    return 64


def try_export(gm: torch.nn.Module, x: torch.Tensor, dynamo: bool) -> dict:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                kw = {"dynamo": True, "verbose": False} if dynamo else {"dynamo": False, "opset_version": 17}
                import contextlib
                with contextlib.redirect_stdout(io.StringIO()):
                    torch.onnx.export(gm, (x,), path, **kw)
        except Exception as err:  # noqa: BLE001 - we are measuring failures
            return {"ok": False, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"}
        secs = time.perf_counter() - t0
        try:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        except Exception as err:  # noqa: BLE001
            return {"ok": False, "error": f"ORT: {type(err).__name__}: {str(err).strip().splitlines()[0][:200]}", "secs": secs}
        with torch.no_grad():
            ref = gm(x)
        err = max_rel_error([torch.from_numpy(o) for o in out], ref)
        return {"ok": err <= 1e-4, "err": err, "secs": round(secs, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = {}
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, size_for(name), size_for(name))
        gm = capture(model, (x,))
        rows[name] = {"torchscript": try_export(gm, x, False), "dynamo": try_export(gm, x, True)}
        print(name, json.dumps(rows[name]), flush=True)
    for kind in ("torchscript", "dynamo"):
        ok = [r[kind] for r in rows.values() if r[kind]["ok"]]
        print(f"{kind}: {len(ok)}/{len(rows)} ok, total export {sum(r['secs'] for r in ok):.1f}s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
