"""A tiny stand-in for the remote code that SAIL-VL's InternVL-chat checkpoints carry.

The hub checkpoints ship ``configuration_internvl_chat.py``, ``modeling_internvl_chat.py``,
``conversation.py`` (and InternViT's files) and name them in config.json's ``auto_map`` so that
``AutoModel.from_pretrained(path, trust_remote_code=True)`` builds ``InternVLChatModel``. The real
files are not available here; these have the same file names, class names, auto_map entries and
parameter names (InternViT's ``vision_model.*``, ``mlp1``, a Qwen2 ``language_model``), enough for
transformers to build the model from an export and load every tensor into it.
"""

from pathlib import Path

CONFIGURATION = """
from transformers import PretrainedConfig, Qwen2Config


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, downsample_ratio=0.5, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = dict(vision_config or {})
        self.llm_config = Qwen2Config(**{k: v for k, v in (llm_config or {}).items()
                                        if k not in ("architectures", "model_type")})
        self.downsample_ratio = downsample_ratio

    def to_dict(self):
        out = super().to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        return out
"""

MODELING = """
import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2ForCausalLM

from .configuration_internvl_chat import InternVLChatConfig


class _Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)


class _Mlp(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)


class _Layer(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.attn, self.mlp = _Attention(d), _Mlp(d, f)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ls1, self.ls2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))


class _Embeddings(nn.Module):
    def __init__(self, d, patch, image):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, patch, patch)
        self.position_embedding = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, d))


class _Encoder(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(v["hidden_size"], v["intermediate_size"])
                                    for _ in range(v["num_hidden_layers"]))


class InternVisionModel(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.embeddings = _Embeddings(v["hidden_size"], v["patch_size"], v["image_size"])
        self.encoder = _Encoder(v)


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        v, llm = config.vision_config, config.llm_config
        d = v["hidden_size"] * int(1 / config.downsample_ratio) ** 2
        self.vision_model = InternVisionModel(v)
        self.mlp1 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, llm.hidden_size), nn.GELU(),
                                  nn.Linear(llm.hidden_size, llm.hidden_size))
        self.language_model = Qwen2ForCausalLM(llm)
        self.post_init()
"""

CONVERSATION = '''
"""Conversation templates (stand-in): SAIL-VL's "sailvl-chat" is ChatML."""
TEMPLATES = {"sailvl-chat": "<|im_start|>{role}\\n{content}<|im_end|>\\n"}
'''

AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
}
FILES = {
    "configuration_internvl_chat.py": CONFIGURATION,
    "modeling_internvl_chat.py": MODELING,
    "conversation.py": CONVERSATION,
}


def add_remote_code(folder: Path) -> None:
    """Write the fixture files into an InternVL-chat checkpoint folder and name them in its
    config.json (auto_map), as the hub checkpoints do."""
    import json

    for name, text in FILES.items():
        (folder / name).write_text(text.lstrip())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = AUTO_MAP
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
