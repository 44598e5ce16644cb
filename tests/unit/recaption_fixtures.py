"""Shared pieces of the recaption tests: demo-image shards, a JSONL pool, a tiny checkpoint, and a
local OpenAI-compatible HTTP server (http.server on localhost) that can fail on purpose."""

from __future__ import annotations

import io
import json
import random
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def demo_png(rng: random.Random) -> tuple[bytes, str]:
    """A demo scene (megatron_sail/demo/generator.py) as PNG bytes and its exact caption."""
    from megatron_sail.demo.generator import caption_of, make_scene

    img, facts = make_scene(rng)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), caption_of(facts)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    folder: Path, shards: int, per_shard: int, seed: int = 0, bad: dict | None = None
) -> list[str]:
    """img2dataset-like shards 00000.tar...: KEY.png + KEY.txt + KEY.json; ``bad`` maps a global
    sample index to replacement image bytes (e.g. b'not an image')."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for k in range(per_shard):
                n = s * per_shard + k
                key = f"{n:09d}"
                data, caption = demo_png(rng)
                if bad and n in bad:
                    data = bad[n]
                add_member(tar, f"{key}.png", data)
                add_member(tar, f"{key}.txt", f"noisy alt text {n}".encode())
                add_member(
                    tar,
                    f"{key}.json",
                    json.dumps({"key": key, "url": f"http://x/{n}", "truth": caption}).encode(),
                )
                keys.append(key)
    return keys


def read_output(tar_path: str) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of an output shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def tiny_checkpoint(root: Path, layout: str = "hf") -> str:
    """A tiny random InternVL with a BPE tokenizer (tools/make_tiny_hf_checkpoint.py)."""
    from megatron_sail.demo.tiny_checkpoint import TinyCheckpointConfig, make_tiny_checkpoint

    return str(
        make_tiny_checkpoint(
            root, TinyCheckpointConfig(layout=layout, vocab_size=300, tokenizer=True, seed=3)
        )
    )


class FakeVLMServer:
    """An OpenAI-compatible /chat/completions on localhost. The caption names the prompt and
    the image size, so tests can check what was sent. Behaviour per request body:
    ``answer(prompt, width, height)``, when given, is the reply text; ``fail_first`` calls answer
    HTTP 503; an image whose width is in ``empty_widths`` gets an empty answer, in
    ``length_widths`` finish_reason 'length', in ``error_widths`` HTTP 500 every time."""

    def __init__(
        self,
        fail_first: int = 0,
        delay_s: float = 0.0,
        empty_widths=(),
        length_widths=(),
        error_widths=(),
        answer=None,
    ):
        self.fail_first, self.delay_s, self.answer = fail_first, delay_s, answer
        self.empty, self.length, self.errors = set(empty_widths), set(length_widths), set(error_widths)
        self.calls, self.ok_calls, self.auth = 0, 0, []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                try:
                    server.handle(self)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _reply(self, h, code: int, obj) -> None:
        data = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def handle(self, h) -> None:
        import base64
        import time

        from PIL import Image

        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        with self.lock:
            self.calls += 1
            n = self.calls
            self.auth.append(h.headers.get("Authorization"))
        if self.delay_s:
            time.sleep(self.delay_s)
        if h.path != "/v1/chat/completions":
            return self._reply(h, 404, {"error": h.path})
        if n <= self.fail_first:
            return self._reply(h, 503, {"error": "warming up"})
        content = body["messages"][0]["content"]
        url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
        prompt = next(c["text"] for c in content if c["type"] == "text")
        w, hgt = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size
        if w in self.errors:
            return self._reply(h, 500, {"error": "boom"})
        text, finish = f"a {w}x{hgt} image; asked: {prompt}", "stop"
        if self.answer is not None:  # e.g. a judge: answer(prompt, width, height) -> text
            text = self.answer(prompt, w, hgt)
        if w in self.empty:
            text = "  "
        if w in self.length:
            finish = "length"
        with self.lock:
            self.ok_calls += 1
        self._reply(
            h,
            200,
            {
                "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"completion_tokens": len(text.split())},
                "model": body["model"],
            },
        )


def tiny_clip(folder: Path, texts: list[str]) -> str:
    """A tiny random transformers CLIP (1 layer, 16 wide, 32 px images, 8-d projection) with a
    BPE tokenizer trained on ``texts``, saved to ``folder``; returns the folder."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts * 3, trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "[PAD]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    layer = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=120, max_position_embeddings=32, **layer),
        vision_config=dict(image_size=32, patch_size=16, **layer),
        projection_dim=8,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)
