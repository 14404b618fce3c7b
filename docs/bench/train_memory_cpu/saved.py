"""What autograd keeps from a paper-base training forward for its backward, per setting of
train.activation_checkpointing and train.loss_chunk_tokens: the bytes of the distinct storages the saved tensors
live in (parameters excluded: those are the weights' memory, not the batch's). On the CPU under bf16 autocast, with
MLA's attention on SDPA's flash kernel as on a GPU (v padded, below), one micro-batch of 2 x 1024 tokens; activation memory grows linearly with the tokens, so
multiply by 8 for the 16 x 1024 micro-batch of docs/benchmarks.md §4. The peak on a GPU also holds the weights,
gradients, optimizer moments and the backward's transients: `egmla bench train --activation-checkpointing 0,1
--loss-chunk-tokens 0,4096` measures it there.

    python docs/bench/train_memory_cpu/saved.py > docs/bench/train_memory_cpu/saved.txt
    python docs/bench/train_memory_cpu/saved.py --compiled > docs/bench/train_memory_cpu/saved_compiled.txt

--compiled: each block under torch.compile (mode "default") and the loss compiled, as `train.compile` runs them; the
count is taken on the second forward (the first compiles).
"""
import sys

import torch

from egmla.model import Transformer
from egmla.train.loss import token_loss
from egmla.train.recompute import recompute_blocks
from egmla.variants import VARIANTS

SETTINGS = [(0, 0), (0, 512), (1, 0), (1, 512)]  # (activation_checkpointing, loss_chunk_tokens): 4 chunks of 2,048


def kept_bytes(model, inputs, targets, chunk_tokens: int, compiled: bool = False) -> int:
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and tensor.dim() > 0:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        token_loss(model, inputs, targets, chunk_tokens=chunk_tokens, compiled=compiled)
    return sum(storages.values())


def one_row(name: str, recompute: int, chunk: int, compiled: bool = False) -> int:
    import functools

    from egmla.attention import mla

    # MLA pads v to q's width on CUDA so that SDPA takes FlashAttention; do the same here so that the CPU's SDPA takes
    # its flash kernel too (kept: output and log-sum-exp) rather than the math path's [heads, T, T] probabilities
    mla.causal_attention = functools.partial(mla.causal_attention, pad_v=True)
    torch.manual_seed(0)
    tokens = torch.randint(0, 32768, (2, 1025))
    model = Transformer(VARIANTS[name].config("paper-base"))
    model.check_inputs = False
    recompute_blocks(model, recompute)
    if compiled:
        for block in model.layers:
            block.compile(mode="default")
        kept_bytes(model, tokens[:, :-1], tokens[:, 1:], chunk, compiled)  # compiles
    return kept_bytes(model, tokens[:, :-1], tokens[:, 1:], chunk, compiled)


def main():
    import multiprocessing

    compiled = "--compiled" in sys.argv[1:]
    print(f"torch {torch.__version__}, CPU, bf16 autocast, paper-base, one micro-batch of 2 x 1024 tokens"
          + (", blocks and loss under torch.compile" if compiled else ""))
    print(f"{'variant':<12} {'recompute':>9} {'loss chunks':>11} {'kept MB':>9} {'vs plain':>9}")
    # a fresh process per row: the CPU allocator keeps what a freed paper-base graph held (24 GB ran out)
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for name in ("mha", "mla-kv64", "egmla-kv64"):
            plain = None
            for recompute, chunk in SETTINGS:
                kept = pool.apply(one_row, (name, recompute, chunk, compiled))
                plain = plain or kept
                print(f"{name:<12} {recompute or '-':>9} {chunk or '-':>11} {kept / 1e6:>9.1f} {kept / plain:>8.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
