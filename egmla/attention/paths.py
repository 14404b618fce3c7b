"""What a decode path is: one row of an attention class's table of paths (`decode_path_table(config)`), read by the
class itself, the model, the generation engine, the memory planner and the benchmarks instead of lists of path names.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodePath:
    """A decode path of one attention class, as a config of that class has it (EG-MLA's paths differ by placement).

    name: the spelling everyone uses (`model.set_decode_path(name)`, `--decode-path`).
    method: the class's method a cached call attends with, `attend_*` (None: the class's forward tests the name).
    reads_weights: reads the layer's weights directly (folded, in a gate table, passed to a kernel), so a wrapped
        linear (peft's LoRA) is refused on it (egmla.attention.precomputed.ReadsWeights).
    folds_absorption: MLA's W_UK / W_UV folded into the query and output projections when the path is set, where
        that makes them no larger (`fold_absorption`).
    reads_gate_table: EG-MLA's precomputed G_l = E_l W_UE^T, built when the path is set, beside E_l.
    keeps_stats: the cache keeps each position's norm statistics (mu, rho), written at append.
    keeps_token_groups: the cache keeps the positions grouped by token id, registered by the model at append.
    reads_own_positions: its one-token steps on CUDA read only each sequence's own positions (a Triton kernel takes
        the length), so a cache longer than a call needs costs them nothing (egmla.infer.engine).
    gate_rows_by_id: every gate row it reads (E_l's or G_l's) it reads by token id or slot through `GateRows`, never
        the whole table, so an offload's rows resident on the device serve it (egmla.infer.offload). False by
        default: a new path whose kernels take the whole table must not be offloaded until they take the rows.
    """

    name: str
    method: str | None = None
    reads_weights: bool = False
    folds_absorption: bool = False
    reads_gate_table: bool = False
    keeps_stats: bool = False
    keeps_token_groups: bool = False
    reads_own_positions: bool = False
    gate_rows_by_id: bool = False


def path_table(*paths: DecodePath) -> dict[str, DecodePath]:
    """{name: path}, in the order given (the first is the default path)."""
    return {path.name: path for path in paths}
