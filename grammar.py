"""
Grammars of the agents' messages [ours, docs/method.md section 5]: which tokens a message may hold
at each position. Sampling (sampling.generate) and every log-prob (scoring.token_logprobs: policy,
teacher, student, the --user-kl base) read the same Grammar.allowed, so a message is decoded from,
and scored under, one restricted softmax. A file of its own because env.py (the built-in message
format), support/chat.py (chat models' titles and replies), sampling.py and scoring.py all build or
read grammars; it is plain Python, no tensors.

A message is a sequence of parts; each part is
  - a prefix-free set of token sequences (stored as a trie of nested dicts): e.g. the RecAgent's
    item among the 20 candidates, or a chat model's title among their titles;
  - FREE: any tokens until the end of the message (no restriction);
  - Text(limit, stops): free text of at most `limit` tokens, then one of the stop ids (a chat
    model's reason, support/chat.py), so the message is never cut off at a length limit.
The built-in RecAgent's grammar is four one-token parts: its item among the 20 candidates,
<|why|>, a history item, <|end|> (env.Tokenizer.rec_grammar); --decoding item restricts only the
first token (first_token_grammar), --decoding free nothing.
[ours] A grammar may also tilt its first part: `bias` {token id: b} is added to those tokens' logits
where the message's first token is drawn (before the temperature), so the restricted softmax there
is softmax(logit + b) over the allowed ids. The built-in RecAgent's item takes SASRec's opinion of
every candidate this way (--prior-weight, env.Tokenizer.rec_grammar, docs/method.md section 2).
Sampling and every log-prob read it where they read allowed (Grammar.tilt).
"""

FREE = None          # a part that allows any token, to the end of the message


class Text:
    """A grammar part of free text: any tokens, a stop id ends the part (and is part of it); after
    `limit` tokens without one, only the stop ids may come. A message whose last part is a Text
    therefore always ends with a stop id, never cut off at a length limit."""

    def __init__(self, limit, stops):
        self.limit, self.stops = int(limit), tuple(int(s) for s in stops)
        assert self.limit >= 0 and self.stops, \
            "a Text part needs a length limit and at least one stop id"

    def __eq__(self, other):
        return isinstance(other, Text) and (self.limit, self.stops) == (other.limit, other.stops)

    __hash__ = None


def trie(seqs):
    """Nested dicts over token sequences; a leaf is {}. The set must be prefix-free (so a part ends
    exactly where one of its sequences does); repeats are fine."""
    root = {}
    seqs = [tuple(int(t) for t in s) for s in seqs]
    if not seqs or not all(seqs):
        raise ValueError("a grammar part needs at least one sequence, none of them empty")
    for sq in seqs:
        node = root
        for t in sq[:-1]:
            if t in node and not node[t]:
                raise ValueError(f"grammar part is not prefix-free: a sequence ends inside {sq}")
            node = node.setdefault(t, {})
        if node.get(sq[-1]):
            raise ValueError(f"grammar part is not prefix-free: {sq} is the start of another "
                             "sequence")
        node[sq[-1]] = {}
    return root


class Grammar:
    """The messages an agent may write: parts in order, each a list of token sequences (or its
    trie), FREE, or a Text part.
    allowed(prefix) -> the ids that may come next after `prefix` (a list of ids the message holds
    so far), in the order the part lists them; None where any token may (a FREE part, a Text part
    under its limit); a prefix the grammar cannot produce is an error.
    tilt(prefix) -> {id: bias} added to the logits there, or None (no tilt: every position but the
    first, and every position of a grammar built without `bias`)."""

    def __init__(self, parts, bias=None):
        # a part may be given as a trie already (a dict from trie()), shared read-only between
        # grammars
        self.parts = [p if p is FREE or isinstance(p, (dict, Text)) else trie(p) for p in parts]
        self.bias = {int(t): float(b) for t, b in bias.items()} if bias else None
        if self.bias and (self.parts[0] is FREE or isinstance(self.parts[0], Text)
                          or not set(self.bias) <= set(self.parts[0])):
            raise ValueError("a grammar's bias must name first tokens of its first part")

    def __eq__(self, other):
        return (isinstance(other, Grammar) and self.parts == other.parts
                and self.bias == other.bias)

    __hash__ = None

    def allowed(self, prefix):
        k, node, n = 0, self.parts[0], 0  # part k, where in its trie, tokens of its text so far
        for t in prefix:
            t = int(t)
            if node is FREE:
                return None
            if isinstance(node, Text):
                if t not in node.stops:
                    n += 1
                    if n > node.limit:
                        raise ValueError(f"token {t} at position {len(prefix)}: the text part is "
                                         f"longer than its limit of {node.limit} tokens")
                    continue
                node = {}                   # a stop id ends the text part
            else:
                node = node.get(t)
                if node is None:
                    raise ValueError(f"token {t} at position {len(prefix)} is outside the "
                                     "message's grammar")
            if not node:                    # a part is complete: the next one starts
                k, n = k + 1, 0
                if k == len(self.parts):
                    return []               # the message is complete
                node = self.parts[k]
        if isinstance(node, Text):
            return None if n < node.limit else list(node.stops)
        return None if node is FREE else list(node)

    def tilt(self, prefix):
        return self.bias if self.bias and len(prefix) == 0 else None

    def max_len(self):
        """The longest message the grammar allows (tokens), or None when a part is FREE."""
        def depth(node):
            return 1 + max(depth(c) for c in node.values()) if node else 0
        if any(p is FREE for p in self.parts):
            return None
        return sum(p.limit + 1 if isinstance(p, Text) else depth(p) for p in self.parts)


def first_token_grammar(ids, bias=None):
    """Only the first token restricted (to ids), the rest free: the RecAgent's item among the
    candidates, the message otherwise unconstrained (--decoding item)."""
    return Grammar([[[int(i)] for i in ids], FREE], bias)


def row_grammars(grammar, first, B):
    """generate()'s per-row grammars: `grammar` as given, or first_token_grammar of each row's
    `first` ids (rows whose entry is None: unconstrained); None when no row is restricted."""
    if grammar is None and first is not None:
        grammar = [None if f is None else first_token_grammar(f) for f in first]
    if grammar is None or all(g is None for g in grammar):
        return None
    assert len(grammar) == B, "one grammar (or None) per prompt"
    return list(grammar)


def row_supports(grammars, completions, tilts=False):
    """Per pair b and completion position n, the ids grammars[b] allows there
    (grammars[b].allowed(completions[b][:n]); None = the whole vocabulary): the support that
    sampling.generate drew each token from. tilts=True: also, in the same layout, each position's
    Grammar.tilt (None = no bias), as a second list."""
    out, tl = [], []
    for g, c in zip(grammars, completions):
        out.append([None] * len(c) if g is None else [g.allowed(c[:n]) for n in range(len(c))])
        tl.append([None] * len(c) if g is None else [g.tilt(c[:n]) for n in range(len(c))])
    return (out, tl) if tilts else out
