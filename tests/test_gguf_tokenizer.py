"""GGUF tokenizers written as Hugging Face tokenizer files: byte-level BPE and SentencePiece."""

import json

import pytest
from ifp_mlx.convert.errors import ConversionError
from ifp_mlx.convert.gguf_reader import read_gguf

gguf = pytest.importorskip("gguf")
from gguf_writing import (  # noqa: E402
    CHAT_TEMPLATE,
    GPT2_TOKENS,
    add_gpt2_tokenizer,
    hf_tensors,
    load_tokenizers,
    write_gguf,
)


def test_gpt2_tokenizer_files(tmp_path):
    src = hf_tensors("llama", len(GPT2_TOKENS), True)
    ck = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", src))
    out = tmp_path / "tok"
    ck.write_tokenizer(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        False,
    )
    assert (
        json.loads((out / "special_tokens_map.json").read_text())["eos_token"]
        == "<|im_end|>"
    )

    tok, wrapped = load_tokenizers(out)
    assert tok.encode("hello world") == [
        GPT2_TOKENS.index(t) for t in ["hello", "Ġw", "o", "r", "l", "d"]
    ]
    assert tok.encode("12") == [GPT2_TOKENS.index("1"), GPT2_TOKENS.index("2")]
    text = "<|im_start|>user\nhello<|im_end|>"
    assert tok.encode(text)[0] == 1 and tok.encode(text)[-1] == 2
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "user\nhello"
    assert tok.decode(tok.encode("naïve 🤖")) == "naïve 🤖"
    assert wrapped.eos_token_id == 2


def test_qwen2_pre_tokenizer(tmp_path):
    ck = read_gguf(
        write_gguf(
            tmp_path / "m.gguf",
            "qwen2",
            hf_tensors("qwen2", len(GPT2_TOKENS), True),
            tokenizer=lambda w: add_gpt2_tokenizer(w, pre="qwen2", add_bos=True),
        )
    )
    ck.write_tokenizer(tmp_path / "tok")
    tok, _ = load_tokenizers(tmp_path / "tok")
    ids = tok.encode("hello\u0301 12")
    assert ids[0] == 1  # add_bos_token: the post-processor adds <|im_start|>
    # NFC composes o + combining acute into ó before byte-level BPE.
    assert tok.decode(ids[1:]) == "hell\u00f3 12"


def test_unsupported_pre_tokenizer_and_model(tmp_path):
    ck = read_gguf(
        write_gguf(
            tmp_path / "m.gguf",
            "llama",
            hf_tensors("llama", len(GPT2_TOKENS), True),
            tokenizer=lambda w: add_gpt2_tokenizer(w, pre="mystery"),
        )
    )
    with pytest.raises(ConversionError, match="pre-tokenizer 'mystery'"):
        ck.write_tokenizer(tmp_path / "tok")
    ck.metadata["tokenizer.ggml.model"] = "bert"
    with pytest.raises(ConversionError, match="tokenizer model 'bert'"):
        ck.write_tokenizer(tmp_path / "tok")


SPM_SPECIAL = "<pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn> <unused0>".split()
SPM_TYPES = [3, 3, 3, 2, 3, 3, 5]
SPM_PIECES = "▁ h e l o w r d he ll hell hello ▁hello ▁w or ▁wor ld ▁world".split()
SPM_PIECES.append("  ")  # Gemma GGUFs spell run-of-spaces pieces with real spaces
SPM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
)


def add_spm_tokenizer(w, space_prefix: bool):
    tokens = SPM_SPECIAL + SPM_PIECES + [f"<0x{b:02X}>" for b in range(256)]
    types = SPM_TYPES + [1] * len(SPM_PIECES) + [6] * 256
    scores = [-float(i) for i in range(len(SPM_PIECES))]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * len(SPM_SPECIAL) + scores + [0.0] * 256)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(space_prefix)
    w.add_chat_template(SPM_TEMPLATE)


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_sentencepiece_tokenizer(tmp_path, arch):
    """`tokenizer.ggml.model = llama`: Gemma style (no prefix space) and Llama 2 style."""
    vocab = len(SPM_SPECIAL) + len(SPM_PIECES) + 256
    ck = read_gguf(
        write_gguf(
            tmp_path / "m.gguf",
            arch,
            hf_tensors(arch, vocab, True),
            tokenizer=lambda w: add_spm_tokenizer(w, space_prefix=arch == "llama"),
        )
    )
    ck.write_tokenizer(tmp_path / "tok")
    tok, wrapped = load_tokenizers(tmp_path / "tok")
    pieces = SPM_SPECIAL + SPM_PIECES
    first = "hello" if arch == "gemma3" else "▁hello"  # llama prepends "▁"
    assert tok.encode("hello world") == [2, pieces.index(first), pieces.index("▁world")]
    # Characters outside the vocabulary fall back to byte tokens and decode back.
    text = "hello wé  d"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.encode("<start_of_turn>", add_special_tokens=False) == [4]
    assert wrapped.bos_token == "<bos>"
    if arch == "gemma3":
        # The real-spaces piece is respelled with "▁" so it still matches.
        assert tok.encode("  ", add_special_tokens=False) == [pieces.index("  ")]

