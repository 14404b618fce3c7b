"""`egmla kv-report`: KV-cache size per token for every variant at one model shape."""
import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("model fields: --set KEY=VALUE here; in `egmla train`, the [model] section of --config or\n"
                     "--set model.KEY=VALUE. Defaults are ModelConfig's; a preset overrides some of them.\n"
                     + model_fields_help())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--preset", default="paper-base", help="model shape: tiny, paper-base or paper-1b "
                                                               "(default: paper-base)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field of the preset, e.g. --set max_seq_len=4096 (repeatable; "
                             "fields listed below)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")


def model_fields_help() -> str:
    """Every ModelConfig field with its default and the comment beside it in egmla/config.py."""
    import dataclasses
    import inspect
    import re

    from egmla.config import ModelConfig

    comments = dict(re.findall(r"^\s+(\w+): [^=]+=[^#\n]*#\s*(.+)$", inspect.getsource(ModelConfig), re.M))
    def toml(value) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return "\n".join((f"  {f.name} = {toml(f.default)}".ljust(32) + " " + comments.get(f.name, "")).rstrip()
                     for f in dataclasses.fields(ModelConfig))


def main(args) -> int:
    from egmla.accounting import format_kv_table, kv_rows, variant_configs
    from egmla.config import preset
    from egmla.configfile import model_overrides

    base = preset(args.preset, **model_overrides(args.overrides))
    rows = kv_rows(variant_configs(base))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"KV cache per token, preset {args.preset} ({base.n_layers} layers, d_model {base.d_model})")
        print(format_kv_table(rows))
    return 0
