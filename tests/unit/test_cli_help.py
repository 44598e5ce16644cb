"""Every flag of every command explains itself (issue 22): a one-line help text, a plain metavar
(never a config path such as DATA.DATA_PATH), for the trainer, generate and every tool."""
import argparse
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY_MODULES = ["megatron_sail.train", "megatron_sail.generate", "megatron_sail.config.run"]


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
        if "." in metavar or (not action.metavar and "." in action.dest and action.nargs != 0
                              and not isinstance(action, argparse._StoreConstAction)):
            bad.append(f"{name}: metavar is a config path")
    return bad


def _load_tool(path: Path):
    spec = importlib.util.spec_from_file_location(f"_tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ENTRY_MODULES)
def test_every_entry_point_flag_has_help(name, monkeypatch):
    module = importlib.import_module(name)
    parser = module.build_parser() if hasattr(module, "build_parser") else _parser_of(
        module.main, monkeypatch)
    assert _undescribed(parser) == []


def test_trainer_help_is_grouped_as_megatron_groups_it():
    from megatron_sail.config.run import build_parser

    titles = [g.title for g in build_parser()._action_groups]
    for title in ("data", "training", "learning rate", "mixed precision", "distributed",
                  "checkpointing", "logging"):
        assert title in titles


def test_megatron_spellings_and_short_forms_map_to_ours():
    from megatron_sail.config.run import resolve

    cfg = resolve(["--recipe", "tiny", "--freeze-ViT", "--freeze-LM",
                   "--pretrained-checkpoint", "/ckpt/start", "--tp", "1", "--pp", "1"])
    assert cfg.stage.train_vision is False and cfg.stage.train_language is False
    assert cfg.checkpoint.init_from == "/ckpt/start"
    assert resolve(["--recipe", "tiny", "--train-vision", "true"]).stage.train_vision is True
