"""
Sampling rollouts from the language model (model.py): what RL for language models spends much of
its time on, so a concern of its own.

What is here:
  - keyed sampling [ours]: each episode's random draws are a function of its own key and the token's
    step, so an episode is the same in any batch, micro-batch or torchrun rank.
  - generate(): batched sampling with a KV cache (the built-in GPT's is static, a Hugging Face
    model's is its own), left-padded prompts, temperature and stop tokens. Its decode step
    (model.decode) has fixed shapes, so it can run through torch.compile (compile=True).
  - generate_nocache(): the plain reference, one prompt at a time and a full forward per token; the
    tests check generate() against it token for token, compiled or not.
  - decoding under a grammar [ours, docs/method.md section 5] (grammar.Grammar: which tokens may
    come next in one message, given what it holds so far): generate() samples each token from the
    softmax restricted to those tokens, and scoring.token_logprobs() scores every token over the
    same restricted softmax (policy, teacher, student, base), so a message decoded under its
    grammar is valid by construction and RL's gradient falls on the decisions (which item, which
    action and score), not on the format.

Shapes in comments: B batch, T time, C channels, V vocab.
"""

import weakref

import torch

from grammar import row_grammars
from model import GPT, causal_mask, positions
from scoring import common_prefix


# Keyed sampling [ours]. An episode's random draws depend only on its own key and the token's step,
# never on which other episodes share its batch, micro-batch or GPU: each row draws one uniform u, a
# hash of (key, step), and takes the token where the cumulative softmax passes u (inverse-CDF
# sampling, exact in distribution). So a batch rolled out whole, in halves after an out-of-memory
# error, or split over torchrun ranks gives the same episodes. The hash is a 32-bit integer mix (odd
# multipliers below 2^31, so int64 products never overflow); it works on Python ints and on integer
# tensors alike.

_M32 = 0xFFFFFFFF


def hash32(x):
    """A bijective 32-bit integer hash (xor-shift / multiply rounds)."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def keyed_uniform(keys, step):
    """(B,) float64 uniforms in (0,1), a fixed function of (keys[b], step). keys: (B,) int64."""
    return (hash32(hash32(keys) ^ hash32(step + 0x9E3779B)).double() + 0.5) / float(1 << 32)


def sample_next(logits, temperature, generator=None, keys=None, step=0):
    """One token per row of logits (B,V): greedy at temperature 0; keyed inverse-CDF sampling when
    keys are given; else torch.multinomial with `generator`."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)            # (B,V)
    if keys is not None:
        cdf = probs.double().cumsum(-1)  # float64: exact enough at 150k tokens
        u = keyed_uniform(keys, step) * cdf[:, -1]
        return torch.searchsorted(cdf, u[:, None])[:, 0].clamp(max=logits.shape[-1] - 1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def grammar_mask(grammars, prefixes, V, device, done=None):
    """(B,V) bool, True where row b's next token may be drawn: grammars[b].allowed(prefixes[b]);
    rows whose grammar is None, whose support is FREE, or that are done, may draw any token. None
    when no row is restricted."""
    if grammars is None or all(g is None for g in grammars):
        return None
    mask = torch.ones(len(grammars), V, dtype=torch.bool, device=device)
    rows, cols = [], []
    for b, (g, pre) in enumerate(zip(grammars, prefixes)):
        if g is None or (done is not None and done[b]):
            continue
        a = g.allowed(pre)
        if a is None:
            continue
        if not a:
            raise ValueError("a message is complete under its grammar but generation did not "
                             "stop: end the grammar with a stop token")
        rows += [b] * len(a)
        cols += a
        mask[b] = False
    if rows:
        mask[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = True
    return mask


def grammar_bias(grammars, prefixes, V, device, done=None):
    """(B,V) float, each row's Grammar.tilt(prefix) at its ids (0 elsewhere), added to the logits
    before sampling; None when no row is tilted here."""
    if grammars is None:
        return None
    tilts = [None if g is None or (done is not None and done[b]) else g.tilt(pre)
             for b, (g, pre) in enumerate(zip(grammars, prefixes))]
    if all(t is None for t in tilts):
        return None
    bias = torch.zeros(len(grammars), V, device=device)
    for b, t in enumerate(tilts):
        if t:
            ids = torch.tensor(list(t), device=device)
            bias[b, ids] = torch.tensor(list(t.values()), device=device)
    return bias


_COMPILED = weakref.WeakKeyDictionary()      # model -> its compiled decode step


def decoder(model, compile=False):
    """model.decode, or its torch.compile'd version (built once per model and kept). Compiling
    costs seconds per new shape (the first call, then once more when the batch or length changes,
    after which torch marks them dynamic); it pays for itself on long generations."""
    if not compile:
        return model.decode
    if not isinstance(model, GPT):
        raise ValueError("compile=True is for the built-in GPT (a Hugging Face model has its own "
                         "cache)")
    if model not in _COMPILED:
        fn = torch.compile(model.decode)

        def step(*args):
            try:
                return fn(*args)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise CompileError(f"torch.compile could not build the decode step ({why}); run "
                                   "without compilation (drop --compile).") from None
        _COMPILED[model] = step
    return _COMPILED[model]


class CompileError(RuntimeError):
    """torch.compile failed (e.g. no C++ compiler on a CPU, no Triton on a GPU); one sentence."""


def head_logits(h, head_t):
    """(B,V) next-token logits of hidden states h (B,C) under the output head head_t (C,V), in
    float32 whatever the weights' dtype (float64 stays): the precision scoring.score_tokens scores
    the same tokens in, so that on a GPU's bf16 model the distribution sampled from is the one the
    loss scores (bf16 products would be off by about 0.03 in a logit)."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    with torch.autocast(h.device.type, enabled=False):
        return h.to(acc) @ head_t.to(acc)


class Kept:
    """One row's keys and values kept from one generate() call to the next (an agent's cache in an
    episode, env.rollout): ids, the tokens they are of; kv, per layer (k, v), each (H,len(ids),D).
    The next call runs only the tokens of its prompt after the longest prefix it shares with ids."""

    def __init__(self):
        self.ids, self.kv = [], []


@torch.no_grad()
def generate(model, prompts, max_new, pad_id, stop_ids=(), temperature=1.0, generator=None,
             device="cpu", keys=None, compile=False, grammar=None, kept=None, logprobs=None):
    """Sample completions for a batch of prompts with a KV cache (the built-in GPT's is static,
    model.new_cache; a Hugging Face model's is support/hf.KVCache).

    prompts: list of id lists (any lengths: they are left-padded so every row's next token is at
    the same column). temperature 0 = greedy. A row stops after emitting a stop id (kept in its
    output) or after max_new tokens. keys: optional list of per-row ints for keyed sampling (see
    sample_next). compile: run the decode steps through torch.compile (built-in GPT only; same
    tokens, see decoder()). grammar: optional list, per row, of a Grammar (None = unconstrained):
    each token is drawn from the softmax restricted to grammar.allowed(what the row wrote so far),
    the support scoring.token_logprobs scores the same token over. kept: optional list, per row, of
    a Kept: the keys and values of the tokens the row's prompt shares with kept.ids are taken from
    it instead of being computed again, and afterwards it holds this call's (its prompt and the
    message tokens that went through the model). logprobs: an optional list that receives, per row,
    the log-prob of each token written under the distribution it was drawn from (temperature,
    grammar and tilt; 0 for greedy rows is not special: it is the softmax's at temperature 1).
    Returns a list of id lists."""
    B = len(prompts)
    kept = kept or [None] * B
    # Columns: [0, C) the kept keys and values (row b's last c_b of them), [C, C + N) the prompt
    # tokens still to run (row b's last len(new_b)), then the message; all left-padded.
    reuse = [0 if k is None else min(common_prefix(k.ids, p), len(p) - 1)
             for k, p in zip(kept, prompts)]
    news = [p[c:] for p, c in zip(prompts, reuse)]
    C, N = max(reuse), max(len(x) for x in news)
    P = C + N
    Tmax = P + max_new
    longest = max(len(p) for p in prompts) + max_new
    assert longest <= model.max_len, \
        f"prompt+completion {longest} exceeds the model's length {model.max_len}"
    step = decoder(model, compile)
    idx = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, Tmax, dtype=torch.bool, device=device)
    pos_new = torch.zeros(B, N, dtype=torch.long, device=device)
    for b, (x, c) in enumerate(zip(news, reuse)):
        idx[b, N - len(x):] = torch.tensor(x, device=device)
        valid[b, C - c:C] = True
        valid[b, P - len(x):P] = True
        pos_new[b, N - len(x):] = c + torch.arange(len(x), device=device)
    keys = None if keys is None else torch.tensor([int(k) for k in keys], dtype=torch.long,
                                                  device=device)
    if C:
        cache = model.prefixed_cache(_left_padded(kept, reuse, C, device), B, Tmax, device)
    else:
        cache = model.new_cache(B, Tmax, device)
    # prefill: every prompt token not kept, at once, attending to the kept columns
    h = model(idx, pos_new, causal_mask(valid[:, :P])[:, :, C:], cache, C)   # (B,N,C)
    last = h[:, -1]                                                      # (B,C)
    next_pos = torch.tensor([len(p) for p in prompts], device=device)    # (B,)
    cols = torch.arange(Tmax, device=device)
    toks = torch.full((B, max_new), pad_id, dtype=torch.long, device=device)   # what each row wrote
    lens = torch.zeros(B, dtype=torch.long, device=device)  # how many of them are its output
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    # normalised once, not per step; (C,V) contiguous: a few rows stream it faster than (V,C)^T
    head_t = model.head_weight.t().contiguous()
    grammar = row_grammars(grammar, None, B)
    written = [[] for _ in range(B)]  # each row's tokens so far (grammar)
    lps = torch.zeros(B, max_new, dtype=torch.float64, device=device)
    fed = 0                                  # message columns that went through the model
    for t in range(max_new):
        logits = head_logits(last, head_t)                               # (B,V) head on last only
        # (B,V) or None
        gmask = grammar_mask(grammar, written, logits.shape[1], device, done.tolist())
        if gmask is not None:
            logits = logits.masked_fill(~gmask, float("-inf"))
        gbias = grammar_bias(grammar, written, logits.shape[1], device, done.tolist())
        if gbias is not None:   # a tilted grammar (the RecAgent's item under --prior-weight)
            logits = logits + gbias
        tok = sample_next(logits, temperature, generator, keys, t)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        toks[:, t] = tok
        if logprobs is not None:
            lp = torch.log_softmax(logits / (temperature or 1.0), -1)     # (B,V)
            lps[:, t] = lp.gather(1, tok[:, None])[:, 0].double()
        if grammar is not None:
            for b, v in enumerate(tok.tolist()):
                written[b].append(v)
        lens += ~done
        done = done | torch.isin(tok, stop)
        if t == max_new - 1 or bool(done.all()):
            break
        col = P + t
        # finished rows keep feeding pad tokens: harmless, their output is unused
        valid[:, col] = True
        last = step(tok, next_pos, valid, cache, cols[col:col + 1])     # (B,C)
        next_pos = next_pos + 1
        fed = t + 1
    outs = [row[:n] for row, n in zip(toks.tolist(), lens.tolist())]
    if logprobs is not None:
        logprobs.extend(row[:n] for row, n in zip(lps.tolist(), lens.tolist()))
    if any(k is not None for k in kept):
        _keep(model, cache, kept, prompts, outs, valid, P, fed)
    return outs


def _left_padded(kept, reuse, C, device):
    """Per layer (k, v) of (B,H,C,D): row b's first reuse[b] kept columns at its right end."""
    rows = [k for k in kept if k is not None and k.kv]
    out = []
    for layer in range(len(rows[0].kv)):
        pair = []
        for j in (0, 1):
            ref = rows[0].kv[layer][j]                                   # (H,L,D)
            x = ref.new_zeros(len(kept), ref.shape[0], C, ref.shape[2])  # (B,H,C,D)
            for b, (k, c) in enumerate(zip(kept, reuse)):
                if c:
                    x[b, :, C - c:] = k.kv[layer][j][:, :c]
            pair.append(x.to(device))
        out.append(tuple(pair))
    return out


def _keep(model, cache, kept, prompts, outs, valid, P, fed):
    """Store in each row's Kept the keys and values of its prompt and of the message tokens that
    went through the model (the first `fed` of them)."""
    kv = model.cache_kv(cache, P + fed)                                  # per layer (B,H,P+fed,D)
    for b, k in enumerate(kept):
        if k is None:
            continue
        n = min(len(outs[b]), fed)
        cols = valid[b, :P + fed].nonzero()[:, 0][:len(prompts[b]) + n]  # its real columns
        k.ids = list(prompts[b]) + list(outs[b][:n])
        k.kv = [(kk[b][:, cols], vv[b][:, cols]) for kk, vv in kv]


@torch.no_grad()
def generate_nocache(model, prompts, max_new, pad_id, stop_ids=(), temperature=1.0, generator=None,
                     device="cpu", keys=None, grammar=None):
    """Plain reference for generate(): one prompt at a time, full forward at every step, no cache.
    With temperature 0, or with keys, it must give exactly generate()'s tokens. A grammar's support
    is applied as a plain -inf mask over the row's allowed ids, its tilt as a plain sum per id."""
    out = []
    grammar = row_grammars(grammar, None, len(prompts)) or [None] * len(prompts)
    for b, p in enumerate(prompts):
        seq = list(p)
        res = []
        key = None if keys is None else torch.tensor([int(keys[b])], device=device)
        for n in range(max_new):
            s = torch.tensor([seq], device=device)
            valid = torch.ones_like(s, dtype=torch.bool)
            h = model(s, positions(valid), causal_mask(valid))[0, -1]
            logits = (h @ model.head_weight.t()).float()[None]
            support = None if grammar[b] is None else grammar[b].allowed(res)
            if support is not None:
                keep = torch.zeros_like(logits, dtype=torch.bool)
                keep[0, support] = True
                logits = logits.masked_fill(~keep, float("-inf"))
            tilt = None if grammar[b] is None else grammar[b].tilt(res)
            for i, bias in (tilt or {}).items():
                logits[0, i] += bias
            tok = int(sample_next(logits, temperature, generator, key, n)[0])
            res.append(tok)
            seq.append(tok)
            if tok in stop_ids:
                break
        out.append(res)
    return out
