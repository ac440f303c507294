"""The PyTorch reference LVLM: vision tower -> connector -> image features spliced into the text
embeddings at image-token positions -> transformers causal LM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fundusrt.config import ModelConfig, TextConfig
from fundusrt.kernels.tiling import plan_tiles
from fundusrt.models.assembly import anyres_unpad
from fundusrt.models.chat import prompt_spec
from fundusrt.models.connector import build_connector
from fundusrt.models.vision import build_vision_tower, vision_hidden_states

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedConfig


def text_hf_config(config: TextConfig, attn_implementation: str = "sdpa") -> PreTrainedConfig:
    """The transformers config of the decoder (`config.type` is its model_type)."""
    from transformers import CONFIG_MAPPING

    hf_config = CONFIG_MAPPING[config.type](**{k: v for k, v in config.config.items() if k != "model_type"})
    hf_config._attn_implementation = attn_implementation
    return hf_config


def build_language_model(config: TextConfig, attn_implementation: str = "sdpa") -> nn.Module:
    """A transformers causal LM (Qwen2ForCausalLM, LlamaForCausalLM, Phi3ForCausalLM) for `config`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(text_hf_config(config, attn_implementation))


class LVLM(nn.Module):
    """Vision tower + connector + decoder LLM, with the tokenizer and prompt format of the checkpoint.

    Submodule names (`vision`, `connector`, `language_model`) are the native checkpoint's prefixes.
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.prompt = prompt_spec(config, tokenizer)
        if tokenizer.get_vocab_size() > config.text.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the decoder vocab is "
                             f"{config.text.vocab_size}")
        self.vision = build_vision_tower(config.vision, attn_implementation)
        self.connector = build_connector(config)
        self.language_model = build_language_model(config.text, attn_implementation)
        if config.image_layout == "anyres_unpad":
            # LLaVA-NeXT's learned row separator, appended after every row of the unpadded feature map.
            self.image_newline = nn.Parameter(torch.zeros(config.text.hidden_size))

    @property
    def image_token_id(self) -> int:
        return self.prompt.image_token_id

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_tiles, 3, S, S) normalised pixels -> (num_tiles, T_in, C_in) connector input."""
        return self.connector.select(vision_hidden_states(self.vision, pixel_values))

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_tiles, 3, S, S) -> (num_tiles, tokens_per_tile, hidden)."""
        return self.connector(self.vision_features(pixel_values))

    def image_tokens(self, pixel_values: torch.Tensor,
                     image_sizes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """(total image tokens, hidden): the prompt features of the images whose tiles are `pixel_values`.

        Args:
            pixel_values: (num_tiles, 3, S, S) tiles of every image, in prompt order.
            image_sizes: (width, height) of each image as tiled; needed by the anyres_unpad layout.
        """
        embeds = self.image_embeds(pixel_values)
        if self.config.image_layout == "flat":
            return embeds.reshape(-1, embeds.shape[-1])
        if not image_sizes:
            raise ValueError("the anyres_unpad layout needs image_sizes, the (width, height) of each image")
        tokens, start = [], 0
        for width, height in image_sizes:
            plan = plan_tiles(width, height, self.config.tiling)
            tokens.append(anyres_unpad(embeds[start:start + plan.num_tiles], plan.grid, plan.source_size,
                                       self.image_newline, self.config.anyres_max_tiles))
            start += plan.num_tiles
        if start != embeds.shape[0]:
            raise ValueError(f"image_sizes {list(image_sizes)} account for {start} tiles, pixel_values has "
                             f"{embeds.shape[0]}")
        return torch.cat(tokens)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) ids -> (batch, seq, hidden) token embeddings."""
        return self.language_model.get_input_embeddings()(input_ids)

    def splice(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Put the k-th image feature (tile-major, then token) at the k-th image-token position (row-major).

        `image_embeds` is (num_tiles, tokens_per_tile, hidden) or already flat (tokens, hidden).
        """
        mask = input_ids == self.image_token_id
        n_positions, n_features = int(mask.sum()), image_embeds.numel() // image_embeds.shape[-1]
        if n_positions != n_features:
            raise ValueError(f"prompt has {n_positions} image tokens but the images give {n_features} features "
                             f"(image_embeds {tuple(image_embeds.shape)}); build the prompt with "
                             "fundusrt.prompt.build_input_ids and the image's token count")
        features = image_embeds.reshape(-1, inputs_embeds.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)

    def prompt_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                      image_sizes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Embeddings of a prompt with the image features of `pixel_values` spliced in (see `image_tokens`)."""
        embeds = self.embed(input_ids)
        if pixel_values is None:
            return embeds
        return self.splice(input_ids, embeds, self.image_tokens(pixel_values.to(embeds.dtype), image_sizes))

    def decoder_step(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, past: Any
    ) -> tuple[torch.Tensor, Any]:
        """One decoder call: logits of the last position (batch, 1, vocab) and the updated cache."""
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past, use_cache=True,
                                  logits_to_keep=1)
        return out.logits, out.past_key_values

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[int],
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        stop_token_ids: Sequence[int] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[int]:
        """Greedy decoding with a KV cache (our own loop, not transformers' generate), batch 1.

        Args:
            input_ids: 1-D prompt ids with image tokens already expanded (fundusrt.prompt.build_input_ids).
            pixel_values: (num_tiles, 3, S, S) tiles of the prompt's images, in prompt order.
            max_new_tokens: most tokens to generate.
            stop_token_ids: ids that end generation (included in the result); default: the prompt's.
            image_sizes: (width, height) of each image; needed by the anyres_unpad layout.

        Returns:
            the generated token ids.
        """
        from transformers import DynamicCache

        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
        stops = set(self.prompt.stop_token_ids if stop_token_ids is None else stop_token_ids)
        embeds = self.prompt_embeds(ids, pixel_values, image_sizes)
        prompt_len = ids.shape[1]
        cache = DynamicCache(config=self.language_model.config)
        mask = torch.ones(1, prompt_len, dtype=torch.long)
        positions = torch.arange(prompt_len).unsqueeze(0)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            logits, cache = self.decoder_step(embeds, mask, positions, cache)
            token = int(logits[0, -1].argmax())
            generated.append(token)
            if token in stops:
                break
            embeds = self.embed(torch.tensor([[token]]))
            positions = positions[:, -1:] + 1
            mask = torch.ones(1, mask.shape[1] + 1, dtype=torch.long)
        return generated
