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
    softmax restricted to those tokens, and model.token_logprobs() scores every token over the same
    restricted softmax (policy, teacher, student, base), so a message decoded under its grammar is
    valid by construction and RL's gradient falls on the decisions (which item, which action and
    score), not on the format.

Shapes in comments: B batch, T time, C channels, V vocab.
"""

import weakref

import torch

from grammar import row_grammars
from model import GPT, causal_mask, positions


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


@torch.no_grad()
def generate(model, prompts, max_new, pad_id, stop_ids=(), temperature=1.0, generator=None,
             device="cpu", keys=None, compile=False, grammar=None):
    """Sample completions for a batch of prompts with a KV cache (the built-in GPT's is static,
    model.new_cache; a Hugging Face model's is its own cache object).

    prompts: list of id lists (any lengths: they are left-padded so every row's next token is at
    the same column). temperature 0 = greedy. A row stops after emitting a stop id (kept in its
    output) or after max_new tokens. keys: optional list of per-row ints for keyed sampling (see
    sample_next). compile: run the decode steps through torch.compile (built-in GPT only; same
    tokens, see decoder()). grammar: optional list, per row, of a Grammar (None = unconstrained):
    each token is drawn from the softmax restricted to grammar.allowed(what the row wrote so far),
    the support model.token_logprobs scores the same token over. Returns a list of id lists."""
    B = len(prompts)
    P = max(len(p) for p in prompts)
    Tmax = P + max_new
    assert Tmax <= model.max_len, \
        f"prompt+completion {Tmax} exceeds the model's length {model.max_len}"
    step = decoder(model, compile)
    idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, Tmax, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        idx[b, P - len(p):] = torch.tensor(p, device=device)
        valid[b, P - len(p):P] = True
    keys = None if keys is None else torch.tensor([int(k) for k in keys], dtype=torch.long,
                                                  device=device)
    cache = model.new_cache(B, Tmax, device)
    pos_all = positions(valid[:, :P])
    # prefill: all prompt tokens at once
    h = model(idx, pos_all, causal_mask(valid[:, :P]), cache, 0)        # (B,P,C)
    last = h[:, -1]                                                      # (B,C)
    next_pos = pos_all[:, -1] + 1                                        # (B,)
    cols = torch.arange(Tmax, device=device)
    toks = torch.full((B, max_new), pad_id, dtype=torch.long, device=device)   # what each row wrote
    lens = torch.zeros(B, dtype=torch.long, device=device)  # how many of them are its output
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    head_t = model.head_weight.t()  # normalised once, not per step
    grammar = row_grammars(grammar, None, B)
    written = [[] for _ in range(B)]  # each row's tokens so far (grammar)
    for t in range(max_new):
        logits = (last @ head_t).float()                                 # (B,V) head on last only
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
    return [row[:n] for row, n in zip(toks.tolist(), lens.tolist())]


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
