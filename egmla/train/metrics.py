"""Training metrics: FLOPs and MFU, metrics.jsonl, TensorBoard events and the loss-curve plot.

FLOPs per token follow the PaLM convention (appendix B): 6 x the parameters used in matmuls (embedding
lookups and EG-MLA's gate tables excluded, the output head included), plus 6·L·h·(d_qk + d_v)·T for
the attention score and value products at sequence length T (causal masking not discounted).
"""
from __future__ import annotations

import json
from pathlib import Path

from egmla.config import ModelConfig
from egmla.model import count_params

# Dense bf16 peak of common accelerators, TFLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
                    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A10G", 125.0), ("L4", 121.0),
                    ("L40S", 362.0), ("RTX 4090", 165.0))


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: all but the embedding lookups and gate tables."""
    lookups = config.vocab_size * config.d_model * (0 if config.tie_embeddings else 1)  # input embedding
    return count_params(config, include_gate_tables=False) - lookups


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    if config.is_latent:
        qk_dim, v_dim = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    else:
        qk_dim = v_dim = config.mha_head_dim
    attention = 6 * config.n_layers * config.n_heads * (qk_dim + v_dim) * seq_len
    return 6 * matmul_params(config) + attention


def peak_flops(device_name: str, override_tflops: float = 0.0) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (MFU is then not reported)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def peak_memory_bytes(device) -> tuple[float, str]:
    """(this process's peak memory in bytes, what was measured): the most CUDA tensor memory allocated on
    its GPU, or on CPU the peak resident set size (0 where the platform does not report it)."""
    if device.type == "cuda":
        import torch

        return float(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return 0.0, "unavailable"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "peak RSS (ru_maxrss)"  # Linux: KiB


def peak_reserved_bytes(device) -> float | None:
    """The most memory this process's CUDA caching allocator held from its GPU (torch.cuda.max_memory_reserved:
    CUDA graphs' private pools included, which max_memory_allocated misses between their recordings); None off
    CUDA."""
    if device.type != "cuda":
        return None
    import torch

    return float(torch.cuda.max_memory_reserved(device))


class MetricsLog:
    """Append-only metrics.jsonl plus TensorBoard scalars (if tensorboard is installed)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_step: int = 0, warn=print):
        """Records past start_step (left by a crashed or earlier attempt) are dropped first, from metrics.jsonl and
        from what TensorBoard shows."""
        self.path = run_dir / "metrics.jsonl"
        self.enabled, self.writer = enabled, None
        if not enabled:
            return
        truncate_metrics(self.path, start_step, warn)
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: the first step logged again; events of it and later ones (a crashed attempt's) are
                # hidden, those of start_step itself (its validation) are kept, as in metrics.jsonl
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                warn("note: tensorboard is not installed; writing metrics.jsonl only")

    def log(self, record: dict, tensorboard: bool = True) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None and tensorboard:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def read_metrics(path: str | Path, torn: list | None = None) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not JSON (a write cut short by a full disk or a crash) is
    skipped and, if `torn` is given, appended to it."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if torn is not None:
                    torn.append(line)
    return records


def truncate_metrics(path: Path, last_step: int, warn=print) -> None:
    """Drop records past the step being resumed from (they are recomputed), and lines cut short, atomically."""
    from egmla.runs import atomic_write_bytes

    torn: list[str] = []
    records = [r for r in read_metrics(path, torn) if r.get("step", 0) <= last_step]
    if torn:
        warn(f"note: {path}: dropped {len(torn)} line(s) cut short by an earlier failure ({torn[0][:60]!r}...)")
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def plot_loss_curve(metrics_path: Path, out_path: Path, title: str, baseline: float | None = None) -> Path | None:
    """Training and validation loss vs step as a PNG (None if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.5)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="unigram baseline (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
