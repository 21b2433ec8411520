"""Structured pruning of a byte-level Llama on CPython's standard library: STR (strfx) vs uniform magnitude.

    python benchmarks/lm.py            # default run (~25 min on 2 shared cores), writes docs/lm.{json,md} + png
    python benchmarks/lm.py --rewind --targets 0.5 --methods str-all str-hn --out /tmp/x  # + diagnostic
    python benchmarks/lm.py --methods str-all+rw str-hn+rw --stem lm_rewind   # the rewind rows
    python benchmarks/lm.py --quick    # 2-minute smoke run into /tmp/strfx_lm_quick

Data: the ``.py`` files of the standard library of the Python running this script
(``sysconfig.get_paths()["stdlib"]``, site-/dist-packages left out), sorted by path; every 20th file is
held out for validation. Tokens are bytes (vocabulary 256). Training batches are random fixed-length
windows of the training files' concatenation (seeded); validation is a fixed seeded set of windows of
the held-out files, scored in bits per byte (bpb = cross-entropy in nats / ln 2, every position).

Model: HF ``LlamaForCausalLM`` from a config (GQA: 8 query heads sharing 4 key/value heads, SwiGLU,
RMSNorm, untied head), trained dense with AdamW for a fixed token budget. From the SAME dense
checkpoint, every method then gets the same number of training tokens at each FLOPs target:

* ``str-all``   — strfx structured STR on every transformer unit: key/value head groups, MLP neurons,
  the hidden size (one vector for the residual stream) and depth (a scalar gate per residual
  branch). ``STRSession`` steers the FLOPs removed to the target (AdamW, decoupled decay) during the
  first ``str_frac`` (75 %) of the budget; then ``strfx.shrink`` and plain AdamW fine-tuning of the shrunk
  model for the rest.
* ``str-hn``    — the same with heads and neurons only: ``SparsifyConfig(depth=False)`` and the
  hidden-size vector (and its threshold) frozen at its initial value, so it cannot die.
* ``str-all+rw``, ``str-hn+rw`` — the same units chosen by STR in the first ``rewind_frac`` (50 %) of the
  budget, then ``STRSession(rewind="start")``: STR's units are cut from the DENSE weights
  (``strfx.rewind``) and that model is trained for the rest exactly like ``uniform``'s (same lr, warm-up).
* ``uniform``   — the Torch-Pruning / LLM-Pruner recipe, written here: every layer loses the same
  fraction of its key/value head groups and of its MLP neurons, those with the smallest group L2
  magnitude (q/k/v rows + o columns of a head group; gate/up rows + down column of a neuron); the
  fraction is the one that removes the target FLOPs (heads round to whole groups, neurons take the
  rest); the units are zeroed through their strfx carriers, the model is cut with ``strfx.shrink``
  and fine-tuned for the whole budget.
* ``tp``        — Torch-Pruning 1.6.x itself (``benchmarks/tp_baseline.py``), set up as its LLM example: local
  ``GroupMagnitudeImportance(p=2)``, heads via ``num_heads``/``head_pruning_ratio``, ``lm_head`` ignored, the
  hidden size kept; then fine-tuned exactly like ``uniform``. Where Torch-Pruning cannot build the head groups
  of this model (it does not finish: see docs/lm.md) the failure is recorded and it prunes MLP neurons only, at
  the per-layer ratio that removes the target FLOPs; a target neurons alone cannot reach is skipped and noted.

FLOPs: ``torch.utils.flop_counter`` on one window (batch 1), with the attention computed by HF's
eager path (on CPU, FlopCounterMode does not count SDPA, so a model that trains with SDPA would hide
its attention matmuls); the models train and are timed with SDPA, because HF's eager attention blocks
the head units in strfx's analysis (see docs/lm.md). The controller targets the FLOPs strfx's meter
sees (SDPA: without the attention matmuls); the table reports both.
Tokens/s: forward (prefill) of one batch of windows, one thread, in torch eager and in onnxruntime (each
model exported through ``strfx.export``, which checks onnxruntime against torch, and checked again on the
timed batch), timed in rounds that interleave dense and shrunk, eager and onnxruntime (median per model),
since the machine is shared; ``--no-ort`` times eager only. ``benchmarks/lm_speed.py`` measures the same
for the shapes a finished run recorded, without retraining.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import strfx  # before transformers: strfx installs the torchvision shim transformers' imports need
import strfx.modules
from strfx.integrations import STRSession, str_optimizer
from strfx.modules import UnitScale
from strfx.verify import TOLERANCE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402
from baselines import lowest, uniform_counts  # noqa: E402
from latency import ort_runner, time_interleaved  # noqa: E402
from lm_data import VAL_EVERY, read_bytes, split_files, stdlib_files, windows  # noqa: E402
from tp_baseline import ratio_keeping, tp_prune_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@dataclass
class Budget:
    """Everything that sizes a run; ``--quick`` replaces it with a tiny one."""

    hidden: int = 128
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 344
    seq: int = 128
    batch: int = 16
    dense_steps: int = 650
    dense_lr: float = 2e-3
    method_steps: int = 200
    method_lr: float = 1e-3
    val_windows: int = 256
    targets: list[float] = field(default_factory=lambda: [0.5, 0.75])
    methods: list[str] = field(default_factory=lambda: ["str-all", "str-hn", "uniform"])
    controller_interval: int = 2
    max_step_rate: float = 0.05  # the controller's cap on the thresholds' pace per step (strfx default 0.02)
    str_frac: float = 0.75  # share of each method's token budget STR learns in (the rest fine-tunes the shrunk model)
    rewind_frac: float = 0.5  # the same for the "+rw" methods (the rest retrains the rewound model)
    str_lr_scale: float = 10.0  # lr of STR's thresholds and importance vectors ÷ the weights' lr
    throughput_rounds: int = 20  # interleaved rounds of eager and onnxruntime, dense and shrunk


QUICK = Budget(hidden=64, layers=2, ffn=160, seq=64, batch=8, dense_steps=60, method_steps=48, val_windows=32,
               targets=[0.5], controller_interval=2, max_step_rate=0.1,
               throughput_rounds=2)


# ---------------------------------------------------------------- model, training, measurement

def llama_config(b: Budget, **override: Any) -> Any:
    import transformers

    kw = dict(vocab_size=256, hidden_size=b.hidden, intermediate_size=b.ffn, num_hidden_layers=b.layers,
              num_attention_heads=b.heads, num_key_value_heads=b.kv_heads, head_dim=b.hidden // b.heads,
              max_position_embeddings=b.seq, use_cache=False, tie_word_embeddings=False, rms_norm_eps=1e-5,
              attn_implementation="sdpa")
    kw.update(override)
    return transformers.LlamaConfig(**kw)


def example(b: Budget) -> tuple[torch.Tensor]:
    """Example inputs for capture, shaped like a training batch: the ATen graph strfx.shrink falls back to when it
    cannot cut the eager model is static in the batch size, and must still train, score and be timed."""
    return (torch.randint(0, 256, (b.batch, b.seq), generator=torch.Generator().manual_seed(1)),)


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out[0]


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.0) -> float:
    """Linear warm-up then cosine from ``peak`` to ``floor·peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(total - warmup, 1)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, stream: torch.Tensor, b: Budget, steps: int, peak: float,
          seed: int, warmup: int, floor: float = 0.0, after_step: Callable[[int], Any] | None = None,
          log_every: int = 50, tag: str = "") -> float:
    """AdamW steps on random windows; returns seconds spent."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, steps, peak, warmup, floor) * g.get("lr_scale", 1.0)
        w = windows(stream, b.batch, b.seq, gen)
        loss = F.cross_entropy(logits_of(model, w[:, :-1]).reshape(-1, 256).float(), w[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        extra = after_step(step + 1) if after_step else None
        if (step + 1) % log_every == 0 or step + 1 == steps:
            bpb = loss.item() / math.log(2)
            print(f"  {tag} step {step + 1}/{steps} train bpb {bpb:.3f} {extra or ''} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def bpb(model: nn.Module, val: torch.Tensor, batch: int) -> float:
    """Validation bits per byte over every position of the fixed windows."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, val.shape[0], batch):
        w = val[i:i + batch]
        total += float(F.cross_entropy(logits_of(model, w[:, :-1]).reshape(-1, 256).float(), w[:, 1:].reshape(-1),
                                       reduction="sum"))
        n += w[:, 1:].numel()
    return total / n / math.log(2)


def _attn(model: nn.Module, impl: str) -> str:
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "_attn_implementation", None)
    if cfg is not None and old is not None:
        cfg._attn_implementation = impl
    return old


@torch.no_grad()
def flops(model: nn.Module, b: Budget, attention: str = "eager") -> int:
    """Forward FLOPs of one window (a batch counted, divided by its size: a graph shrink falls back to is static);
    ``attention="eager"`` counts the attention matmuls too."""
    old = _attn(model, attention)
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            logits_of(model.eval(), torch.zeros(b.batch, b.seq, dtype=torch.long))
        return int(counter.get_total_flops()) // b.batch
    finally:
        if old is not None:
            _attn(model, old)


@torch.no_grad()
def module_flops(model: nn.Module, b: Budget) -> dict[str, int]:
    """FLOPs per submodule (qualified name), attention matmuls included."""
    old = _attn(model, "eager")
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            logits_of(model.eval(), torch.zeros(b.batch, b.seq, dtype=torch.long))
    finally:
        if old is not None:
            _attn(model, old)
    root = type(model).__name__ + "."
    return {k[len(root):]: int(sum(v.values())) // b.batch for k, v in counter.get_flop_counts().items() if k.startswith(root)}


def params(model: nn.Module) -> int:
    """Parameters the model computes with (STR thresholds s not counted; tied tensors once)."""
    return sum(p.numel() for n, p in {id(p): (n, p) for n, p in model.named_parameters()}.values()
               if not n.endswith(".s"))


class _Logits(nn.Module):
    """The logits alone: the one output the ONNX graph gets (HF returns a ModelOutput)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model, x)


def ort_op_share(path: Path, x: np.ndarray, threads: int, runs: int = 3) -> dict[str, float]:
    """Share of onnxruntime's kernel time per op type (its own profiler, ``runs`` runs on ``x``): where the time goes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(runs):
        sess.run(None, {name: x})
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    spent: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            spent[op] = spent.get(op, 0.0) + e["dur"]
    total = sum(spent.values()) or 1.0
    return {k: v / total for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}


class SpeedMeter:
    """Tokens/s of shrunk models beside the dense one, in torch eager and in onnxruntime, all four timed in the
    same interleaved rounds (the machine is shared: only ratios taken side by side mean anything).

    Every model goes to ONNX through ``strfx.export`` (torch.export → ONNX; it refuses a file whose
    onnxruntime outputs differ from torch's on its verification inputs) and is checked once more on the timed
    batch itself, so a wrong export cannot produce a fast number. The dense model is exported once."""

    def __init__(self, dense: nn.Module, b: Budget, rounds: int, threads: int, ort: bool = True,
                 profile: bool = False) -> None:
        self.b, self.rounds, self.threads, self.dense, self.profile = b, rounds, threads, dense.eval(), profile
        self.x = torch.randint(0, 256, (b.batch, b.seq), generator=torch.Generator().manual_seed(0))
        self._tmp = tempfile.TemporaryDirectory(prefix="strfx-lm-onnx-")
        self.dense_ort: tuple[Callable[[], Any], dict[str, Any]] | None = self.export(dense, "dense") if ort else None

    def export(self, model: nn.Module, name: str) -> tuple[Callable[[], Any], dict[str, Any]]:
        """A verified onnxruntime session of ``model`` (same threads as torch) and what the export reported."""
        path = Path(self._tmp.name) / f"{name}.onnx"
        t0 = time.perf_counter()
        rep = strfx.export(_Logits(model.eval()), path, example_inputs=example(self.b), dynamic_batch=False,
                           repeats=1, force=True)
        run = ort_runner(path, self.threads)
        xa = self.x.numpy()
        with torch.no_grad():
            ref = logits_of(model, self.x).numpy()
        err = float(np.abs(run(xa)[0] - ref).max())
        rel = err / max(float(np.abs(ref).max()), 1e-12)
        if not rel <= TOLERANCE:  # strfx.export checked other inputs; this is the batch that is timed
            raise RuntimeError(f"onnxruntime differs from torch on the timed batch of {name}: max |Δ| {err:.3g}")
        info = {"exporter": rep.exporter, "export_max_rel_error": rep.onnx_max_error, "timed_max_abs_error": err,
                "onnx_mb": path.stat().st_size / 2**20, "export_s": time.perf_counter() - t0}
        if self.profile:
            info["ort_op_share"] = ort_op_share(path, xa, self.threads)
        path.unlink()  # onnxruntime has read it
        return (lambda: run(xa)), info

    @torch.no_grad()
    def pair(self, small: nn.Module, name: str) -> dict[str, Any]:
        """Tokens/s of ``small`` and of the dense model in the same rounds: eager, and onnxruntime when on."""
        x = self.x
        small.eval()
        calls: dict[str, Callable[[], Any]] = {"eager/dense": lambda: logits_of(self.dense, x),
                                               "eager/small": lambda: logits_of(small, x)}
        info = None
        if self.dense_ort is not None:
            small_run, info = self.export(small, name)
            calls["ort/dense"], calls["ort/small"] = self.dense_ort[0], small_run
        sec = time_interleaved(calls, self.rounds)
        tok = self.b.batch * self.b.seq
        out: dict[str, Any] = {"tokens_s": tok / sec["eager/small"], "dense_tokens_s": tok / sec["eager/dense"],
                               "speedup": sec["eager/dense"] / sec["eager/small"]}
        if info is not None:
            out.update(ort_tokens_s=tok / sec["ort/small"], ort_dense_tokens_s=tok / sec["ort/dense"],
                       ort_speedup=sec["ort/dense"] / sec["ort/small"], ort=info,
                       ort_dense=self.dense_ort[1] if self.dense_ort else None)
        return out


# ---------------------------------------------------------------- units

def unit_kind(name: str, kind: str) -> str:
    if kind == "depth":
        return "depth"
    if ".self_attn." in name:
        return "heads"
    if ".mlp." in name:
        return "neurons"
    return "hidden"


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


@torch.no_grad()
def kept_units(model: nn.Module, b: Budget) -> dict[str, Any]:
    """Alive units per layer and kind, read off the STR carriers (query heads: kv groups × group size)."""
    rep = b.heads // b.kv_heads
    out: dict[str, Any] = {"heads": [b.heads] * b.layers, "neurons": [b.ffn] * b.layers, "hidden": b.hidden,
                           "branches": [[1, 1] for _ in range(b.layers)]}
    for name, c in strfx.modules.channel_carriers(model).items():
        kind, layer = unit_kind(name, c.kind), layer_of(name)
        alive = int((c.value() != 0).sum())
        if kind == "heads":
            out["heads"][layer] = alive * rep
        elif kind == "neurons":
            out["neurons"][layer] = alive
        elif kind == "hidden":
            out["hidden"] = alive
        elif kind == "depth":
            out["branches"][layer][0 if ".self_attn." in name else 1] = alive
    return out


def _unit_index(module: nn.Module, attr: str) -> UnitScale:
    return next(p for p in module.parametrizations[attr] if isinstance(p, UnitScale))


@torch.no_grad()
def magnitude_scores(dense: nn.Module, b: Budget) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (group L2² of each kv head group, group L2² of each neuron) from the dense weights."""
    hd, rep = b.hidden // b.heads, b.heads // b.kv_heads
    out = []
    for layer in dense.model.layers:
        a, m = layer.self_attn, layer.mlp
        q = a.q_proj.weight.view(b.kv_heads, rep * hd, -1).pow(2).sum((1, 2))
        k = a.k_proj.weight.view(b.kv_heads, hd, -1).pow(2).sum((1, 2))
        v = a.v_proj.weight.view(b.kv_heads, hd, -1).pow(2).sum((1, 2))
        o = a.o_proj.weight.view(-1, b.kv_heads, rep * hd).pow(2).sum((0, 2))
        neurons = m.gate_proj.weight.pow(2).sum(1) + m.up_proj.weight.pow(2).sum(1) + m.down_proj.weight.pow(2).sum(0)
        out.append((q + k + v + o, neurons))
    return out


@torch.no_grad()
def zero_units(sparse: nn.Module, b: Budget, dead: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Kill the chosen kv groups / neurons through their STR carriers (raw = 0 gives u' = 0 exactly)."""
    hd, rep = b.hidden // b.heads, b.heads // b.kv_heads
    for layer, (dead_heads, dead_neurons) in zip(sparse.model.layers, dead):
        scale = _unit_index(layer.self_attn.q_proj, "weight")
        units = scale.index.view(b.kv_heads, rep * hd)
        assert bool((units == units[:, :1]).all()), "a kv group's query rows map to different STR units"
        scale.unit.weight[units[dead_heads, 0]] = 0.0
        scale = _unit_index(layer.mlp.gate_proj, "weight")
        scale.unit.weight[scale.index[dead_neurons]] = 0.0


# ---------------------------------------------------------------- methods

def shrink_checked(sparse: nn.Module, b: Budget) -> tuple[nn.Module, dict[str, Any]]:
    x = example(b)
    t0 = time.perf_counter()
    small = strfx.shrink(sparse.eval(), x)
    rep = {k: small.strfx_shrink.get(k) for k in ("params_before", "params_after", "result", "max_error64",
                                                 "channels_removed", "note")}
    rep["shrink_s"] = time.perf_counter() - t0
    print(f"  shrink: {rep['result']} {rep['params_before']:,} -> {rep['params_after']:,} params, "
          f"max_error64 {rep['max_error64']:.1e} ({rep['shrink_s']:.0f}s) {rep['note'] or ''}", flush=True)
    return small, rep


def run_str(dense: nn.Module, method: str, target: float, b: Budget, train_stream: torch.Tensor,
            val: torch.Tensor, seed: int) -> dict[str, Any]:
    """STR learns the units with the FLOPs target, then shrink and fine-tune for the rest of the budget.

    A ``+rw`` method rewinds instead (strfx's ``rewind="start"``): after learning for ``rewind_frac`` of the
    budget, STR's units are cut from the dense weights and that model is trained for the rest, like uniform's."""
    variant, rewinding = method.removesuffix("+rw"), method.endswith("+rw")
    x = example(b)
    t0 = time.perf_counter()
    sparse = strfx.sparsify(copy.deepcopy(dense), "structured", example_inputs=x, verify=False,
                            config={"depth": variant == "str-all"})
    frozen = []
    if variant == "str-hn":  # heads + neurons only: the hidden-size vector keeps every channel
        for name, c in strfx.modules.channel_carriers(sparse).items():
            if unit_kind(name, c.kind) == "hidden":
                unit = next(u for n, u in strfx.modules.str_units(sparse).items() if u.weight is c.raw)
                for p in (unit.weight, unit.s):
                    p.requires_grad_(False)
                frozen.append(name)
    kinds = sorted({unit_kind(n, c.kind) for n, c in strfx.modules.channel_carriers(sparse).items()} -
                   {unit_kind(n, "gate") for n in frozen})
    str_steps = max(int(round((b.rewind_frac if rewinding else b.str_frac) * b.method_steps)), 1)
    ft_steps = b.method_steps - str_steps
    session = STRSession(target, controller={"interval_steps": b.controller_interval,
                                             "max_step_rate": b.max_step_rate}, rewind="start" if rewinding else "off")
    session.attach(sparse)
    opt = str_optimizer(sparse, b.method_lr, optimizer="adamw", weight_decay=0.0, betas=(0.9, 0.95))
    for g in opt.param_groups:  # Adam moves every parameter ~lr per step: the importance vectors need a larger
        if g["name"] in ("thresholds", "norms"):  # lr to separate before the controller's decay takes them to 0
            g["lr_scale"] = b.str_lr_scale
    session.start(opt, str_steps)
    log: list[dict[str, float]] = []

    def after(step: int) -> str:
        got = session.after_step(opt, step)
        if got:
            log.append({"step": step, **got})
            return f"FLOPs removed {got['strfx/sparsity']:.3f} (schedule {got['strfx/target_now']:.3f})"
        return ""

    learn_s = train(sparse, opt, train_stream, b, str_steps, b.method_lr, seed, warmup=max(str_steps // 20, 1),
                    after_step=after, tag=f"{method}@{target}")
    kept = kept_units(sparse, b)
    dead = {n: (c.value() == 0).detach().clone() for n, c in strfx.modules.channel_carriers(sparse).items()}
    bpb_masked = bpb(sparse, val, b.batch)
    if rewinding:
        t1 = time.perf_counter()
        small = session.rewound()
        shrink_rep = {k: small.strfx_shrink.get(k) for k in ("params_before", "params_after", "result", "max_error64",
                                                            "channels_removed", "note")}
        shrink_rep["shrink_s"] = time.perf_counter() - t1
    else:
        small, shrink_rep = shrink_checked(sparse, b)
    bpb_shrunk = bpb(small, val, b.batch)
    ft_s = 0.0
    if ft_steps:  # rewound: trained like uniform's pruned model; else a gentler fine-tune of STR's weights
        lr = b.method_lr if rewinding else b.method_lr / 2
        opt2 = torch.optim.AdamW(small.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
        ft_s = train(small, opt2, train_stream, b, ft_steps, lr, seed + 1,
                     warmup=max(ft_steps // 20, 1) if rewinding else 1, tag=f"{method}@{target} ft")
    return {"method": method, "target": target, "units": kinds, "kept": kept, "bpb_before_ft": bpb_shrunk,
            "bpb_masked": bpb_masked, "bpb": bpb(small, val, b.batch), "shrink": shrink_rep, "controller": log,
            "str_steps": str_steps, "ft_steps": ft_steps, "train_s": learn_s + ft_s,
            "wall_s": time.perf_counter() - t0, "model": small, "dead": dead}


def run_rewind(dense: nn.Module, variant: str, target: float, dead: dict[str, torch.Tensor], b: Budget,
               train_stream: torch.Tensor, val: torch.Tensor, seed: int) -> dict[str, Any]:
    """Diagnostic: the units STR chose, cut from the DENSE weights and fine-tuned like the uniform baseline
    (it separates STR's choice of units from what its training did to the weights; it spends STR's tokens too)."""
    t0 = time.perf_counter()
    sparse = strfx.sparsify(copy.deepcopy(dense), "structured", example_inputs=example(b), verify=False,
                            config={"depth": variant == "str-all"})
    with torch.no_grad():
        for name, c in strfx.modules.channel_carriers(sparse).items():
            c.raw[dead[name].view_as(c.raw)] = 0.0
    kept = kept_units(sparse, b)
    small, shrink_rep = shrink_checked(sparse, b)
    bpb_shrunk = bpb(small, val, b.batch)
    opt = torch.optim.AdamW(small.parameters(), lr=b.method_lr, weight_decay=0.0, betas=(0.9, 0.95))
    train_s = train(small, opt, train_stream, b, b.method_steps, b.method_lr, seed, warmup=max(b.method_steps // 20, 1),
                    tag=f"{variant}-rewind@{target}")
    return {"method": f"{variant}-rewind", "target": target, "units": [], "kept": kept, "bpb_before_ft": bpb_shrunk,
            "bpb": bpb(small, val, b.batch), "shrink": shrink_rep, "train_s": train_s,
            "wall_s": time.perf_counter() - t0, "model": small}


def measure(r: dict[str, Any], dense_row: dict[str, Any], b: Budget, meter: SpeedMeter) -> None:
    """Params, FLOPs (with and without attention matmuls) and paired tokens/s (eager, onnxruntime) of a method's
    final model; speed-up ÷ FLOPs gain is 1.0 when time falls as fast as FLOPs."""
    small = r.pop("model")
    r["params"], r["flops"] = params(small), flops(small, b)
    r["flops_removed"] = 1 - r["flops"] / dense_row["flops"]
    r["flops_removed_sdpa"] = 1 - flops(small, b, "sdpa") / dense_row["flops_sdpa"]
    r.update(meter.pair(small, f"{r['method']}-{r['target']:g}"))
    gain = dense_row["flops"] / r["flops"]
    r["speedup_per_flops_gain"] = r["speedup"] / gain
    if "ort_speedup" in r:
        r["ort_speedup_per_flops_gain"] = r["ort_speedup"] / gain
    ort = f", onnxruntime {r['ort_speedup']:.2f}" if "ort_speedup" in r else ""
    print(f"  -> {r['method']} bpb {r['bpb']:.3f} (after shrink {r['bpb_before_ft']:.3f}), FLOPs removed "
          f"{100 * r['flops_removed']:.1f} %, params {r['params']:,}, speed-up eager {r['speedup']:.2f}{ort}, "
          f"kept {r['kept']}", flush=True)


def run_uniform(dense: nn.Module, target: float, b: Budget, train_stream: torch.Tensor, val: torch.Tensor,
                seed: int) -> dict[str, Any]:
    """Same fraction of kv groups and neurons in every layer, smallest group L2 first; shrink; fine-tune."""
    t0 = time.perf_counter()
    dense_fl = flops(dense, b)
    # every FLOP of an attention block scales with its kv groups, every FLOP of an MLP with its neurons
    per_module = module_flops(dense, b)
    head_cost = per_module["model.layers.0.self_attn"] / b.kv_heads
    neuron_cost = per_module["model.layers.0.mlp"] / b.ffn
    k, n = uniform_counts(b.kv_heads, b.ffn, b.layers, head_cost, neuron_cost, dense_fl, target)
    dead = [(lowest(h, k), lowest(m, n)) for h, m in magnitude_scores(dense, b)]
    x = example(b)
    sparse = strfx.sparsify(copy.deepcopy(dense), "structured", example_inputs=x, verify=False,
                            config={"depth": False})
    zero_units(sparse, b, dead)
    kept = kept_units(sparse, b)
    small, shrink_rep = shrink_checked(sparse, b)
    bpb_shrunk = bpb(small, val, b.batch)
    opt = torch.optim.AdamW(small.parameters(), lr=b.method_lr, weight_decay=0.0, betas=(0.9, 0.95))
    train_s = train(small, opt, train_stream, b, b.method_steps, b.method_lr, seed, warmup=max(b.method_steps // 20, 1),
                    tag=f"uniform@{target}")
    return {"method": "uniform", "target": target, "units": ["heads", "neurons"], "kept": kept,
            "pruned_per_layer": {"kv_groups": k, "neurons": n}, "bpb_before_ft": bpb_shrunk, "bpb": bpb(small, val, b.batch),
            "shrink": shrink_rep, "train_s": train_s, "wall_s": time.perf_counter() - t0, "model": small}


TP_HEAD_LIMIT_S = 90.0  # Torch-Pruning's head groups on this model never finish; how long to let it try
_TP_HEAD_FAILURE: dict[str, str] = {}  # the first failure, so later targets do not wait for it again


def run_tp(dense: nn.Module, target: float, b: Budget, train_stream: torch.Tensor, val: torch.Tensor,
           seed: int) -> dict[str, Any]:
    """Torch-Pruning itself: heads (its GQA rule) + neurons where it runs, else neurons only; then uniform's fine-tune.
    Returns ``{"skipped": why}`` when Torch-Pruning cannot reach the target on this model."""
    t0 = time.perf_counter()
    dense_fl = flops(dense, b)
    neuron_cost = module_flops(dense, b)["model.layers.0.mlp"] / b.ffn
    x = example(b)[0][:1]
    attempts: list[dict[str, Any]] = []
    model = None
    if not _TP_HEAD_FAILURE:  # as the example: heads and neurons at the same ratio (GQA: at most half the queries)
        trial = copy.deepcopy(dense)
        try:
            info = tp_prune_llama(trial, x, neuron_ratio=target, head_ratio=min(target, 0.5), limit_s=TP_HEAD_LIMIT_S)
            model = trial
        except Exception as e:  # noqa: BLE001 — any failure of Torch-Pruning here is the result
            _TP_HEAD_FAILURE["error"] = f"{type(e).__name__}: {e}"
            print(f"  tp heads+neurons failed: {_TP_HEAD_FAILURE['error']}", flush=True)
    if _TP_HEAD_FAILURE:
        attempts.append({"units": "heads+neurons", **_TP_HEAD_FAILURE})
    if model is None:  # neurons only: the same count in every layer, the one closest to the target FLOPs
        keep = min(range(1, b.ffn + 1), key=lambda k: abs(b.layers * (b.ffn - k) * neuron_cost / dense_fl - target))
        reach = b.layers * (b.ffn - keep) * neuron_cost / dense_fl
        if abs(reach - target) > 0.02:
            return {"method": "tp", "target": target, "attempts": attempts,
                    "skipped": f"MLP neurons alone remove at most {100 * b.layers * (b.ffn - 1) * neuron_cost / dense_fl:.1f} % "
                               f"of the FLOPs (1 neuron kept per layer)"}
        model = copy.deepcopy(dense)
        info = tp_prune_llama(model, x, neuron_ratio=ratio_keeping(b.ffn, keep))
    kept = {"heads": info["q_heads"], "neurons": info["neurons"], "hidden": b.hidden,
            "branches": [[1, 1] for _ in range(b.layers)]}
    print(f"  tp: {info}", flush=True)
    model.eval()
    bpb_pruned = bpb(model, val, b.batch)
    if not math.isfinite(bpb_pruned):
        raise RuntimeError(f"Torch-Pruning's pruned model gives bpb {bpb_pruned}")
    opt = torch.optim.AdamW(model.parameters(), lr=b.method_lr, weight_decay=0.0, betas=(0.9, 0.95))
    train_s = train(model, opt, train_stream, b, b.method_steps, b.method_lr, seed, warmup=max(b.method_steps // 20, 1),
                    tag=f"tp@{target}")
    return {"method": "tp", "target": target, "units": ["heads", "neurons"] if info["head_ratio"] > 0 else ["neurons"],
            "kept": kept, "tp": info, "attempts": attempts, "bpb_before_ft": bpb_pruned, "bpb": bpb(model, val, b.batch),
            "shrink": {"result": "torch-pruning", "max_error64": float("nan"), "shrink_s": info["prune_s"]},
            "train_s": train_s, "wall_s": time.perf_counter() - t0, "model": model}


# ---------------------------------------------------------------- outputs

LABELS = {"str-all": "STR: heads+neurons+hidden+depth", "str-hn": "STR: heads+neurons", "uniform": "uniform magnitude (L2)",
          "tp": "Torch-Pruning 1.6.1 (L2, local)",
          "str-all+rw": "STR: all units, rewind (`rewind=\"start\"`)", "str-hn+rw": "STR: heads+neurons, rewind",
          "str-all-rewind": "diagnostic: STR-all's units cut from the dense weights, fine-tuned",
          "str-hn-rewind": "diagnostic: STR-hn's units cut from the dense weights, fine-tuned"}


def plot_budgets(rows: list[dict[str, Any]], b: Budget, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"str-all": ("C0", "o"), "str-hn": ("C2", "s"), "uniform": ("C3", "^"), "str-all-rewind": ("C0", "x"),
              "str-hn-rewind": ("C2", "x"), "str-all+rw": ("C0", "D"), "str-hn+rw": ("C2", "D"), "tp": ("C4", "v")}
    for r in rows:
        color, marker = styles[r["method"]]
        ls = "-" if r["target"] == min(b.targets) else "--"
        kept = r["kept"]
        dead_branches = sum(2 - sum(x) for x in kept["branches"])
        label = (f"{r['method']} @{100 * r['target']:.0f}% (hidden {kept['hidden']}/{b.hidden}, "
                 f"{dead_branches} branch{'es' if dead_branches != 1 else ''} removed)")
        axes[0].plot(range(b.layers), [h / b.heads for h in kept["heads"]], ls, color=color, marker=marker, label=label)
        axes[1].plot(range(b.layers), [n / b.ffn for n in kept["neurons"]], ls, color=color, marker=marker)
    for ax, what in zip(axes, (f"query heads kept (of {b.heads}; units: kv groups of {b.heads // b.kv_heads})",
                               f"MLP neurons kept (of {b.ffn})")):
        ax.set_xlabel("layer")
        ax.set_xticks(range(b.layers))
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(what, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction kept")
    fig.legend(loc="lower center", ncol=2, fontsize=7)
    fig.tight_layout(rect=(0, 0.18, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(res: dict[str, Any], plot_name: str) -> str:
    b, env, d = res["budget"], res["env"], res["dense"]
    tok = b["batch"] * b["seq"]
    ort = any("ort_speedup" in r for r in res["rows"])
    lines = [
        "# Language modelling: structured STR vs uniform magnitude pruning on a byte-level Llama",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/lm.py', *res['argv']])}`  ",
        f"Machine: {env['nproc']} CPUs ({env['cpu']}), shared with other jobs (load average "
        f"{', '.join(f'{x:.1f}' for x in env['loadavg'])} at the end); torch {env['torch']}, transformers "
        f"{env['transformers']}, strfx {env['strfx']} (commit {env['commit']}), Python {env['python']}; {env['date']}; "
        f"{env['threads']} thread; seed {res['seed']}; wall time {res['wall_s'] / 60:.1f} min.",
        "",
        f"Data: {res['data']['train_files']} training / {res['data']['val_files']} held-out `.py` files of "
        f"CPython {env['python']}'s standard library (every {VAL_EVERY}th sorted path held out; "
        f"{res['data']['train_bytes'] / 1e6:.1f} MB / {res['data']['val_bytes'] / 1e6:.2f} MB), bytes as tokens, "
        f"random windows of {b['seq']} (+1) bytes; validation: {b['val_windows']} fixed windows.",
        f"Model: HF LlamaForCausalLM, {b['layers']} layers × hidden {b['hidden']}, {b['heads']} query heads / "
        f"{b['kv_heads']} kv heads (head dim {b['hidden'] // b['heads']}), SwiGLU {b['ffn']}, RMSNorm, "
        f"{d['params']:,} parameters; dense: AdamW (β 0.9/0.95, lr {b['dense_lr']:g}, cosine to 10 %, "
        f"grad clip 1), {b['dense_steps']} steps × {tok} tokens = {b['dense_steps'] * tok / 1e6:.2f} M tokens "
        f"({d['train_s'] / 60:.1f} min).",
        f"Every method: {b['method_steps']} steps × {tok} tokens = {b['method_steps'] * tok / 1e6:.2f} M tokens "
        f"from the same dense checkpoint, AdamW lr {b['method_lr']:g}. STR: {b.get('str_frac', 0.75):.0%} of them "
        f"learning the units with the target controller (`STRSession`, FLOPs steered every "
        f"{b['controller_interval']} steps, pace cap `max_step_rate` {b['max_step_rate']:g}; thresholds and "
        f"importance vectors at {b['str_lr_scale']:g}× the lr), then `strfx.shrink` and the rest fine-tuning the "
        f"shrunk model "
        f"(lr {b['method_lr'] / 2:g}); STR with rewind (`+rw`): {b.get('rewind_frac', 0.5):.0%} of them learning the "
        f"units, then `STRSession.rewound()` (STR's units cut from the dense weights) trained for the rest like "
        f"uniform's model (lr {b['method_lr']:g}, warm-up); uniform: prune, shrink, fine-tune for all of them.",
        "",
        "bpb: validation bits per byte (lower is better). FLOPs: per window, attention matmuls "
        "included (HF eager attention under `torch.utils.flop_counter`). Tokens/s: forward of "
        f"{b['batch']}×{b['seq']} tokens in torch eager (SDPA)"
        + (f" and in onnxruntime {env.get('onnxruntime', '')} (the model exported with `strfx.export`, checked "
           "against torch)" if ort else "") +
        f", {env['threads']} thread(s), median of {b['throughput_rounds']} rounds interleaving dense and shrunk"
        + (", eager and onnxruntime" if ort else "") + "; speed-up ÷ FLOPs gain is 1.0 when time falls with FLOPs.",
        "",
        "| method | target | FLOPs removed | bpb after shrink | bpb after fine-tune | params | MFLOPs | tokens/s eager "
        "(dense, same rounds) | speed-up | ÷ FLOPs gain | tokens/s onnxruntime (dense) | speed-up | ÷ FLOPs gain "
        "| kept: q heads / neurons per layer, hidden, branches |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| dense | | 0 % | | {d['bpb']:.3f} | {d['params']:,} | {d['flops'] / 1e6:.1f} | | 1.00 | | | 1.00 | "
        f"| {b['heads']} / {b['ffn']}, {b['hidden']}, {2 * b['layers']} |",
    ]
    for r in res["rows"]:
        k = r["kept"]
        gain = d["flops"] / r["flops"]
        branches = sum(sum(x) for x in k["branches"])
        lines.append(
            f"| {LABELS[r['method']]}{': ' + '+'.join(r['units']) if r['method'] == 'tp' else ''} | {100 * r['target']:.0f} % | {100 * r['flops_removed']:.1f} % | "
            f"{r['bpb_before_ft']:.3f} | **{r['bpb']:.3f}** | {r['params']:,} | {r['flops'] / 1e6:.1f} | "
            f"{r['tokens_s']:.0f} ({r['dense_tokens_s']:.0f}) | {r['speedup']:.2f} | {r['speedup'] / gain:.2f} | "
            + (f"{r['ort_tokens_s']:.0f} ({r['ort_dense_tokens_s']:.0f}) | {r['ort_speedup']:.2f} | "
               f"{r['ort_speedup'] / gain:.2f} | " if "ort_speedup" in r else "| | | ") +
            f"{'-'.join(map(str, k['heads']))} / {'-'.join(map(str, k['neurons']))}, {k['hidden']}, {branches} |")
    lines += ["", f"![units kept per layer]({plot_name})", ""]
    lines += ["Per run: FLOPs removed as strfx's controller measured them (SDPA, attention matmuls not counted), "
              "the masked model's bpb before shrinking, shrink's exactness (max |Δ| in float64) and wall time:", ""]
    for r in res["rows"]:
        s = r["shrink"]
        if r["method"] == "tp":
            t = r["tp"]
            lines.append(f"- tp @{100 * r['target']:.0f} %: FLOPs removed without attention matmuls "
                         f"{100 * r['flops_removed_sdpa']:.1f} %; Torch-Pruning {t['torch_pruning']}, pruning_ratio "
                         f"{t['neuron_ratio']:.4f}, head_pruning_ratio {t['head_ratio']:g}, ignored layers "
                         f"{', '.join(t['ignored_layers'])}, pruned in {t['prune_s']:.0f} s; {r['wall_s'] / 60:.1f} min.")
            continue
        extra = f", controller's last reading {r['controller'][-1]['strfx/sparsity']:.3f}" if r.get("controller") else ""
        masked = f", masked bpb {r['bpb_masked']:.3f}" if "bpb_masked" in r else ""
        lines.append(f"- {r['method']} @{100 * r['target']:.0f} %: FLOPs removed without attention matmuls "
                     f"{100 * r['flops_removed_sdpa']:.1f} %{extra}{masked}; shrink {s['result']}, "
                     f"max_error64 {s['max_error64']:.1e}, {s['shrink_s']:.0f} s; {r['wall_s'] / 60:.1f} min.")
    for sk in res.get("skipped", []):
        lines.append(f"- {sk['method']} @{100 * sk['target']:.0f} %: not run: {sk['skipped']}.")
    failures = sorted({a["error"] for r in [*res["rows"], *res.get("skipped", [])] for a in r.get("attempts", [])})
    for err in failures:
        lines.append(f"- Torch-Pruning with heads (`num_heads`, `prune_num_heads=True`, `head_pruning_ratio`) failed: {err}")
    lines += ["", *res.get("notes", []), ""]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """The libraries besides torch and strfx that the numbers depend on (for the results file)."""
    import onnxruntime
    import transformers

    return {"transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2-minute smoke run (tiny model, one target)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default docs/, or /tmp/strfx_lm_quick)")
    ap.add_argument("--stem", default="lm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--targets", type=float, nargs="+", default=None, help="fractions of FLOPs to remove")
    ap.add_argument("--methods", nargs="+", default=None, choices=["str-all", "str-hn", "uniform", "str-all+rw", "str-hn+rw", "tp"])
    ap.add_argument("--dense-steps", type=int, default=None)
    ap.add_argument("--method-steps", type=int, default=None)
    ap.add_argument("--str-frac", type=float, default=None,
                    help="share of the budget STR learns in; the rest fine-tunes the shrunk model (default 0.75)")
    ap.add_argument("--str-lr-scale", type=float, default=None,
                    help="lr of STR's thresholds and importance vectors ÷ the weights' lr (default 10)")
    ap.add_argument("--dense-ckpt", type=Path, default=None,
                    help="reuse this dense state_dict (written there on first use) instead of retraining")
    ap.add_argument("--force", action="store_true", help="overwrite existing outputs")
    ap.add_argument("--rewind", action="store_true",
                    help="diagnostic: also cut STR's units from the dense weights and fine-tune for the whole budget")
    ap.add_argument("--no-ort", action="store_true", help="time torch eager only (no ONNX export, no onnxruntime)")
    ap.add_argument("--replot", type=Path, default=None, help="only rebuild the Markdown and plot from a JSON this wrote")
    args = ap.parse_args(argv)
    if args.replot:
        res = json.loads(args.replot.read_text())
        out = args.out or args.replot.parent
        plot_budgets(res["rows"], Budget(**res["budget"]), out / f"{args.stem}_units.png")
        _write(out / f"{args.stem}.md", markdown(res, f"{args.stem}_units.png"))
        return 0
    b = copy.deepcopy(QUICK if args.quick else Budget())
    for name in ("targets", "methods", "dense_steps", "method_steps", "str_lr_scale", "str_frac"):
        if getattr(args, name) is not None:
            setattr(b, name, getattr(args, name))
    out = args.out or (Path("/tmp/strfx_lm_quick") if args.quick else DOCS)
    out.mkdir(parents=True, exist_ok=True)
    if (out / f"{args.stem}.json").exists() and not args.force:
        print(f"{out / (args.stem + '.json')} exists; pass --force to overwrite or --out elsewhere", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    import transformers

    t_all = time.perf_counter()
    files = stdlib_files()
    train_files, val_files = split_files(files)
    train_stream, val_stream = read_bytes(train_files), read_bytes(val_files)
    val = windows(val_stream, b.val_windows, b.seq, torch.Generator().manual_seed(1234))
    print(f"data: {len(train_files)} train files ({train_stream.numel() / 1e6:.1f} MB), {len(val_files)} val "
          f"({val_stream.numel() / 1e6:.2f} MB)", flush=True)

    torch.manual_seed(args.seed)
    dense = transformers.LlamaForCausalLM(llama_config(b))
    if args.dense_ckpt and args.dense_ckpt.exists():
        dense.load_state_dict(torch.load(args.dense_ckpt, weights_only=True))
        side = args.dense_ckpt.with_suffix(".json")
        dense_s = json.loads(side.read_text())["train_s"] if side.exists() else float("nan")
        print(f"dense: loaded {args.dense_ckpt}", flush=True)
    else:
        opt = torch.optim.AdamW(dense.parameters(), lr=b.dense_lr, weight_decay=0.1, betas=(0.9, 0.95))
        dense_s = train(dense, opt, train_stream, b, b.dense_steps, b.dense_lr, args.seed,
                        warmup=max(b.dense_steps // 20, 1), floor=0.1, log_every=100, tag="dense")
        if args.dense_ckpt:
            torch.save(dense.state_dict(), args.dense_ckpt)
            args.dense_ckpt.with_suffix(".json").write_text(json.dumps({"train_s": dense_s, "budget": asdict(b)}))
    dense.eval()
    dense_row = {"params": params(dense), "flops": flops(dense, b), "flops_sdpa": flops(dense, b, "sdpa"),
                 "bpb": bpb(dense, val, b.batch), "train_s": dense_s}
    print(f"dense: bpb {dense_row['bpb']:.3f}, {dense_row['params']:,} params, {dense_row['flops'] / 1e6:.1f} MFLOPs",
          flush=True)

    meter = SpeedMeter(dense, b, b.throughput_rounds, args.threads, ort=not args.no_ort)
    if meter.dense_ort is not None:
        dense_row["ort"] = meter.dense_ort[1]
    env = environment(**versions())
    res: dict[str, Any] = {"env": env, "argv": sys.argv[1:] if argv is None else argv, "seed": args.seed,
                           "budget": asdict(b), "dense": dense_row, "rows": [],
                           "data": {"stdlib": sysconfig.get_paths()["stdlib"], "train_files": len(train_files),
                                    "val_files": len(val_files), "train_bytes": int(train_stream.numel()),
                                    "val_bytes": int(val_stream.numel())},
                           "notes": [
                               "Notes: strfx makes a kv head group (a key/value head and the query heads that share it) "
                               "the head unit of GQA; single query heads are not units. HF's eager attention "
                               "(`attn_implementation=\"eager\"`) blocks the head units in strfx's analysis "
                               "(RoPE's `mul` and the attention matmul), so the models use SDPA."]}
    for target in b.targets:
        for method in b.methods:
            print(f"{method} @ {target}", flush=True)
            if method == "uniform":
                r = run_uniform(dense, target, b, train_stream, val, args.seed)
            elif method == "tp":
                r = run_tp(dense, target, b, train_stream, val, args.seed)
                if "skipped" in r:
                    print(f"  tp @ {target}: skipped: {r['skipped']}", flush=True)
                    res.setdefault("skipped", []).append(r)
                    continue
            else:
                r = run_str(dense, method, target, b, train_stream, val, args.seed)
            runs = [r]
            dead = r.pop("dead", None)
            if args.rewind and dead is not None:
                runs.append(run_rewind(dense, method, target, dead, b, train_stream, val, args.seed))
            for r in runs:
                measure(r, dense_row, b, meter)
                res["rows"].append(r)
            _write(out / f"{args.stem}.partial.json", json.dumps(res, indent=1, default=str))
    for key, dense_key in (("tokens_s", "dense_tokens_s"), ("ort_tokens_s", "ort_dense_tokens_s")):
        seen = [r[dense_key] for r in res["rows"] if dense_key in r]
        if seen:
            dense_row[key] = statistics.median(seen)
    res["wall_s"] = time.perf_counter() - t_all
    res["env"] = environment(**versions())
    plot_name = f"{args.stem}_units.png"
    plot_budgets(res["rows"], b, out / plot_name)
    _write(out / f"{args.stem}.json", json.dumps(res, indent=1, default=str))
    _write(out / f"{args.stem}.md", markdown(res, plot_name))
    (out / f"{args.stem}.partial.json").unlink(missing_ok=True)
    print(f"wrote {out / (args.stem + '.md')} ({res['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
