"""The value head on the policy's shared backbone: one linear layer from the last hidden state
(the last decoder hidden state for an encoder-decoder) to a scalar value per position.

The wrapper keeps TRL 0.11.4's layout and call: attributes `pretrained_model` (the PEFT model)
and `v_head.summary` (the linear layer), so that runs made by rlhf_recipes 0.2 load as they
were saved, and `model(input_ids=..., attention_mask=...) -> (logits, None, values)`, the logits
in float32, values (b, L) in float32.
"""
from __future__ import annotations

import torch
from torch import nn

from ..components.seq2seq import is_encoder_decoder


def _hidden_size(config) -> int:
    if getattr(config, "word_embed_proj_dim", None):  # OPT projects its hidden states to this width
        return config.word_embed_proj_dim
    decoder = getattr(config, "decoder", None)
    if is_encoder_decoder(config) and hasattr(decoder, "hidden_size"):
        return decoder.hidden_size
    return config.get_text_config().hidden_size


class ValueHead(nn.Module):
    """(b, L, d) hidden states -> (b, L, 1) values, computed in the head's own dtype (float32)."""

    def __init__(self, config):
        super().__init__()
        self.summary = nn.Linear(_hidden_size(config), 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype))


class ValueHeadModel(nn.Module):
    """A PEFT-adapted causal or encoder-decoder LM with a value head on its last hidden state."""

    def __init__(self, adapted_model):
        super().__init__()
        self.pretrained_model = adapted_model
        self.v_head = ValueHead(adapted_model.config)
        self.is_encoder_decoder = is_encoder_decoder(adapted_model)

    @property
    def config(self):
        return self.pretrained_model.config

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        """(logits (b, L, V) float32, None, values (b, L) float32); keyword arguments go to the LM."""
        out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                    **kwargs)
        hidden = (out.decoder_hidden_states if self.is_encoder_decoder else out.hidden_states)[-1]
        values = self.v_head(hidden.to(self.v_head.summary.weight.device)).squeeze(-1)
        return out.logits.float(), None, values

    def generate(self, *args, **kwargs):
        return self.pretrained_model.generate(*args, **kwargs)


def with_value_head(adapted_model) -> ValueHeadModel:
    """`adapted_model` (a PeftModel) with a fresh value head in float32, placed beside its weights
    (which works alike for CPU, CUDA and bitsandbytes placements)."""
    model = ValueHeadModel(adapted_model)
    model.v_head.to(next(adapted_model.parameters()).device, torch.float32)
    return model
