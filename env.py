"""
The multi-turn environment of CoARS (PAPER.md section 2): what each agent sees, what it must write,
and the batched loop in which a RecAgent and a UserAgent talk.

Message formats of the built-in model (token level; `tok.decode` shows them as text):

  RecAgent prompt   <|rec|><|cands|>c0..c19[<|prior|>p]<|mem|>MEMORY[REFERENCE]<|hist|>h1..h10
  RecAgent message  ITEM <|why|> RATIONALE <|end|>          e.g. <|item_7|><|why|><|item_3|><|end|>
  UserAgent prompt  <|user|><|mem|>MEMORY[REFERENCE]<|hist|>h1..h10<|msg|>REC MESSAGE<|peers|>3/5 4.2<|ans|>
  UserAgent message ACTION SCORE <|why|> JUSTIFICATION <|end|>   e.g. <|skip|>0.31<|why|><|item_5|><|end|>
  MEMORY            for each earlier turn: <|turn|> rec message <|msg|> user message (without <|end|>)
  REFERENCE         the hindsight reference d (distill.py), teacher prompts only

[ours] The RecAgent names its item by the item's own token, and the RecAgent prompt ENDS with the
history, so the first answer token is predicted exactly where stage 1's next-item language model
predicts the item after a history (pretrain.py): the base's knowledge of what users take next is
the RecAgent's answer distribution. That item is decoded among the episode's 20 candidates only
(PAPER.md section 5; rollout(free_answer=True) lifts the restriction, and then a non-candidate is
an invalid message). The SASRec prior appears in turn 1 only (Trajectory.prior None: no hint).
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
import torch

from sampling import generate, hash32

ACTION_RANGE = {"dislike": (0.0, 0.25), "skip": (0.25, 0.5), "star": (0.5, 0.75), "click": (0.75, 1.0)}
POSITIVE = ("click", "star")
_SCORE = re.compile(r"^(0\.\d\d|1\.00)$")


def action_of_score(s):
    """The action whose interval holds score s (PAPER.md section 2, [ours])."""
    for a in ("dislike", "skip", "star"):
        if s < ACTION_RANGE[a][1]:
            return a
    return "click"


def score_fits(action, s):
    """True when score s lies in the action's interval (click includes 1.0): a UserAgent message
    whose action contradicts its score is invalid (PAPER.md section 2, [ours])."""
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
    q: float = 0.0                # peer signal q_t in [-1, 1] (PAPER.md section 2)
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
    done: bool = False
    key: int = 0                  # sampling key of the episode (sampling.sample_next): its draws depend on it alone

    @property
    def final_item(self):
        return self.turns[-1].item if self.turns else None

    @property
    def hit(self):
        return int(self.final_item is not None and self.final_item == self.target)


def new_trajectory(data, split, row):
    return Trajectory(split, int(row), int(getattr(data, f"{split}_user")[row]), data.history(split, row),
                      int(getattr(data, f"{split}_target")[row]), getattr(data, f"{split}_cands")[row].tolist(),
                      int(getattr(data, f"{split}_prior")[row]))


# --------------------------------------------------------------------------------------------------
# Prompts


def _strip_end(tok, ids):
    return [t for t in ids if t != tok.end_id]


def render_memory(tok, turns):
    """M_{t-1}: every earlier (m_rec, m_user), in order."""
    ids = []
    for tr in turns:
        ids += [tok.sp("turn")] + (_strip_end(tok, tr.rec_out) if tr.rec_valid else [tok.sp("invalid")])
        if tr.user_out is not None:
            ids += [tok.sp("msg")] + (_strip_end(tok, tr.user_out) if tr.user_valid else [tok.sp("invalid")])
    return ids


def render_rec(tok, traj, t, reference=()):
    """RecAgent prompt x_t for turn t (0-based) of traj; reference = hindsight tokens (teacher only)."""
    if tok.chat:                  # a Hugging Face model: the natural-language prompt of extras/chat.py
        return tok.render_rec(traj, t, reference)
    ids = [tok.sp("rec"), tok.sp("cands")] + [tok.item(i) for i in traj.cands]
    if t == 0 and traj.prior is not None:
        ids += [tok.sp("prior"), tok.item(traj.prior)]
    ids += [tok.sp("mem")] + render_memory(tok, traj.turns[:t]) + list(reference)
    return ids + [tok.sp("hist")] + [tok.item(i) for i in traj.hist]     # the answer's item comes next


def render_user(tok, traj, t, reference=()):
    """UserAgent prompt for turn t: memory, history, the RecAgent's message and peer opinions."""
    if tok.chat:
        return tok.render_user(traj, t, reference)
    tr = traj.turns[t]
    ids = [tok.sp("user"), tok.sp("mem")] + render_memory(tok, traj.turns[:t]) + list(reference)
    ids += [tok.sp("hist")] + [tok.item(i) for i in traj.hist]
    ids += [tok.sp("msg")] + _strip_end(tok, tr.rec_out) + [tok.sp("peers")] + tok.text(tr.peer_text)
    return ids + [tok.sp("ans")]


def answer_choices(tok, traj):
    """The ids the RecAgent's first token is decoded among: the candidates' item tokens (None for a
    chat model, which writes a title)."""
    return None if tok.chat else [tok.item(i) for i in traj.cands]


def peer_opinion(data, user, item):
    """(text, q_t): how many of the user's peers interacted with the item (and their mean rating),
    and q_t = sum_j w_j * (+1 if peer j interacted else -1) (PAPER.md section 2, [ours])."""
    sets = data.train_sets()
    peers, w = data.peers[user], data.peer_w[user]
    hits = [item in sets[p] for p in peers]
    q = float(sum(wj * (1 if h else -1) for wj, h in zip(w, hits)))
    text = f"{sum(hits)}/{len(peers)}"
    if data.has_ratings and any(hits):
        text += f" {np.mean([sets[p][item] for p, h in zip(peers, hits) if h]):.1f}"
    return text, q


# --------------------------------------------------------------------------------------------------
# Parsing


def parse_rec(tok, out, cands):
    """-> the recommended item index, or None (invalid: malformed, or not a candidate)."""
    if tok.chat:                  # the title is matched to the candidates (chat.match_title)
        return tok.parse_rec(out, cands)
    if len(out) < 3 or out[-1] != tok.end_id or out[1] != tok.sp("why") or not tok.is_item(out[0]):
        return None
    item = tok.item_of(out[0])
    return item if item in cands else None


def parse_user(tok, out):
    """-> (action, score) or None (invalid)."""
    if tok.chat:
        return tok.parse_user(out)
    if len(out) < 3 or out[-1] != tok.end_id or tok.sp("why") not in out:
        return None
    inv = {v: k for k, v in tok.action_ids.items()}
    if out[0] not in inv:
        return None
    w = out.index(tok.sp("why"))
    if any(t >= 256 for t in out[1:w]):
        return None
    text = bytes(out[1:w]).decode("latin-1")
    if not _SCORE.match(text):
        return None
    score = float(text)
    if not score_fits(inv[out[0]], score):
        return None
    return inv[out[0]], score


def rec_message(tok, item, rationale):
    """RecAgent message naming `item`, with a history item as its rationale."""
    if tok.chat:
        return tok.rec_message(item, rationale)
    return [tok.item(item), tok.sp("why"), tok.item(rationale), tok.end_id]


def user_message(tok, action, score, justification):
    """UserAgent message: an action, its score, and a history item as the justification."""
    if tok.chat:
        return tok.user_message(action, score, justification)
    return [tok.action_ids[action]] + tok.text(f"{score:.2f}") + [tok.sp("why"), tok.item(justification), tok.end_id]


# --------------------------------------------------------------------------------------------------
# The batched multi-turn loop


def record_user(data, traj, tr):
    """Fill the peer opinion of a turn whose RecAgent message is valid."""
    tr.peer_text, tr.q = peer_opinion(data, traj.user, tr.item)


def finish_turn(traj, tr, t_max):
    tr.hit = int(tr.item is not None and tr.item == traj.target)
    if (tr.user_valid and tr.action == "click") or len(traj.turns) >= t_max:
        traj.done = True


@torch.no_grad()
def rollout(model, tok, data, trajs, t_max=5, temperature=1.0, generator=None, device="cpu",
            rec_adapter="rec", user_adapter="user", batch=256, compile=False, free_answer=False):
    """Play every trajectory in trajs to its end. All live episodes take each turn together (one
    batched generate per agent per turn); finished ones drop out. Trajectories are filled in place
    and returned. Sampling is keyed by each trajectory's `key` (so an episode is the same in any
    batch); a torch `generator` instead draws for the whole batch at once. compile: generate's
    decode steps through torch.compile (sampling.decoder). free_answer: the RecAgent's item is not
    restricted to the candidates (a non-candidate is then an invalid message)."""
    for _ in range(t_max):
        live = [tr for tr in trajs if not tr.done]
        if not live:
            break
        # RecAgent writes m_rec for every live episode
        prompts = [render_rec(tok, tr, len(tr.turns)) for tr in live]
        model.set_adapter(rec_adapter)
        keys = [message_key(tr, 0) for tr in live] if generator is None else None
        first = None if free_answer else [answer_choices(tok, tr) for tr in live]
        outs = generate_all(model, prompts, tok.rec_max_new, tok, temperature, generator, device, batch, keys,
                            compile, first)
        for tr, p, o in zip(live, prompts, outs):
            item = parse_rec(tok, o, tr.cands)
            tr.turns.append(Turn(rec_out=o, item=item, rec_valid=item is not None, rec_prompt=p))
        # UserAgent answers every valid recommendation
        answer = [tr for tr in live if tr.turns[-1].rec_valid]
        for tr in answer:
            record_user(data, tr, tr.turns[-1])
        prompts = [render_user(tok, tr, len(tr.turns) - 1) for tr in answer]
        model.set_adapter(user_adapter)
        keys = [message_key(tr, 1) for tr in answer] if generator is None else None
        outs = generate_all(model, prompts, tok.user_max_new, tok, temperature, generator, device, batch,
                            keys, compile) if prompts else []
        for tr, p, o in zip(answer, prompts, outs):
            turn = tr.turns[-1]
            turn.user_out, turn.user_prompt = o, p
            parsed = parse_user(tok, o)
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


def generate_all(model, prompts, max_new, tok, temperature, generator, device, batch, keys=None, compile=False,
                 first=None):
    """generate() over any number of prompts, `batch` at a time, stopping at the end-of-message token;
    first: per prompt, the ids its first token is chosen among (or None)."""
    out = []
    for s in range(0, len(prompts), batch):
        out += generate(model, prompts[s:s + batch], max_new, tok.pad_id, stop_ids=tok.stop_ids,
                        temperature=temperature, generator=generator, device=device,
                        keys=None if keys is None else keys[s:s + batch], compile=compile,
                        first=None if first is None else first[s:s + batch])
    return out


# --------------------------------------------------------------------------------------------------
# Rationales of the built-in model


def closest_history_item(data, hist, item):
    """The history item most similar to `item` by SASRec item embeddings: the built-in model's
    rationale ("because you watched X") and justification."""
    v = data.item_vec
    return hist[int(np.argmax(v[hist] @ v[item]))]
