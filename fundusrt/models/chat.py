"""Chat formats of the supported decoders, turned into the package's `PromptSpec`."""

from __future__ import annotations

from fundusrt.config import ModelConfig
from fundusrt.manifest import PromptSpec
from fundusrt.prompt import TokenizerLike

# name -> (system_template, user_template, assistant_prefix); InternVL 2.5 "internvl2_5" is ChatML.
CHAT_TEMPLATES: dict[str, tuple[str, str, str]] = {
    "chatml": (
        "<|im_start|>system\n{system}<|im_end|>\n",
        "<|im_start|>user\n{content}<|im_end|>\n",
        "<|im_start|>assistant\n",
    ),
    "phi3": ("<|system|>\n{system}<|end|>\n", "<|user|>\n{content}<|end|>\n", "<|assistant|>\n"),
}


def _token_id(tokenizer: TokenizerLike, token: str, role: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {role} token {token!r}; add it as a special token")
    return token_id


def prompt_spec(config: ModelConfig, tokenizer: TokenizerLike) -> PromptSpec:
    """The prompt format of `config`, with special token ids looked up in `tokenizer`."""
    if config.chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template {config.chat_template!r} is not one of {sorted(CHAT_TEMPLATES)}")
    system_template, user_template, assistant_prefix = CHAT_TEMPLATES[config.chat_template]
    for token, role in ((config.image_start, "image start"), (config.image_end, "image end")):
        if token:
            _token_id(tokenizer, token, role)
    return PromptSpec(
        system_message=config.system_message,
        system_template=system_template,
        user_template=user_template,
        assistant_prefix=assistant_prefix,
        image_token=config.image_token,
        image_token_id=_token_id(tokenizer, config.image_token, "image"),
        tokens_per_tile=config.tokens_per_tile,
        stop_token_ids=[_token_id(tokenizer, t, "stop") for t in config.stop_tokens],
        image_start=config.image_start,
        image_end=config.image_end,
        bos_token_id=None if config.bos_token is None else _token_id(tokenizer, config.bos_token, "bos"),
        pad_token_id=_token_id(tokenizer, config.stop_tokens[-1], "pad"),
        image_layout=config.image_layout,
    )
