"""Any egmla command under torch.profiler (CUDA activity), then its kernels by total device time:

    python docs/bench/serve_max_len_h100/profile.py bench serve --preset paper-base --set max_seq_len=4096 \
        --variants mla-kv64 --systems continuous --requests 128 --rate inf --prompt-len 1024 --output-len 256 \
        --max-batch 128

With PROFILE_TRACE=FILE.json it also records the host's side (CPU activity, Python call stacks off) and writes a
Chrome trace of both, to read the timeline in Perfetto (ui.perfetto.dev): where the device waits on the host.
"""
import os
import sys

from torch.profiler import ProfilerActivity, profile

from egmla.cli import main

trace = os.environ.get("PROFILE_TRACE")
activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace else [])
with profile(activities=activities) as prof:
    main(sys.argv[1:])
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
if trace:
    prof.export_chrome_trace(trace)
