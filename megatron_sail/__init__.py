"""megatron_sail: SAIL-VL-style vision-language models on Megatron-Core (see README.md)."""

import warnings as _warnings

# Megatron-Core warns at import, once per module and process, that Transformer Engine or Apex is
# missing and that it falls back to torch: expected on a CPU machine and said again per rank, it
# drowned every command typed by hand. Only these known fallback notices are silenced; every other
# warning still shows. (platform/ reports what the run actually uses.)
for _pattern in (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"Transformer Engine is not installed",
    # TransformerConfig's own default (cuda_graph_scope) trips its deprecation
    # notice on every model build; nothing a user can act on.
    r"full scope is deprecated",
):
    _warnings.filterwarnings("ignore", message=_pattern, category=UserWarning)
del _pattern
