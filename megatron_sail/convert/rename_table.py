"""One table of name rules that converts a state dict between two checkpoint layouts, both ways.

A hub layout and transformers' layout of the same network differ only in names, in a q/k/v that
one side fuses into one tensor, and in a leading singleton dimension. Writing the walk twice
(once per direction) let the two drift apart; here each fact is one ``Rule`` and the table reads
it forwards (side A -> side B) or backwards. Nothing changes a value: the conversion is bit-exact
both ways.

Patterns name whole keys with placeholders: ``{i}`` a layer number, ``{w}`` weight or bias,
``{s}`` one name part (no dot), ``{rest}`` any tail, and on the B side of a split ``{part}`` q, k
or v. Unknown keys are an error (a silent drop would make a wrong conversion look right).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

_PLACEHOLDERS = {"i": r"\d+", "w": "weight|bias", "s": r"[^.]+", "rest": ".+", "part": "[qkv]"}


@dataclass(frozen=True)
class Rule:
    """One fact of a layout: key ``a`` on side A is key ``b`` on side B."""

    a: str
    b: str
    kind: str = "rename"
    """'rename' (same tensor), 'split3' (A holds [q; k; v] fused on dim 0, B the three parts,
    ``{part}`` in ``b``) or 'squeeze' (A holds [1, ...], B the same without the leading 1)."""

    def __post_init__(self):
        if self.kind not in ("rename", "split3", "squeeze"):
            raise ValueError(f"Rule kind {self.kind!r}: expected rename, split3 or squeeze")


def _regex(pattern: str) -> re.Pattern:
    """A pattern with placeholders as a compiled full-match regex with named groups."""
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out += re.escape(pattern[pos : m.start()]) + f"(?P<{m.group(1)}>{_PLACEHOLDERS[m.group(1)]})"
        pos = m.end()
    return re.compile(out + re.escape(pattern[pos:]))


def prefixed(rules: list[Rule], a: str, b: str) -> list[Rule]:
    """The rules with ``a`` / ``b`` put before their A / B patterns (a tower inside a container)."""
    return [Rule(a + r.a, b + r.b, r.kind) for r in rules]


@dataclass
class RenameTable:
    """Rules read in either direction; the first rule whose pattern matches a key applies."""

    rules: list[Rule]
    unknown_a: str = "state dict has tensors with no known mapping"
    """Error text for side-A keys no rule matches (a list of the keys follows)."""
    unknown_b: str = "state dict has tensors with no known mapping"
    """The same for side-B keys."""
    _compiled: list = field(init=False, repr=False)

    def __post_init__(self):
        self._compiled = [(r, _regex(r.a), _regex(r.b)) for r in self.rules]

    def _find(self, key: str, side: int) -> tuple[Rule, dict] | None:
        """The first rule whose side-A (``side`` 1) or side-B (2) pattern matches ``key``, with
        the placeholders' values."""
        for compiled in self._compiled:
            m = compiled[side].fullmatch(key)
            if m:
                return compiled[0], m.groupdict()
        return None

    def _matched(self, state: dict, side: int, unknown: str) -> list[tuple]:
        """(key, tensor, rule, placeholder values) for every key of ``state``, read from side A
        (``side`` 1) or B (2); keys no rule matches are an error naming them."""
        hits = [(key, value, self._find(key, side)) for key, value in state.items()]
        missing = sorted(key for key, _, hit in hits if hit is None)
        if missing:
            raise ValueError(f"{unknown}: {missing[:8]}")
        return [(key, value, *hit) for key, value, hit in hits]

    def a_to_b(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Side-A keys -> side B (fused q/k/v split in thirds, leading 1 dropped)."""
        out = {}
        for key, value, rule, groups in self._matched(state, 1, self.unknown_a):
            target = rule.b.format(**groups, part="{part}")
            if rule.kind == "split3":
                if value.shape[0] % 3:
                    raise ValueError(f"{key}: fused qkv first dim {value.shape[0]} is not divisible by 3")
                for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[target.format(part=part)] = chunk.clone()
            elif rule.kind == "squeeze":
                if value.dim() != 3 or value.shape[0] != 1:
                    raise ValueError(f"{key}: expected shape [1, N, d], got {tuple(value.shape)}")
                out[target] = value[0]
            else:
                out[target] = value
        return out

    def b_to_a(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Side-B keys -> side A (q/k/v parts fused once all three are seen, leading 1 added)."""
        out: dict[str, torch.Tensor] = {}
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for _key, value, rule, groups in self._matched(state, 2, self.unknown_b):
            part = groups.pop("part", None)
            target = rule.a.format(**groups)
            if rule.kind == "split3":
                pending.setdefault(target, {})[part] = value
            elif rule.kind == "squeeze":
                out[target] = value[None].contiguous()
            else:
                out[target] = value
        for key, parts in pending.items():
            if set(parts) != {"q", "k", "v"}:
                raise ValueError(f"{key}: needs q, k and v projections, got {sorted(parts)}")
            out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        return out
