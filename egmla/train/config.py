"""Training configuration: the [train] section, and a whole run's config (model + train + data).

A TOML file (see configs/) has sections [model] (`preset = "..."` plus any ModelConfig field), [train]
(TrainConfig) and [data] (egmla.data.config.DataConfig), and an optional top-level `name`.
Every key is checked; an unknown one is an error that suggests the closest known key.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Le, Lt

from egmla.config import (NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, ModelConfig, check_field_types,
                          check_keys, preset)
from egmla.data.config import DataConfig

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
GATE_TABLE_UPDATES = ("dense", "row-sparse")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")  # torch.compile's
COMM_HOOKS = ("none", "bf16")
FSDP_DTYPES = ("fp32", "bf16")
UnitFloat = Annotated[float, Ge(0), Le(1)]


@dataclass
class TrainConfig:
    steps: NonNegativeInt = 800  # optimizer steps (0 = as many as fit time_limit_s, measured after 20 steps)
    batch_size: PositiveInt = 8  # global batch in sequences, over all processes and accumulation steps
    micro_batch_size: NonNegativeInt = 0  # sequences per process per forward; 0 = batch_size / processes (no accumulation)
    seq_len: PositiveInt = 128  # tokens per training sequence (<= model.max_seq_len)
    lr: PositiveFloat = 3e-3  # peak learning rate
    min_lr_ratio: UnitFloat = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: NonNegativeInt = 60  # linear warmup from lr/warmup_steps to lr
    schedule: Literal[SCHEDULES] = "cosine"  # cosine | wsd (warmup-stable-decay) | constant (after warmup)
    decay_fraction: Annotated[float, Gt(0), Le(1)] = 0.2  # wsd: the last fraction of steps decays linearly to the final lr
    weight_decay: NonNegativeFloat = 0.1  # on matrices only: never on norms, biases, embeddings or gate tables
    beta1: Annotated[float, Ge(0), Lt(1)] = 0.9  # AdamW
    beta2: Annotated[float, Ge(0), Lt(1)] = 0.95  # AdamW
    eps: PositiveFloat = 1e-8  # AdamW
    grad_clip: NonNegativeFloat = 1.0  # max global gradient norm (0 = no clipping)
    gate_table_update: Literal[GATE_TABLE_UPDATES] = "dense"  # EG-MLA gate tables: dense AdamW | row-sparse lazy Adam
    dtype: Literal[DTYPES] = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: NonNegativeInt = 0  # recompute every Nth block in backward, keeping only its input (1 = every block; 0 = off)
    loss_chunk_tokens: NonNegativeInt = 0  # output head + cross-entropy this many tokens at a time, never the whole logits (0 = whole)
    compile: bool = False  # torch.compile each block and the training loss (GPU; slow to start on CPU)
    compile_mode: Literal[COMPILE_MODES] = "auto"  # blocks' torch.compile mode; auto: reduce-overhead (CUDA graphs) on one GPU, else default
    parallel: Literal[PARALLEL] = "ddp"  # under torchrun with several processes: ddp | fsdp (FSDP2 fully_shard)
    # DDP and FSDP2 settings (docs/training.md#multi-gpu-settings); they apply under torchrun with several processes
    ddp_gradient_as_bucket_view: bool = False  # DDP: gradients are views into the all-reduce buckets (no copy)
    ddp_static_graph: bool = False  # DDP: one graph every step (buckets set from the first step's order)
    ddp_bucket_cap_mb: NonNegativeFloat = 0.0  # DDP: all-reduce bucket size in MiB; 0 = torch's default (25)
    ddp_comm_hook: Literal[COMM_HOOKS] = "none"  # DDP: none | bf16 (bf16_compress_hook; CUDA and NCCL only)
    fsdp_param_dtype: Literal[FSDP_DTYPES] = "fp32"  # FSDP2 MixedPrecisionPolicy: weights gathered in fp32 | bf16
    fsdp_reduce_dtype: Literal[FSDP_DTYPES] = "fp32"  # FSDP2 MixedPrecisionPolicy: gradients reduced in fp32 | bf16
    fsdp_reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward (false: keep them)
    device: Literal[DEVICES] = "auto"  # auto (cuda if available) | cpu | cuda
    seed: NonNegativeInt = 0  # model init and data order
    eval_every: NonNegativeInt = 200  # validate every N steps (and at the end); 0 = only at the end
    eval_sequences: NonNegativeInt = 128  # size of the fixed validation set, in sequences (0 = whole split)
    log_every: PositiveInt = 10  # progress-bar and TensorBoard update interval
    checkpoint_every: NonNegativeInt = 200  # 0 = only at the end (and on Ctrl-C, SIGTERM or the time limit)
    keep_checkpoints: PositiveInt = 2  # keep the newest N checkpoints
    tensorboard: bool = True  # also write TensorBoard events (metrics.jsonl is always written)
    peak_tflops: NonNegativeFloat = 0.0  # accelerator peak for MFU; 0 = look up the device name
    time_limit_s: NonNegativeFloat = 0.0  # stop (validated, with a checkpoint) after this much training time in one call (a resume restarts the clock); 0 = no limit
    profile_steps: NonNegativeInt = 0  # torch.profiler over the last N steps (0 = off): RUN_DIR/profile.md, .json

    def __post_init__(self):
        check_field_types(self, "train.")
        if self.steps == 0 and (self.time_limit_s <= 0 or self.warmup_steps < 20):
            raise ValueError(f"train.steps=0 (fit the run to a time budget) needs train.time_limit_s > 0 and "
                             f"train.warmup_steps >= 20 (the length is set after 20 steps); got time_limit_s="
                             f"{self.time_limit_s}, warmup_steps={self.warmup_steps}")
        if self.compile and 0 < self.ddp_bucket_cap_mb < 1:  # else an assert in torch._dynamo's DDPOptimizer
            raise ValueError(f"train.ddp_bucket_cap_mb={self.ddp_bucket_cap_mb}: with train.compile, use at least 1 "
                             f"(MiB; torch.compile splits DDP's graph at the buckets and needs none smaller than "
                             f"DDP's first, 1 MiB) or 0 for torch's default")
        if self.compile_mode not in ("auto", "default") and not self.compile:
            raise ValueError(f"train.compile_mode={self.compile_mode!r} needs train.compile=true (or leave "
                             f"compile_mode at 'auto')")
        if self.profile_steps and not 0 < self.profile_steps < self.steps:
            raise ValueError(f"train.profile_steps={self.profile_steps}: profiles the last steps of a run of fixed "
                             f"length, after at least one unprofiled step; needs 0 < profile_steps < train.steps "
                             f"(train.steps={self.steps})")

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_compile_mode(compile_mode: str, compile: bool, device_type: str, world_size: int) -> str:
    """'auto' -> 'reduce-overhead' (each block replayed from CUDA graphs) when compiling for one CUDA process, else
    'default'; any other mode as given. On one H200 the graphs took 7-16% off a paper-base step with the same
    losses (docs/benchmarks.md §4); they are untested under DDP/FSDP2, hence one process."""
    if compile_mode != "auto":
        return compile_mode
    return "reduce-overhead" if compile and device_type == "cuda" and world_size == 1 else "default"


def uses_cuda_graphs(compile_mode: str) -> bool:
    """Whether torch.compile's mode records CUDA graphs (cudagraph trees): each training or evaluation step must
    then begin with torch.compiler.cudagraph_mark_step_begin(), so that the graphs' outputs of the step before
    may be overwritten. (A mode other than 'default' implies compile: TrainConfig and the bench refuse it
    without.)"""
    return compile_mode in ("reduce-overhead", "max-autotune")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str):  # `name = 5` in a TOML file, or --set name=5 (a TOML number)
            example = self.name if isinstance(self.name, (int, float)) and not isinstance(self.name, bool) else "my-run"
            raise ValueError(f"name={self.name!r}: must be a string (it names the run's folder); quote it, e.g. "
                             f"name = \"{example}\" in the TOML file or --set 'name=\"{example}\"'")
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len={self.train.seq_len}: exceeds model.max_seq_len="
                             f"{self.model.max_seq_len}; lower it or raise model.max_seq_len")
        if not self.name:
            self.name = default_name(self.model)
        if not re.fullmatch(r"[A-Za-z0-9._+-]+", self.name):
            raise ValueError(f"name={self.name!r}: use letters, digits and . _ + - only (it names a folder)")

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model.to_dict(), "train": self.train.to_dict(),
                "data": self.data.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """From a parsed TOML file / config.json: sections model (with optional `preset`), train, data."""
        sections = ("name", "model", "train", "data")
        for key in values:
            if key not in sections and key not in ("format_version", "egmla_version"):
                # a key of a section given bare (`--set steps=10`, or `steps = 10` above the file's [train]): name it
                owners = (("model", ModelConfig), ("train", TrainConfig), ("data", DataConfig))
                owner = next((name for name, cls in owners if key in {f.name for f in fields(cls)}), None)
                close = difflib.get_close_matches(key, sections, n=1)
                hint = (f"; did you mean '{owner}.{key}'?" if owner else
                        f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sections)}")
                raise ValueError(f"{key}: unknown config section{hint}")
        for section in ("model", "train", "data"):
            if not isinstance(values.get(section, {}), dict):
                raise ValueError(f"{section}: must be a [{section}] table, not {values[section]!r}")
        model_values = dict(values.get("model", {}))
        try:
            model = preset(model_values.pop("preset", "tiny"), **model_values)
        except ValueError as err:  # "field=value: fix" -> "model.field=value: fix", as train.* and data.* name theirs
            field_name = str(err).split("=", 1)[0]
            known = field_name == "preset" or field_name in ModelConfig.__dataclass_fields__
            raise ValueError(f"model.{err}" if known else str(err)) from None
        train = TrainConfig(**check_keys(TrainConfig, values.get("train", {}), where="train"))
        data = DataConfig(**check_keys(DataConfig, values.get("data", {}), where="data"))
        return cls(model=model, train=train, data=data, name=values.get("name", ""))


def warmup_warning(train: TrainConfig) -> str | None:
    """What a run whose warmup outlasts it (`--set train.steps=20` for a quick look under the default warmup of 60)
    should be told: it runs, its learning rate never reaches train.lr and never decays. A warning, not a refusal:
    quick looks stay one --set, and stored runs keep loading."""
    if not train.steps or train.warmup_steps <= train.steps:  # (== steps: all warmup, ending at the peak)
        return None
    return (f"warning: train.warmup_steps={train.warmup_steps} is longer than the run (train.steps={train.steps}): the "
            f"learning rate rises to {train.steps / train.warmup_steps:.0%} of train.lr and never decays; for the "
            f"whole schedule use --set train.warmup_steps={max(1, train.steps // 10)} (any value <= {train.steps})")


def cpu_work_warning(run: "RunConfig", device_type: str) -> str | None:
    """What a run sized for a GPU, started on the CPU, should be told before it spends minutes preparing its data and
    hours training: its training FLOPs as a multiple of the default run's (`egmla train`: tiny, 800 steps, minutes
    on a CPU). A warning, not a refusal: a patient user may mean it."""
    from egmla.train.metrics import flops_per_token

    if device_type != "cpu" or not run.train.steps:  # steps 0: fitted to a time budget, which bounds it anyway
        return None

    def work(config: RunConfig) -> float:
        tokens = config.train.steps * config.train.batch_size * config.train.seq_len
        return tokens * flops_per_token(config.model, config.train.seq_len)

    ratio = work(run) / work(RunConfig())
    if ratio < CPU_WORK_WARNING_RATIO:
        return None
    per_step = ratio / run.train.steps
    shrink = (f"one of its steps is {per_step:.1f}x the default run's whole training: for a look here shrink "
              f"train.batch_size and train.seq_len too" if per_step >= 1 else
              f"--set train.steps={int(1 / per_step)} keeps it to the default run's work")
    return (f"warning: this run trains on the CPU and is {ratio:,.0f}x the default `egmla train` run's training "
            f"FLOPs ({work(run):.1e}: {run.train.steps:,} steps of {run.train.batch_size} x {run.train.seq_len} tokens, "
            f"{run.model.d_model} wide, {run.model.n_layers} layers): it is sized for a GPU (train.device = \"cuda\" "
            f"on a machine with one); {shrink}")


CPU_WORK_WARNING_RATIO = 20  # the default run takes minutes on a 2-core CPU; 20x that is hours


def default_name(model: ModelConfig) -> str:
    """e.g. 'eg-mla-kv64-d256' from the variant and width."""
    variant = re.sub(r"[^a-z0-9]+", "-", model.variant_name().lower()).strip("-")
    return f"{variant}-d{model.d_model}"


def train_keys() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def config_help() -> str:
    """The [train] and [data] keys with their defaults and the comments beside them in the source,
    for `egmla train --help` (one place documents them: the dataclasses above)."""
    import inspect

    from egmla.data.config import DataConfig

    lines = []
    for section, cls in (("train", TrainConfig), ("data", DataConfig)):
        comments = dict(re.findall(r"^\s+(\w+): [^=]+=[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M))
        for f in fields(cls):
            default = f.default if f.default != "" else '""'
            lines.append(f"  {section}.{f.name} = {default}".ljust(38) + " " + comments.get(f.name, ""))
    return "\n".join(lines)
