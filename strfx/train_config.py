"""``TrainConfig``: the ``train:`` section of a config file, with the STR paper's recipe as defaults.

Defaults follow Kusupati et al. (2020), §4 / Appendix: SGD with momentum 0.875 (no Nesterov),
lr 0.256 per 256 images, cosine decay after 5 linear warm-up epochs, label smoothing 0.1, weight
decay on every parameter including the thresholds ``s``. Values that only make sense for 100-epoch
ImageNet runs are scaled for short runs (see :meth:`TrainConfig.warmup_epochs_for`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ControllerConfig(_Strict):
    """How ``--target-sparsity`` steers the threshold decay (see strfx.controller)."""

    ramp_start: float = Field(0.05, ge=0, lt=1, description="Fraction of training before the sparsity schedule starts rising.")
    ramp_end: float = Field(0.6, gt=0, le=1, description="Fraction of training at which the schedule reaches the target; "
                            "the rest of the run holds it while the learning rate anneals.")
    interval_steps: int | None = Field(None, ge=1, description="Optimizer steps between two updates; None: "
                                       "total_steps/400, at least 1.")
    max_rate: float = Field(40.0, gt=0, description="At full effort the decay shrinks |s| by e^-max_rate over the "
                            "ramp (at most max_step_rate per step); bounds how fast thresholds can rise, so they cannot "
                            "run away. 8 was too slow for long ramps: the thresholds' own gradient held a 30-epoch "
                            "LeNet-5 search at 98 % of a 99.2 % target (docs/results.md).")
    max_step_rate: float = Field(0.02, gt=0, description="Cap on that pace per optimizer step (momentum makes the "
                                 "response lag ~1/(1-μ) steps, so very short runs must not move faster).")
    max_boost: float | None = Field(None, ge=1, description="When the schedule holds the target (after ramp_end) and the run "
                             "is still behind it at full effort, the pace may grow past max_step_rate, doubling every "
                             "boost_doubling percent of training, up to this multiple; it falls back to 1× once the run "
                             "catches up. 1 disables; None: 4 in unstructured mode, 1 otherwise (a raised pace on γ and thresholds "
                             "together prunes a short structured run to nothing). "
                             "The 2 %/step cap alone kept a 700-step 98.2 % search at 96.4 % (docs/results.md).")
    boost_doubling: float = Field(5.0, gt=0, description="Percent of training over which a saturated, lagging run's "
                                  "pace doubles (see max_boost); never faster than every 4/(1-momentum) steps.")
    proportional: float = Field(10.0, ge=0, description="Effort per unit of relative sparsity error "
                                "((schedule - measured) / min(target, 1 - target)): 10% of that behind the schedule = full effort.")
    integral: float = Field(0.05, ge=0, description="Integral gain per unit relative error per percent of training.")
    max_reverse: float = Field(0.5, ge=0, le=1, description="Largest negative effort when ahead of the schedule: the "
                               "decay then turns negative and lowers thresholds (pruned weights keep their values, "
                               "so they come back); 0 keeps the decay non-negative.")
    max_decay: float = Field(1.0, gt=0, description="Clamp of |threshold decay| (the lr-compensated decay would "
                             "grow without bound as the cosine schedule reaches 0).")

    @model_validator(mode="after")
    def _ordered(self) -> "ControllerConfig":
        if self.ramp_end <= self.ramp_start:
            raise ValueError("ramp_end must be after ramp_start")
        return self


class FsdpConfig(_Strict):
    """How ``strategy: fsdp`` shards the model (FSDP2, ``torch.distributed.fsdp.fully_shard``): one unit per block, the root takes the rest."""

    # A block is only picked when it is closed: none of its parameters is shared with a module outside it
    # (a structured STR importance vector gates every writer of a channel group, which may span blocks; it
    # then stays with the enclosing unit). See strfx.distributed.fsdp_units.
    wrap: list[str] = Field(default_factory=list, description="Class names of the blocks to shard one by one "
                            "(e.g. [LlamaDecoderLayer]; any class of the module's MRO); when empty, blocks are picked "
                            "by size (min_params). A block sharing a parameter with a module outside it is never a unit of its own.")
    min_params: int = Field(1_000_000, ge=1, description="Without `wrap`: every module (bottom-up) holding at least "
                            "this many parameters not yet in a smaller unit becomes a unit.")
    cpu_offload: bool = Field(False, description="Keep parameters, gradients and optimizer state on the CPU between "
                              "uses (FSDP2 CPUOffloadPolicy; only useful with a GPU).")
    mixed_precision: Literal["auto", "off"] = Field("auto", description="auto: on CUDA, bf16 parameters for "
                                                    "compute with fp32 gradient reduction; off: fp32 throughout.")
    reshard_after_forward: bool = Field(True, description="Free gathered parameters after each unit's forward "
                                        "(less memory, one more all-gather in backward).")


class TrainConfig(_Strict):
    """The training recipe. Every field can be set in YAML under ``train:``."""

    epochs: int = Field(100, ge=1, description="Training epochs (the STR paper trains ImageNet for 100).")
    batch_size: int = Field(256, ge=1, description="GLOBAL batch size, split evenly over all processes, so a run "
                            "gives the same optimisation on 1 or N processes.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate; default 0.256 × batch_size / 256.")
    momentum: float = Field(0.875, ge=0, lt=1)
    nesterov: bool = False
    warmup_epochs: float = Field(5.0, ge=0, description="Linear warm-up length (the paper's 5 of 100 epochs); a "
                                 "run shorter than 25 epochs warms up for its first 20% instead, so a 3-epoch run "
                                 "neither spends all of it warming up nor jumps to the peak lr within a few steps.")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip_norm: float | None = Field(5.0, gt=0, description="Clip the global gradient norm to this value "
                                         "(None: no clipping). A safety net, not part of the STR paper's recipe: "
                                         "its lr 0.256 × batch/256 was tuned for BatchNorm networks, and networks "
                                         "without normalization (LeNet-5, LeNet-300-100) diverge at it unclipped.")
    weight_decay: float = Field(3.0517578125e-05, ge=0, description="Decay on every parameter (STR's 1/32768).")
    threshold_decay: float | None = Field(None, ge=0, description="Decay on the thresholds s (default weight_decay). "
                                          "It is what raises s, so it sets how sparse the run ends.")
    norm_decay: float | None = Field(None, ge=0, description="Decay on STR-BN γ and gate vectors (default weight_decay).")
    s_init: dict[Literal["unstructured", "structured"], float] = Field(
        default_factory=lambda: {"unstructured": -10.0, "structured": -5.0},
        description="sparsify.s_init used by `strfx train` in each mode, unless the config sets sparsify.s_init "
        "itself: sigmoid(-10)≈5e-5 is below almost every weight; sigmoid(-5)≈7e-3 is far below γ≈1.")
    target_sparsity: float | None = Field(None, gt=0, lt=1, description="Unstructured: fraction of STR weights that "
                                          "end at zero. Structured: fraction of FLOPs removed. None: plain STR.")
    target_metric: Literal["flops", "params"] = Field("flops", description="Structured mode: what target_sparsity "
                                                      "is a fraction of — FLOPs the shrunk model saves, or parameters.")
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    rewind: Literal["auto", "off", "start", "ramp"] = Field(
        "auto", description="With --finetune-epochs: the model trained after the run is cut from EARLIER weights, "
        "with the units (or weights) STR killed kept dead (strfx.rewind): 'start' the weights the run started from "
        "(the --init weights, or the initialisation); 'ramp' those when the target schedule started rising "
        "(controller.ramp_start, by default 60 % of the run; needs target_sparsity); 'off' fine-tunes STR's own "
        "weights. 'auto': 'ramp' for structured and unstructured runs with a target and --finetune-epochs (on "
        "LeNet-5 it beat network slimming, and Han et al. at 95-99 % sparsity, docs/results.md), else 'off'. STR "
        "then only picks the units; the rising thresholds never touch the weights kept.")
    seed: int = 0
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="With several processes: ddp replicates the model "
                                             "on every rank; fsdp shards parameters, gradients and optimizer state "
                                             "(FSDP2) and writes sharded checkpoints (torch.distributed.checkpoint).")
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    init: str | None = Field(None, description="Start from these weights (--init): a state dict of the model "
                             "build_model() returns, loaded with weights_only=True before STR is inserted; every "
                             "key must match (the common case: STR fine-tuning of a pretrained model).")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (resume equals uninterrupted).")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    channels_last: bool | None = Field(None, description="None: on for 4-D inputs on CUDA.")
    compile: bool = Field(False, description="torch.compile the model (CUDA only by default; slow to start).")
    sync_batchnorm: bool = Field(False, description="Convert nn BatchNorms to SyncBatchNorm under DDP. STR-BN layers "
                                 "keep per-process batch statistics (see docs in strfx.train).")
    workers: int | None = Field(None, ge=0, description="DataLoader workers per process; None: 4 on CUDA, 0 for "
                                "in-memory arrays on CPU, 2 otherwise.")
    checkpoint_every: int = Field(1, ge=1, description="Epochs between checkpoints (the last epoch always gets one).")
    keep_checkpoints: int | None = Field(3, ge=1, description="Newest checkpoints kept; None keeps all.")
    log_every_steps: int | None = Field(None, ge=1, description="Without a progress bar (output not a terminal): "
                                        "print a progress line every this many steps...")
    log_every_seconds: float = Field(30.0, gt=0, description="...and at least every this many seconds.")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap on optimizer steps per epoch (smoke tests).")

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else 0.256 * self.batch_size / 256

    def warmup_epochs_for(self) -> float:
        """Warm-up actually used: ``warmup_epochs``, at most 20% of the run."""
        return min(self.warmup_epochs, 0.2 * self.epochs)
