"""
The language model both CoARS agents run on (docs/method.md section 5).

What is here (the built-in tokenizer is the message format's vocabulary: env.Tokenizer):
  - GPT: a small decoder-only transformer in plain PyTorch (the built-in backbone [ours]).
  - LoRA: two named adapters, "rec" (RecAgent) and "user" (UserAgent), on one frozen base. Each
    agent is the base plus its own adapter; with no adapter active the model is the base.
  - GPT.decode: one generation step with fixed shapes (static KV cache), which sampling.py's
    generate() runs, eagerly or through torch.compile.
  - restricted_logprobs: the softmax restricted to the tokens a message's grammar allows at each
    position (grammar.Grammar [ours, docs/method.md section 5]); sampling and every log-prob use it.
  - token_logprobs(): per-token log-probs of given completion tokens, the quantity every loss in
    CoARS needs (Eq. 10-12). The output head runs only on the scored positions and the
    log-sum-exp is taken in row chunks with a hand-written backward, so no float32
    (batch, time, vocab) log-softmax is ever built. Its plain reference is
    token_logprobs_reference() (log_softmax + gather in float64).

Shapes in comments: B batch, T time, C channels, H heads, D head dim, V vocab, N scored tokens.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from grammar import row_grammars, row_supports

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


# --------------------------------------------------------------------------------------------------
# Per-token log-probs (Eq. 10-12 all need log pi(y_n | x, y_<n))


def _acc(dtype):
    """Accumulation dtype: float32 for bf16/fp16/fp32 inputs, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


LOGIT_BUDGET = 1 << 25      # elements of one chunk of logits (128 MB in float32)


class _ChunkedTokenLogprob(torch.autograd.Function):
    """logp[n] = h[n] . W[y[n]] - logsumexp_v(h[n] . W[v]), row chunk by row chunk.

    Forward keeps only (N,) results; backward recomputes each chunk's logits, so peak extra memory
    is one (chunk, V) float32 block instead of (N, V)."""

    @staticmethod
    def forward(ctx, h, w, y, chunk):
        acc = _acc(h.dtype)
        chunk = max(1, min(chunk, LOGIT_BUDGET // w.shape[0]))  # a (chunk, V) block stays ~128 MB
        out = torch.empty(h.shape[0], dtype=acc, device=h.device)
        # The logits are computed in float32 (float64 for float64 inputs) even for bf16 inputs and
        # under autocast: bf16 logits of size ~10 are off by ~0.03, which is the size of the
        # differences the token credit (Eq. 10) is made of.
        with torch.autocast(h.device.type, enabled=False):
            wa = w.to(acc)
            for s in range(0, h.shape[0], chunk):
                z = h[s:s + chunk].to(acc) @ wa.t()                      # (n,V)
                out[s:s + chunk] = z.gather(1,
                                            y[s:s + chunk, None])[:, 0] - torch.logsumexp(z, dim=1)
        ctx.save_for_backward(h, w, y)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        h, w, y = ctx.saved_tensors
        acc = _acc(h.dtype)
        gh = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
        with torch.autocast(h.device.type, enabled=False):
            wa = w.to(acc)
            for s in range(0, h.shape[0], ctx.chunk):
                hc = h[s:s + ctx.chunk].to(acc)
                z = hc @ wa.t()                                          # (n,V) recomputed
                dz = -torch.softmax(z, dim=1)  # d logp / dz = onehot - softmax
                dz.scatter_add_(1, y[s:s + ctx.chunk, None], torch.ones_like(dz[:, :1]))
                dz = dz * g[s:s + ctx.chunk, None].to(acc)               # (n,V)
                if gh is not None:
                    gh[s:s + ctx.chunk] = (dz @ wa).to(h.dtype)
                if gw is not None:
                    gw.addmm_(dz.t(), hc)  # in place: no (V,C) temporary
        return gh, (gw.to(w.dtype) if gw is not None else None), None, None


def logprobs_of(hidden, weight, targets, chunk=1024):
    """log-softmax(hidden @ weight^T)[targets] per row: hidden (N,C), weight (V,C), targets (N,) ->
    (N,)."""
    return _ChunkedTokenLogprob.apply(hidden, weight, targets, chunk)


def pack(prompts, completions, pad_id):
    """Right-pad prompt+completion pairs into one batch.
    Returns idx (B,T), valid (B,T) bool, and score (B,T) bool marking the positions whose NEXT token
    is a completion token (the positions whose output predicts y_n)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    score = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        idx[b, :len(s)] = torch.tensor(s)
        valid[b, :len(s)] = True
        score[b, len(p) - 1:len(s) - 1] = True
    return idx, valid, score


# --------------------------------------------------------------------------------------------------
# Log-probs under a grammar (grammar.py: which tokens a message may hold at each position)

def restricted_logprobs(hidden, weight, allowed, targets, keep=None, temperature=1.0, bias=None):
    """log-softmax over the `allowed` tokens only, at the target: hidden (M,C), weight (V,C),
    allowed (M,K) token ids (each row's choices, e.g. the 20 candidates' item tokens), targets (M,)
    -> (M,). keep (M,K) bool marks the real entries of rows padded to K (None = all). This is the
    distribution a message's token is sampled from under its grammar (grammar.Grammar,
    docs/method.md section 5, [ours]), at the sampling temperature: logits / temperature. bias
    (M,K): the grammar's tilt of each allowed id (Grammar.tilt), added to its logit before the
    temperature (None = none). A target outside its row's allowed ids gets -inf. Float32 logits, as
    logprobs_of."""
    with torch.autocast(hidden.device.type, enabled=False):
        acc = _acc(hidden.dtype)
        z = torch.einsum("mc,mkc->mk", hidden.to(acc), weight[allowed].to(acc))        # (M,K)
        z = (z if bias is None else z + bias.to(acc)) / temperature
        if keep is not None:
            z = z.masked_fill(~keep, float("-inf"))
        hit = (allowed == targets[:, None]) & (True if keep is None else keep)  # (M,K)
        return z.masked_fill(~hit, float("-inf")).logsumexp(1) - z.logsumexp(1)


def padded_supports(supports, device, tilts=None):
    """(allowed (M,K) ids, keep (M,K) bool) from M id lists of any lengths, padded to the longest:
    restricted_logprobs' inputs. tilts: M dicts {id: bias} or None (grammar.row_supports) -> also
    the (M,K) bias, or None where no position is tilted."""
    K = max(len(a) for a in supports)
    allowed = torch.tensor([list(a) + [0] * (K - len(a)) for a in supports], device=device)
    keep = torch.tensor([[k < len(a) for k in range(K)] for a in supports], device=device)
    if tilts is None:
        return allowed, keep
    bias = None
    if any(t for t in tilts):
        bias = torch.tensor([[(t or {}).get(i, 0.0) for i in a] + [0.0] * (K - len(a))
                             for a, t in zip(supports, tilts)], device=device)
    return allowed, keep, bias


def token_logprobs(model, prompts, completions, pad_id, device="cpu", chunk=1024, first=None,
                   grammar=None, temperature=1.0):
    """log pi(y_n | x, y_<n) for every completion token, fast path.

    prompts, completions: lists of id lists. grammar: optional list, one per pair, of the
    grammar.Grammar its completion was decoded under (None = the whole vocabulary): every token is
    scored over the restricted softmax generate() drew it from (restricted_logprobs; a tilted
    grammar's bias included), so policy, teacher and student log-probs share the policy's support.
    first: per pair, the ids its first
    token was chosen among (shorthand for grammar.first_token_grammar). temperature: the
    sampling temperature; the log-probs are those of softmax(logits / temperature), the
    distribution the tokens were drawn from. Returns a list of 1-D tensors (one per pair, length
    len(completion)), differentiable w.r.t. the model's trainable parameters. The head runs only
    on the N scored positions (not on every prompt position): (N,C) @ (C,V) in chunks."""
    idx, valid, score = (t.to(device) for t in pack(prompts, completions, pad_id))
    h = model(idx, positions(valid), causal_mask(valid))                 # (B,T,C)
    hs, tgt = h[score], idx[:, 1:][score[:, :-1]]  # (N,C), (N,) the y_n, row-major
    return score_tokens(model, hs, tgt, completions, device, chunk, first, grammar, temperature)


def score_tokens(model, hs, tgt, completions, device="cpu", chunk=1024, first=None, grammar=None,
                 temperature=1.0):
    """The log-probs of token_logprobs from the hidden states that predict the completions' tokens:
    hs (N,C), tgt (N,) the tokens, row-major over the completions. The hidden states are taken to
    float32 (float64 stays) before the temperature, as sampling.head_logits takes them, so the
    distribution scored is the one sampled from in any dtype."""
    hs = hs.to(_acc(hs.dtype))
    if temperature != 1.0:
        hs = hs / temperature  # logits / T, as sample_next
    lens = [len(c) for c in completions]
    grammar = row_grammars(grammar, first, len(completions))
    if grammar is None:
        return list(logprobs_of(hs, model.head_weight, tgt, chunk).split(lens))
    # each position over its own support: the whole vocabulary (chunked kernel) only where it is
    # free
    supports, tilts = row_supports(grammar, completions, tilts=True)
    supports = [a for row in supports for a in row]                        # (N,) lists or None
    tilts = [t for row in tilts for t in row]                              # (N,) dicts or None
    rows = [n for n, a in enumerate(supports) if a is not None]
    free = [n for n, a in enumerate(supports) if a is None]
    lp = torch.zeros(len(supports), dtype=_acc(hs.dtype), device=hs.device)  # (N,)
    if free:
        free = torch.tensor(free, device=device)
        lp = lp.index_put((free,),
                          logprobs_of(hs[free], model.head_weight, tgt[free], chunk).to(lp.dtype))
    if rows:
        allowed, keep, bias = padded_supports([supports[n] for n in rows], device,
                                              [tilts[n] for n in rows])
        rows = torch.tensor(rows, device=device)                          # (M,)
        bias = None if bias is None else bias / temperature               # hs is already / T
        lp = lp.index_put((rows,),
                          restricted_logprobs(hs[rows], model.head_weight, allowed, tgt[rows],
                                              keep, bias=bias).to(lp.dtype))
    return list(lp.split(lens))


# --------------------------------------------------------------------------------------------------
# Shared prompt prefixes: the prompts of one agent in one episode are a tree (docs/method.md
# section 5). Turn t's prompt is the fixed part (system text, history, candidates), the memory
# lines of turns 1..t-1, then a short tail; the teacher's is the student's with the hindsight
# reference inserted before that tail. So one "trunk" (the longest prompt, cut where no other
# prompt follows it any more) runs once, and each prompt's "branch" (what it adds after the tokens
# it shares with the trunk, then its message) runs against the trunk's keys and values, attending
# only to the trunk's first shared[i] tokens. Causal attention makes this exact: the trunk's keys
# and values at a position depend only on the tokens up to it, which that prompt has too. Its
# plain reference is token_logprobs (each prompt whole); the tests hold the two equal.


def common_prefix(a, b):
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def trunk_of(prompts):
    """(trunk ids, shared): the trunk is the prompt that shares the most tokens with the others, cut
    after the last token any other prompt shares with it; shared[i] <= len(prompts[i]) - 1 is how
    many of prompt i's first tokens are the trunk's (at least its last token stays in its branch,
    whose hidden state predicts the first completion token)."""
    lcp = [[common_prefix(p, q) for q in prompts] for p in prompts]
    best = max(range(len(prompts)), key=lambda i: sum(lcp[i]) - lcp[i][i])
    trunk = prompts[best]
    cut = [min(lcp[best][i], len(p) - 1) for i, p in enumerate(prompts)]
    K = max((c for i, c in enumerate(cut) if i != best), default=cut[best])
    return list(trunk[:K]), [min(c, K) for c in cut]


def run_trunk(model, trunk, device="cpu"):
    """The trunk's keys and values: one (1,T) forward, per layer (k, v) (1,H,T,D), differentiable
    when autograd is on (the student pass back-propagates into them)."""
    ids = torch.tensor([trunk], device=device)
    cache = model.new_cache(1, len(trunk), device)
    model(ids, torch.arange(len(trunk), device=device)[None], None, cache, 0)   # mask None: causal
    return model.cache_kv(cache, len(trunk))


def branch_logprobs(model, trunk_kv, prompts, shared, completions, pad_id, device="cpu", chunk=1024,
                    grammar=None, temperature=1.0):
    """token_logprobs of (prompt, completion) pairs whose prompts' first shared[i] tokens are the
    trunk's (trunk_of, run_trunk): the branches prompts[i][shared[i]:] + completions[i] run as one
    right-padded batch after the trunk's K columns (trunk_kv), each attending to the trunk's first
    shared[i] columns and causally to itself, at positions shared[i], shared[i] + 1, ..."""
    K = trunk_kv[0][0].shape[2] if trunk_kv else 0
    branches = [list(p[s:]) + list(c) for p, s, c in zip(prompts, shared, completions)]
    B, L = len(branches), max(len(b) for b in branches)
    idx = torch.full((B, L), pad_id, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    score = torch.zeros(B, L, dtype=torch.bool)
    seen = torch.zeros(B, K + L, dtype=torch.bool)  # which trunk columns each branch sees
    for b, (br, p, s) in enumerate(zip(branches, prompts, shared)):
        idx[b, :len(br)] = torch.tensor(br)
        valid[b, :len(br)] = True
        score[b, len(p) - s - 1:len(br) - 1] = True
        seen[b, :s] = True
    idx, valid, score, seen = idx.to(device), valid.to(device), score.to(device), seen.to(device)
    mask = seen[:, None, None, :].expand(B, 1, L, K + L).clone()             # (B,1,L,K+L)
    mask[:, :, :, K:] = causal_mask(valid)
    pos = torch.tensor(shared, device=device)[:, None] + torch.arange(L, device=device)  # (B,L)
    cache = model.prefixed_cache(trunk_kv, B, K + L, device)
    h = model(idx, pos, mask, cache, K)                                    # (B,L,C)
    hs, tgt = h[score], idx[:, 1:][score[:, :-1]]                          # (N,C), (N,)
    return score_tokens(model, hs, tgt, completions, device, chunk, None, grammar, temperature)


def shares(prompts, trunk):
    """How many first tokens of each prompt branch_logprobs may take from the trunk: the common
    prefix, leaving at least the prompt's last token to its branch."""
    return [min(common_prefix(p, trunk), len(p) - 1) for p in prompts]


def token_logprobs_reference(model, prompts, completions, pad_id, device="cpu", first=None,
                             grammar=None, temperature=1.0):
    """Plain reference for token_logprobs: each pair alone, full float64 log_softmax of logits / T,
    gather; under a grammar, the logits outside each position's allowed ids set to -inf first, and a
    tilted grammar's bias added per id (before the temperature)."""
    grammar = row_grammars(grammar, first, len(prompts)) or [None] * len(prompts)
    out = []
    for b, (p, c) in enumerate(zip(prompts, completions)):
        s = torch.tensor([list(p) + list(c)], device=device)
        valid = torch.ones_like(s, dtype=torch.bool)
        h = model(s, positions(valid), causal_mask(valid))[0]           # (T,C)
        logits = h.double() @ model.head_weight.double().t() / temperature   # (T,V)
        logits = logits[len(p) - 1:-1].clone()                           # rows predicting y_n
        if grammar[b] is not None:
            for n in range(len(c)):
                support = grammar[b].allowed(c[:n])
                if support is not None:
                    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=device)
                    keep[support] = True
                    logits[n] = logits[n].masked_fill(~keep, float("-inf"))
                for i, b_ in (grammar[b].tilt(c[:n]) or {}).items():
                    logits[n, i] += b_ / temperature
        lp = torch.log_softmax(logits, dim=-1)
        out.append(lp.gather(1, torch.tensor(c, device=device)[:, None])[:, 0])
    return out


@torch.no_grad()
def next_token_scores(model, prompts, choices, pad_id, device="cpu"):
    """(B,K) logits of the ids choices[b] (K per row) as the token after prompts[b]: one forward
    pass over the left-padded batch. The built-in RecAgent's ranking of its candidates
    (eval.rank_metrics, and stage 1's validation in pretrain.py); its softmax is
    restricted_logprobs' distribution."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):              # left-pad so every row's last position is its own
        idx[b, T - len(p):] = torch.tensor(p)
        valid[b, T - len(p):] = True
    idx, valid = idx.to(device), valid.to(device)
    h = model(idx, positions(valid), causal_mask(valid))[:, -1].float()          # (B,C)
    w = model.head_weight.float()[torch.tensor(choices, device=device)]          # (B,K,C)
    return torch.einsum("bc,bkc->bk", h, w)
