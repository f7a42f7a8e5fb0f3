"""
The multi-turn environment of CoARS (docs/method.md section 2): what each agent sees, what it must
write, and the batched loop in which a RecAgent and a UserAgent talk.

Message formats of the built-in model (token level; `tok.decode` shows them as text):

  RecAgent prompt   <|rec|><|cands|>c0..c19[<|prior|>p]<|mem|>MEMORY[REFERENCE]<|hist|>h1..h10
  RecAgent message  ITEM <|why|> RATIONALE <|end|>          e.g. <|item_7|><|why|><|item_3|><|end|>
  UserAgent prompt  <|user|><|mem|>MEMORY[REFERENCE]<|hist|>h1..h10<|msg|>REC MESSAGE
                    <|peers|>3/5 4.2<|ans|>
  UserAgent message ACTION SCORE <|why|> JUSTIFICATION <|end|>
                    e.g. <|skip|>0.31<|why|><|item_5|><|end|>
  MEMORY            for each earlier turn: <|turn|> rec message <|msg|> user message
                    (without <|end|>)
  REFERENCE         the hindsight reference d (distill.py), teacher prompts only

[ours] The RecAgent names its item by the item's own token, and the RecAgent prompt ENDS with the
history, so the first answer token is predicted exactly where stage 1's next-item language model
predicts the item after a history (pretrain.py): the base's knowledge of what users take next is
the RecAgent's answer distribution. The SASRec prior appears in turn 1 only (Trajectory.prior None:
no hint). [ours] --prior-weight w > 0: SASRec's log-softmax over the candidates
(Trajectory.prior_lp) also tilts the RecAgent's item at every turn, w times it added to the item
logits in its grammar (Tokenizer.prior_bias; docs/method.md section 2).
[ours] Messages are decoded under their grammar (docs/method.md section 5; grammar.Grammar),
--decoding:
  grammar  (default) RecAgent: ITEM among the 20 candidates, <|why|>, one history item, <|end|>;
           UserAgent: ACTION, a score d.dd inside that action's interval, <|why|>, one history
           item, <|end|>. Every message is valid by construction.
  item     the RecAgent's ITEM among the candidates, every other token free (the default before the
           grammar): invalid messages happen, more often at temperature 1 than greedily.
  free     nothing restricted: a non-candidate item is an invalid message too.
Sampling and every log-prob of the loss (distill.py) use the same restricted softmax: one place
builds a message's grammar (message_grammar) and one decodes messages (write_messages).
The UserAgent never sees the candidates or the target.
Validity [ours]: a RecAgent message is valid when it is ITEM <|why|> ... <|end|> with ITEM among
the candidates; a UserAgent message when it is ACTION d.dd <|why|> ... <|end|> with the score in
[0, 1] and inside the action's interval (dislike [0,.25), skip [.25,.5), star [.5,.75),
click [.75,1]). After an invalid RecAgent message the user has nothing to answer: that turn has no
user message. The episode ends at the first click or after t_max turns; the final recommendation
is the last turn's item (None, a miss, if that message was invalid).
"""

import re
from dataclasses import dataclass, field

import numpy as np
import tiktoken
import torch

from grammar import FREE, Grammar, trie
from sampling import Kept, generate, hash32

ACTION_RANGE = {"dislike": (0.0, 0.25), "skip": (0.25, 0.5), "star": (0.5, 0.75),
                "click": (0.75, 1.0)}
POSITIVE = ("click", "star")
_SCORE = re.compile(r"^(0\.\d\d|1\.00)$")
DECODING = ("grammar", "item", "free")      # --decoding (module docstring)


def action_of_score(s):
    """The action whose interval holds score s (docs/method.md section 2, [ours])."""
    for a in ("dislike", "skip", "star"):
        if s < ACTION_RANGE[a][1]:
            return a
    return "click"


def score_fits(action, s):
    """True when score s lies in the action's interval (click includes 1.0): a UserAgent message
    whose action contradicts its score is invalid (docs/method.md section 2, [ours])."""
    lo, hi = ACTION_RANGE[action]
    return lo <= s < hi or (action == "click" and s == 1.0)


@dataclass
class Turn:
    rec_out: list                 # RecAgent's tokens, as written
    item: int = None              # recommended item (None when the message is invalid)
    rec_valid: bool = False
    user_out: list = None         # UserAgent's tokens (None when there was nothing to answer)
    action: str = None
    score: float = None
    user_valid: bool = False
    hit: int = 0
    q: float = 0.0                # peer signal q_t in [-1, 1] (docs/method.md section 2)
    peer_text: str = ""
    rec_prompt: list = None       # the student prompts the messages were written from
    user_prompt: list = None


@dataclass
class Trajectory:
    split: str
    row: int                      # sample index within the split
    user: int
    hist: list
    target: int
    cands: list
    prior: int
    turns: list = field(default_factory=list)
    prior_lp: list = None         # SASRec's log-softmax over cands, in their order (--prior-weight)
    done: bool = False
    key: int = 0  # sampling key of the episode (sampling.sample_next): its draws depend on it alone

    @property
    def final_item(self):
        return self.turns[-1].item if self.turns else None

    @property
    def hit(self):
        return int(self.final_item is not None and self.final_item == self.target)


def new_trajectory(data, split, row):
    lp = getattr(data, f"{split}_prior_lp", None)
    return Trajectory(split, int(row), int(getattr(data, f"{split}_user")[row]),
                      data.history(split, row), int(getattr(data, f"{split}_target")[row]),
                      getattr(data, f"{split}_cands")[row].tolist(),
                      int(getattr(data, f"{split}_prior")[row]),
                      prior_lp=None if lp is None else lp[row].tolist())


# --------------------------------------------------------------------------------------------------
# The message format (the built-in model's)

# Control tokens of the message format. Order fixes their ids.
CONTROL_TOKENS = [
    "<|pad|>", "<|end|>",
    "<|rec|>", "<|user|>",            # whose prompt this is
    "<|hist|>", "<|cands|>", "<|prior|>", "<|mem|>", "<|turn|>", "<|msg|>", "<|peers|>", "<|ans|>",
    "<|why|>",                        # rationale (RecAgent) / justification (UserAgent)
    "<|click|>", "<|star|>", "<|skip|>", "<|dislike|>",   # the four user actions
    "<|hind|>", "<|/hind|>", "<|target|>", "<|right|>", "<|wrong|>", "<|invalid|>",  # hindsight ref
]
ACTIONS = ["click", "star", "skip", "dislike"]


class Tokenizer:
    """The built-in model's message format: its vocabulary (a tiktoken.Encoding built in code, no
    download: the 256 byte tokens, the control tokens above, one special token per item) and the
    agents' prompts and messages in it (the methods below the vocabulary's). This object is the
    format seam: support/chat.ChatTokenizer has the same methods in natural language, and the loop
    only ever calls them.

    Prompts are assembled from ids directly (`sp`, `item`, `text`): tiktoken's special-token regex
    over thousands of item tokens makes `encode(allowed_special=...)` ~1 ms per prompt, too slow for
    rollouts, while `encode_ordinary` on plain text is fast. `decode` shows any id sequence.
    """

    chat = False          # the token-level format (support/chat.ChatTokenizer: natural language)
    rec_max_new = 8  # longest RecAgent message: ITEM <|why|> RATIONALE <|end|>, with room to spare
    user_max_new = 12     # longest UserAgent message: ACTION d.dd <|why|> JUSTIFICATION <|end|>
    eval_batch = 256  # episodes per batched generation in evaluation (short prompts, small model)

    def __init__(self, n_items, prior_weight=0.0):
        self.n_items = n_items
        self.prior_weight = float(prior_weight)     # --prior-weight (rec_grammar)
        specials = CONTROL_TOKENS + [f"<|item_{i}|>" for i in range(n_items)]
        self.special_ids = {s: 256 + j for j, s in enumerate(specials)}
        # Split text into runs of non-'<' characters so that no byte merges ever apply (there are
        # none: the ranks are the 256 single bytes).
        self.enc = tiktoken.Encoding(
            name=f"coars-bytes-{n_items}",
            pat_str=r"[^<]+|<",
            mergeable_ranks={bytes([b]): b for b in range(256)},
            special_tokens=self.special_ids,
        )
        self.item0 = self.special_ids["<|item_0|>"] if n_items else 256 + len(CONTROL_TOKENS)
        self.vocab_size = 256 + len(specials)
        self.pad_id = self.special_ids["<|pad|>"]
        self.end_id = self.special_ids["<|end|>"]
        self.stop_ids = (self.end_id,)
        self.action_ids = {a: self.special_ids[f"<|{a}|>"] for a in ACTIONS}

    def sp(self, name):
        """Id of a control token, e.g. sp('hist') -> id of <|hist|>."""
        return self.special_ids[f"<|{name}|>"]

    def item(self, i):
        """Id of the token for item index i (0..n_items-1)."""
        return self.item0 + int(i)

    def is_item(self, tid):
        return self.item0 <= tid < self.item0 + self.n_items

    def item_of(self, tid):
        return tid - self.item0

    def text(self, s):
        """Ids of plain text (bytes)."""
        return self.enc.encode_ordinary(s)

    def decode(self, ids):
        return self.enc.decode([int(t) for t in ids if int(t) != self.pad_id])

    # ---------------------------------------------------------------------------------------------
    # Prompts

    def _strip_end(self, ids):
        return [t for t in ids if t != self.end_id]

    def memory(self, turns, for_user=False):
        """M_{t-1}: every earlier (m_rec, m_user), in order (the same tokens for both agents)."""
        ids = []
        for tr in turns:
            ids += [self.sp("turn")] + (self._strip_end(tr.rec_out) if tr.rec_valid
                                        else [self.sp("invalid")])
            if tr.user_out is not None:
                ids += [self.sp("msg")] + (self._strip_end(tr.user_out) if tr.user_valid
                                           else [self.sp("invalid")])
        return ids

    def render_rec(self, traj, t, reference=()):
        """RecAgent prompt x_t for turn t (0-based) of traj; reference = hindsight tokens (teacher
        only)."""
        ids = [self.sp("rec"), self.sp("cands")] + [self.item(i) for i in traj.cands]
        if t == 0 and traj.prior is not None:
            ids += [self.sp("prior"), self.item(traj.prior)]
        ids += [self.sp("mem")] + self.memory(traj.turns[:t]) + list(reference)
        # the answer's item comes next
        return ids + [self.sp("hist")] + [self.item(i) for i in traj.hist]

    def render_user(self, traj, t, reference=()):
        """UserAgent prompt for turn t: memory, history, the RecAgent's message and peer
        opinions."""
        tr = traj.turns[t]
        ids = [self.sp("user"), self.sp("mem")]
        ids += self.memory(traj.turns[:t], for_user=True) + list(reference)
        ids += [self.sp("hist")] + [self.item(i) for i in traj.hist]
        ids += [self.sp("msg")] + self._strip_end(tr.rec_out)
        ids += [self.sp("peers")] + self.text(tr.peer_text)
        return ids + [self.sp("ans")]

    def answer_choices(self, traj):
        """The ids the RecAgent's first token is decoded among: the candidates' item tokens."""
        return [self.item(i) for i in traj.cands]

    # ---------------------------------------------------------------------------------------------
    # Grammars of the messages (grammar.Grammar; docs/method.md section 5, [ours])

    def prior_bias(self, traj, items=None):
        """[ours, --prior-weight w] {item token: w * SASRec's log-softmax of that candidate}: the
        tilt of the RecAgent's item (grammar.Grammar's bias), so that it is drawn from
        softmax(logit + w log p_SASRec) over the candidates, a product of the agent's and SASRec's
        opinions of every candidate, at every turn. None when w = 0 or the trajectory carries no
        prior (eval's no-hint ranking sets traj.prior None: no SASRec opinion at all)."""
        if not self.prior_weight or traj.prior is None or traj.prior_lp is None:
            return None
        keep = set(traj.cands if items is None else items)
        return {self.item(c): self.prior_weight * lp for c, lp in zip(traj.cands, traj.prior_lp)
                if c in keep}

    def rec_grammar(self, traj, items=None):
        """ITEM <|why|> RATIONALE <|end|>: ITEM among `items` (default the candidates), RATIONALE a
        history item; the item tilted by SASRec's opinion under --prior-weight (prior_bias)."""
        return Grammar([[[self.item(i)] for i in (traj.cands if items is None else items)],
                        [[self.sp("why")]], [[self.item(i)] for i in traj.hist], [[self.end_id]]],
                       self.prior_bias(traj, items))

    def user_grammar(self, traj):
        """ACTION d.dd <|why|> JUSTIFICATION <|end|>: the score inside the action's interval, the
        justification a history item."""
        if not hasattr(self, "_scores"):  # the trie of the 101 (action, score) heads, built once
            self._scores = trie([[self.action_ids[action_of_score(k / 100)]]
                                 + self.text(f"{k / 100:.2f}") for k in range(101)])
        return Grammar([self._scores, [[self.sp("why")]], [[self.item(i)] for i in traj.hist],
                        [[self.end_id]]])

    # ---------------------------------------------------------------------------------------------
    # Messages and their parsing

    def parse_rec(self, out, cands):
        """-> the recommended item index, or None (invalid: malformed, or not a candidate)."""
        if (len(out) < 3 or out[-1] != self.end_id or out[1] != self.sp("why")
                or not self.is_item(out[0])):
            return None
        item = self.item_of(out[0])
        return item if item in cands else None

    def parse_user(self, out):
        """-> (action, score) or None (invalid)."""
        if len(out) < 3 or out[-1] != self.end_id or self.sp("why") not in out:
            return None
        inv = {v: k for k, v in self.action_ids.items()}
        if out[0] not in inv:
            return None
        w = out.index(self.sp("why"))
        if any(t >= 256 for t in out[1:w]):
            return None
        text = bytes(out[1:w]).decode("latin-1")
        if not _SCORE.match(text):
            return None
        score = float(text)
        if not score_fits(inv[out[0]], score):
            return None
        return inv[out[0]], score

    def rec_message(self, item, rationale):
        """RecAgent message naming `item`, with a history item as its rationale."""
        return [self.item(item), self.sp("why"), self.item(rationale), self.end_id]

    def user_message(self, action, score, justification):
        """UserAgent message: an action, its score, and a history item as the justification."""
        return ([self.action_ids[action]] + self.text(f"{score:.2f}")
                + [self.sp("why"), self.item(justification), self.end_id])


def peer_opinion(data, user, item):
    """(text, q_t): how many of the user's peers interacted with the item (and their mean rating),
    and q_t = sum_j w_j * (+1 if peer j interacted else -1) (docs/method.md section 2, [ours])."""
    sets = data.train_sets()
    peers, w = data.peers[user], data.peer_w[user]
    hits = [item in sets[p] for p in peers]
    q = float(sum(wj * (1 if h else -1) for wj, h in zip(w, hits)))
    text = f"{sum(hits)}/{len(peers)}"
    if data.has_ratings and any(hits):
        text += f" {np.mean([sets[p][item] for p, h in zip(peers, hits) if h]):.1f}"
    return text, q


# --------------------------------------------------------------------------------------------------
# The batched multi-turn loop


def record_user(data, traj, tr):
    """Fill the peer opinion of a turn whose RecAgent message is valid."""
    tr.peer_text, tr.q = peer_opinion(data, traj.user, tr.item)


def rejected_items(turns):
    """The items the user turned down (a valid skip or dislike) in these turns of an episode."""
    return {t.item for t in turns if t.user_valid and t.action not in POSITIVE}


def finish_turn(traj, tr, t_max):
    tr.hit = int(tr.item is not None and tr.item == traj.target)
    if (tr.user_valid and tr.action == "click") or len(traj.turns) >= t_max:
        traj.done = True


def candidate_bias(tok, trajs):
    """(B,20) float tensor: each trajectory's RecAgent tilt (Tokenizer.prior_bias) of its
    candidates, in cands order, to add to their item-token logits; None when no trajectory is
    tilted."""
    bias = [tok.prior_bias(tr) for tr in trajs]
    if not any(bias):
        return None
    return torch.tensor([[(b or {}).get(tok.item(c), 0.0) for c in tr.cands]
                         for b, tr in zip(bias, trajs)])


def message_grammar(tok, traj, agent, decoding="grammar", items=None):
    """The Grammar (grammar.Grammar) of the message `agent` ("rec" / "user") writes next in traj
    under --decoding (module docstring), or None (unconstrained). items: the RecAgent's choices
    (default the candidates). The same for a chat model (support/chat.ChatTokenizer's grammars: the
    title among the candidates' titles, the action and a score inside its interval, a bounded
    reason)."""
    if decoding == "free":
        return None
    if agent == "rec":
        g = tok.rec_grammar(traj, items)
        # item: the rest unconstrained
        return Grammar([g.parts[0], FREE], g.bias) if decoding == "item" else g
    return tok.user_grammar(traj) if decoding == "grammar" else None


def max_new_tokens(tok, agent, grammars):
    """How many tokens a batch of messages may run to: the format's limit (tok.rec_max_new /
    user_max_new), where an unconstrained message may be cut off, or more where a bounded grammar
    allows a longer message (a chat model's long title and reason), so that no message decoded
    under its grammar is ever cut off. Generation stops once every row has written its stop id."""
    limit = tok.rec_max_new if agent == "rec" else tok.user_max_new
    bounds = [g.max_len() for g in grammars if g is not None]
    return max([limit] + [b for b in bounds if b is not None])


def write_messages(model, tok, trajs, agent, adapter, prompts, temperature=0.0, generator=None,
                   device="cpu", batch=256, compile=False, decoding="grammar", items=None,
                   kept=None):
    """The one place a message is decoded: `agent` ("rec" / "user") writes its next message in each
    trajectory from its prompt, under message_grammar, with the LoRA adapter `adapter` active (None:
    the bare base; no adapter is active afterwards). Keyed sampling by message_key unless a torch
    generator is given. items: per trajectory, the RecAgent's choices (None = the candidates).
    kept: per trajectory, this agent's sampling.Kept (the keys and values of its last prompt and
    message in the episode), or None. Returns the messages (id lists)."""
    model.set_adapter(adapter)
    keys = [message_key(tr, 0 if agent == "rec" else 1)
            for tr in trajs] if generator is None else None
    grammars = [message_grammar(tok, tr, agent, decoding, None if items is None else items[k])
                for k, tr in enumerate(trajs)]
    outs = generate_all(model, prompts, max_new_tokens(tok, agent, grammars), tok, temperature,
                        generator, device, batch, keys, compile, grammars, kept)
    model.set_adapter(None)
    return outs


@torch.no_grad()
def rollout(model, tok, data, trajs, t_max=5, temperature=1.0, generator=None, device="cpu",
            rec_adapter="rec", user_adapter="user", batch=256, compile=False, decoding="grammar",
            user=None, rec_items=None, keep_cache=True):
    """Play every trajectory in trajs to its end. All live episodes take each turn together (one
    batched generate per agent per turn); finished ones drop out. Trajectories are filled in place
    and returned. Sampling is keyed by each trajectory's `key` (so an episode is the same in any
    batch); a torch `generator` instead draws for the whole batch at once. compile: generate's
    decode steps through torch.compile (sampling.decoder). decoding: "grammar", "item" or "free"
    (module docstring).
    keep_cache: each episode keeps each agent's keys and values from turn to turn (sampling.Kept),
    so a turn runs only what its prompt adds to the tokens it shares with the last one (the new
    memory line and the prompt's tail); then the episodes are played `batch` at a time, each group
    to its end, which bounds the kept caches' memory (with keyed sampling the episodes are the same;
    with a generator all are played together). False: every prompt runs whole (the plain
    reference; the tests compare the two).
    Two seams, never used in training: user, a function (traj, turn) -> (action, score) that plays
    the user instead of the UserAgent (eval.user_returns' constant users, tools/headroom.py's
    oracle); rec_items, a function traj -> the items the RecAgent's item is decoded among this turn
    (default the candidates; built-in format, grammar or item decoding only)."""
    if keep_cache and generator is None and len(trajs) > batch:
        for s in range(0, len(trajs), batch):
            rollout(model, tok, data, trajs[s:s + batch], t_max, temperature, None, device,
                    rec_adapter, user_adapter, batch, compile, decoding, user, rec_items, True)
        return trajs
    kept = {id(tr): (Kept(), Kept()) for tr in trajs} if keep_cache else None
    which = (lambda group, a: None if kept is None else [kept[id(tr)][a] for tr in group])
    for _ in range(t_max):
        live = [tr for tr in trajs if not tr.done]
        if not live:
            break
        # RecAgent writes m_rec for every live episode
        prompts = [tok.render_rec(tr, len(tr.turns)) for tr in live]
        items = None
        if rec_items is not None and decoding != "free" and not tok.chat:
            items = [rec_items(tr) for tr in live]
        outs = write_messages(model, tok, live, "rec", rec_adapter, prompts, temperature, generator,
                              device, batch, compile, decoding, items, which(live, 0))
        for tr, p, o in zip(live, prompts, outs):
            item = tok.parse_rec(o, tr.cands)
            tr.turns.append(Turn(rec_out=o, item=item, rec_valid=item is not None, rec_prompt=p))
        # UserAgent answers every valid recommendation
        answer = [tr for tr in live if tr.turns[-1].rec_valid]
        for tr in answer:
            record_user(data, tr, tr.turns[-1])
        if user is not None:                  # a scripted user instead of the UserAgent
            for tr in answer:
                turn = tr.turns[-1]
                turn.action, turn.score = user(tr, turn)
                turn.user_out = tok.user_message(turn.action, turn.score,
                                                 closest_history_item(data, tr.hist, turn.item))
                turn.user_valid = True
            answer = []
        prompts = [tok.render_user(tr, len(tr.turns) - 1) for tr in answer]
        outs = write_messages(model, tok, answer, "user", user_adapter, prompts, temperature,
                              generator, device, batch, compile, decoding, None,
                              which(answer, 1)) if prompts else []
        for tr, p, o in zip(answer, prompts, outs):
            turn = tr.turns[-1]
            turn.user_out, turn.user_prompt = o, p
            parsed = tok.parse_user(o)
            if parsed:
                turn.action, turn.score = parsed
                turn.user_valid = True
        for tr in live:
            finish_turn(tr, tr.turns[-1], t_max)
    model.set_adapter(None)
    return trajs


def message_key(traj, agent):
    """Sampling key of the message agent (0 rec, 1 user) writes next in traj: a hash of the
    episode's key and the turn, so each message's random draws are its own."""
    return hash32(hash32(traj.key) + 2 * len(traj.turns) + agent)


def generate_all(model, prompts, max_new, tok, temperature, generator, device, batch, keys=None,
                 compile=False, grammars=None, kept=None):
    """generate() over any number of prompts, `batch` at a time, stopping at the end-of-message
    token; grammars: per prompt, the Grammar its message is decoded under (or None); kept: per
    prompt, its sampling.Kept (or None)."""
    out = []
    for s in range(0, len(prompts), batch):
        out += generate(model, prompts[s:s + batch], max_new, tok.pad_id, stop_ids=tok.stop_ids,
                        temperature=temperature, generator=generator, device=device,
                        keys=None if keys is None else keys[s:s + batch], compile=compile,
                        grammar=None if grammars is None else grammars[s:s + batch],
                        kept=None if kept is None else kept[s:s + batch])
    return out


# --------------------------------------------------------------------------------------------------
# Rationales of the built-in model


def closest_history_item(data, hist, item):
    """The history item most similar to `item` by SASRec item embeddings: the built-in model's
    rationale ("because you watched X") and justification."""
    v = data.item_vec
    return hist[int(np.argmax(v[hist] @ v[item]))]
