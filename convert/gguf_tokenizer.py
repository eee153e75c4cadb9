"""Rebuild a Hugging Face ``tokenizer.json`` from the vocabulary a GGUF keeps as metadata.

llama.cpp stores a tokenizer as arrays (tokens, token types, merges or
scores) plus a pre-tokenizer name, and applies the splitting rules in its
own C++. Neither the gguf package nor ``tokenizers`` turns that back into a
tokenizer (gguf-py only writes these keys), so this module does: byte-level
BPE for ``gpt2`` vocabularies with the split regex the ``pre`` name stands
for, and SentencePiece-style BPE with byte fallback for ``llama`` ones,
including the two fixes Gemma files need.

Every metadata value is checked for type before the ``tokenizers`` library
sees it, and whatever that library still raises becomes a ConversionError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConversionError
from .gguf_meta import Metadata, one_line, show

# llama.cpp token types (llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")


@dataclass
class _Vocab:
    """The tokenizer keys, type-checked once."""

    model: str
    tokens: list[str]
    types: list[int]
    meta: Metadata  # "tokenizer.ggml.*"

    def token(self, key: str) -> str | None:
        """The token an id key names, or None when absent or out of range."""
        token_id = self.meta.token_id(key)
        if token_id is None or token_id >= len(self.tokens):
            return None
        return self.tokens[token_id]


def _vocab(metadata: dict[str, Any]) -> _Vocab:
    meta = Metadata(metadata, "tokenizer.ggml.")
    if "tokens" not in meta:
        raise ConversionError("this GGUF carries no tokenizer (no tokenizer.ggml.tokens)")
    model = meta.get("model", None)
    if model not in ("gpt2", "llama"):
        raise ConversionError(f"GGUF tokenizer model {show(model)} is not supported (supported: gpt2, llama)")
    tokens = meta.texts("tokens")
    types = meta.integers("token_type", []) or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ConversionError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")
    return _Vocab(model, tokens, types, meta)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are spelled in."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_pre_tokenizer(pre: str):
    """The split a gpt2-style vocabulary was trained with, named by `tokenizer.ggml.pre`."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    def split(regex: str):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )

    if pre in ("smollm", "starcoder"):
        # StarCoder-style: every digit on its own, then GPT-2's regex.
        return None, pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return normalizers.NFC(), split(_QWEN2_SPLIT)
    if pre in _LLAMA3_PRES:
        return None, split(_LLAMA3_SPLIT)
    if pre in ("default", "gpt-2", "gpt2"):
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise ConversionError(
        f"GGUF pre-tokenizer {show(pre)} is not supported"
        " (supported: smollm, starcoder, qwen2, llama-bpe, gpt-2, default)"
    )


def _merge_pairs(vocab: _Vocab) -> list[tuple[str, str]]:
    merges = []
    for m in vocab.meta.texts("merges", []):
        pair = m.split(" ")
        if len(pair) != 2:
            raise ConversionError(f"GGUF merge {show(m)} is not two tokens separated by one space")
        merges.append((pair[0], pair[1]))
    return merges


def _gpt2_tokenizer(vocab: _Vocab):
    """Byte-level BPE straight from the GGUF's tokens and merges."""
    from tokenizers import Tokenizer, decoders, models

    alphabet = bytes_to_unicode()
    spelled = set(alphabet.values())
    ids: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(vocab.tokens, vocab.types)):
        if kind == _NORMAL and not set(tok) <= spelled:
            # A few converters store a normal token as raw text: respell it in bytes.
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        ids.setdefault(tok, i)
    pre = vocab.meta.text("pre", "default")
    normalizer, pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tok = Tokenizer(
        models.BPE(
            vocab=ids,
            merges=_merge_pairs(vocab),
            dropout=None,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre in _LLAMA3_PRES,
        )
    )
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(vocab: dict[str, int], priority: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, best merge first.

    SentencePiece-BPE merges the adjacent pair whose concatenation scores
    highest; listing every (left, right) split of every piece in score order
    reproduces that as a Hugging Face BPE (as transformers' generate_merges).
    """
    merges = []
    for piece, score in priority.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (-m[2], -len(m[0]), -len(m[1])))
    return [(a, b) for a, b, _ in merges]


def _spm_priority(vocab: _Vocab, mergeable: dict[str, int], gemma: bool) -> dict[str, float]:
    if gemma:  # Gemma's merge order is the token order, not the scores
        return {t: -float(i) for t, i in mergeable.items()}
    if "scores" not in vocab.meta:
        raise ConversionError("SentencePiece GGUF vocabulary has no tokenizer.ggml.scores")
    scores = vocab.meta.numbers("scores")
    if len(scores) != len(vocab.tokens):
        raise ConversionError(f"GGUF tokenizer has {len(vocab.tokens)} tokens but {len(scores)} scores")
    return {t: scores[i] for t, i in mergeable.items()}


def _spm_tokenizer(vocab: _Vocab, arch: str):
    """SentencePiece (BPE with byte fallback) from tokens and scores.

    Gemma files need two fixes (as transformers' GGUF loader found): runs of
    spaces are stored as real spaces instead of "▁", and the merge order is
    the token order, not the scores.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    gemma = arch.startswith("gemma")
    tokens = vocab.tokens
    if gemma:
        tokens = ["\u2581" * len(t) if t and set(t) == {" "} else t for t in tokens]
    ids: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        ids.setdefault(tok, i)
    mergeable = {t: i for t, i in ids.items() if vocab.types[i] in (_NORMAL, _USER_DEFINED)}
    unk_id = vocab.meta.token_id("unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None
    tok = Tokenizer(
        models.BPE(
            vocab=ids,
            merges=_spm_merges(mergeable, _spm_priority(vocab, mergeable, gemma)),
            dropout=None,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        prefix = vocab.meta.flag("add_space_prefix", True)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
        if prefix:
            steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _post_processor(vocab: _Vocab, add_bos: bool, add_eos: bool):
    """BOS/EOS insertion lives in tokenizer.json so every loader agrees on it."""
    from tokenizers import processors

    steps = [processors.ByteLevel(trim_offsets=False)] if vocab.model == "gpt2" else []
    ends = {"bos": (add_bos, "bos_token_id"), "eos": (add_eos, "eos_token_id")}
    used = {k: (vocab.token(key), vocab.meta.token_id(key)) for k, (on, key) in ends.items() if on}
    used = {k: (t, i) for k, (t, i) in used.items() if t is not None}
    if used:
        head = [used["bos"][0]] if "bos" in used else []
        tail = [used["eos"][0]] if "eos" in used else []
        steps.append(
            processors.TemplateProcessing(
                single=[*head, "$A", *tail],
                pair=[*head, "$A", *tail, *head, "$B:1", *tail],
                special_tokens=list(dict(used.values()).items()),
            )
        )
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)


def _add_bos_eos(vocab: _Vocab) -> tuple[bool, bool]:
    # llama.cpp's defaults when the flag is absent: BOS for SentencePiece, not for BPE.
    add_bos = vocab.meta.flag("add_bos_token", vocab.model == "llama")
    return add_bos, vocab.meta.flag("add_eos_token", False)


def _build(vocab: _Vocab, arch: str):
    from tokenizers import AddedToken

    tok = _gpt2_tokenizer(vocab) if vocab.model == "gpt2" else _spm_tokenizer(vocab, arch)
    # Control tokens are special (skipped on decode); user-defined ones are matched
    # whole but kept in text; unused ones stay plain vocabulary entries.
    special = [i for i, k in enumerate(vocab.types) if k in (_CONTROL, _UNKNOWN)]
    user = [i for i, k in enumerate(vocab.types) if k == _USER_DEFINED]
    spelled = [(tok.id_to_token(i), True) for i in special]
    spelled += [(tok.id_to_token(i), False) for i in user]
    added = [AddedToken(t, special=s, normalized=False) for t, s in spelled if t is not None]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    tok.post_processor = _post_processor(vocab, *_add_bos_eos(vocab))
    return tok


def build_tokenizer(metadata: dict[str, Any], arch: str):
    """A `tokenizers.Tokenizer` equivalent to the one the GGUF metadata describes."""
    vocab = _vocab(metadata)
    try:
        return _build(vocab, arch)
    except ConversionError:
        raise
    except Exception as e:  # the tokenizers library refusing what the checks let through
        raise ConversionError(f"cannot rebuild this GGUF's tokenizer ({one_line(e)})") from None


def tokenizer_files(metadata: dict[str, Any], arch: str, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json and special_tokens_map.json contents."""
    vocab = _vocab(metadata)
    special_map = {
        name: tok
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
        if (tok := vocab.token(key)) is not None
    }
    add_bos, add_eos = _add_bos_eos(vocab)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        **special_map,
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = Metadata(metadata).text("tokenizer.chat_template")
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}
