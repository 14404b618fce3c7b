"""`egmla kv-report`: KV-cache size per token for every variant at one model shape."""
import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="paper-base", help="model shape: tiny, paper-base or paper-1b")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field of the preset, e.g. --set max_seq_len=4096 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")


def main(args) -> int:
    from egmla.accounting import format_kv_table, kv_rows, variant_configs
    from egmla.config import preset
    from egmla.configfile import parse_overrides

    base = preset(args.preset, **parse_overrides(args.overrides, section="model"))
    rows = kv_rows(variant_configs(base))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"KV cache per token, preset {args.preset} ({base.n_layers} layers, d_model {base.d_model})")
        print(format_kv_table(rows))
    return 0
