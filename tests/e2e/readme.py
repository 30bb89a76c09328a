"""The README's stack section as the tests run it: the shell blocks, split into commands.

The tests run these commands verbatim, so that what a new user pastes is what was tested.
"""

from __future__ import annotations

import re

from tests.conftest import REPO

SECTION = "## Running rounds on real Airflow services"


def stack_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end != -1 else len(text)]


def shell_blocks() -> list[str]:
    """The fenced ```bash blocks of the section, in order."""
    return re.findall(r"```bash\n(.*?)```", stack_section(), flags=re.S)


def paragraphs(block: str) -> list[str]:
    """A block's groups of lines separated by blank lines (each one example in the README)."""
    return [group.strip("\n") for group in re.split(r"\n\s*\n", block) if group.strip()]


def command_lines(block: str) -> list[str]:
    """A block's commands: continuation lines joined, comments and blank lines left out."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        code = line.split("  #", 1)[0].strip()
        if code and not code.startswith("#"):
            commands.append(code)
    return commands
