"""Any egmla command under torch.profiler (CUDA activity), then its kernels by total device time:

    python docs/bench/serve_max_len_h100/profile.py bench serve --preset paper-base --set max_seq_len=4096 \
        --variants mla-kv64 --systems continuous --requests 128 --rate inf --prompt-len 1024 --output-len 256 \
        --max-batch 128
"""
import sys

from torch.profiler import ProfilerActivity, profile

from egmla.cli import main

with profile(activities=[ProfilerActivity.CUDA]) as prof:
    main(sys.argv[1:])
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
