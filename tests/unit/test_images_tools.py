"""tools/render_tiles.py and tools/bench_images.py, run in-process on small images."""

import os

import numpy as np
import pytest

import bench_images as bench
import render_tiles as render
from megatron_sail.config.images import ImageConfig, TilingConfig
from megatron_sail.data.images import build_image_pipeline
from megatron_sail.data.images.files import load_record
from megatron_sail.data.images.synthetic import synthetic_jpeg


def test_render_tiles_writes_the_pipeline_tiles(tmp_path):
    image = tmp_path / "wide.jpg"
    image.write_bytes(synthetic_jpeg(150, 50, 1))
    out = tmp_path / "tiles.npy"
    assert (
        render.main(
            [
                "--backend",
                "pil",
                "--image",
                str(image),
                "--max-tiles",
                "4",
                "--tile-size",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    tiles = np.load(out)
    rec = load_record(str(image), TilingConfig(tile_size=32, max_tiles=4))
    assert rec.grid == (3, 1) and tiles.shape == (4, 3, 32, 32) and tiles.dtype == np.float32
    want, _ = build_image_pipeline(ImageConfig(backend="pil", tile_size=32)).tiles([rec])
    np.testing.assert_array_equal(tiles, want.numpy())
    assert not os.path.exists(f"{out}.tmp")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(SystemExit, match="bad.jpg"):
        render.main(["--backend", "pil", "--image", str(tmp_path / "bad.jpg"), "--out", str(out)])


def test_bench_prints_rates_last(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(96, 64), (40, 80), (64, 64)]):
        (folder / f"{i}.jpg").write_bytes(synthetic_jpeg(w, h, i))
    assert (
        bench.main(
            [
                "--images",
                str(folder),
                "--backend",
                "pil",
                "--threads",
                "1",
                "--tile-size",
                "32",
                "--max-tiles",
                "6",
                "--seconds",
                "0",
                "--batch",
                "2",
            ]
        )
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split())
    assert list(fields) == ["images_per_s", "tiles_per_s"]
    assert float(fields["tiles_per_s"]) > float(fields["images_per_s"]) > 0
    with pytest.raises(SystemExit, match="no .jpg"):
        bench.main(["--images", str(tmp_path / "empty"), "--backend", "pil"])
