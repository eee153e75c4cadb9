"""Prompts as tokens: through the model's chat template, checked against its context."""

import logging
from typing import Optional, Sequence

from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..errors import IFPError


class _NoLengthWarning(logging.Filter):
    """Drops transformers' "Token indices sequence length is longer than ..." warning.

    ``check_context`` and ``fit_prompt`` deal with long prompts, in one line
    that names the model's real context; the tokenizer's warning would be a
    second, alarming line about "indexing errors" that cannot happen here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token indices sequence length is longer than")


logging.getLogger("transformers.tokenization_utils_base").addFilter(_NoLengthWarning())


def prompt_tokens(
    tokenizer: TokenizerWrapper, prompt: str, system: Optional[str] = None, chat_template: bool = True
) -> list[int]:
    """Token ids of the prompt, through the chat template when there is one."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return chat_tokens(tokenizer, messages, chat_template)


def chat_tokens(tokenizer: TokenizerWrapper, messages: list[dict], chat_template: bool = True) -> list[int]:
    """Token ids of a conversation, ready for the assistant's next turn.

    Through the chat template when the model has one; else the contents
    joined by blank lines (a base model continues the text).
    """
    if chat_template and tokenizer.chat_template is not None:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode("\n\n".join(m["content"] for m in messages))


def context_length(config: dict) -> Optional[int]:
    """The most positions the model was trained for (config.json's ``max_position_embeddings``).

    None when the config does not say, and then nothing is checked: refusing
    every prompt of a model we cannot size would be worse than not checking.
    """
    value = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    return int(value) if value else None


def check_context(
    tokens: Sequence[int], max_tokens: int, context_length: Optional[int], what: str = "prompt", hint: str = ""
) -> None:
    """Refuse a prompt that, with the tokens to generate, does not fit the model's context.

    Past its context a model's output is noise, and on a CPU the prefill of
    such a prompt runs for minutes before anyone could tell; one line up front
    names both lengths instead. ``hint`` is the caller's way out (a flag, say).
    """
    if context_length is None or len(tokens) + max_tokens <= context_length:
        return
    total = f" + {max_tokens} to generate = {len(tokens) + max_tokens}" if max_tokens else ""
    raise IFPError(f"{what} is {len(tokens)} tokens{total}, more than the model's context of {context_length} tokens{hint}")


CHARS_PER_TOKEN_BOUND = 16  # real text averages about 4 characters a token; 16 leaves room for code and markup


def check_length(
    tokenizer: TokenizerWrapper, text: str, max_tokens: int, context_length: Optional[int],
    what: str = "prompt", hint: str = "",
) -> None:
    """Refuse text far too long for the context while tokenizing only a bounded prefix of it.

    A paste of megabytes would otherwise go whole through the chat template
    and the tokenizer (seconds and gigabytes) only to be refused. Text longer
    than ``CHARS_PER_TOKEN_BOUND`` characters per token of the room left is
    cut at a space within that bound. The tokenizers split words at spaces,
    so the tokens before the cut are tokens of the whole text too: when they
    alone overflow, the whole does. Text this cannot refuse (shorter, or
    denser than the bound, as runs of ``=`` can be) is tokenized whole, and
    ``check_context`` decides.
    """
    if context_length is None:
        return
    room = max(context_length - max_tokens, 0)
    limit = room * CHARS_PER_TOKEN_BOUND
    if len(text) <= limit:
        return
    cut = max(text.rfind(space, 0, limit) for space in " \n\t")
    if cut <= 0:  # one word longer than the bound: only the whole text's tokens can tell
        return
    counted = len(tokenizer.encode(text[:cut], add_special_tokens=False))
    if counted > room:
        reply = f" with {max_tokens} to generate" if max_tokens else ""
        raise IFPError(f"{what} is {len(text):,} characters, more than the model's context of {context_length} tokens"
                       f" holds{reply} (its first {cut:,} characters are already {counted:,} tokens){hint}")


def fit_prompt(
    tokenizer: TokenizerWrapper,
    prompt: str,
    max_tokens: int,
    context_length: Optional[int],
    system: Optional[str] = None,
    chat_template: bool = True,
    what: str = "prompt",
) -> tuple[list[int], int]:
    """Prompt tokens that fit the context with ``max_tokens`` to generate, and how many prompt tokens were dropped.

    Drops the oldest tokens of the user's text (its end is what the reply
    follows) and applies the chat template again, so the result is still a
    well-formed chat prompt rather than one with its opening markers cut off.
    The template can add or merge a token at the cut, so it shrinks until it fits.
    """
    tokens = prompt_tokens(tokenizer, prompt, system, chat_template)
    if context_length is None or len(tokens) + max_tokens <= context_length:
        return tokens, 0
    text_ids = tokenizer.encode(prompt, add_special_tokens=False)
    budget = context_length - max_tokens
    keep = min(len(text_ids), budget - (len(tokens) - len(text_ids)))
    while keep > 0:
        kept = tokenizer.decode(text_ids[-keep:]).lstrip("\ufffd")  # a cut inside a character decodes to U+FFFD
        tokens = prompt_tokens(tokenizer, kept, system, chat_template)
        if len(tokens) <= budget:
            return tokens, len(text_ids) - keep
        keep -= len(tokens) - budget
    raise IFPError(
        f"{max_tokens} tokens to generate leave no room for the {what} in the model's context of {context_length} tokens"
        f"{' (with the system message and chat template)' if system or chat_template else ''}"
    )
