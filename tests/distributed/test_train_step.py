"""Pieces of the train step that need a pipeline group: first-stage image results shared."""

import torch


def _share(rank):
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.data.loading.collate import MicroBatch
    from megatron_sail.platform import distributed as D
    from megatron_sail.training.step import share_first_stage_images

    D.initialize(ParallelConfig(pp=2))

    def mb(i):
        mask = torch.ones(2, 8)
        tiles = torch.zeros(0, 3, 1, 1)
        counts = (0, 0, 0)
        if rank == 0:  # the first stage decoded: image i of row 1 failed, its sample is masked
            mask[1, 2 + i : 6] = 0.0
            tiles = torch.randn(3 + i, 3, 4, 4)
            counts = (2 + i, 3 + i, 1)
        return MicroBatch(
            tokens=torch.full((2, 8), rank),
            labels=torch.zeros(2, 8, dtype=torch.long),
            loss_mask=mask,
            cu_seqlens=torch.tensor([0, 8, 16], dtype=torch.int32),
            max_seqlen=8,
            tiles=tiles,
            num_images=counts[0],
            num_tiles=counts[1],
            decode_failures=counts[2],
            failed_sources=[],
        )

    out = share_first_stage_images([mb(0), mb(1)])
    return [
        (b.loss_mask, b.num_images, b.num_tiles, b.decode_failures, b.tokens[0, 0].item(), b.tiles.shape[0])
        for b in out
    ]


def test_later_stages_get_first_stage_masks_and_counts(launcher):
    first, last = launcher(_share, 2, timeout=120)
    for i, (a, b) in enumerate(zip(first, last)):
        assert torch.equal(a[0], b[0]) and a[0][1].sum() < 8  # mask with the failed sample
        assert a[1:4] == b[1:4] == (2 + i, 3 + i, 1)
        assert (a[4], b[4]) == (0, 1)  # tokens stay each rank's own
        assert (a[5], b[5]) == (3 + i, 0)  # later stages hold no tiles


def _fp8_configs(rank):
    import model_cases as mc
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.platform import distributed as D
    from megatron_sail.training.precision import apply_fp8

    D.initialize(ParallelConfig())
    out = []
    for vit in (False, True):
        model = mc.build_ours(mc.variant("base"))
        apply_fp8(model, "hybrid", "tensorwise", vit)
        layer = model.language_model.decoder.layers[0]
        out.append(
            (
                model.language_model.config.fp8,
                layer.config.fp8,
                model.language_model.config.fp8_recipe,
                model.vision_model.config.fp8,
            )
        )
    return out


def test_fp8_reaches_the_lm_and_optionally_the_vit(launcher):
    """--fp8-format lands in the TransformerConfig every LM layer reads; the ViT only with --fp8-vit."""
    lm_only, both = launcher(_fp8_configs, 1, timeout=120)[0]
    assert lm_only == ("hybrid", "hybrid", "tensorwise", None)
    assert both == ("hybrid", "hybrid", "tensorwise", "hybrid")
