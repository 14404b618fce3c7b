"""Grouped EG-MLA decode kernels that were built, tested exact and measured slower than the model's path
(egmla/kernels/grouped_decode.py, three launches), kept so that docs/grouped-decode.md's runs reproduce
(`egmla bench grouped --settings ...`, `egmla bench kernel-resources`). Nothing in the model imports them.

    grouped_fused.py    one launch per (heads, block of distinct ids, sequence)
    grouped_gluon.py    one persistent Gluon kernel, weights resident in shared memory (Triton >= 3.6)
    grouped_scratch.py  one launch over ranges of grouped positions, intermediates read back from L2
    grouped_decode_cuda.py / .cu
                        one CUDA launch (mma.sync, cp.async, two warps per head, weights in shared memory), built at
                        run time by egmla/kernels/cuda_build.py

Each compares against the same reference as the three launches (egmla/kernels/grouped_decode_ref.py).
"""
