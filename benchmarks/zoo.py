"""The zoo: sparsify → kill channels → shrink → verify, over three public model sets (random init, nothing downloaded).

Sets (``--set``):

* ``torchvision``: every classification builder (``list_models(module=torchvision.models)``, 64 px; 224 for
  ViT/MaxViT, 96 for Inception-v3), segmentation (fcn, deeplabv3, lraspp; 64 px), video (r3d_18, mc3_18,
  r2plus1d_18, s3d, mvit_v1_b built for 4×64×64, swin3d_t; 1×3×4×64×64, s3d 1×3×16×224×224, the least
  its final 2×7×7 pooling takes), raft_small (two
  128×128 frames) and the quantizable models in float mode (``quantize=False``);
* ``timm``: the smallest model (parameter count on the meta device; timm's ``test_*`` configs left out) of
  every timm module, i.e. architecture family (``timm.models._registry._model_to_module``), at 96 px where
  it runs there, else its default input size; the choice is cached in benchmarks/timm_families.json;
* ``hf``: BERT, RoBERTa, GPT-2, Llama (GQA), Qwen2, Mistral, ViT, T5 encoder, Whisper encoder from small
  configs built in code, inputs from ``strfx.loader.hf_example_inputs``.

For every model, in its own subprocess with a time limit (one crash or hang is one row; results are
written after every model, ``--resume`` continues):

1. build, ``strfx.testing.randomize_``; params and FLOPs;
2. time capture + analysis (``strfx.surgery.analyze``: torch.export, ATen graph, channel rules) **side by
   side with** Torch-Pruning's ``DependencyGraph().build_dependency`` on the same model in the same process
   (both after a warm-up on a small net); torchvision image models again at 224 px;
3. ``strfx.sparsify(..., "structured")``, kill a random 30–50 % of every prunable group through the STR
   parameters (``strfx.testing.kill_channels``), ``strfx.shrink`` (which verifies the result against the
   masked model in float32 and float64), and, for torchvision (``--onnx``), export to ONNX and compare
   onnxruntime with the masked model;
4. record the status (*exact*: fewer parameters and verified; *refused*: strfx said why in one line;
   *failed*: anything else), eager or exported result, groups and what blocks them, ATen ops without a
   rule, params/FLOPs after, errors, timings, peak memory of ``strfx.shrink``.

Usage (torch-pruning is the ``bench`` extra; without it the Torch-Pruning column is empty)::

    python benchmarks/zoo.py --set timm                        # → docs/zoo_timm.json + docs/zoo.md (all sets)
    python benchmarks/zoo.py --set hf --models gpt2,llama --out /tmp/hf.json   # → /tmp/hf.json + /tmp/hf.md
    python benchmarks/zoo.py --set torchvision --resume        # skip models already in docs/zoo_torchvision.json
    python benchmarks/zoo.py --set timm --list                 # the models of a set
    python benchmarks/zoo.py --render-only                     # rewrite docs/zoo.md from the JSON files
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LEGACY_JSON = ROOT / "docs" / "zoo.json"  # the last full torchvision run of the old fx front end
DEFAULT_MD = ROOT / "docs" / "zoo.md"
FRACTION = (0.3, 0.5)
SEED = 0


SETS = ("torchvision", "timm", "hf")
TV_EXTRA = ["fcn_resnet50", "fcn_resnet101", "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50",
            "deeplabv3_resnet101", "lraspp_mobilenet_v3_large", "r3d_18", "mc3_18", "r2plus1d_18", "s3d",
            "mvit_v1_b", "swin3d_t", "raft_small"]
HF_MODELS = ["bert", "roberta", "gpt2", "llama", "qwen2", "mistral", "vit", "t5_encoder", "whisper_encoder"]


def input_size(name: str) -> int:
    if name.startswith(("vit_", "maxvit")):
        return 224  # fixed image_size / partition grid
    if name.startswith(("inception", "quantized_inception")):
        return 96  # needs ≥ 75
    return 64


# ------------------------------------------------------------------------------------------ model sets


def _tv() -> Any:
    from strfx._torchvision import torchvision

    return torchvision


def _small_mvit(name: str) -> Any:
    """MViT with its own block settings, built for 4×64×64 clips (mvit_v1_b hard-codes 16×224×224)."""
    from torchvision.models.video import mvit

    build = mvit._mvit

    def small(**kw: Any) -> Any:
        return build(**dict(kw, spatial_size=(64, 64), temporal_size=4))

    mvit._mvit = small
    try:
        return _tv().models.get_model(name, weights=None)
    finally:
        mvit._mvit = build


def list_torchvision() -> list[str]:
    """The 80 classifiers, segmentation, video, optical flow and the quantizable models (float mode)."""
    tvm = _tv().models
    return (sorted(tvm.list_models(module=tvm)) + TV_EXTRA
            + sorted(tvm.list_models(module=tvm.quantization)))


def build_torchvision(name: str) -> tuple[Any, tuple[Any, ...], str]:
    """Random-init model, its small example inputs and a short description of them."""
    import torch

    tvm = _tv().models
    gen = torch.Generator().manual_seed(SEED)
    if name in tvm.list_models(module=tvm.segmentation):
        model, shape = tvm.get_model(name, weights=None, weights_backbone=None), (1, 3, 64, 64)
    elif name in tvm.list_models(module=tvm.video):
        model = _small_mvit(name) if name.startswith("mvit") else tvm.get_model(name, weights=None)
        shape = (1, 3, 16, 224, 224) if name == "s3d" else (1, 3, 4, 64, 64)  # s3d's last pool is 2×7×7
    elif name.startswith("raft"):
        model = tvm.get_model(name, weights=None)
        # its correlation pyramid needs feature maps of ≥ 16 px (input ≥ 128)
        x = (torch.randn(1, 3, 128, 128, generator=gen), torch.randn(1, 3, 128, 128, generator=gen))
        return model, x, "2×1×3×128×128"
    elif name.startswith("quantized_"):
        model, shape = tvm.get_model(name, weights=None, quantize=False), (1, 3, input_size(name), input_size(name))
    else:
        model, shape = tvm.get_model(name, weights=None), (1, 3, input_size(name), input_size(name))
    return model, (torch.randn(*shape, generator=gen),), "×".join(map(str, shape))


TIMM_FAMILIES_JSON = ROOT / "benchmarks" / "timm_families.json"


def timm_families(refresh: bool = False) -> dict[str, str]:
    """timm module (architecture family) → its smallest model by parameter count, counted on the meta device.

    ``test_*`` models (timm's own tiny test configs) are left out. The choice is cached in
    benchmarks/timm_families.json with the timm version it was made for.
    """
    import strfx._torchvision  # noqa: F401 - makes torchvision (which timm imports) importable
    import timm
    import torch
    from timm.models import _registry

    if TIMM_FAMILIES_JSON.exists() and not refresh:
        cached = json.loads(TIMM_FAMILIES_JSON.read_text())
        if cached.get("timm") == timm.__version__:
            return cached["families"]
    best: dict[str, tuple[int, str]] = {}
    for n in timm.list_models():
        if n.startswith("test_"):
            continue
        try:
            with torch.device("meta"):
                count = sum(p.numel() for p in timm.create_model(n, pretrained=False).parameters())
        except Exception:  # noqa: BLE001 - not constructible without extra arguments: not a candidate
            continue
        fam = _registry._model_to_module[n]
        if fam not in best or (count, n) < best[fam]:
            best[fam] = (count, n)
    families = {f: n for f, (_, n) in sorted(best.items())}
    _atomic_write(TIMM_FAMILIES_JSON, json.dumps({"timm": timm.__version__, "families": families}, indent=1))
    return families


def list_timm() -> list[str]:
    return sorted(timm_families().values())


def build_timm(name: str) -> tuple[Any, tuple[Any, ...], str]:
    """The model at 96 px where it runs there (else its default input size)."""
    import strfx._torchvision  # noqa: F401 - makes torchvision (which timm imports) importable
    import timm
    import torch

    model = timm.create_model(name, pretrained=False).eval()
    _, h, w = timm.data.resolve_data_config({}, model=model)["input_size"]
    gen = torch.Generator().manual_seed(SEED)
    for size in ((96, 96), (h, w)):
        x = torch.randn(1, 3, *size, generator=gen)
        try:
            with torch.no_grad():
                model(x)
            break
        except Exception:  # noqa: BLE001 - a fixed input size: use the model's own
            continue
    return model, (x,), "×".join(map(str, x.shape))


def build_hf(name: str) -> tuple[Any, tuple[Any, ...], str]:
    """A small config of each architecture, built in code (nothing downloaded)."""
    import torch
    import transformers as tf

    from strfx.loader import hf_example_inputs

    lm = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=64)
    dec = dict(lm, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "bert":
        cfg = tf.BertConfig(**lm)
        cls = tf.BertForSequenceClassification
    elif name == "roberta":
        cfg = tf.RobertaConfig(**dict(lm, max_position_embeddings=70), pad_token_id=1)
        cls = tf.RobertaForSequenceClassification
    elif name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                            eos_token_id=2)
        cls = tf.GPT2LMHeadModel
    elif name == "llama":
        cfg, cls = tf.LlamaConfig(**dec), tf.LlamaForCausalLM
    elif name == "qwen2":
        cfg, cls = tf.Qwen2Config(**dec), tf.Qwen2ForCausalLM
    elif name == "mistral":
        cfg, cls = tf.MistralConfig(**dec, sliding_window=8), tf.MistralForCausalLM
    elif name == "vit":
        cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                           image_size=32, patch_size=8, num_labels=10)
        cls = tf.ViTForImageClassification
    elif name == "t5_encoder":
        cfg = tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
        cls = tf.T5EncoderModel
    elif name == "whisper_encoder":
        cfg = tf.WhisperConfig(vocab_size=64, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                               decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                               num_mel_bins=16, max_source_positions=16, max_target_positions=16, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        cls = None
    else:
        raise KeyError(name)
    torch.manual_seed(SEED)
    model = tf.WhisperModel(cfg).get_encoder() if cls is None else cls(cfg)
    if hasattr(model, "config"):
        model.config.use_cache = False
    x = hf_example_inputs(cfg)
    return model.eval(), x, "×".join(map(str, x[0].shape))


LISTS = {"torchvision": list_torchvision, "timm": list_timm, "hf": lambda: list(HF_MODELS)}
BUILDERS = {"torchvision": build_torchvision, "timm": build_timm, "hf": build_hf}


# ----------------------------------------------------------------------------------- one model (worker)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


class _HeapPeak:
    """Peak bytes in use by malloc (glibc ``mallinfo2``: heap + mmapped blocks), sampled every 5 ms.

    RSS growth undercounts when freed pages are reused; this counts what is allocated, whoever frees it.
    """

    def __init__(self) -> None:
        import ctypes
        import threading

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = MallInfo2
            self._info = libc.mallinfo2
        except (OSError, AttributeError):
            self._info = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.base = self.peak = self._used()

    def _used(self) -> int:
        if self._info is None:
            return -1
        i = self._info()
        return int(i.uordblks + i.hblkhd)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> "_HeapPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())

    @property
    def extra(self) -> int | None:
        return None if self._info is None else self.peak - self.base


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:240]}" if text else type(err).__name__


def _warm_up(tp: Any) -> None:
    """Run both analyses once on a small net so first-call costs (imports, caches) are not timed."""
    import torch
    from torch import nn

    from strfx.surgery import analyze

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    analyze(net, (x,))
    if tp is not None:
        tp.DependencyGraph().build_dependency(net, example_inputs=x, verbose=False)


def _tp_build(tp: Any, model: Any, inputs: tuple[Any, ...]) -> None:
    """Torch-Pruning's ``build_dependency``, leaving the model's hooks as they were: when the model's
    forward raises inside it, it returns without removing the hooks it registered, and they would break
    strfx's own runs on the same model afterwards."""
    saved = [(m, dict(m._forward_hooks)) for m in model.modules()]
    try:
        tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
    finally:
        for m, hooks in saved:
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)


def _reason_kind(reason: str) -> str:
    return re.sub(r"\s*\([^()]*\)$", "", reason)


def _norm_kind(model: Any) -> str:
    """Which BatchNorm the model is built on: timm's BatchNormAct2d, plain nn.BatchNorm2d, both or none."""
    import torch

    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    act = any(k.startswith("BatchNormAct") for k in kinds)
    plain = any(not k.startswith("BatchNormAct") for k in kinds)
    return {(True, False): "BatchNormAct2d", (False, True): "BatchNorm", (True, True): "both"}.get((act, plain), "none")


def run_model(set_name: str, name: str, row: dict[str, Any], onnx: bool) -> dict[str, Any]:
    """Fill ``row`` with everything the zoo records for one model (runs in the worker process)."""
    import torch

    import strfx
    from strfx.export import count_flops, count_params
    from strfx.surgery import analyze
    from strfx.testing import kill_channels, randomize_

    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
    row.update({"model": name, "set": set_name, "status": "failed", "stage": "build"})
    torch.manual_seed(SEED)
    with torch.no_grad():
        model, inputs, desc = BUILDERS[set_name](name)
        model = randomize_(model.eval(), SEED)
    row["input"] = desc
    row["norms"] = _norm_kind(model)
    row["params_before"] = count_params(model)
    row["model_bytes"] = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    try:
        row["flops_before"] = count_flops(model, inputs)
    except Exception as err:  # noqa: BLE001 - FLOPs are informative only
        row["flops_error"] = _first_line(err)
    _warm_up(tp)

    row["stage"] = "capture+analysis"
    t0 = time.perf_counter()
    _, analysis = analyze(model, inputs)  # torch.export, ATen graph, channel rules and groups
    row["analysis_s"] = time.perf_counter() - t0
    groups = analysis.groups
    row["groups"] = len(groups)
    row["prunable_groups"] = sum(g.prunable for g in groups)
    row["blocked_groups"] = sum(not g.prunable for g in groups)
    row["channels"] = sum(g.channels for g in groups)
    reasons = collections.Counter(_reason_kind(r) for g in groups if not g.prunable for r in g.blocked_by[:1])
    row["blocked_why"] = dict(reasons.most_common())
    row["unknown_ops"] = dict(analysis.unknown_ops)
    del analysis

    if tp is not None:
        try:
            t0 = time.perf_counter()
            _tp_build(tp, model, inputs)
            row["tp_analysis_s"] = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - Torch-Pruning's failure is a result, not a crash
            row["tp_error"] = _first_line(err)
    if set_name == "torchvision" and len(inputs) == 1 and inputs[0].dim() == 4:  # the same two analyses at 224 px
        if inputs[0].shape[-1] != 224:
            x224 = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(SEED))
            t0 = time.perf_counter()
            analyze(model, (x224,))
            row["analysis_224_s"] = time.perf_counter() - t0
            if tp is not None and "tp_error" not in row:
                t0 = time.perf_counter()
                _tp_build(tp, model, (x224,))
                row["tp_analysis_224_s"] = time.perf_counter() - t0
        else:
            row["analysis_224_s"] = row["analysis_s"]
            if "tp_analysis_s" in row:
                row["tp_analysis_224_s"] = row["tp_analysis_s"]

    row["stage"] = "sparsify"
    masked = strfx.sparsify(model, "structured", example_inputs=inputs)
    del model
    row["stage"] = "kill"
    row["killed"] = kill_channels(masked, FRACTION, seed=SEED, example_inputs=inputs)
    masked.eval()

    row["stage"] = "shrink"
    base = _rss_kib("VmRSS")
    reset = _reset_peak()
    with _HeapPeak() as heap:
        shrunk = strfx.shrink(masked, inputs)
    peak = _rss_kib("VmHWM")
    if heap.extra is not None:
        row["shrink_peak_alloc_extra_bytes"] = heap.extra
    if reset and base > 0 and peak > 0:
        row["shrink_peak_extra_bytes"] = (peak - base) * 1024
    rep = shrunk.strfx_shrink
    row["shrink_analysis_s"] = rep["analysis_s"]
    row["shrink_s"] = rep["shrink_s"]
    row["channels_removed"] = rep["channels_removed"]
    row["max_error_torch"] = rep["max_error"]
    row["max_error64"] = rep.get("max_error64")
    row["result"] = rep["result"]
    if rep.get("note"):
        row["note"] = rep["note"]
    row["params_after"] = count_params(shrunk)
    try:
        row["flops_after"] = count_flops(shrunk, inputs)
    except Exception as err:  # noqa: BLE001
        row["flops_error"] = _first_line(err)

    if onnx:
        row["stage"] = "onnx"
        _onnx_check(shrunk, masked, inputs, row)
    removed = row["params_after"] < row["params_before"]
    row["status"] = "exact" if removed else "nothing removed"
    if not removed:
        row["error"] = _nothing_removed_why(row)
    row.pop("stage")
    return row


def _nothing_removed_why(row: dict[str, Any]) -> str:
    if not row.get("prunable_groups"):
        top = next(iter(row.get("blocked_why", {})), "no channel groups")
        return f"no prunable group ({top})"
    return "prunable groups had no killable STR carrier"


def _onnx_check(shrunk: Any, masked: Any, inputs: tuple[Any, ...], row: dict[str, Any]) -> None:
    """Export the shrunk model and compare onnxruntime with the masked torch model on the example and a fresh input."""
    import numpy as np
    import onnxruntime as ort
    import torch

    import strfx
    from strfx.verify import max_rel_error

    with tempfile.TemporaryDirectory(prefix="strfx-zoo-") as d:
        t0 = time.perf_counter()
        exp = strfx.export(shrunk, Path(d) / "m.onnx", inputs, repeats=1)
        row["export_s"] = time.perf_counter() - t0
        row["exporter"] = exp.exporter
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(Path(d) / "m.onnx"), opts, providers=["CPUExecutionProvider"])
        gen = torch.Generator().manual_seed(SEED + 1)
        fresh = tuple(torch.randn(t.shape, generator=gen) if t.is_floating_point() else t for t in inputs)
        errs = []
        for xs in (inputs, fresh):
            feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), xs)}
            out = sess.run(None, feeds)
            with torch.no_grad():
                expected = masked(*xs)
            errs.append(max_rel_error([torch.from_numpy(np.asarray(o)) for o in out],
                                      list(torch.utils._pytree.tree_leaves(expected))))
        row["max_error_ort"] = max(errs)
    if row["max_error_ort"] > strfx.api.TOLERANCE:
        raise RuntimeError(f"onnxruntime differs from the masked model by {row['max_error_ort']:.1e}")


def worker(set_name: str, name: str, out: str, threads: int, onnx: bool) -> None:
    import torch

    from strfx.errors import StrfxError, VerificationError

    torch.set_num_threads(threads)
    row: dict[str, Any] = {"model": name}
    try:
        run_model(set_name, name, row, onnx)
    except Exception as err:  # noqa: BLE001 - recorded as this model's result
        # strfx explaining why it cannot (capture, nothing to sparsify) is a refusal; a wrong cut or a crash is a failure
        refused = isinstance(err, StrfxError) and not isinstance(err, VerificationError)
        row.update(status="refused" if refused else "failed", error=f"in {row.get('stage', '?')}: {_first_line(err)}",
                   trace=traceback.format_exc(limit=-3)[-1500:])
    Path(out).write_text(json.dumps(row))


# -------------------------------------------------------------------------------------------- driver


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


@functools.lru_cache(maxsize=None)
def _param_bytes_on_meta(set_name: str, name: str) -> int:
    """fp32 parameter bytes without building the model on real memory (meta device)."""
    import torch

    if set_name == "hf":
        return 1 << 20
    try:
        with torch.device("meta"):
            if set_name == "timm":
                import strfx._torchvision  # noqa: F401
                import timm

                m = timm.create_model(name, pretrained=False)
            else:
                tvm = _tv().models
                kw = {"weights_backbone": None} if name in tvm.list_models(module=tvm.segmentation) else {}
                m = tvm.get_model(name, weights=None, **kw)
        return sum(p.numel() * 4 for p in m.parameters())
    except Exception:  # noqa: BLE001 - unknown: let the worker try
        return 0


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch

    from strfx._torchvision import torchvision

    v = {"torch": torch.__version__, "torchvision": torchvision.__version__, "onnxruntime": onnxruntime.__version__,
         "python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("timm", "transformers", "torch-pruning"):
        try:
            v[pkg] = version(pkg)
        except PackageNotFoundError:
            v[pkg] = "not installed"
    return v


def _fmt_int(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v / 1e6:,.2f}M" if v >= 1e5 else f"{v:,}"


def _fmt_s(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}"


def _fmt_e(v: Any) -> str:
    return "–" if v is None else f"{v:.1e}"


def _peak(r: dict[str, Any]) -> int | None:
    """Peak extra memory of strfx.shrink: allocated bytes when measured, else RSS growth."""
    return r.get("shrink_peak_alloc_extra_bytes") or r.get("shrink_peak_extra_bytes")


def _pct_removed(r: dict[str, Any]) -> float | None:
    if r.get("params_before") and r.get("params_after") is not None:
        return 100.0 * (1 - r["params_after"] / r["params_before"])
    return None


def _why_cell(r: dict[str, Any]) -> str:
    why = "; ".join(f"{k} ×{v}" for k, v in list(r.get("blocked_why", {}).items())[:3]) or "–"
    if len(r.get("blocked_why", {})) > 3:
        why += f"; +{len(r['blocked_why']) - 3} more"
    if r.get("unknown_ops"):
        why += "; unknown ops: " + ", ".join(sorted(r["unknown_ops"]))
    return why.replace("|", "/")


def _status_cell(r: dict[str, Any]) -> str:
    status = {"ok": "exact"}.get(r["status"], r["status"])
    text = status if status == "exact" and not r.get("error") else f"{status}: {r.get('error', '')[:160]}"
    if r.get("legacy"):
        text += " (old fx front end)"
    return text.replace("|", "/")


def _set_header(set_name: str, all_rows: list[dict[str, Any]], meta: dict[str, Any],
                legacy: dict[str, Any] | None = None) -> list[str]:
    rows = [r for r in all_rows if not r.get("legacy")]
    n = len(meta.get("all_models", rows))
    exact = [r for r in rows if r["status"] in ("exact", "ok")]
    refused = [r for r in rows if r["status"] == "refused"]
    failed = [r for r in rows if r["status"] not in ("exact", "ok", "refused", "nothing removed")]
    nothing = [r for r in rows if r["status"] == "nothing removed"]
    env = meta.get("env", {})
    lines = [
        f"- Run: {meta['date']}; strfx commit {meta.get('commit', 'unknown')}; machine: {meta['machine']}"
        + (f", load average at start {', '.join(f'{x:.1f}' for x in env['loadavg'])}" if env.get("loadavg") else "")
        + f"; torch threads per model: {meta['threads']}; seed {meta.get('seed', SEED)}; one model at a time per benchmark process.",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        *([f"- Note: {meta['note']}."] if meta.get("note") else []),
        f"- **{len(exact)}/{n}** exact (fewer parameters, verified in float32 ≤ 1e-4 and float64), "
        f"{len(nothing)} exact with nothing removed, {len(refused)} refused with a reason, {len(failed)} failed"
        + (f"; {n - len(rows)} not measured in this run" if n > len(rows) else "") + ".",
    ]
    old = [r for r in all_rows if r.get("legacy")]
    if old and legacy:
        lines.append(f"- {len(old)} rows marked *(old fx front end)* were not re-measured on the new core: they are "
                     f"the last full run of the old torch.fx front end (commit {legacy.get('commit')}, "
                     f"{legacy.get('date')}, docs/zoo.json) and are not counted above; "
                     f"{sum(r['status'] == 'ok' for r in old)}/{len(old)} of them were exact there.")
    pct = [p for r in exact if (p := _pct_removed(r)) is not None]
    if pct:
        k = sum(p >= 20 for p in pct)
        all_pct = [(_pct_removed(r) or 0.0) if r["status"] == "exact" else 0.0 for r in rows]
        lines.append(f"- Parameters removed: **{k}/{len(rows)}** measured models ({100 * k / len(rows):.0f} %) are exact "
                     f"with ≥ 20 % removed ({k}/{n} of the whole set); median removed over the exact ones "
                     f"**{statistics.median(pct):.1f} %**, over all measured (failed/refused = 0) "
                     f"{statistics.median(all_pct):.1f} %.")
    both = [r for r in rows if r.get("analysis_s") is not None and r.get("tp_analysis_s") is not None
            and not r.get("legacy")]
    if both:
        s_sum, tp_sum = sum(r["analysis_s"] for r in both), sum(r["tp_analysis_s"] for r in both)
        lines.append(f"- Capture + analysis (`strfx.surgery.analyze`: torch.export, ATen graph, channel rules) vs "
                     f"Torch-Pruning `build_dependency`, same models, same run ({len(both)} models): {s_sum:.1f} s vs "
                     f"{tp_sum:.1f} s = **{s_sum / tp_sum:.2f}×**; per-model median "
                     f"{statistics.median(r['analysis_s'] / r['tp_analysis_s'] for r in both):.2f}×.")
        both224 = [r for r in both if r.get("analysis_224_s") and r.get("tp_analysis_224_s")]
        if both224:
            s224, tp224 = sum(r["analysis_224_s"] for r in both224), sum(r["tp_analysis_224_s"] for r in both224)
            lines.append(f"- The same at 224 px ({len(both224)} image models): {s224:.1f} s vs {tp224:.1f} s = "
                         f"**{s224 / tp224:.2f}×**.")
    tp_fail = [r for r in rows if r.get("tp_error") and not r.get("legacy")]
    if tp_fail:
        lines.append(f"- Torch-Pruning's `build_dependency` raised on {len(tp_fail)} models: "
                     + "; ".join(f"{r['model']} (`{r['tp_error'][:100]}`)" for r in tp_fail) + ".")
    if set_name == "timm":
        by_norm: dict[str, list[float]] = collections.defaultdict(list)
        for r in rows:
            by_norm[r.get("norms", "none")].append(_pct_removed(r) or 0.0 if r["status"] == "exact" else 0.0)
        parts = [f"{k}: {len(v)} models, median {statistics.median(v):.1f} % removed, "
                 f"{sum(p >= 20 for p in v)} with ≥ 20 %" for k, v in sorted(by_norm.items())]
        lines.append("- By BatchNorm kind (failed/refused count as 0 %): " + "; ".join(parts) + ".")
    ops = collections.Counter(op for r in rows if not r.get("legacy") for op in r.get("unknown_ops", {}))
    if ops:
        lines.append("- ATen ops without a rule (models they block channels in): "
                     + ", ".join(f"`{op}` ×{c}" for op, c in ops.most_common()) + ".")
    return lines


def render_set(set_name: str, data: dict[str, Any]) -> list[str]:
    rows, meta = data["results"], data["meta"]
    lines = [f"## {TITLES[set_name]}", "", *_set_header(set_name, rows, meta, data.get("legacy_meta")), "",
             "| model | input | BN kind | groups (prunable/blocked) | what blocks groups | params before → after "
             "| FLOPs before → after | result | max err f32 / f64 | capture+analysis s | TP build_dependency s "
             "| at 224 px: strfx / TP s | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["model"]):
        tp_cell = "error" if r.get("tp_error") else _fmt_s(r.get("tp_analysis_s"))
        at224 = (f"{_fmt_s(r.get('analysis_224_s'))} / {_fmt_s(r.get('tp_analysis_224_s'))}"
                 if r.get("analysis_224_s") else "–")
        groups = f"{r['groups']} ({r['prunable_groups']}/{r['blocked_groups']})" if "groups" in r else "–"
        err = f"{_fmt_e(r.get('max_error_torch'))} / {_fmt_e(r.get('max_error64'))}"
        lines.append(
            f"| {r['model']} | {r.get('input', '–')} | {r.get('norms', '–')} | {groups} | {_why_cell(r)} | "
            f"{_fmt_int(r.get('params_before'))} → {_fmt_int(r.get('params_after'))} | "
            f"{_fmt_int(r.get('flops_before'))} → {_fmt_int(r.get('flops_after'))} | "
            f"{r.get('result', '–')}{' (' + r['note'][:80].replace('|', '/') + ')' if r.get('note') else ''} | {err} | "
            f"{_fmt_s(r.get('analysis_s'))} | {tp_cell} | {at224} | {_status_cell(r)} |")
    return lines + [""]


TITLES = {"torchvision": "torchvision: classification, segmentation, video, optical flow, quantizable (float)",
          "timm": "timm: the smallest model of every architecture family (timm module)",
          "hf": "HuggingFace transformers 5: small configs built in code"}


def load_set(set_name: str, out: Path | None = None) -> dict[str, Any] | None:
    """A set's results; the torchvision set also shows rows of the last full run of the old fx front end
    (docs/zoo.json) for models not measured on the new core yet, marked as such."""
    path = out or json_path(set_name)
    data = json.loads(path.read_text()) if path.exists() else None
    if set_name == "torchvision" and LEGACY_JSON.exists() and out is None:
        legacy = json.loads(LEGACY_JSON.read_text())
        data = data or {"meta": dict(legacy["meta"], all_models=[]), "results": []}
        have = {r["model"] for r in data["results"]}
        extra = [dict(r, legacy=True) for r in legacy["results"] if r["model"] not in have]
        data = {"meta": data["meta"], "results": data["results"] + extra,
                "legacy_meta": {k: legacy["meta"].get(k) for k in ("date", "commit")}}
    return data


def render_markdown(sets: dict[str, dict[str, Any]]) -> str:
    lines = ["# The zoo: shrink and verify models nobody here wrote", "",
             "Generated by `python benchmarks/zoo.py --set SET` (see its docstring); do not edit by hand.", "",
             f"Recipe for every model: random init + `strfx.testing.randomize_`, `strfx.sparsify(model, \"structured\")`,"
             f" kill a random {int(FRACTION[0] * 100)}–{int(FRACTION[1] * 100)} % of the channels of every prunable group "
             "through the STR parameters (`strfx.testing.kill_channels`), `strfx.shrink` (verified against the masked "
             "model on the example, random, large-magnitude and non-negative inputs, float32 ≤ 1e-4 and float64). "
             "*exact*: fewer parameters and verified; *refused*: strfx said why it cannot (one line); *failed*: "
             "anything else (crash, wrong cut, time limit). *result*: `eager` is the user's own class with smaller "
             "parameters, `exported` the cut ATen graph (the model's forward hard-codes a size). *what blocks "
             "groups*: blocked channel groups counted by their first reason, and the ATen ops without a rule. "
             "Capture + analysis is timed beside Torch-Pruning's `DependencyGraph().build_dependency` on the same "
             "model in the same process, both after a warm-up.", ""]
    for set_name in SETS:
        if set_name in sets:
            lines += render_set(set_name, sets[set_name])
    return "\n".join(lines) + "\n"


def json_path(set_name: str) -> Path:
    return ROOT / "docs" / f"zoo_{set_name}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="set_name", choices=SETS, default="torchvision", help="Which model set.")
    ap.add_argument("--models", default=None, help="Comma-separated subset of the set (default: all of it).")
    ap.add_argument("--out", default=None, help="JSON results file (default: docs/zoo_SET.json).")
    ap.add_argument("--md", default=None, help="Markdown report (default: docs/zoo.md with every set's results "
                    "when --out is the default, else next to --out).")
    ap.add_argument("--timeout", type=int, default=1800, help="Seconds per model.")
    ap.add_argument("--threads", type=int, default=1, help="torch/onnxruntime threads per model.")
    ap.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=None,
                    help="Export each shrunk model and check it in onnxruntime (default: on for torchvision only).")
    ap.add_argument("--note", default=None, help="A note for the report (e.g. which subset was run and why).")
    ap.add_argument("--resume", action="store_true", help="Keep results already in --out and skip those models.")
    ap.add_argument("--list", action="store_true", help="Print the set's models and exit.")
    ap.add_argument("--render-only", action="store_true", help="Rewrite the markdown from the JSON files; run nothing.")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    onnx = args.onnx if args.onnx is not None else args.set_name == "torchvision"
    if args.worker:
        worker(args.set_name, args.worker, args.worker_out, args.threads, onnx)
        return

    out = Path(args.out) if args.out else json_path(args.set_name)
    default_out = args.out is None
    md = Path(args.md) if args.md else (DEFAULT_MD if default_out else out.with_suffix(".md"))

    def render() -> None:
        if default_out:
            sets = {s: d for s in SETS if (d := load_set(s)) is not None}
        else:
            sets = {args.set_name: json.loads(out.read_text())}
        _atomic_write(md, render_markdown(sets))

    if args.render_only:
        render()
        return
    all_models = LISTS[args.set_name]()
    if args.list:
        print("\n".join(all_models))
        return
    names = args.models.split(",") if args.models else all_models
    unknown = [n for n in names if n not in all_models]
    if unknown:
        sys.exit(f"error: not in the {args.set_name} set: {', '.join(unknown)}; see --list")
    results: list[dict[str, Any]] = []
    previous: list[str] = []
    old_meta: dict[str, Any] = {}
    if args.resume and out.exists():  # keep every row already there; run only what --models names and lacks
        old = json.loads(out.read_text())
        results, previous, old_meta = old["results"], list(old["meta"].get("all_models", [])), old["meta"]
    done = {r["model"] for r in results}
    todo = sorted((n for n in names if n not in done), key=lambda n: _param_bytes_on_meta(args.set_name, n))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _env import environment

    env = environment()
    meta = {"date": env["date"], "commit": env["commit"], "env": env,
            "machine": f"{platform.machine()}, {env['cpu']}, {os.cpu_count()} CPUs (shared)", "threads": args.threads,
            "versions": _versions(), "all_models": list(dict.fromkeys(previous + names)), "fraction": FRACTION, "seed": SEED, "onnx": onnx,
            **({"note": args.note} if args.note else {})}
    if old_meta:  # a resumed run: say when and at which commits its rows were measured
        for key in ("date", "commit"):
            if old_meta.get(key) and old_meta[key] != meta[key]:
                meta[key] = f"{old_meta[key].split(' to ')[0]} to {meta[key]}"
        if not args.note and old_meta.get("note"):
            meta["note"] = old_meta["note"]
    for name in todo:
        need = _param_bytes_on_meta(args.set_name, name) * 5  # model + sparsified copy + shrunk + float64 copies
        t0 = time.perf_counter()
        if need > _mem_available():
            row = {"model": name, "status": "refused",
                   "error": f"skipped: needs ~{need / 2**30:.1f} GiB, {_mem_available() / 2**30:.1f} GiB available"}
        else:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                tmp = f.name
            try:
                proc = subprocess.run([sys.executable, __file__, "--set", args.set_name, "--worker", name,
                                       "--worker-out", tmp, "--threads", str(args.threads),
                                       "--onnx" if onnx else "--no-onnx"], capture_output=True, text=True,
                                      timeout=args.timeout)
                text = Path(tmp).read_text()
                row = json.loads(text) if text else {
                    "model": name, "status": "failed",
                    "error": f"worker exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}"}
            except subprocess.TimeoutExpired:
                row = {"model": name, "status": "failed", "error": f"time limit: over {args.timeout} s"}
            finally:
                Path(tmp).unlink(missing_ok=True)
        row["wall_s"] = time.perf_counter() - t0
        row["commit"] = env["commit"]
        results.append(row)
        print(f"{name:28s} {row['status']:8s} {row['wall_s']:7.1f}s  "
              f"params {_fmt_int(row.get('params_before'))} → {_fmt_int(row.get('params_after'))}  "
              f"analysis strfx {_fmt_s(row.get('analysis_s'))} TP {_fmt_s(row.get('tp_analysis_s'))}  "
              f"{row.get('error', '')[:140]}", flush=True)
        _atomic_write(out, json.dumps({"meta": meta, "results": results}, indent=1))
        render()


if __name__ == "__main__":
    main()
