"""Decode-attention benchmark, same as `egmla bench decode` (see egmla/bench/decode.py for the options).

    PYTHONPATH=$PWD python3 benchmarks/bench_decode.py --out decode.json --plot decode.png --markdown decode.md
"""
import argparse
import sys

from egmla.bench import decode

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    decode.add_arguments(parser)
    sys.exit(decode.main(parser.parse_args()))
