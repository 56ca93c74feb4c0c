"""The assembled model: ternary attention blocks with MoEGraph FFNs routed through one shared
VQ codebook, a KG VQ codebook, and a composite LM + KG head.

    ids ─ embed ─┬─ block 0 ─ block 1 ─ … ─ block L-1 ─ RMSNorm ─ CompositeHead ─┬─ next-byte logits
                 │   each block: x += attn(norm(x)); h = norm(x)                 └─ KG-entity scores
                 │     quantising blocks: code ids = SharedVQ(proj(h)).ids         (via KGVQCodebook)
                 │     x += MoEGraph(h, code ids)      (later blocks reuse the last ids)

Quantising once per ``quantize_every`` blocks (DESIGN 3b) keeps the 10M-code search out of
most layers. With ``weights="float"`` every TernaryLinear / embedding table becomes its float
counterpart (the float baseline); the VQ codebooks and the routing graph stay as they are,
since the architecture has no float version of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..graph.moegraph import MoEGraph
from ..nn.attention import CausalSelfAttention, DecodeStep, KVCache, rms_norm
from ..nn.factory import check_weights, make_embedding, make_linear
from ..nn.grouped import TernaryGroupedLinear
from ..nn.linear import TernaryLinear
from ..nn.vq import KGVQCodebook, TernaryVQCodebook
from ..precision import autocast_for
from ..ternary.state import ternary_states
from . import generate as _generation


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)
    hidden: torch.Tensor  # (B, T, dim) final normalised hidden state (input of the head)
    aux_loss: torch.Tensor  # scalar: VQ commitment losses (+ the topk routers' load-balancing losses)
    lm_loss: torch.Tensor | None = None  # scalar mean cross-entropy in nats, when targets are given
    loss: torch.Tensor | None = None  # lm_loss + aux_loss


class Block(nn.Module):
    """Pre-norm block: causal attention, then a MoEGraph FFN routed by shared-VQ code ids."""

    def __init__(self, cfg: ModelConfig, layer: int, weights: str, device, generator) -> None:
        super().__init__()
        self.layer = layer
        self.attn = CausalSelfAttention(cfg.dim, cfg.n_heads, rope_base=cfg.rope_base, weights=weights,
                                        device=device, generator=generator)
        self.quantizes = layer in cfg.quantize_layers
        self.vq_proj = make_linear(cfg.dim, cfg.codebook_dim, weights, device=device, generator=generator) \
            if self.quantizes else None
        self.vq_projection_frozen = cfg.vq_projection == "frozen"
        if self.vq_proj is not None and self.vq_projection_frozen:  # the optimizers leave it out
            for state in ternary_states(self.vq_proj):
                state.frozen = True
            self.vq_proj.requires_grad_(False)
        # Small codebooks hold every code's fanout edges (dense mode); past edge_capacity the
        # bounded active-edge set (large mode) takes over.
        capacity = None if cfg.edge_capacity >= cfg.codebook_size * cfg.fanout else cfg.edge_capacity
        self.moe = MoEGraph(cfg.dim, cfg.num_experts, cfg.expert_hidden, codebook_size=cfg.codebook_size,
                            top_k=cfg.top_k, fanout=cfg.fanout, capacity=capacity, routing=cfg.routing,
                            balance_weight=cfg.balance_weight, weights=weights, device=device, generator=generator)

    def forward(self, x: torch.Tensor, code_ids: torch.Tensor | None, vq: TernaryVQCodebook,
                cache: KVCache | None = None, step: DecodeStep | None = None):
        x = x + self.attn(rms_norm(x), cache, step)
        h = rms_norm(x)
        aux = x.new_zeros((), dtype=torch.float32)
        if self.vq_proj is not None:
            if self.vq_projection_frozen:  # no votes, no gradient: the codes alone follow the hidden states
                with torch.no_grad():
                    z = self.vq_proj(h)
            else:
                z = self.vq_proj(h)
            q = vq(z)
            code_ids, aux = q.ids, q.commitment_loss
        x = x + self.moe(h, code_ids)
        balance = self.moe.take_balance_loss()  # the topk routers' load-balancing loss (ablation)
        return x, code_ids, aux if balance is None else aux + balance


class CompositeHead(nn.Module):
    """Next-byte logits and KG-entity scores from the same hidden state.

    KG scores are DistMult-style: ``<proj(h) ⊙ r, e>`` for a relation vector ``r`` and KG code
    vectors ``e`` of the candidate entities (the batch's entities and sampled negatives); a
    dense softmax over all KG codes is never taken.
    """

    def __init__(self, cfg: ModelConfig, weights: str, device, generator) -> None:
        super().__init__()
        self.lm = make_linear(cfg.dim, cfg.vocab_size, weights, device=device, generator=generator)
        self.kg_proj = make_linear(cfg.dim, cfg.kg_codebook_dim, weights, device=device, generator=generator)
        self.relations = make_embedding(cfg.num_relations, cfg.kg_codebook_dim, weights, device=device,
                                        generator=generator)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm(hidden)

    def kg_scores(self, hidden: torch.Tensor, relation_ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Shapes: hidden (n, dim), relation_ids (n,), candidates (n, c, kg_dim) -> (n, c)."""
        query = self.kg_proj(hidden) * self.relations(relation_ids)
        return torch.einsum("nd,ncd->nc", query, candidates) / candidates.shape[-1] ** 0.5


class TernaryGraphLM(nn.Module):
    """The assembled model (see the module docstring). ``weights`` is "ternary" or "float".

    ``compute_dtype`` is the activation dtype (see ``ternary_graph.precision``): float32, or
    bfloat16 for the GPU (ternary kernels read bf16 activations; float layers run under
    autocast; norms, softmax statistics and the loss stay float32). It is not state: a
    checkpoint loads into a model of either compute dtype.
    """

    def __init__(self, cfg: ModelConfig, *, weights: str = "ternary", device: torch.device | str | None = None,
                 seed: int = 0, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.bfloat16, got {compute_dtype}")
        self.cfg, self.weights, self.compute_dtype = cfg, check_weights(weights), compute_dtype
        device = torch.device(device) if device is not None else torch.device("cpu")
        generator = None if device.type == "meta" else torch.Generator().manual_seed(seed)
        self.embed = make_embedding(cfg.vocab_size, cfg.dim, weights, device=device, generator=generator)
        # The codebook's commitment loss sums over the code dimension; per element it stays on
        # the scale of the LM loss whatever codebook_dim is.
        self.shared_vq = TernaryVQCodebook(cfg.codebook_size, cfg.codebook_dim,
                                           commitment_weight=cfg.commitment_weight / cfg.codebook_dim,
                                           # 1.0: the norm of a code at its unit-variance init scale
                                           input_norm=1.0 if cfg.vq_input_norm else None,
                                           reseed_from=cfg.vq_reseed_from, reseed_window=cfg.vq_reseed_window,
                                           device=device, generator=generator)
        self.blocks = nn.ModuleList(Block(cfg, layer, weights, device, generator) for layer in range(cfg.n_layers))
        self.kg_vq = KGVQCodebook(cfg.kg_codebook_size, cfg.kg_codebook_dim, device=device, generator=generator)
        self.head = CompositeHead(cfg, weights, device, generator)
        self._last_graph_updates: list = []  # transient: what the last update_graph() did, per layer

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: list[KVCache] | None = None) -> ModelOutput:
        """Shapes: ids (B, T) int64/int32 bytes, targets (B, T) or None.

        With ``kv_cache`` (from :meth:`new_kv_cache`), ``ids`` are the T positions after the
        cached prefix; the caches are extended in place. Everything but attention is
        position-local, so each new token is quantised and routed exactly as in a full forward.
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape (batch, seq_len), got {tuple(ids.shape)}")
        if kv_cache is not None and len(kv_cache) != len(self.blocks):
            raise ValueError(f"kv_cache must hold one KVCache per block ({len(self.blocks)}), got {len(kv_cache)}")
        cached = 0 if kv_cache is None else kv_cache[0].length
        if cached + ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {cached + ids.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        logits, hidden, aux = self._trunk(ids, kv_cache, None)
        out = ModelOutput(logits=logits, hidden=hidden, aux_loss=aux)
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).long())
            out.loss = out.lm_loss + aux
        return out

    def _trunk(self, ids: torch.Tensor, kv_cache: list[KVCache] | None, step: DecodeStep | None):
        """(logits, hidden, aux) of ``ids``: the body shared by :meth:`forward` and :meth:`decode_step`."""
        with autocast_for(self.compute_dtype, ids.device):
            x = self.embed(ids, dtype=self.compute_dtype)
            code_ids, aux = None, x.new_zeros((), dtype=torch.float32)
            for i, block in enumerate(self.blocks):
                x, code_ids, block_aux = block(x, code_ids, self.shared_vq,
                                               None if kv_cache is None else kv_cache[i], step)
                aux = aux + block_aux
            hidden = rms_norm(x)
            logits = self.head(hidden)
        return logits, hidden, aux

    def decode_step(self, ids: torch.Tensor, kv_cache: list[KVCache], position: torch.Tensor) -> torch.Tensor:
        """One fixed-shape decode step: the logits of the byte ``ids`` at the position held in the
        device tensor ``position``, whose keys/values are written there into every cache.

        Every shape is fixed (the caches are preallocated to ``max_seq_len``; attention covers all
        of it under a mask of the positions past ``position``) and no device value is read on the
        host, so the step can be captured as a CUDA graph (``models/decode_graph.py``). It changes
        no host state either: the caller advances ``position`` and each cache's ``length`` (see
        :class:`~ternary_graph.models.decode_graph.StepDecoder`) and keeps ``position <
        max_seq_len``. Equals the last row of :meth:`forward` over the prefix and this byte.

        Shapes: ids (B, 1) int32/int64; position () int64 on the model's device -> (B, vocab).
        """
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must have shape (batch, 1), got {got}")
        if len(kv_cache) != len(self.blocks):
            raise ValueError(f"kv_cache must hold one KVCache per block ({len(self.blocks)}), got {len(kv_cache)}")
        if isinstance(position, torch.Tensor) and position.device != ids.device:
            raise ValueError(f"position is on {position.device} but ids is on {ids.device}")
        step = DecodeStep.at(position, self.cfg.head_dim, self.cfg.rope_base, kv_cache[0].max_len)
        return self._trunk(ids, kv_cache, step)[0][:, -1]

    def new_kv_cache(self, batch_size: int = 1) -> list[KVCache]:
        """One empty :class:`KVCache` per block, preallocated to ``max_seq_len`` positions."""
        device = next(self.buffers()).device
        return [KVCache.empty(batch_size, self.cfg.n_heads, self.cfg.max_seq_len, self.cfg.head_dim,
                              dtype=self.compute_dtype, device=device) for _ in self.blocks]

    def generate(self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, cuda_graph: bool | None = None,
                 compile_backend: str | None = None) -> torch.Tensor:
        """Continue ``ids`` (B, T) by ``max_new_tokens`` sampled bytes with a KV cache; returns
        (B, T + max_new_tokens). ``cuda_graph``: replay the decode step as a CUDA graph (None:
        whenever the model is on CUDA); ``compile_backend``: run the step through ``torch.compile``
        (``"inductor"``). See :func:`ternary_graph.models.generate.generate`."""
        return _generation.generate(self, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seed, cuda_graph=cuda_graph, compile_backend=compile_backend)

    def prepare_inference(self) -> "TernaryGraphLM":
        """Eval mode, and a decode copy (2-bit layout, ``kernels/ternary_gemv.py``) in every ternary
        linear layer, used by no-grad forwards of at most 16 rows per layer on CUDA (the decode
        steps of :meth:`generate`). The copies are plain attributes, not state (``state_dict`` is
        unchanged); ``train()`` drops them. Returns ``self``. A float model has none to build."""
        self.eval()
        for module in self.modules():
            if isinstance(module, (TernaryLinear, TernaryGroupedLinear)):
                module.prepare_inference()
        return self

    def kg_scores(self, hidden: torch.Tensor, relation_ids: torch.Tensor, candidate_codes: torch.Tensor) -> torch.Tensor:
        """Score KG candidates (ids into the KG codebook) for each hidden state and relation."""
        return self.head.kg_scores(hidden, relation_ids, self.kg_vq.codes(candidate_codes))

    def update_graph(self) -> list:
        """Apply the routing graphs' pending edge votes (call after the optimizer step)."""
        self._last_graph_updates = [block.moe.update_graph() for block in self.blocks]
        return self._last_graph_updates

    def routing_stats(self) -> dict:
        """Routing of the last batch and last graph update, per layer, plus shared-VQ usage."""
        stats: dict = {}
        updates = self._last_graph_updates or [None] * len(self.blocks)
        for block, update in zip(self.blocks, updates):
            layer: dict = {"active_edges": block.moe.num_active_edges}
            routing = block.moe.last_routing
            if routing is not None and routing.token.numel():
                load = routing.load().float()
                layer["via_edge_fraction"] = float(routing.via_edge.float().mean())
                layer["load_max_share"] = float(load.max() / load.sum())
                layer["load_min_share"] = float(load.min() / load.sum())
            if update is not None:
                layer.update(edges_inserted=int(update.inserted), edges_evicted=int(update.evicted),
                             edges_up=int(update.edges_up), edges_down=int(update.edges_down))
            stats[f"layer{block.layer}"] = layer
        stats["shared_vq"] = dataclasses.asdict(self.shared_vq.stats())
        return stats

    def moe_layers(self) -> list[MoEGraph]:
        return [b.moe for b in self.blocks]


def build_model(cfg: ModelConfig, *, weights: str = "ternary", device: torch.device | str | None = None,
                seed: int = 0, compute_dtype: torch.dtype = torch.float32) -> TernaryGraphLM:
    return TernaryGraphLM(cfg, weights=weights, device=device, seed=seed, compute_dtype=compute_dtype)
