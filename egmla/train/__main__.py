"""`python -m egmla.train ...` is `egmla train ...` without loading the other subcommands (faster to
start; also `torchrun --nproc_per_node=N -m egmla.train ...`)."""
import sys

from egmla.cli import ArgumentParser, quiet_cpu_threads
from egmla.train import cli  # neither imports torch: quiet_cpu_threads() below still acts


def main(argv=None) -> int:
    quiet_cpu_threads()
    parser = ArgumentParser(prog="egmla train", description=cli.__doc__.split("\n\n")[0])
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cli.main(args)
    except ValueError as err:  # the same one-line errors as `egmla train`
        print(f"egmla train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
