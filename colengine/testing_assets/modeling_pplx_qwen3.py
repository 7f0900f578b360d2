"""Bidirectional Qwen3 encoder (``model_type = "bidirectional_pplx_qwen3"``).

This file is copied next to the weights of a model folder and loaded by transformers with
``trust_remote_code=True`` through the folder's ``auto_map``, exactly as the real
``perplexity-ai/pplx-embed-v1-late-0.6b`` checkpoint is. It is self-contained on purpose.

The architecture is Qwen3 (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP)
with the causal mask replaced by a bidirectional padding mask: every token attends to every
non-padding token of its sequence.
"""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3Model


class PPLXQwen3Config(Qwen3Config):
    model_type = "bidirectional_pplx_qwen3"


class PPLXQwen3Model(Qwen3Model):
    config_class = PPLXQwen3Config

    def __init__(self, config: PPLXQwen3Config) -> None:
        super().__init__(config)
        for layer in self.layers:
            # sdpa would otherwise fall back to a causal kernel whenever no mask is passed
            layer.self_attn.is_causal = False

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        # [B, 1, L, L] additive mask: 0 where the key is a real token, dtype-min on padding keys
        keep = attention_mask[:, None, None, :].to(torch.bool).expand(batch, 1, length, length)
        bias = torch.zeros(keep.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        bias = bias.masked_fill(~keep, torch.finfo(inputs_embeds.dtype).min)
        masks = {"full_attention": bias, "sliding_attention": bias}
        kwargs.pop("past_key_values", None)
        kwargs["use_cache"] = False
        return super().forward(attention_mask=masks, inputs_embeds=inputs_embeds, **kwargs)


PPLXQwen3Config.register_for_auto_class("AutoConfig")
PPLXQwen3Model.register_for_auto_class("AutoModel")
