"""Every flag of every command explains itself (issue 22): a one-line help text, a plain metavar
(never a config path such as DATA.DATA_PATH), for the trainer, generate and every tool (tools/*.py and benchmarks/hf_reference.py)."""

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

from testkit import ROOT

ENTRY_MODULES = ["megatron_sail.train", "megatron_sail.generate"]


CONFIG_PATH = re.compile(r"[A-Za-z_]\.[A-Za-z_]")
"""A dotted config path such as DATA.DATA_PATH (an ellipsis as in S1,S2,... is fine)."""


class _Captured(Exception):
    """Raised instead of parsing, carrying the parser that main() built."""

    def __init__(self, parser):
        super().__init__("captured")
        self.parser = parser


def _parser_of(main, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``main`` builds: argparse's parse methods raise with it instead of parsing."""

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    monkeypatch.setattr(sys, "argv", ["prog", "--help"])
    with pytest.raises(_Captured) as info:
        main(["--help"]) if inspect.signature(main).parameters else main()
    return info.value.parser


def _undescribed(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Flags (and subcommand flags) without help text or with a dotted config-path metavar."""
    bad = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                bad += _undescribed(sub, f"{prefix}{name} ")
            continue
        name = prefix + "/".join(action.option_strings or [action.dest])
        if not action.help or action.help == argparse.SUPPRESS or not action.help.strip():
            bad.append(f"{name}: no help")
        metavar = action.metavar if isinstance(action.metavar, str) else ""
        if CONFIG_PATH.search(metavar) or (
            not action.metavar
            and "." in action.dest
            and action.nargs != 0
            and not isinstance(action, argparse._StoreConstAction)
        ):
            bad.append(f"{name}: metavar is a config path")
    return bad


@pytest.mark.parametrize("name", ENTRY_MODULES)
def test_every_entry_point_flag_has_help(name, monkeypatch):
    module = importlib.import_module(name)
    parser = (
        module.build_parser() if hasattr(module, "build_parser") else _parser_of(module.main, monkeypatch)
    )
    assert _undescribed(parser) == []


def test_trainer_help_is_grouped_as_megatron_groups_it():
    from megatron_sail.config.run import build_parser

    titles = [g.title for g in build_parser()._action_groups]
    for title in (
        "data",
        "training",
        "learning rate",
        "mixed precision",
        "distributed",
        "checkpointing",
        "logging",
    ):
        assert title in titles


def test_megatron_spellings_and_short_forms_map_to_ours():
    from megatron_sail.config.run import resolve

    cfg = resolve(
        [
            "--recipe",
            "tiny",
            "--freeze-ViT",
            "--freeze-LM",
            "--pretrained-checkpoint",
            "/ckpt/start",
            "--tp",
            "1",
            "--pp",
            "1",
        ]
    )
    assert cfg.stage.train_vision is False and cfg.stage.train_language is False
    assert cfg.checkpoint.init_from == "/ckpt/start"
    assert resolve(["--recipe", "tiny", "--train-vision", "true"]).stage.train_vision is True


def _tool_parser(path: str, func: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser that ``func`` of the tool at ``path`` builds (captured before parsing); tools/
    is on pytest's pythonpath, so the tool imports by its file name."""
    module = importlib.import_module(Path(path).stem)
    with monkeypatch.context() as m:
        return _parser_of(getattr(module, func), m)


def _described(parser: argparse.ArgumentParser, flags: list[str]) -> list[str]:
    """Of ``flags``, those whose action lacks help text or has a config-path metavar."""
    actions = {parser._option_string_actions[f] for f in flags}
    helpless = argparse.ArgumentParser(add_help=False)
    helpless._actions = list(actions)
    return _undescribed(helpless)


@pytest.mark.parametrize(
    "path,func,tp_names",
    [
        ("tools/evaluate.py", "parse_args", ["--tp", "--tensor-model-parallel-size"]),
        ("tools/compare_logits.py", "parse_args", ["--tp", "--tensor-model-parallel-size"]),
        ("tools/score_complexity.py", "main", ["--tp", "--tensor-model-parallel-size"]),
        (
            "tools/recaption.py",
            "parse_args",
            ["--tp", "--tensor-model-parallel-size", "--tensor-parallel-size"],
        ),
    ],
)
def test_parallel_sizes_take_megatron_long_names_and_short_forms(path, func, tp_names, monkeypatch):
    """``--tp N`` and ``--tensor-model-parallel-size N`` (and ``--pp`` likewise) are one flag."""
    parser = _tool_parser(path, func, monkeypatch)
    groups = [tp_names]
    if "--pp" in parser._option_string_actions:
        groups.append(["--pp", "--pipeline-model-parallel-size"])
    for names in groups:
        actions = {id(parser._option_string_actions.get(n)) for n in names}
        assert len(actions) == 1 and None not in {parser._option_string_actions.get(n) for n in names}, names
        assert _described(parser, names) == []
        action = parser._option_string_actions[names[0]]
        assert action.metavar == "N" and "default" in action.help


def test_benchmark_and_candidate_lists_accept_both_forms(monkeypatch):
    """data_ablation.py takes ``--benchmark A=a B=b`` and ``--benchmark A=a --benchmark B=b``,
    as evaluate.py does; same for ``--candidate``."""
    ablation = _tool_parser("tools/data_ablation.py", "main", monkeypatch)
    evaluate = _tool_parser("tools/evaluate.py", "parse_args", monkeypatch)
    assert _described(ablation, ["--benchmark", "--candidate"]) == []
    base = ["--candidate", "raw=d/raw", "recap=d/recap", "--candidate", "x=d/x", "--tokens", "100"]
    for argv in (
        ["--benchmark", "pope=p.tsv", "caption=c.tsv", "--benchmark", "mmb=m.tsv"],
        ["--benchmark", "pope=p.tsv", "--benchmark", "caption=c.tsv", "mmb=m.tsv"],
    ):
        a = ablation.parse_args(base + argv)
        assert a.benchmark == ["pope=p.tsv", "caption=c.tsv", "mmb=m.tsv"]
        assert a.candidate == ["raw=d/raw", "recap=d/recap", "x=d/x"]
        assert evaluate.parse_args(argv).benchmark == a.benchmark


TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py")) + ["hf_reference"]


@pytest.mark.parametrize("name", TOOLS)
def test_every_tool_flag_has_help(name, monkeypatch):
    """Each tool's parser (subcommands included) describes every flag with a plain metavar; tools/
    and benchmarks/ are on pytest's pythonpath, so each imports by its file name."""
    module = importlib.import_module(name)
    with monkeypatch.context() as m:
        parser = _parser_of(module.main, m)
    assert _undescribed(parser) == []
