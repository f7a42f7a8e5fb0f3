"""
Per-token log-probs, the quantity every loss in CoARS needs (Eq. 10-12: log pi(y_n | x, y_<n)), and
the RecAgent's scores of its candidates. A file of its own because scoring given tokens is a
concern apart from the model that is scored (model.py): the same kernels serve the built-in GPT
and any Hugging Face backbone (support/hf.py), and sampling.py samples from the same distribution.

What is here:
  - token_logprobs(): per-token log-probs of given completion tokens. The output head runs only on
    the scored positions and the log-sum-exp is taken in row chunks with a hand-written backward
    (_ChunkedTokenLogprob), so no float32 (batch, time, vocab) log-softmax is ever built. Its plain
    reference is token_logprobs_reference() (log_softmax + gather in float64).
  - restricted_logprobs: the softmax restricted to the tokens a message's grammar allows at each
    position (grammar.Grammar [ours, docs/method.md section 5]); sampling and every log-prob use it.
  - Shared prompt prefixes (trunk_of, run_trunk, branch_logprobs; docs/method.md section 5): one
    agent's prompts in one episode run as one trunk and short branches, equal to token_logprobs.
  - next_token_scores(): the built-in RecAgent's ranking of its candidates.

Shapes in comments: B batch, T time, C channels, V vocab, N scored tokens, K keys.
"""

import numpy as np
import torch

from grammar import row_grammars, row_supports
from model import causal_mask, positions


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
