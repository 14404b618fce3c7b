"""The row-Adam kernel (egmla/kernels/row_adam.py) against its reference (row_adam_ref.py), and RowSparseAdamW
through the kernel against its gather path."""
import pytest
import torch

from egmla.kernels.row_adam_ref import row_adam_ref
from tests.kernels.conftest import kernel_device, needs_cuda, rel_err, requires_triton

pytestmark = requires_triton


def table_and_grad(rows: int, cols: int, touched: list[int], dtype, device, seed: int):
    torch.manual_seed(seed)
    param = torch.randn(rows, cols, dtype=dtype, device=device)
    grad = torch.zeros(rows, cols, dtype=dtype, device=device)
    grad[touched] = torch.randn(len(touched), cols, dtype=dtype, device=device)
    grad[touched[0], : cols // 2] = 0  # a touched row that is partly zero is still touched
    return param, grad


@pytest.mark.parametrize("rows,cols", [(37, 48), (8, 512), (5, 3)])
def test_kernel_matches_the_reference_over_steps_and_leaves_untouched_rows_alone(rows, cols):
    from egmla.kernels.row_adam import row_adam_

    device = kernel_device()
    param, _ = table_and_grad(rows, cols, [0], torch.float32, device, seed=0)
    ref = [param.clone(), torch.zeros_like(param), torch.zeros_like(param)]
    out = [param.clone(), torch.zeros_like(param), torch.zeros_like(param)]
    for step, touched in enumerate(([0, 2, rows - 1], [1, 2], [rows - 1], [0, 1, 2, rows // 2]), start=1):
        _, grad = table_and_grad(rows, cols, touched, torch.float32, device, seed=step)
        before = [t.clone() for t in out]
        hyper = dict(lr=0.03, beta1=0.9, beta2=0.95, eps=1e-8, step=step)
        assert row_adam_ref(*ref[:1], grad, *ref[1:], **hyper) == len(set(touched))
        row_adam_(out[0], grad, out[1], out[2], **hyper)
        for name, o, r in zip(("param", "exp_avg", "exp_avg_sq"), out, ref):
            assert not o.isnan().any(), name
            assert rel_err(o, r) < 1e-6, name
        untouched = torch.tensor([row not in touched for row in range(rows)], device=device)
        for o, b in zip(out, before):
            assert torch.equal(o[untouched], b[untouched])  # bit for bit: never written


@pytest.mark.gpu
@needs_cuda
def test_kernel_on_bf16_tables_is_within_bf16_rounding():
    from egmla.kernels.row_adam import row_adam_

    param, grad = table_and_grad(300, 512, list(range(0, 300, 7)), torch.bfloat16, "cuda", seed=4)
    moments = [torch.rand_like(param) * 1e-2, torch.rand_like(param) * 1e-4]
    ref = [t.float() for t in (param, *moments)]
    out = [param.clone(), *[m.clone() for m in moments]]
    row_adam_ref(ref[0], grad.float(), ref[1], ref[2], lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8, step=3)
    row_adam_(out[0], grad, out[1], out[2], lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8, step=3)
    for o, r in zip(out, ref):
        assert not o.isnan().any() and rel_err(o, r) < 1e-2


def test_kernel_refuses_mismatched_tensors_by_name():
    from egmla.kernels.row_adam import row_adam_

    param = torch.zeros(4, 8, device=kernel_device())
    with pytest.raises(ValueError, match=r"exp_avg_sq must be a contiguous \[rows, cols\] tensor of param's shape"):
        row_adam_(param, param.clone(), param.clone(), torch.zeros(4, 9, device=param.device), 0.1, 0.9, 0.9,
                  1e-8, 1)
    with pytest.raises(ValueError, match="step=0"):
        row_adam_(param, param.clone(), param.clone(), param.clone(), 0.1, 0.9, 0.9, 1e-8, 0)


def test_row_sparse_adamw_through_the_kernel_matches_its_gather_path():
    """The trainer's step (loss, backward, clip, step) on a tiny EG-MLA model: RowSparseAdamW with kernel=True
    (on the CPU: Triton's interpreter) and kernel=False take the same step. One step: after it the two roundings
    of the tables change later gradients, and Adam makes near-zero ones (the gate norm's bias) differ visibly;
    the kernel's multi-step agreement is the test above."""
    from egmla.config import preset
    from egmla.model import Transformer
    from egmla.train.distributed import clip_grad_norm
    from egmla.train.optim import RowSparseAdamW, gate_tables, param_groups
    from egmla.train.loss import token_loss

    device = kernel_device()
    torch.manual_seed(5)
    batches = [torch.randint(0, 24, (2, 9), device=device) for _ in range(1)]  # ids 0..23 of 64: rows untouched
    models = []
    for kernel in (False, True):
        torch.manual_seed(0)
        model = Transformer(preset("tiny", vocab_size=64, n_layers=2, d_model=32, n_heads=2, qk_nope_head_dim=8,
                                   qk_rope_head_dim=8, v_head_dim=8, kv_lora_rank=16, gate_dim=8,
                                   max_seq_len=16)).to(device)
        optimizer = RowSparseAdamW(param_groups(model, 0.1), row_sparse=gate_tables(model), kernel=kernel, lr=1e-2)
        for ids in batches:
            token_loss(model, ids[:, :-1], ids[:, 1:]).backward()
            clip_grad_norm(model, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        models.append(model)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert rel_err(b, a) < 1e-5, name
    table = models[1].layers[0].attn.gate_embed.weight
    assert torch.equal(table[40:], models[0].layers[0].attn.gate_embed.weight[40:])  # never touched
