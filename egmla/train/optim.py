"""AdamW with decoupled weight decay on matrices only, optionally row-sparse updates of EG-MLA's gate
tables, and the learning-rate schedules.

No decay on norms, biases, the token embedding (tied to the output head) or EG-MLA's gate tables:
decaying a lookup table shrinks rows of rare tokens toward zero for no reason.

`train.gate_table_update = "row-sparse"` gives the gate tables (one [vocab, d_e] table per layer, 201 M of
paper-base's 316 M parameters) a lazy Adam step on the rows the batch touched, instead of AdamW on every
row: docs/training.md#gate-table-updates has the semantics.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from egmla.train.config import TrainConfig


GATE_TABLE = "gate_embed.weight"  # the name every EG-MLA layer's gate table E_l ends with


def no_decay(name: str, param: torch.Tensor) -> bool:
    return param.dim() < 2 or name.endswith(("tok_embeddings.weight", GATE_TABLE, "output.weight"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def gate_tables(model: nn.Module) -> list[torch.Tensor]:
    """EG-MLA's per-layer gate tables (none for other variants)."""
    return [param for name, param in model.named_parameters() if name.endswith(GATE_TABLE) and param.requires_grad]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the (possibly wrapped) model; with train.gate_table_update = "row-sparse", RowSparseAdamW.
    Both keep the same parameter groups and state keys, so a checkpoint of one resumes under the other."""
    groups = param_groups(model, config.weight_decay)
    params = [p for group in groups for p in group["params"]]
    # On CUDA, AdamW's fused kernel: one pass over weights, gradients and moments where the default (foreach)
    # path makes about seven. Not for FSDP2's sharded (DTensor) parameters; the CPU keeps the plain loop.
    fused = bool(params) and all(p.is_cuda and not hasattr(p, "to_local") for p in params)
    options = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=fused or None)
    if config.gate_table_update == "row-sparse":
        optimizer = RowSparseAdamW(groups, row_sparse=gate_tables(model), **options)
    else:
        optimizer = torch.optim.AdamW(groups, **options)
    mark_steps_in_place(optimizer, params)
    return optimizer


def mark_steps_in_place(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """After each step, count it as an in-place change of every parameter. AdamW's fused kernel and the Triton
    row-sparse step write the weights without bumping their version counters, and the decode paths rebuild what
    they precompute from the weights (gate tables, folded absorption, merged products) only when a version, storage,
    dtype or device changed (egmla.attention.precomputed): without this, generating after training on a GPU would
    read the weights of before. (Sharded FSDP2 parameters are DTensors, left as they are.)"""
    plain = [p for p in params if not hasattr(p, "to_local")]
    if plain:
        optimizer.register_step_post_hook(lambda *_: torch.autograd.graph.increment_version(plain))


def counts_on_host(counts: torch.Tensor):
    """Start copying `counts` to the host; returns a function that waits for that copy alone (not for the work
    queued on the GPU after it) and gives the counts as a list."""
    if not counts.is_cuda:
        return counts.tolist
    host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
    host.copy_(counts, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return wait


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's rows of an FSDP2-sharded (DTensor) table, gradient or moment; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class RowSparseAdamW(torch.optim.AdamW):
    """AdamW, except for the `row_sparse` tables, which take a lazy Adam step on their touched rows.

    A row is touched when its gradient is non-zero: for a gate table, the rows of the token ids in the
    batch (over every process: under DDP the gradient is all-reduced before the step). A touched row's
    moments and weights move exactly as Adam's; an untouched row, its moments included, stays as it is
    (torch.optim.SparseAdam's and TF LazyAdam's semantics). Dense AdamW instead decays every row's
    moments each step, so a row keeps moving on its momentum for a while after its token was last seen.
    Bias correction uses the table's step count, which counts every optimizer step. With every row touched
    in every step, or with beta1 = beta2 = 0, both are the same update.

    The gradients stay dense (the embedding backward, DDP's all-reduce and gradient clipping are
    unchanged); only the optimizer's reads and writes shrink to the touched rows. The state keeps AdamW's
    keys (step, exp_avg, exp_avg_sq) and the parameter groups are AdamW's, so checkpoints move between
    the two. Tables sharded by FSDP2 are updated shard by shard (rows are independent).
    """

    def __init__(self, params, row_sparse: list[torch.Tensor], kernel: bool | None = None, **adamw_options):
        super().__init__(params, **adamw_options)
        self.row_sparse = list(row_sparse)
        # The Triton row-Adam kernel (egmla/kernels/row_adam.py: one launch per table, untouched rows only read
        # their gradient) where it can run: CUDA tables with Triton installed, unless kernel=False; kernel=True
        # also takes it on the CPU through Triton's interpreter (tests). Else the gather/foreach/scatter path.
        self.kernel = kernel
        row_sparse_ids = {id(table) for table in self.row_sparse}
        for group in self.param_groups:
            if any(id(p) in row_sparse_ids for p in group["params"]) and (
                    group["weight_decay"] or group["amsgrad"] or group["maximize"]):
                raise ValueError("RowSparseAdamW: a row-sparse table's group must have weight_decay=0 and no "
                                 "amsgrad or maximize (the lazy step implements plain Adam)")

    def _uses_kernel(self, tables: list[torch.Tensor]) -> bool:
        if self.kernel is False or not tables:
            return False
        if self.kernel:
            return True
        from egmla.kernels import triton_available

        return triton_available() and all(_local(table).is_cuda and _local(table).is_contiguous() for table in tables)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:  # a closure would recompute the tables' gradients after they were set aside
            raise ValueError("RowSparseAdamW.step: closures are not supported; call backward() before step()")
        tables = [table for table in self.row_sparse if table.grad is not None]
        kernel = self._uses_kernel(tables)
        if not kernel:
            # The touched rows are counted first and their counts copied to the host behind AdamW's kernels, so
            # that waiting for them does not wait for AdamW, and the row updates are launched while AdamW runs.
            touched = [_local(table.grad).any(dim=1) for table in tables]  # [rows] bool per table
            counts = counts_on_host(torch.stack([mask.sum() for mask in touched])) if tables else list
        grads = [table.grad for table in tables]
        for table in tables:  # AdamW skips parameters without a gradient: it updates everything else
            table.grad = None
        try:
            super().step()
        finally:
            for table, grad in zip(tables, grads):
                table.grad = grad
        if kernel:
            self.row_adam_kernel_step(tables)
        else:
            self.lazy_adam_step(tables, touched, counts())

    def _table_state(self, table: torch.Tensor) -> dict:
        """The table's AdamW state, created as AdamW would, with its step count advanced (every optimizer step
        counts, touched or not)."""
        state = self.state[table]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)  # as AdamW keeps it (on the CPU)
            state["exp_avg"] = torch.zeros_like(table, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(table, memory_format=torch.preserve_format)
        if state["step"].is_cuda:  # loaded from a fused AdamW's state: .item() there would wait for the GPU
            state["step"] = state["step"].cpu()
        state["step"] += 1
        return state

    def row_adam_kernel_step(self, tables: list[torch.Tensor]) -> None:
        """The lazy Adam step of `lazy_adam_step`, one Triton launch per table, no host sync."""
        from egmla.kernels.row_adam import row_adam_

        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        for table in tables:
            state, group = self._table_state(table), group_of[id(table)]
            (beta1, beta2), step = group["betas"], int(state["step"].item())
            row_adam_(_local(table), _local(table.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                      group["lr"], beta1, beta2, group["eps"], step)

    def lazy_adam_step(self, tables: list[torch.Tensor], touched: list[torch.Tensor], counts: list[int]) -> None:
        """Adam on the touched rows of each table (touched: a [rows] bool mask per table, counts: its sums):
        gather the rows, update them with AdamW's own foreach ops in its order (no weight decay), scatter them
        back. Every table's step count advances, touched or not."""
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        by_group: dict[int, list] = {}
        for table, mask, count in zip(tables, touched, counts):
            state = self._table_state(table)
            if count:
                rows = torch.nonzero_static(mask, size=count).squeeze(1)  # sized from `counts`: no sync
                by_group.setdefault(id(group_of[id(table)]), []).append((table, state, rows))
        for group in self.param_groups:
            if id(group) in by_group:
                self._adam_rows(by_group[id(group)], group)

    @staticmethod
    def _adam_rows(entries: list, group: dict) -> None:
        """torch.optim.adam._multi_tensor_adam's non-capturable update, on gathered rows."""
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        local = [(_local(table), _local(table.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]), rows)
                 for table, state, rows in entries]
        params, grads, exp_avgs, exp_avg_sqs = ([tensors[i].index_select(0, tensors[4]) for tensors in local]
                                                for i in range(4))
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        steps = [state["step"].item() for _, state, _ in entries]
        step_size = [-lr / (1 - beta1 ** step) for step in steps]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - beta2 ** step) ** 0.5 for step in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
        for (table, _, exp_avg, exp_avg_sq, rows), param_rows, avg_rows, sq_rows in zip(local, params, exp_avgs,
                                                                                        exp_avg_sqs):
            table.index_copy_(0, rows, param_rows)
            exp_avg.index_copy_(0, rows, avg_rows)
            exp_avg_sq.index_copy_(0, rows, sq_rows)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine, WSD or constant. A run whose
    length is not set yet (steps = 0: a time-budgeted run before it has timed 20 steps of a call) holds the peak
    after its warmup: the decay needs the length (it gave the final rate, e.g. to a run resumed from before step 20)."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    final = config.lr * config.min_lr_ratio
    if config.schedule == "constant" or config.steps == 0:
        return config.lr
    if config.schedule == "wsd":  # warmup-stable-decay: flat, then a linear decay over the last steps
        decay_steps = max(1, round(config.decay_fraction * config.steps))
        decay_start = config.steps - decay_steps
        if step < decay_start:
            return config.lr
        return config.lr + (final - config.lr) * min(1.0, (step - decay_start + 1) / decay_steps)
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps + 1) / span)
    return final + (config.lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
