"""Tokenizer loading (special tokens added) and the ChatML template + loss mask."""

import json

import numpy as np
import pytest

from megatron_sail.config.data import TemplateConfig
from megatron_sail.data.template import ChatTemplate, SampleError, normalize_turns
from megatron_sail.data.tokenizer import IMG_CONTEXT, SPECIAL_TOKENS, load_tokenizer
from megatron_sail.demo.generator import train_tokenizer

TEXTS = ["What colour is the shape?", "red", "blue circle on the left", "Describe the image."] * 5


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_tokenizer(TEXTS, path, vocab_size=300)
    return load_tokenizer(path)


def test_missing_special_tokens_are_added_and_reported(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(
        TEXTS,
        trainers.BpeTrainer(
            vocab_size=280, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    path = str(tmp_path / "plain.json")
    t.save(path)
    base = t.get_vocab_size()
    logs = []
    tok = load_tokenizer(path, log=logs.append)
    assert tok.added == list(SPECIAL_TOKENS)
    assert len(logs) == 1 and "<IMG_CONTEXT>" in logs[0]
    ids = sorted(vars(tok.special).values())
    assert ids == list(range(base, base + len(SPECIAL_TOKENS)))
    assert tok.vocab_size == base + len(SPECIAL_TOKENS)
    # encode() is plain text: a literal "<IMG_CONTEXT>" in user text is not the special id
    assert tok.special.img_context not in tok.encode("look: " + IMG_CONTEXT)


def test_tokenizer_directory_and_missing_path(tmp_path, tok):
    d = tmp_path / "dir"
    d.mkdir()
    with open(tok.path) as f:
        (d / "tokenizer.json").write_text(f.read())
    again = load_tokenizer(str(d))
    assert again.special == tok.special and again.added == []
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(tmp_path / "nope"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(str(bad))


def test_sentencepiece_tokenizer_gets_special_ids(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(TEXTS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60, model_type="bpe", minloglevel=2
    )
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert tok.added == list(SPECIAL_TOKENS) and tok.vocab_size == 60 + len(SPECIAL_TOKENS)
    ids = tok.encode("red circle")
    text = tok.decode([tok.special.img_start] + ids + [tok.special.im_end])
    assert text == "<img>red circle<|im_end|>"


def test_template_layout_and_loss_mask(tok):
    cfg = TemplateConfig(system_prompt="Be brief.")
    turns = normalize_turns(
        [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Describe the image."},
            {"from": "gpt", "value": "blue circle on the left"},
        ],
        1,
        cfg,
    )
    tokens, mask = ChatTemplate(tok, cfg).render(turns, [3])
    sp = tok.special
    text = tok.decode(tokens)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 3 + "</img>\nWhat colour is the shape?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nDescribe the image.<|im_end|>\n"
        "<|im_start|>assistant\nblue circle on the left<|im_end|>\n"
    )
    assert tokens.dtype == np.int32 and mask.dtype == np.uint8 and len(mask) == len(tokens)
    # mask[t] == 1 iff token t+1 is assistant content or its <|im_end|>
    targets = tokens[1:][mask[:-1] == 1]
    assert tok.decode(targets) == "red<|im_end|>blue circle on the left<|im_end|>"
    assert mask[-1] == 0
    assert int((tokens == sp.img_context).sum()) == 3


def test_missing_placeholders_are_prepended_to_first_user_turn(tok):
    cfg = TemplateConfig()
    turns = normalize_turns(
        [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "red"}],
        2,
        cfg,
    )
    assert turns == [("system", "S"), ("user", "<image>\n<image>\nHi"), ("assistant", "red")]
    tokens, _ = ChatTemplate(tok, cfg).render(turns, [2, 4])
    assert int((tokens == tok.special.img_context).sum()) == 6
    assert int((tokens == tok.special.img_start).sum()) == 2


@pytest.mark.parametrize(
    "turns,n_images,reason",
    [
        ([{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}], 0, "unknown_role"),
        (
            [
                {"from": "human", "value": "x"},
                {"from": "system", "value": "y"},
                {"from": "gpt", "value": "z"},
            ],
            0,
            "unknown_role",
        ),
        ([{"from": "human", "value": "x"}], 0, "no_assistant_turn"),
        (
            [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "y"}],
            1,
            "placeholder_mismatch",
        ),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}], 0, "placeholder_mismatch"),
        ([{"from": "gpt", "value": "y"}], 1, "placeholder_mismatch"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}], 0, "bad_sample"),
    ],
)
def test_bad_conversations_name_their_reason(turns, n_images, reason):
    with pytest.raises(SampleError) as e:
        normalize_turns(json.loads(json.dumps(turns)), n_images, TemplateConfig())
    assert e.value.reason == reason
