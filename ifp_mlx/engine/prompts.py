"""Prompts as tokens: through the model's chat template, checked against its context."""

from typing import Optional

from mlx_lm.tokenizer_utils import TokenizerWrapper


def prompt_tokens(
    tokenizer: TokenizerWrapper, prompt: str, system: Optional[str] = None, chat_template: bool = True
) -> list[int]:
    """Token ids of the prompt, through the chat template when there is one."""
    if chat_template and tokenizer.chat_template is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    text = f"{system}\n\n{prompt}" if system else prompt
    return tokenizer.encode(text)
