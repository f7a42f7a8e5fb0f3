"""
The language model both CoARS agents run on (docs/method.md section 5).

What is here (the built-in tokenizer is the message format's vocabulary: env.Tokenizer):
  - GPT: a small decoder-only transformer in plain PyTorch (the built-in backbone [ours]).
  - LoRA: two named adapters, "rec" (RecAgent) and "user" (UserAgent), on one frozen base. Each
    agent is the base plus its own adapter; with no adapter active the model is the base.
  - GPT.decode: one generation step with fixed shapes (static KV cache), which sampling.py's
    generate() runs, eagerly or through torch.compile.
  - causal_mask / positions: the attention mask and position ids of a padded batch.
Scoring given tokens under the model (per-token log-probs, Eq. 10-12) is scoring.py.

Shapes in comments: B batch, T time, C channels, H heads, D head dim, V vocab, N scored tokens.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """nn.Linear with any number of named low-rank adapters; at most one active at a time.

    y = x W^T + b + (alpha / r) * (x A^T) B^T for the active adapter. B starts at zero, so a fresh
    adapter leaves the base unchanged (a test checks it).
    """

    fold = True    # fold the active adapter into the weight where no gradient flows (forward)

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.scale = {}
        self.active = None
        self._folded, self._folded_key = None, None

    def add_adapter(self, name, r, alpha):
        a = nn.Linear(self.base.in_features, r, bias=False)
        b = nn.Linear(r, self.base.out_features, bias=False)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        a.to(self.base.weight.device)
        b.to(self.base.weight.device)
        self.adapters[name] = nn.Sequential(a, b)
        self.scale[name] = alpha / r

    def forward(self, x):
        if (self.active is not None and self.fold and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            # No gradient flows (rollouts, evaluation, the teacher's pass): one product with the
            # folded weight W + scale B A instead of three. The same map up to float round-off;
            # at a decode step the three small products cost about a third of the layer's time.
            # The folded weight is kept transposed, (in, out) contiguous: a decode step's few rows
            # then stream it about twice as fast as F.linear's (out, in) layout on a CPU
            # (docs/benchmarks.md), and never slower for a prompt's many rows.
            y = x @ self.folded_weight()
            return y if self.base.bias is None else y + self.base.bias
        y = self.base(x)
        if self.active is not None:
            y = y + self.scale[self.active] * self.adapters[self.active](x)
        return y

    def folded_weight(self):
        """(W + scale * B A)^T of the active adapter, (in, out) contiguous, kept until W, A or B
        change (an optimiser step or a load changes their version counters) or another adapter is
        activated."""
        a, b = (lin.weight for lin in self.adapters[self.active])
        w = self.base.weight
        key = (self.active, id(a), a._version, id(b), b._version, id(w), w._version)
        if key != self._folded_key:
            with torch.no_grad():
                self._folded = torch.addmm(w, b, a, alpha=self.scale[self.active]).t().contiguous()
            self._folded_key = key
        return self._folded


# --------------------------------------------------------------------------------------------------
# GPT


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 384
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.fc2 = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rot, mask, cache=None, start=0):
        """x (B,T,C); rot: (cos, sin) each (B,1,T,D/2); mask (B,1,T,Tk) bool, True = may attend;
        cache: (k, v) buffers (B,H,Tmax,D) written at [start, start+T), attended over [0, start+T);
        start may instead be a (1,) tensor: a one-token decode step (see GPT.decode)."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = rotate(q, *rot), rotate(k, *rot)                            # (B,H,T,D)
        if cache is not None and torch.is_tensor(start):
            # One decode step (GPT.decode): static shapes, so one compiled graph serves every step.
            # k, v go in at column `start` ((1,) long tensor) and the query attends over the whole
            # buffer under the mask (B,1,1,Tmax). A plain masked softmax for the single query:
            # torch.compile fuses it (faster than the sdpa kernel on CPU; docs/benchmarks.md).
            # Scores and softmax in float32 whatever the weights' dtype, as sdpa's kernels do.
            ck, cv = cache
            ck.index_copy_(2, start, k)
            cv.index_copy_(2, start, v)
            # (B,H,1,Tmax)
            att = (q.float() @ ck.transpose(-1, -2).float()) * (C // self.n_head) ** -0.5
            y = att.masked_fill(~mask, float("-inf")).softmax(-1).to(cv.dtype) @ cv
        else:
            if cache is not None:
                ck, cv = cache
                ck[:, :, start:start + T] = k
                cv[:, :, start:start + T] = v
                k, v = ck[:, :, :start + T], cv[:, :, :start + T]     # (B,H,Tk,D)
            # mask None: causal without padding (from column 0), which the kernel skips half of
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=mask is None)  # (B,H,T,D)
        y = y.transpose(1, 2).reshape(B, T, C)
        x = x + self.drop(self.proj(y))
        x = x + self.drop(self.fc2(F.gelu(self.fc(self.ln2(x)))))
        return x


class Adapters:
    """LoRA adapter handling shared by the built-in GPT and the Hugging Face wrapper
    (support/hf.py)."""

    def add_lora(self, names=("rec", "user"), r=8, alpha=16, targets=None):
        """Wrap every nn.Linear whose own name is in `targets` (default: self.lora_targets) with
        LoRA and add one adapter per name. The wrapped layer keeps its place, so the base weights'
        state-dict keys only gain a '.base'."""
        targets = set(targets or self.lora_targets)
        found = [(n, m) for n, m in self.named_modules() if n.split(".")[-1] in targets
                 and isinstance(m, (nn.Linear, LoRALinear))]
        if not found:
            raise ValueError(f"no linear layer is named any of {sorted(targets)}")
        for name, lin in found:
            if not isinstance(lin, LoRALinear):
                parent = self.get_submodule(name.rpartition(".")[0]) if "." in name else self
                lin = LoRALinear(lin)
                setattr(parent, name.split(".")[-1], lin)
            for n in names:
                lin.add_adapter(n, r, alpha)

    def lora_modules(self):
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def has_adapter(self, name):
        mods = self.lora_modules()
        return bool(mods) and name in mods[0].adapters

    def set_adapter(self, name):
        """Activate adapter `name` ("rec" / "user") or None for the bare base model."""
        for m in self.lora_modules():
            m.active = name

    def adapter_parameters(self, name):
        return [p for m in self.lora_modules() for p in m.adapters[name].parameters()]

    def base_parameters(self):
        return [p for n, p in self.named_parameters() if ".adapters." not in n]


class GPT(Adapters, nn.Module):
    lora_targets = ("qkv", "proj", "fc", "fc2")

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # Rotary positions (RoPE) [ours]: attention can then find "the token k places back" with
        # one learned pattern for every position, which the agents' copy-like reads need (the
        # item after <|prior|>, the target in the reference); with learned absolute position
        # embeddings the base had not learned them after 2,400 stage-1 steps.
        D = cfg.n_embd // cfg.n_head
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D),
                             persistent=False)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        # The output head is tied to the token embedding (fewer parameters; items get one vector).
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("fc2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    @property
    def head_weight(self):
        """(V,C) output head: the token embeddings, each scaled to unit length [ours].

        Tied but normalised: with plain tied embeddings the ~10k item tokens get norms that grow
        with their popularity, and the model then names popular items it has seen often instead of
        copying the (often rarer) candidates in its prompt. Unit rows make every item equally easy
        to name; ln_f's gain sets the logit scale."""
        return F.normalize(self.wte.weight, dim=-1)

    @property
    def max_len(self):
        return self.cfg.block_size

    def new_cache(self, B, Tmax, device):
        """Static KV cache for generate(): one (k, v) pair of (B,H,Tmax,D) buffers per block."""
        cfg, dtype = self.cfg, self.wte.weight.dtype
        D = cfg.n_embd // cfg.n_head
        return [(torch.zeros(B, cfg.n_head, Tmax, D, device=device, dtype=dtype),
                 torch.zeros(B, cfg.n_head, Tmax, D, device=device, dtype=dtype))
                for _ in range(cfg.n_layer)]

    def cache_kv(self, cache, n):
        """The first n columns of a cache: per block (k, v), each (B,H,n,D)."""
        return [(k[:, :, :n], v[:, :, :n]) for k, v in cache]

    def prefixed_cache(self, kv, B, Tmax, device):
        """A new static cache of B rows whose first columns hold kv (per block (k, v), each
        (1 or B,H,P,D), broadcast over rows): a forward with start=P then attends to them. Under
        autograd the copy is differentiable, so a gradient reaches whatever computed kv."""
        cache = self.new_cache(B, Tmax, device)
        for (K, V), (k, v) in zip(cache, kv):
            K[:, :, :k.shape[2]] = k
            V[:, :, :v.shape[2]] = v
        return cache

    def forward(self, idx, pos, mask, cache=None, start=0):
        """Hidden states (B,T,C) for token ids idx (B,T) at positions pos (B,T).
        mask (B,1,T,Tk) bool: which keys each query may see (causal and padding, built by
        callers); None: causal, no padding, start 0."""
        x = self.wte(idx)
        ang = pos[:, None, :, None].float() * self.inv_freq                # (B,1,T,D/2)
        rot = (ang.cos(), ang.sin())
        for i, blk in enumerate(self.blocks):
            x = blk(x, rot, mask, None if cache is None else cache[i], start)
        return self.ln_f(x)

    def decode(self, tok, pos, valid, cache, col):
        """One generation step: hidden state (B,C) of token tok (B,) at position pos (B,), written
        into the static cache at column col ((1,) long tensor) and attending to the columns where
        valid (B,Tmax) is True. Every shape is fixed for a whole generate() call and col is a
        tensor, so torch.compile traces it once (generate(..., compile=True))."""
        return self(tok[:, None], pos[:, None], valid[:, None, None, :], cache, col)[:, 0]


def build_model(cfg, vocab_size, device):
    """The built-in GPT of train.py's Config (its size options), seeded by cfg.seed."""
    torch.manual_seed(cfg.seed)
    return GPT(GPTConfig(vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, dropout=cfg.dropout)).to(device)


def freeze(model):
    """The frozen base: no gradients, and evaluation mode (stage 1's dropout off from here on)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def rotate(x, cos, sin):
    """RoPE: rotate the two halves of each head's channels by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def causal_mask(valid):
    """valid (B,T) bool (False at padding) -> (B,1,T,T) attention mask: causal, padding keys hidden.
    Every query may also see itself, so padded rows never have an all-False row (which would make
    scaled_dot_product_attention return NaN); padded positions are never read as outputs."""
    B, T = valid.shape
    tri = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return ((tri & valid[:, None, :]) | eye)[:, None]


def positions(valid):
    """Position ids that start at 0 at each row's first real token (left or right padding)."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)
