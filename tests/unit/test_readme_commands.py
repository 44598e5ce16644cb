"""The README's commands cannot drift (issue 22): every `python tools/X.py ...`,
`python -m megatron_sail.train ...` and `python -m megatron_sail.generate ...` line in its code
blocks is parsed by that command's own argument parser (nothing runs). Optional parts written
`[...]` are parsed as given; `...` stands for flags shown elsewhere and is dropped."""

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from testkit import ROOT

ENTRY = {"megatron_sail.train": "megatron_sail.train", "megatron_sail.generate": "megatron_sail.generate"}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(module or tool name, its arguments) of every python command in the README's bash blocks."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
            words = [
                _placeholder(w, prev)
                for prev, w in zip([""] + words, words)
                if w != "..." or prev.startswith("--")
            ]
            if not words or not words[0].endswith("python"):
                continue
            if "tools/" in " ".join(words[1:2]) and words[1].endswith(".py"):
                out.append((Path(words[1]).stem, words[2:]))
            elif "-m" in words:
                i = len(words) - 1 - words[::-1].index("-m")  # the last -m: past torch.distributed.run
                if words[i + 1] in ENTRY:
                    out.append((words[i + 1], words[i + 2 :]))
    return out


def _placeholder(word: str, prev: str) -> str:
    """A one-letter capital (`--shard-index I`, `--tokens N`) stands for a number; `...` after
    a flag for some value."""
    if re.fullmatch(r"[A-Z]", word):
        return "1"
    return "x" if word == "..." else word


COMMANDS = readme_commands()


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__("captured")
        self.parser = parser


def parser_of(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser the command's main() builds (argparse raises with it instead of parsing)."""
    module = importlib.import_module(ENTRY.get(name, name))
    if hasattr(module, "build_parser"):
        return module.build_parser()

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured) as info:
        module.main(["--help"])
    monkeypatch.undo()
    return info.value.parser


def test_the_readme_has_commands_to_check():
    names = {name for name, _ in COMMANDS}
    assert {
        "preprocess_data",
        "convert_checkpoint",
        "evaluate",
        "megatron_sail.train",
        "megatron_sail.generate",
    } <= names


@pytest.mark.parametrize("name, args", COMMANDS, ids=[f"{n}:{' '.join(a)[:40]}" for n, a in COMMANDS])
def test_readme_command_parses(name, args, monkeypatch):
    parser = parser_of(name, monkeypatch)
    if "--" in args:  # what follows goes to the trainer (data_ablation), not to this parser
        args = args[: args.index("--")]
    try:
        parser.parse_args(args)
    except SystemExit as e:  # argparse's error: a flag the command does not take
        pytest.fail(f"README: {name} {' '.join(args)} does not parse (exit {e.code})")
