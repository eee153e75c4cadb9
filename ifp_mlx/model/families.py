"""Model families ifp can prune: how each one's FFN is named and activated.

mlx-lm hard-codes the activation in each model file and ignores the config's
``hidden_act``, so the converter records it here, in the model folder.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str
    activation: str  # "silu" (SwiGLU) or "gelu_approx" (GeGLU)


FAMILIES = {
    "llama": Family("llama", "silu"),
    "mistral": Family("mistral", "silu"),
    "qwen2": Family("qwen2", "silu"),
    "qwen3": Family("qwen3", "silu"),
    "gemma3_text": Family("gemma3_text", "gelu_approx"),
}


class UnsupportedFamily(ValueError):
    pass


def family_for(config: dict) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedFamily(
            f"unsupported model family {model_type!r}: supported families are {supported}"
        )
    return FAMILIES[model_type]
