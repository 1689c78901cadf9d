"""NAR4Rec (KDD 2024): a non-autoregressive generator that writes the whole list in one pass.

Reading order, as in the paper:

1. Candidate encoder: each candidate's features (upstream score included) plus the user's
   context become a token; a Transformer encoder over the n tokens gives ``X [B, N, d]``.
2. Positions: m learnable embeddings ``T [m, d]`` shared by every request. Because the "vocabulary"
   (the candidates) changes per request, positions are the fixed tokens.
3. Position encoder: self-attention over positions, cross-attention from positions to the
   encoded candidates, feed-forward -> ``P [B, M, d]``.
4. Score matrix ``S = X P^T / sqrt(d)`` (``[B, N, M]``), a softmax over candidates in each column:
   ``p_ij`` = probability that candidate i fills position j. Padded candidates get -inf.

List context (``list_context: true``, :mod:`genrerank.modules.list_context`): a learned
category-transition table. In training, the raw score of each logged slot (``logits``, which the
item-level ``gain_bce`` loss fits) adds the context of the logged items above it, so the table
learns from the logs which categories go well after which (it learns complementarity; satiation
the logs confound, see that module) while ``log_probs`` stay context-free; the ``context``
decoder then applies the table to the items it has chosen.

Auxiliary heads: a click head on each (candidate, position) pair (so offline AUC / LogLoss have
a click probability for every exposed item at its logged position) and a list-length head
(variable m, the paper's Q&A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.losses.base import ModelOutput
from genrerank.models.base import RerankModel, register_model
from genrerank.modules.features import FeatureEmbedding
from genrerank.modules.list_context import ListContext


@dataclass
class NAR4RecConfig:
    dim: int = 64
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 1
    ff_mult: int = 2
    dropout: float = 0.1
    features: dict = field(default_factory=dict)  # FeatureConfig options
    max_positions: int = 0  # 0: the longest list in the data (spec.max_list_length)
    list_context: bool = True  # learned category-transition table (the ``context`` decoder)


@register_model("nar4rec")
class NAR4Rec(RerankModel):
    Config = NAR4RecConfig

    def __init__(self, spec: FeatureSpec, config: NAR4RecConfig) -> None:
        super().__init__(spec, config)
        d = config.dim
        if d % config.heads:
            raise ValueError(f"nar4rec: dim {d} is not divisible by heads {config.heads}")
        self.max_positions = config.max_positions or max(spec.max_list_length, 1)
        self.features = FeatureEmbedding(spec, d, config.dropout, config.features)

        def layer(cls: type) -> nn.Module:
            return cls(d, config.heads, d * config.ff_mult, config.dropout, batch_first=True,
                       norm_first=True)

        self.encoder = nn.TransformerEncoder(
            layer(nn.TransformerEncoderLayer), config.encoder_layers, enable_nested_tensor=False
        )
        self.positions = nn.Parameter(torch.randn(self.max_positions, d) * 0.02)
        self.position_encoder = nn.TransformerDecoder(
            layer(nn.TransformerDecoderLayer), config.decoder_layers
        )
        self.out_norm = nn.LayerNorm(d)
        self.item_proj = nn.Linear(d, d)
        self.pos_proj = nn.Linear(d, d)
        self.click_item = nn.Linear(d, d)
        self.click_pos = nn.Linear(d, d)
        self.click_bias = nn.Parameter(torch.zeros(self.max_positions))
        self.length_head = nn.Linear(d, self.max_positions + 1)
        self.list_context = ListContext(spec.n_categories) if config.list_context else None

    def forward(self, batch: Batch, list_length: int | None = None) -> ModelOutput:
        m = list_length or batch.position_mask.shape[1]
        if m > self.max_positions:
            raise ValueError(f"nar4rec: list length {m} exceeds max_positions {self.max_positions}")
        cand_mask = batch.candidate_mask
        tokens, _ = self.features(batch)
        x = self.encoder(tokens, src_key_padding_mask=~cand_mask)
        x = self.out_norm(x)
        t = self.positions[:m].unsqueeze(0).expand(x.shape[0], m, -1)
        # Every position attends to every other real position: the list is written jointly, not
        # left to right. Without an explicit length, the batch's own list lengths apply.
        pos_pad = ~batch.position_mask if list_length is None else None
        p = self.position_encoder(
            t, x, tgt_key_padding_mask=pos_pad, memory_key_padding_mask=~cand_mask
        )

        d = x.shape[-1]
        scores = torch.einsum("bnd,bmd->bnm", self.item_proj(x), self.pos_proj(p)) / math.sqrt(d)
        scores = scores.masked_fill(~cand_mask.unsqueeze(-1), float("-inf"))
        log_probs = torch.log_softmax(scores, dim=1)

        click = torch.einsum("bnd,bmd->bnm", self.click_item(x), self.click_pos(p)) / math.sqrt(d)
        click = click + self.click_bias[:m]

        logits = scores
        if self.list_context is not None and batch.labels and m == batch.position_mask.shape[1]:
            # Each slot's raw score given the LOGGED items above it (teacher forcing); only a
            # loss reads it, so batches without logged feedback (serving) skip the work.
            logits = scores + self.list_context.teacher_forced(
                batch.category, batch.exposed, batch.position_mask)

        maskf = cand_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * maskf).sum(1) / maskf.sum(1).clamp_min(1.0)
        return ModelOutput(
            log_probs=log_probs,
            item_repr=x,
            position_repr=self.positions[:m],
            click_logits=click,
            length_logits=self.length_head(pooled),
            logits=logits,
        )
