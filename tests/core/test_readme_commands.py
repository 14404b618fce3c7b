"""The front door stays true: every `egmla ...` command in README.md's and docs/'s shell blocks parses with today's
CLI (options renamed or removed fail here), and the config files they name exist."""
import re
import shlex
from pathlib import Path

import pytest

from egmla.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_commands(page: Path) -> list[tuple[str, str]]:
    """(page:line, command) for each line of a ```bash block, or an indented block line, that starts with `egmla `:
    comments and [optional] parts dropped."""
    commands, in_block = [], False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_block = line.strip() in ("```bash", "```sh", "```shell") and not in_block
            continue
        text = line.strip()
        if (in_block or line.startswith("    ")) and text.startswith("egmla ") and not text.endswith("\\"):
            text = re.sub(r"\s+#.*$", "", text)  # a trailing comment
            text = re.sub(r"\s\[[^\]]*\]", "", text)  # [--optional] parts
            commands.append((f"{page.name}:{number}", text))
    return commands


COMMANDS = [command for page in PAGES for command in shell_commands(page)]


def test_the_pages_hold_commands():
    assert len([c for c in COMMANDS if c[0].startswith("README.md")]) >= 20


@pytest.mark.parametrize("where,command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_documented_command_parses(where, command):
    argv = shlex.split(command)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `{command}` does not parse (exit {exc.code})")
    for word in argv:
        if word.startswith("configs/") and word.endswith(".toml"):
            assert (ROOT / word).is_file(), f"{where}: {word} does not exist"
