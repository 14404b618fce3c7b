"""Any egmla command with the scheduler's thread under cProfile: where its host time goes, by function.

    python docs/bench/serve_host_commits_h200/host_profile.py OUT.pstats bench serve --preset paper-base \
        --set max_seq_len=4096 --variants mla-kv64 --systems continuous --requests 128 --rate inf \
        --prompt-len 1024 --output-len 256 --max-batch 128

The scheduler runs its loop in a thread of its own (`Scheduler.start`), which a plain `python -m cProfile` does not
see: the loop is wrapped so that the profiler covers that thread. cProfile slows Python code (each call is timed), so
the times read as shares, not as the run's; time the host spends waiting on the device (a sync) shows in the
function that waits.
"""
import cProfile
import pstats
import sys

from egmla.cli import main
from egmla.infer.scheduler import Scheduler

out, argv = sys.argv[1], sys.argv[2:]
profiler = cProfile.Profile()
loop = Scheduler._loop


def profiled_loop(self):
    profiler.enable()  # in the scheduler's thread: the profile hook is per thread
    try:
        loop(self)
    finally:
        profiler.disable()


Scheduler._loop = profiled_loop
main(argv)
profiler.dump_stats(out)
stats = pstats.Stats(out)
stats.sort_stats("cumulative").print_stats(45)
stats.sort_stats("tottime").print_stats(30)
