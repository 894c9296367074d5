"""The README's session transcript is real: replaying its commands prints the same text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
PROMPT = "(kctx) "


def _transcript() -> list[str]:
    text = README.read_text()
    block = re.search(r"## A session on the demo snapshot.*?```\n(.*?)```", text, re.S)
    assert block, "README lost its session transcript"
    return block.group(1).splitlines()


def test_readme_transcript_matches_the_tool():
    lines = _transcript()
    assert lines[0] == "$ kctx-debug"
    commands = [line[len(PROMPT) :] for line in lines if line.startswith(PROMPT)]
    argv = [sys.executable, "-m", "kctx_debug.cli", "--echo", "--batch", "--no-history"]
    for command in commands:
        argv += ["-ex", command]
    env = dict(os.environ, NO_COLOR="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.splitlines() == lines[2:]
    assert proc.stderr.startswith("(no snapshot given: opening the bundled demo ")
