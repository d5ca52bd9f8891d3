"""A small decoder-style transformer that classifies a token sequence: the grokking task.

The network reads T tokens x_1..x_T in {0..V-1} and returns C logits read out at the last
position (Vaswani et al. 2017, with GPT-2's pre-LayerNorm order, Radford et al. 2019):

    h_t = E[x_t] + P_t                                   token + position embeddings, (T, d)
    for each of the L blocks:
        h <- h + Attn(LN_1(h))                           causal multi-head self-attention
        h <- h + W_2 act(W_1 LN_2(h) + b_1) + b_2        MLP of width d_mlp
    f(x) = U LN_f(h_T) + c                               readout at the last position, (C,)

    Attn(h)_t = W_O concat_j sum_{s <= t} softmax_s(q^j_t . k^j_s / sqrt(d/H)) v^j_s

with H heads of size d/H and q, k, v = W_{Q,K,V} h + biases. ``layer_norm: false`` makes every
LN the identity: Nanda et al. 2023 ("Progress measures for grokking via mechanistic
interpretability") grok with such a one-layer, LayerNorm-free model (d = 128, H = 4,
d_mlp = 512, ReLU), the defaults here; Power et al. 2022 use two layers of width 128 with
LayerNorm (``n_layers: 2, layer_norm: true``).

Plain ``torch.nn`` modules and out-of-place tensor operations, no dropout or BatchNorm and no
data-dependent control flow, so everything built on the functional view works unchanged:
vmapped ensembles (``ensemble_size: K``), Hessian-vector products by forward-over-reverse or
double backward (through softmax and LayerNorm), per-sample gradients, landscapes.

Initialisation: embeddings ``N(0, 1/d)`` (Nanda et al.'s ``randn / sqrt(d)``), linear layers
PyTorch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, LayerNorm gain 1 and bias 0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from overparam.errors import ConfigError, check_choice, check_positive
from overparam.task import Task
from overparam.metrics import member_name

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions s <= t."""

    def __init__(self, d_model: int, n_heads: int, bias: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, h: Tensor) -> Tensor:
        B, T, d = h.shape
        hs = d // self.n_heads
        q, k, v = self.qkv(h).split(d, dim=-1)  # (B, T, d) each
        q, k, v = (t.reshape(B, T, self.n_heads, hs).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, H, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)  # s > t
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)
        mixed = (weights @ v).transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.out(mixed)


class Block(nn.Module):
    """One pre-LN transformer block: attention then MLP, each added to the residual stream."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int, layer_norm: bool, activation: str, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.attn = CausalSelfAttention(d_model, n_heads, bias)
        self.ln_2 = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp, bias=bias), ACTIVATIONS[activation](), nn.Linear(d_mlp, d_model, bias=bias))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.ln_1(h))
        return h + self.mlp(self.ln_2(h))


class DecoderTransformer(nn.Module):
    """Token + position embeddings, ``n_layers`` blocks, a linear readout at the last position.

    Args:
        vocab_size: V, token ids 0..V-1.
        seq_len: T, tokens per input.
        num_outputs: C, logits returned.
        d_model, n_layers, n_heads, d_mlp, layer_norm, activation, bias: see ``Transformer``.
    """

    def __init__(
        self, vocab_size: int, seq_len: int, num_outputs: int, d_model: int, n_layers: int, n_heads: int,
        d_mlp: int, layer_norm: bool, activation: str, bias: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.empty(seq_len, d_model))
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        nn.init.normal_(self.pos, std=d_model**-0.5)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads, d_mlp, layer_norm, activation, bias) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.readout = nn.Linear(d_model, num_outputs, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos  # (B, T, d)
        h = self.blocks(h)
        return self.readout(self.ln_f(h[:, -1]))  # (B, C)


class Transformer(Task):
    """A decoder-style transformer on token sequences (``ModularArithmetic``: grokking).

    N (per member) counts every trainable tensor: the V x d token and T x d position
    embeddings, per block 4 d^2 + 2 d d_mlp weights (+ 4 d + d_mlp + d biases, + 4 d LayerNorm
    gains and biases), the final LayerNorm and the d x C readout (+ C). Width (``d_model``) and
    depth (``n_layers``) scale N for sweeps.

    The training loop also logs the L2 norm of the parameters, ``weights/norm`` (per member
    ``weights/norm/member_k``), at every epoch's end: with weight decay the jump of the test
    accuracy comes with a fall of this norm (Nanda et al. 2023 track the sum of squared weights
    through their cleanup phase; Liu et al. 2023, "Omnigrok", tie grokking to the weight norm).

    Args:
        d_model: d, the width of the residual stream (default 128, Nanda et al. 2023).
        n_layers: L, transformer blocks (default 1).
        n_heads: H, attention heads; must divide d (default 4).
        d_mlp: hidden width of each MLP (default None: 4 d).
        layer_norm: LayerNorm before attention, MLP and readout (default false, as Nanda et al.).
        activation: ``relu`` (default) or ``gelu``.
        bias: biases in every linear layer (default true).
        vocab_size: V (default None: ``num_outputs + 2``, the layout of ``ModularArithmetic``:
            the p residues, the operation and ``=``).
        **kwargs: ``Task`` arguments (loss, lr, ensemble_size, init_seed; input_shape = (T,),
            num_outputs and num_train are linked from the DataModule).

    Example (YAML)::

        model:
          class_path: Transformer
          init_args: {d_model: 64, n_layers: 1, n_heads: 4, init_seed: 0}
        optimizer:
          class_path: torch.optim.AdamW
          init_args: {lr: 1.0e-3, weight_decay: 1.0, betas: [0.9, 0.98]}
    """

    def __init__(
        self,
        d_model: int = 128,
        n_layers: int = 1,
        n_heads: int = 4,
        d_mlp: Optional[int] = None,
        layer_norm: bool = False,
        activation: str = "relu",
        bias: bool = True,
        vocab_size: Optional[int] = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_positive("model.d_model", d_model)
        check_positive("model.n_layers", n_layers)
        check_positive("model.n_heads", n_heads)
        if d_model % n_heads:
            raise ConfigError(f"model.n_heads must divide model.d_model = {d_model}, got {n_heads}")
        if d_mlp is not None:
            check_positive("model.d_mlp", d_mlp)
        check_choice("model.activation", activation, list(ACTIVATIONS))
        if vocab_size is not None:
            check_positive("model.vocab_size", vocab_size)
        if len(self.input_shape) != 1:
            raise ConfigError(f"Transformer reads token sequences: input_shape must be (T,), got {self.input_shape}")
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.d_mlp = d_mlp or 4 * d_model
        self.layer_norm, self.activation, self.bias = layer_norm, activation, bias
        self.vocab_size = vocab_size or self.num_outputs + 2
        self.setup_network()

    def make_network(self) -> nn.Module:
        return DecoderTransformer(
            self.vocab_size, self.input_shape[0], self.num_outputs, self.d_model, self.n_layers, self.n_heads,
            self.d_mlp, self.layer_norm, self.activation, self.bias,
        )  # fmt: skip

    @torch.no_grad()
    def weight_norms(self) -> Tensor:
        """``(K,)``: the L2 norm of each member's parameters, sqrt(sum_i theta_i^2)."""
        params = self.functional_view().params.values()
        K = self.ensemble_size
        squares = [p.reshape(K, -1).square().sum(1) if K > 1 else p.square().sum().reshape(1) for p in params]
        return torch.stack(squares).sum(0).sqrt()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        norms = self.weight_norms().float()
        values = {"weights/norm": norms.mean()}
        if self.ensemble_size > 1:
            values.update({member_name("weights/norm", k): norms[k] for k in range(self.ensemble_size)})
        self.log_dict(values, sync_dist=False)
