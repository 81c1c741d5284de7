"""Every command the user documents tell a researcher to type is one the tools accept: each
`python train.py / evaluate.py / predict.py / -m prostate_seg <tool>` line of README.md and
docs/*.md (continuation lines joined) composes with no unknown key, group option or parse
error: Hydra composes it (a sweep: its own config; the study sweeper composes each job when
it runs), and the line the command would stop with is shown. Placeholders (`...`, `CKPT`,
paths) are values, which Hydra does not check here."""

import shlex
from pathlib import Path

import pytest

from prostate_seg.command_line import config_problem

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOOLS = {"train.py": "train", "evaluate.py": "evaluate", "predict.py": "predict",
         "prostate-seg-train": "train", "prostate-seg-evaluate": "evaluate",
         "prostate-seg-predict": "predict", "prostate-seg-prepare": "prepare",
         "prostate-seg-synthetic": "synthetic"}


def code_lines(text: str) -> list[str]:
    """Lines of ```bash blocks, continuation lines joined, comments dropped."""
    lines, block, pending = [], False, ""
    for raw in text.splitlines():
        if raw.strip().startswith("```"):
            block = not block and raw.strip() == "```bash"
            continue
        if not block or raw.strip().startswith("#"):
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def commands() -> list[tuple[str, str, list[str]]]:
    """(where, config, overrides) for every documented command of a Hydra tool."""
    found = []
    for document in DOCUMENTS:
        for line in code_lines(document.read_text()):
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                tool = TOOLS.get(Path(word).name) or TOOLS.get(word)
                if word == "prostate_seg" and words[i + 1:i + 2] and words[i + 1] in TOOLS.values():
                    tool, i = words[i + 1], i + 1  # python -m prostate_seg prepare ...
                if tool:
                    argv = [w for w in words[i + 1:] if w != "..."]
                    found.append((f"{document.name}: {line}", tool, argv))
                    break
    return found


COMMANDS = commands()


def test_the_documents_hold_the_commands_they_are_about():
    tools = {tool for _, tool, _ in COMMANDS}
    assert tools == {"train", "evaluate", "predict", "prepare", "synthetic"}
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize("where, config, argv", COMMANDS, ids=[c[0][:90] for c in COMMANDS])
def test_every_documented_command_composes(where, config, argv):
    assert config_problem(config, argv) is None, where
