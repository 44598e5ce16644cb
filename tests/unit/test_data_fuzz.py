"""Fuzz: tools/preprocess_data.py on a few hundred generated hostile records mixed with good ones.

The run must finish (a subprocess with a timeout, so a hang fails instead of stalling the suite),
keep every good sample, and report every bad record as a reject with the expected reason, with
1 and 2 workers giving identical files.
"""

import filecmp
import io
import json
import os
import random
import struct
import subprocess
import sys
import zlib

from PIL import Image

from megatron_sail.data import indexed
from megatron_sail.data.loading.dataset import PackedDataset
from testkit import ROOT, subprocess_env

N_RECORDS = 320
CONV = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encoded(size, colour, fmt) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


class Corpus:
    """Writes the image files and JSONL lines; remembers what each line must become."""

    def __init__(self, tmp, rng: random.Random):
        self.root, self.rng = tmp / "root", rng
        self.outside = tmp / "outside"
        self.root.mkdir()
        self.outside.mkdir()
        (self.outside / "secret.png").write_bytes(encoded((32, 32), (1, 1, 1), "PNG"))
        os.mkfifo(self.root / "pipe.png")
        (self.root / "adir").mkdir()
        os.symlink(self.outside / "secret.png", self.root / "out_link.png")
        os.symlink(self.root / "loop_b", self.root / "loop_a")
        os.symlink(self.root / "loop_a", self.root / "loop_b")
        os.symlink(self.root / "gone.png", self.root / "dangling.png")
        self.lines: list[bytes] = []
        self.expected: dict[int, set] = {}  # line number -> allowed reasons
        self.good_images: set[bytes] = set()
        self.good = 0
        self.n = 0

    def _file(self, data: bytes, ext: str) -> str:
        self.n += 1
        name = f"f{self.n}.{ext}"
        (self.root / name).write_bytes(data)
        return name

    def add(self, line: bytes, reasons=None) -> None:
        self.lines.append(line)
        if reasons:
            self.expected[len(self.lines)] = set(reasons)
        else:
            self.good += 1

    def record(self, image, reasons=None, text="What?") -> None:
        conv = [{"from": "human", "value": f"<image>\n{text}"}, CONV[1]]
        self.add(json.dumps({"image": image, "conversations": conv}).encode(), reasons)

    # --- good records -------------------------------------------------------------------------
    def good_image(self) -> None:
        k = len(self.lines)
        colour = (k % 251, (k * 7) % 253, (k * 13) % 255)
        fmt = self.rng.choice(["PNG", "JPEG"])
        data = encoded(self.rng.choice([(32, 32), (64, 32), (40, 72)]), colour, fmt)
        self.good_images.add(data)
        self.record(self._file(data, fmt.lower()))

    def good_text(self) -> None:
        conv = [{"from": "human", "value": "Hi \u00e9\u4e2d"}, {"from": "gpt", "value": "yo"}]
        self.add(json.dumps({"conversations": conv}).encode())

    # --- hostile records ----------------------------------------------------------------------
    def huge_header(self) -> None:
        w, h = self.rng.choice(
            [(30000, 30000), (20000, 20000), (12000, 12000), (65535, 65535), (2**31 - 1, 3)]
        )
        kind = self.rng.choice(["png", "jpg", "bmp", "gif"])
        if kind == "png":
            data = (
                b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\x00" * 32))
                + chunk(b"IEND", b"")
            )
            reasons = {"image_too_large"}
        elif kind == "jpg":
            w, h = min(w, 65535), min(h, 65535)
            sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
            sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"
            data = b"\xff\xd8" + sof + sos + b"\x12\x34" + b"\xff\xd9"
            reasons = {"image_too_large"}
        elif kind == "bmp":
            data = (
                b"BM"
                + struct.pack("<IHHI", 54, 0, 0, 54)
                + struct.pack(
                    "<IiiHHIIiiII", 40, min(w, 2**31 - 1), min(h, 2**31 - 1), 1, 24, 0, 0, 0, 0, 0, 0
                )
            )
            reasons = {"image_too_large", "undecodable_image", "truncated_image"}
        else:
            data = b"GIF89a" + struct.pack("<HHBBB", min(w, 65535), min(h, 65535), 0, 0, 0) + b";"
            reasons = {"image_too_large", "undecodable_image", "truncated_image"}
        self.record(self._file(data, kind), reasons)

    def truncated(self) -> None:
        fmt = self.rng.choice(["PNG", "JPEG", "BMP"])
        data = encoded((48, 48), (200, 100, 50), fmt)
        cut = data[: self.rng.randrange(0, len(data) - 8)]
        self.record(self._file(cut, fmt.lower()), {"truncated_image", "undecodable_image"})

    def garbage(self) -> None:
        data = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 200)))
        self.record(self._file(data, "png"), {"truncated_image", "undecodable_image"})

    def bad_encoding(self) -> None:
        choice = self.rng.randrange(4)
        body = json.dumps({"conversations": CONV}).encode()
        if choice == 0:  # a raw invalid byte inside a string
            self.add(body.replace(b"What?", b"Wh\xffat?"), {"bad_encoding"})
        elif choice == 1:  # a truncated multi-byte sequence
            self.add(body.replace(b"What?", b"Wh\xe4\xb8"), {"bad_encoding"})
        elif choice == 2:  # a lone surrogate escape in the text
            self.add(body.replace(b"What?", b"Wh\\udfffat"), {"bad_encoding"})
        else:  # a lone surrogate in the image path
            self.add(
                json.dumps({"image": "x.png", "conversations": CONV})
                .encode()
                .replace(b"x.png", b"\\ud800.png"),
                {"bad_encoding"},
            )

    def special_file(self) -> None:
        path, reasons = self.rng.choice(
            [
                ("pipe.png", {"not_a_regular_file"}),
                ("adir", {"not_a_regular_file"}),
                ("/dev/zero", {"path_outside_root"}),
                ("/dev/null", {"path_outside_root"}),
                ("loop_a", {"missing_image"}),
                ("dangling.png", {"missing_image"}),
                ("nope.png", {"missing_image"}),
            ]
        )
        self.record(path, reasons)

    def path_escape(self) -> None:
        path = self.rng.choice(
            [
                "../outside/secret.png",
                "../../../../../../etc/passwd",
                "adir/../../outside/secret.png",
                "out_link.png",
                str(self.outside / "secret.png"),
                "file:///etc/passwd",
            ]
        )
        self.record(path, {"path_outside_root"})

    def broken_json(self) -> None:
        line, reasons = self.rng.choice(
            [
                (b'{"image": "a.png", "conversations": [', {"invalid_json"}),
                (b"[1, 2, 3]", {"invalid_json"}),
                (b'{"conversations": 5}', {"bad_sample"}),
                (b'{"image": 5, "conversations": []}', {"bad_sample"}),
                (json.dumps({"image": "a\u0000b.png", "conversations": CONV}).encode(), {"bad_sample"}),
                (
                    json.dumps({"conversations": [{"from": "human", "value": "hi"}]}).encode(),
                    {"no_assistant_turn"},
                ),
                (b"\x00\x01\x02", {"invalid_json"}),
            ]
        )
        self.add(line, reasons)


def test_fuzzed_hostile_records_are_rejects_and_good_samples_survive(tiny_tokenizer, tmp_path):
    rng = random.Random(12)
    corpus = Corpus(tmp_path, rng)
    hostile = [
        corpus.huge_header,
        corpus.truncated,
        corpus.garbage,
        corpus.bad_encoding,
        corpus.special_file,
        corpus.path_escape,
        corpus.broken_json,
    ]
    for _ in range(N_RECORDS):
        pick = rng.random()
        if pick < 0.4:
            corpus.good_image()
        elif pick < 0.5:
            corpus.good_text()
        else:
            rng.choice(hostile)()
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(corpus.lines) + b"\n")
    assert len(corpus.expected) > 120 and corpus.good > 120
    outs = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        cmd = [
            sys.executable,
            str(ROOT / "tools" / "preprocess_data.py"),
            "--input",
            str(tmp_path / "in.jsonl"),
            "--image-root",
            str(corpus.root),
            "--tokenizer",
            tiny_tokenizer,
            "--output-prefix",
            prefix,
            "--seq-length",
            "512",
            "--tile-size",
            "32",
            "--tokens-per-tile",
            "4",
            "--max-tiles",
            "4",
            "--packing-buffer",
            "40",
            "--workers",
            str(workers),
            "--max-reject-rate",
            "1",
        ]
        env = subprocess_env()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        assert summary["records"] == N_RECORDS and summary["samples"] == corpus.good
        rejects = [json.loads(x) for x in indexed.read_rejects(prefix)]
        got = {int(r["key"].split()[1]): r for r in rejects}
        assert len(got) == len(rejects) and sorted(got) == sorted(corpus.expected)
        for line, r in got.items():
            assert r["reason"] in corpus.expected[line], (line, r, corpus.lines[line - 1][:120])
            assert r["detail"] and r["source"] == str(tmp_path / "in.jsonl") and " at 0x" not in r["detail"]
        assert sum(summary["rejects"].values()) == len(corpus.expected)
        ds = PackedDataset(prefix)
        assert {im.data for i in range(len(ds)) for im in ds[i].images} == corpus.good_images
        outs.append(prefix)
    for a, b in zip(indexed.final_paths(outs[0]), indexed.final_paths(outs[1])):
        assert filecmp.cmp(a, b, shallow=False), a
