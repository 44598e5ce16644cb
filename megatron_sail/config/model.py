"""Model configs: vision encoder, pixel-shuffle projector, decoder LM, and the composed ModelConfig.

Which architecture each part is comes from its ``family`` field (a name in
``models/families``); configs without one (older model_config.yaml files) mean InternViT +
Qwen2. Recipes ``tiny()``, ``sail_2b()`` and ``sail_8b()`` return the shapes of SAIL-VL.md;
``sail_vl15_2b()``, ``sail_vl16_8b()``, ``sail_vl2_2b()``, ``sail_vl2_8b()`` and
``sail_vl2_30b_a3b()`` the later
releases (sources next to them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

VISION_FAMILY_CLASS_TOKENS: dict[str, int] = {"internvit": 1, "aimv2": 0, "siglip": 0}
"""The vision families a config may name, with the class tokens each encoder prepends to a
tile's patches. models/families registers one spec per name and refuses to import when its
names and these differ."""
LANGUAGE_FAMILY_NAMES: tuple[str, ...] = ("qwen2", "qwen3", "qwen3_moe")
"""The language families a config may name (models/families checks the same way)."""


def check_family(kind: str, name: str, known) -> None:
    """Unknown family names fail where the config is made, not deep inside the build."""
    if name not in known:
        raise ValueError(f"unknown {kind} family {name!r}; known: {sorted(known)}")


@dataclass(frozen=True)
class TokenGeometry:
    """How one square tile becomes tokens: inside the encoder, and after the pixel-shuffle merge."""

    grid: int
    """Patches per side of the tile."""
    class_tokens: int
    """Extra tokens the encoder prepends (InternViT: 1 class token; AIMv2: 0)."""
    merge: int
    """Patches merged per side by the pixel shuffle (2 for ratio 0.5)."""
    odd_grid: str = "error"
    """A grid the merge does not divide: 'error' (refused) or 'pad' (zero-padded on the
    bottom/right to the next multiple; ``ProjectorConfig.odd_grid``, set by ModelConfig)."""

    @property
    def padded(self) -> bool:
        """Whether the pixel shuffle sees zero-padded patch positions."""
        return self.odd_grid == "pad" and self.grid % self.merge != 0

    @property
    def patches(self) -> int:
        """Patch tokens of one tile."""
        return self.grid * self.grid

    @property
    def encoder_tokens(self) -> int:
        """Tokens one tile is inside the encoder (patches + class tokens)."""
        return self.patches + self.class_tokens

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens one tile turns into after the merge (what <IMG_CONTEXT> runs hold)."""
        if self.grid % self.merge and self.odd_grid != "pad":
            raise ValueError(
                f"tile of {self.grid}x{self.grid} patches not divisible by merge "
                f"{self.merge} (ProjectorConfig.odd_grid='pad' zero-pads it)"
            )
        return (-(-self.grid // self.merge)) ** 2


@dataclass
class VisionConfig:
    """Vision encoder (fields as InternViT names them; a family may ignore some)."""

    family: str = "internvit"
    """Vision family (models/families registry): 'internvit', 'aimv2' or 'siglip'."""
    hidden_size: int = 1024
    """Width of the ViT."""
    num_layers: int = 24
    """Transformer layers."""
    num_heads: int = 16
    """Attention heads (no GQA in the ViT)."""
    ffn_hidden_size: int = 4096
    """MLP width (GELU)."""
    patch_size: int = 14
    """Square patch side in pixels (conv kernel = stride)."""
    image_size: int = 448
    """Tile side the position embeddings were trained at; other tile sizes interpolate them."""
    norm_type: str = "layer_norm"
    """'layer_norm' or 'rms_norm'."""
    norm_eps: float = 1e-6
    """Epsilon of the block norms (QK-norm always uses 1e-6, as InternVL does)."""
    qkv_bias: bool = True
    """Bias on the q/k/v projections."""
    qk_norm: bool = False
    """RMSNorm over the full q and k width before attention (InternViT-6B style)."""
    layer_scale_init: float = 0.1
    """Initial value of the per-channel layer scales ls1/ls2."""
    drop_path_rate: float = 0.0
    """Max stochastic-depth rate (linearly increasing over layers), only while training."""
    select_layer: int = -1
    """Layer whose output feeds the projector (-1 = last, -2 = second to last, ...)."""

    def __post_init__(self):
        check_family("vision", self.family, VISION_FAMILY_CLASS_TOKENS)
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"VisionConfig.norm_type must be layer_norm or rms_norm, got {self.norm_type!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"VisionConfig.hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig.image_size {self.image_size} must be a multiple of "
                f"patch_size {self.patch_size}"
            )
        if not (-self.num_layers <= self.select_layer < self.num_layers) or self.select_layer == 0:
            raise ValueError(
                f"VisionConfig.select_layer={self.select_layer} out of range for "
                f"{self.num_layers} layers (use -1.. -N or 1..N-1)"
            )

    @property
    def layers_used(self) -> int:
        """How many ViT layers run: layers after select_layer are never computed."""
        return self.num_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer


@dataclass
class ProjectorConfig:
    """Pixel shuffle + MLP ("mlp1"): LayerNorm -> Linear -> GELU -> Linear."""

    downsample_ratio: float = 0.5
    """Pixel-shuffle ratio; 0.5 merges 2x2 patches into one token (InternVL "v2" order)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon (torch default, as in InternVL's mlp1)."""
    odd_grid: str = "error"
    """Patch grids the merge does not divide (27x27 for SigLIP-so400m-patch14-384): 'error'
    (refused) or 'pad' (zero-padded on the bottom/right to the next multiple before the pixel
    shuffle, as Ovis2 does: ceil(grid/merge)^2 tokens per tile)."""

    def __post_init__(self):
        if self.odd_grid not in ("error", "pad"):
            raise ValueError(f"ProjectorConfig.odd_grid must be 'error' or 'pad', got {self.odd_grid!r}")

    @property
    def merge(self) -> int:
        """Patches merged per side (2 for ratio 0.5)."""
        m = round(1 / self.downsample_ratio)
        if abs(m * self.downsample_ratio - 1) > 1e-6:
            raise ValueError(f"downsample_ratio {self.downsample_ratio} must be 1/integer")
        return m


@dataclass
class LanguageConfig:
    """Decoder LM (Qwen-style: RMSNorm, SwiGLU, RoPE, GQA)."""

    family: str = "qwen2"
    """Language family (models/families registry): 'qwen2' (also Qwen2.5) or 'qwen3'."""
    hidden_size: int = 1536
    """Model width."""
    num_layers: int = 28
    """Decoder layers."""
    num_heads: int = 12
    """Query heads."""
    num_kv_heads: int = 2
    """Key/value heads (GQA groups)."""
    ffn_hidden_size: int = 8960
    """SwiGLU width."""
    vocab_size: int = 151936
    """Embedding rows; the trainer sets it from the tokenizer (must be divisible by TP)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    tie_embeddings: bool = True
    """Share input embedding and output layer weights."""
    max_position_embeddings: int = 32768
    """Longest sequence RoPE is prepared for."""
    qkv_bias: bool = True
    """Bias on q/k/v (Qwen2: yes; Qwen3: no; no other linear has a bias)."""
    kv_channels: int | None = None
    """Per-head width when it is not hidden_size / num_heads (Qwen3's head_dim); None = derived."""
    num_experts: int = 0
    """Routed experts per MoE layer (Qwen3-MoE's num_experts); 0 = a dense SwiGLU MLP."""
    moe_ffn_hidden_size: int | None = None
    """SwiGLU width of one expert (Qwen3-MoE's moe_intermediate_size); None = ffn_hidden_size."""
    moe_router_topk: int = 8
    """Experts each token is routed to (num_experts_per_tok)."""
    moe_norm_topk_prob: bool = True
    """Renormalize the top-k routing weights to sum to 1 (Qwen3-MoE's norm_topk_prob)."""
    moe_aux_loss_coeff: float = 0.001
    """Load-balancing auxiliary loss coefficient (Qwen3-MoE's router_aux_loss_coef)."""

    def __post_init__(self):
        check_family("language", self.family, LANGUAGE_FAMILY_NAMES)
        if self.num_heads % self.num_kv_heads or (
            self.kv_channels is None and self.hidden_size % self.num_heads
        ):
            raise ValueError(
                f"LanguageConfig: hidden_size {self.hidden_size} must be divisible by num_heads "
                f"{self.num_heads} (or kv_channels set), and num_heads by num_kv_heads "
                f"{self.num_kv_heads}"
            )
        if self.num_experts and not 0 < self.moe_router_topk <= self.num_experts:
            raise ValueError(
                f"LanguageConfig: moe_router_topk {self.moe_router_topk} must be in "
                f"1..num_experts ({self.num_experts})"
            )

    @property
    def is_moe(self) -> bool:
        """Whether the decoder's MLPs are routed mixtures of experts."""
        return self.num_experts > 0

    @property
    def expert_ffn_hidden_size(self) -> int:
        """SwiGLU width of one expert."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.kv_channels or self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    """The whole VLM."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    """Image encoder."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """Vision-to-language adapter."""
    language: LanguageConfig = field(default_factory=LanguageConfig)
    """Decoder LM."""
    img_context_token_id: int = 151667
    """Token id of <IMG_CONTEXT>; its embeddings are replaced by visual tokens."""

    def geometry(self, tile_size: int | None = None) -> TokenGeometry:
        """The token geometry of tiles of ``tile_size`` px (default: the trained size): grid =
        tile / patch, the family's class tokens, the projector's merge and odd-grid rule."""
        v = self.vision
        return TokenGeometry(
            grid=(tile_size or v.image_size) // v.patch_size,
            class_tokens=VISION_FAMILY_CLASS_TOKENS[v.family],
            merge=self.projector.merge,
            odd_grid=self.projector.odd_grid,
        )

    def tokens_per_tile(self, tile_size: int | None = None) -> int:
        """Visual tokens one tile of side ``tile_size`` (default: trained size) turns into."""
        return self.geometry(tile_size).tokens_per_tile


def tiny(vocab_size: int = 512) -> ModelConfig:
    """A few-MB model for tests and the quickstart: same structure, tiny shapes."""
    return ModelConfig(
        vision=VisionConfig(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            ffn_hidden_size=128,
            patch_size=8,
            image_size=32,
            drop_path_rate=0.0,
        ),
        language=LanguageConfig(
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            ffn_hidden_size=256,
            vocab_size=vocab_size,
            rope_theta=10000.0,
            tie_embeddings=True,
            max_position_embeddings=4096,
        ),
        img_context_token_id=vocab_size - 1,
    )


def tiny_moe(vocab_size: int = 512) -> ModelConfig:
    """``tiny`` with a Qwen3-MoE LM (QK-norm, no qkv bias, untied): 4 experts of SwiGLU 64 per
    layer, top-2 renormalized, aux-loss 0.001 (Qwen3-MoE's default). For expert-parallel runs
    on CPU (--expert-model-parallel-size 2 or 4) and the MoE tests."""
    cfg = tiny(vocab_size)
    cfg.language = replace(
        cfg.language,
        family="qwen3_moe",
        qkv_bias=False,
        tie_embeddings=False,
        num_experts=4,
        moe_ffn_hidden_size=64,
        moe_router_topk=2,
    )
    return cfg


def _internvit_300m() -> VisionConfig:
    """InternViT-300M-448px (SAIL-VL.md)."""
    return VisionConfig(
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        ffn_hidden_size=4096,
        patch_size=14,
        image_size=448,
        norm_type="layer_norm",
        norm_eps=1e-6,
        qkv_bias=True,
        qk_norm=False,
        layer_scale_init=0.1,
        drop_path_rate=0.1,
        select_layer=-1,
    )


def sail_2b() -> ModelConfig:
    """SAIL-VL-2B: InternViT-300M + Qwen2.5-1.5B (tied embeddings)."""
    return ModelConfig(
        vision=_internvit_300m(),
        language=LanguageConfig(
            hidden_size=1536,
            num_layers=28,
            num_heads=12,
            num_kv_heads=2,
            ffn_hidden_size=8960,
            vocab_size=151936,
            tie_embeddings=True,
        ),
    )


def sail_8b() -> ModelConfig:
    """SAIL-VL-8B: InternViT-300M + Qwen2.5-7B (untied embeddings)."""
    return ModelConfig(
        vision=_internvit_300m(),
        language=LanguageConfig(
            hidden_size=3584,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            ffn_hidden_size=18944,
            vocab_size=152064,
            tie_embeddings=False,
        ),
    )


# ----------------------------------------------------------------- later releases (AIMv2 / Qwen3)
# Sources (when they were read, details and URLs: docs/architecture.md, "What the released
# SAIL-VL models use"): the SAIL-VL2-2B hub config.json (vision_config, llm_config) and
# model.safetensors.index.json (mirrored in GitHub Nagareshita/pdf_analyzer, SAIL-VL2-2B/);
# apple/aimv2-huge-patch14-* config.json; the Qwen3-8B and Qwen3-30B-A3B configs; the model
# cards' architecture tables (SAIL-VL-1d5-2B, SAIL-VL2-*); the SAIL-VL2 report (arXiv 2509.14033).

SAIL_VL2_IMG_CONTEXT_ID = 151671
"""<IMG_CONTEXT> id of SAIL-VL2 (hard-coded in its remote modeling_sailvl.py ``generate``); the
trainer and converters read the real id from the tokenizer, this is only the recipe default."""


def _aimv2_huge() -> VisionConfig:
    """AIMv2-Huge at 448 px = SAIL-VL2's SAILViT-Huge: 1536 wide, 24 layers, 12 heads, SwiGLU
    4096, patch 14, RMSNorm eps 1e-5, no biases, no class token (SAIL-VL2-2B vision_config,
    whose configuration_sailvit.py is AIMv2-Huge-448's). select_layer -1: SAIL-VL2-2B's config.
    drop_path_rate 0: not published for either model (InternViT's 0.1 comes from InternVL)."""
    return VisionConfig(
        family="aimv2",
        hidden_size=1536,
        num_layers=24,
        num_heads=12,
        ffn_hidden_size=4096,
        patch_size=14,
        image_size=448,
        norm_type="rms_norm",
        norm_eps=1e-5,
        qkv_bias=False,
        qk_norm=False,
        drop_path_rate=0.0,
        select_layer=-1,
    )


def _qwen25_1p5b() -> LanguageConfig:
    """Qwen2.5-1.5B (SAIL-VL.md; the LM of SAIL-VL-2B and SAIL-VL-1.5-2B)."""
    return LanguageConfig(
        hidden_size=1536,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        ffn_hidden_size=8960,
        vocab_size=151936,
        tie_embeddings=True,
    )


def sail_vl15_2b() -> ModelConfig:
    """SAIL-VL-1.5-2B: AIMv2-Huge (448 px) + Qwen2.5-1.5B (model card table). The encoder's
    shape is AIMv2-Huge's config; select_layer -1 is SAIL-VL2's (1.5's config.json not read)."""
    return ModelConfig(vision=_aimv2_huge(), language=_qwen25_1p5b())


def sail_vl16_8b() -> ModelConfig:
    """SAIL-VL-1.6-8B: SAILViT-Huge (= AIMv2-Huge shape) + Qwen2.5-7B (as sail_8b). Its
    config.json (GitHub copy earl-juanico/rca, SAIL-VL-1d6-8B/): vision ``aimv2`` 1536 / 24
    layers / 12 heads / 4096 / patch 14 / 448 / eps 1e-5, no biases; LLM Qwen2ForCausalLM 3584 /
    28 / 28:4 heads / 18944 / vocab 152064, untied; select_layer -1; the SAILViT card names the
    tower ("Equipped with the SAILViT-Huge, our SAIL-VL-1d5-2B and SAIL-VL-1d6-8B ...")."""
    return ModelConfig(vision=_aimv2_huge(), language=sail_8b().language)


def sail_vl2_2b() -> ModelConfig:
    """SAIL-VL2-2B: SAILViT-Huge + Qwen3-1.7B, every number from its config.json (28 layers,
    2048 wide, 16/8 heads of 128, SwiGLU 6144, vocab 151936, tied, RoPE 1e6, 40960 positions)."""
    return ModelConfig(
        vision=_aimv2_huge(),
        language=LanguageConfig(
            family="qwen3",
            hidden_size=2048,
            num_layers=28,
            num_heads=16,
            num_kv_heads=8,
            kv_channels=128,
            ffn_hidden_size=6144,
            vocab_size=151936,
            tie_embeddings=True,
            qkv_bias=False,
            max_position_embeddings=40960,
        ),
        img_context_token_id=SAIL_VL2_IMG_CONTEXT_ID,
    )


def sail_vl2_8b() -> ModelConfig:
    """SAIL-VL2-8B: SAILViT-Huge + Qwen3-8B (model card). The LM shape is Qwen3-8B's config.json
    (36 layers, 4096 wide, 32/8 heads of 128, SwiGLU 12288, vocab 151936, untied); SAIL-VL2-8B's
    own config.json was not read."""
    return ModelConfig(
        vision=_aimv2_huge(),
        language=LanguageConfig(
            family="qwen3",
            hidden_size=4096,
            num_layers=36,
            num_heads=32,
            num_kv_heads=8,
            kv_channels=128,
            ffn_hidden_size=12288,
            vocab_size=151936,
            tie_embeddings=False,
            qkv_bias=False,
            max_position_embeddings=40960,
        ),
        img_context_token_id=SAIL_VL2_IMG_CONTEXT_ID,
    )


def sail_vl2_30b_a3b() -> ModelConfig:
    """SAIL-VL2-30B-A3B (the report's MoE model on Qwen3-30B-A3B; no hub checkpoint seen).

    LM = Qwen3-30B-A3B: 48 layers, 2048 wide, 32/4 heads of 128, 128 experts of SwiGLU 768,
    top-8 renormalized, aux-loss 0.001, vocab 151936, untied. ``ffn_hidden_size`` is unused
    (every layer is sparse; 6144 is the HF config's ``intermediate_size``). ASSUMED: the vision
    encoder is SAILViT-Huge - the report says "fixed-resolution SAIL-ViT" without a size, and
    Huge is the only fixed-resolution SAILViT the hub lists."""
    return ModelConfig(
        vision=_aimv2_huge(),
        language=LanguageConfig(
            family="qwen3_moe",
            hidden_size=2048,
            num_layers=48,
            num_heads=32,
            num_kv_heads=4,
            kv_channels=128,
            ffn_hidden_size=6144,
            vocab_size=151936,
            tie_embeddings=False,
            qkv_bias=False,
            max_position_embeddings=40960,
            num_experts=128,
            moe_ffn_hidden_size=768,
            moe_router_topk=8,
            moe_norm_topk_prob=True,
            moe_aux_loss_coeff=0.001,
        ),
        img_context_token_id=SAIL_VL2_IMG_CONTEXT_ID,
    )
