"""
Self-distilled credit assignment of CoARS (docs/method.md section 4, Eq. 10-12).

Teacher and student are the SAME agent (same base, same adapter, same weights). The student sees
the normal prompt x_t; the teacher sees x_t plus a hindsight reference d, an earlier trajectory of
the same training sample rewritten with what is known afterwards:

    <|hind|>  for each of its turns: <|turn|> ITEM <|right|>|<|wrong|> ACTION
              then: <|target|> i* <|/hind|>

(the true next item, and a templated diagnosis: which recommendation was right or wrong and how
the user reacted). [ours] d comes from the latest earlier trajectory of this sample (a buffer
keyed by sample); with none yet, from the current trajectory. d is used only in training.

    Eq. 10     A_{t,n} = clip(log pi_T(y_n | x_t, d, y_<n) - log pi_S(y_n | x_t, y_<n), -1, 1)
               (a constant: no gradient through it)
    Eq. 11/12  J = E[ sum_t (1/|y_t|) sum_n (R_t + lambda * A_{t,n})
                                             * log pi_S(y_{t,n} | x_t, y_{t,<n}) ]

This is REINFORCE with a per-token advantage R_t + lambda * A_{t,n}: no PPO ratio, no group
normalisation, no KL penalty, as in the paper. coars_objective is Eq. 10-12 on one group of
messages; train.agent_loss runs it (the teacher's, the student's and the base's log-prob passes,
micro-batches, the backward passes and their timing). [ours, extensions, off by default] a
batch-mean baseline subtracted from R_t (--baseline mean); a penalty that keeps the UserAgent near
the untrained one (--user-kl, kl_to_base).
"""

import torch

from env import message_grammar
from reward import turn_rewards


def hindsight_reference(tok, ref):
    """Token ids of the hindsight reference d built from trajectory `ref` (template [ours])."""
    if tok.chat:  # a Hugging Face model: the same content in words (support/chat.py)
        return tok.hindsight_reference(ref)
    ids = [tok.sp("hind")]
    for tr in ref.turns:
        ids.append(tok.sp("turn"))
        if tr.rec_valid:
            ids += [tok.item(tr.item), tok.sp("right" if tr.hit else "wrong")]
        else:
            ids.append(tok.sp("invalid"))
        if tr.user_out is not None:
            ids.append(tok.action_ids[tr.action] if tr.user_valid else tok.sp("invalid"))
    # the answer last, just before the prompt's history
    return ids + [tok.sp("target"), tok.item(ref.target), tok.sp("/hind")]


class ReferenceBuffer:
    """The latest finished trajectory of each training sample, the source of its next reference."""

    def __init__(self):
        self.last = {}

    def reference_for(self, traj):
        return self.last.get((traj.split, traj.row), traj)

    def add(self, trajs):
        for tr in trajs:
            self.last[(tr.split, tr.row)] = tr

    def state(self):
        return self.last


def token_credit(teacher_lp, student_lp, clip=1.0):
    """Eq. 10: per-token credit, clipped to [-clip, clip], with no gradient through it."""
    return (teacher_lp.detach() - student_lp.detach()).clamp(-clip, clip)


def agent_objective(student_lp, rewards, credits, lam=0.1, n_episodes=None, baseline=0.0):
    """Eq. 11 / 12 as a loss to minimise (= -J).

    student_lp: list of (|y_t|,) tensors with gradient; rewards: list of floats R_t; credits: list
    of (|y_t|,) tensors A_{t,n}. The expectation is over episodes: the per-message terms are summed
    and divided by n_episodes (default: the number of messages)."""
    if not student_lp:
        return torch.zeros(())
    total = 0.0
    for lp, r, a in zip(student_lp, rewards, credits):
        # (1/|y_t|) sum_n (...) log pi_S
        total = total + ((r - baseline + lam * a) * lp).sum() / len(lp)
    return -total / (n_episodes or len(student_lp))


def kl_to_base(student_lp, base_lp, n_episodes=None):
    """[ours, extension, off by default: --user-kl] a penalty that keeps an agent near the untrained
    base: for each message the mean over its tokens of k3 = exp(b - s) - (b - s) - 1, where s is the
    agent's log-prob of the token it sampled and b the base's (no adapter). k3 >= 0, and its mean
    over the agent's own samples estimates KL(pi || pi_base); the gradient flows through s only.
    Summed over messages and divided by n_episodes, as agent_objective is. Not in the paper (its
    objective has no KL term)."""
    if not student_lp:
        return torch.zeros(())
    total = 0.0
    for s, b in zip(student_lp, base_lp):
        d = b.detach() - s
        total = total + (torch.exp(d) - d - 1).sum() / len(s)
    return total / (n_episodes or len(student_lp))


def collect_messages(tok, trajs, buffer, agent, reward_cfg, decoding="grammar", owner=None):
    """Gather one agent's trainable messages: (student prompt, teacher prompt, tokens, R_t,
    grammar), grammar = the grammar.Grammar the message was decoded under (env.message_grammar; None
    = the whole vocabulary), so that teacher and student score it over the policy's own support.
    reward_cfg: turn_rewards' options, plus user_balance (see balance_user). owner: an optional list
    that receives, per message, the index of its trajectory in trajs."""
    reward_cfg = dict(reward_cfg)
    user_balance = reward_cfg.pop("user_balance", False)
    out, hits = [], []
    for e, traj in enumerate(trajs):
        n0 = len(out)
        rewards = turn_rewards(traj, **reward_cfg)
        ref = hindsight_reference(tok, buffer.reference_for(traj))
        for t, (tr, (r_rec, r_user)) in enumerate(zip(traj.turns, rewards)):
            if agent == "rec" and r_rec is not None:
                out.append((tr.rec_prompt, tok.render_rec(traj, t, ref), tr.rec_out, r_rec,
                            message_grammar(tok, traj, "rec", decoding)))
            if agent == "user" and r_user is not None:
                out.append((tr.user_prompt, tok.render_user(traj, t, ref), tr.user_out, r_user,
                            message_grammar(tok, traj, "user", decoding)))
                hits.append(tr.hit)
        if owner is not None:
            owner += [e] * (len(out) - n0)
    if agent == "user" and user_balance:
        out = [m[:3] + (r,) + m[4:] for m, r in zip(out, balance_user([m[3] for m in out], hits))]
    return out


def balance_user(rewards, hits):
    """[ours, extension, off by default: --user-balance] the UserAgent's turns on right items and on
    wrong items weigh the same in its loss: each reward is scaled by n / (2 n_hit) or n / (2 n_miss)
    (n = the batch's user messages). Without it, the wrong items outnumber the right ones (an
    episode goes on after a miss and stops at a click), and Eq. 8 drives the user to turn everything
    down when the filter does not hide its accepted misses (--no-user-filter), or to accept
    everything when it does. What it did in practice is in docs/results.md: it is an extension, not
    a fix. Under torchrun the counts are each rank's own."""
    n, n_hit = len(hits), sum(hits)
    if n_hit in (0, n):
        return list(rewards)
    return [r * n / (2 * (n_hit if h else n - n_hit)) for r, h in zip(rewards, hits)]


def coars_objective(student_lp, teacher_lp, rewards, lam=0.1, n_episodes=None, baseline=0.0,
                    base_lp=None, kl=0.0, clip=1.0):
    """Eq. 10-12 for a group of one agent's messages, from the log-probs of the tokens the student
    wrote: the student's (with gradient), the teacher's (the same agent shown the hindsight
    reference d; None when lam = 0) and, for --user-kl, the untrained base's.

        A_{t,n} = clip(log pi_T - log pi_S, -c, c)   c = clip (1)      Eq. 10 (token_credit)
        loss    = -J = -(1/n) sum_t (1/|y_t|) sum_n (R_t - b + lam A_{t,n}) log pi_S    Eq. 11 / 12
                  [+ kl * kl_to_base]                                  [ours, extension]

    n = n_episodes (the expectation is over episodes, so the losses of groups of messages add up
    to the whole batch's). Returns (loss, credits, the KL penalty before its weight or None)."""
    if lam:
        credits = [token_credit(t, s, clip) for t, s in zip(teacher_lp, student_lp)]
    else:
        credits = [torch.zeros_like(s) for s in student_lp]
    loss = agent_objective(student_lp, list(rewards), credits, lam, n_episodes=n_episodes,
                           baseline=baseline)
    pen = kl_to_base(student_lp, base_lp, n_episodes=n_episodes) if kl else None
    return (loss + kl * pen if kl else loss), credits, pen


# --------------------------------------------------------------------------------------------------
# Where the credit falls: statistics of A_{t,n} per kind of token, for metrics.jsonl and the viewer

def token_kinds(tok, y, grammar=None):
    """The kind of each token of a message: 'forced' where its grammar allows one token only (no
    choice: credit 0); for the built-in model 'item' (the RecAgent's first token), 'action' (the
    UserAgent's first), 'score' (its digits), 'rationale' (the history item after <|why|>);
    for a chat model 'answer' (the RecAgent's title, the UserAgent's action and score: every
    unforced token before the message's "Reason:") and 'reason' (the free text after it)."""
    out, y = [], [int(t) for t in y]
    chat = getattr(tok, "chat", False)
    if chat:                                  # where "Reason:" ends (the message's reason marker)
        m = tok._reason
        ends = [k + len(m) for k in range(len(y) - len(m) + 1) if y[k:k + len(m)] == m]
        reason_from = ends[0] if ends else len(y)
    for n, t in enumerate(y):
        allowed = grammar.allowed(list(y[:n])) if grammar is not None else None
        if allowed is not None and len(allowed) == 1:
            out.append("forced")
        elif chat:
            out.append("reason" if n >= reason_from else "answer")
        elif n == 0:
            out.append("action" if t in tok.action_ids.values() else "item")
        elif tok.is_item(t):
            out.append("rationale")
        elif t < 256:
            out.append("score")
        else:
            out.append("other")
    return out


def credit_stats(kinds, credits, rewards, lam, baseline=0.0):
    """Statistics of the credit A_{t,n} of a batch of messages (kinds: token_kinds per message,
    credits: A per message, rewards: R_t per message):
      credit_<kind>_mean / _std   over the tokens of that kind
      credit_<kind>_weight        that kind's part of the reward's weight in Eq. 11: the mean over
                                  messages of the fraction of its tokens of that kind (R_t is
                                  spread over a message's tokens by 1/|y_t|, so a long reason
                                  takes the weight of the answer's few tokens)
      credit_reward_corr          Pearson correlation of a message's mean credit with its R_t
                                  (None, null in metrics.jsonl, with fewer than 2 messages
                                  or no spread: undefined, and no tracker can plot a nan)
      credit_share                the credit's share of the per-token weight of Eq. 11:
                                  sum |lam A_{t,n}| / sum (|R_t - b| + |lam A_{t,n}|)"""
    by, weight = {}, {}
    for ks, a in zip(kinds, credits):
        for k, x in zip(ks, a.tolist()):
            by.setdefault(k, []).append(x)
            weight[k] = weight.get(k, 0.0) + 1 / len(ks) / len(kinds)
    out = {}
    for k, xs in sorted(by.items()):
        x = torch.tensor(xs, dtype=torch.float64)
        out[f"credit_{k}_mean"] = float(x.mean())
        out[f"credit_{k}_std"] = float(x.std(unbiased=False))
        out[f"credit_{k}_weight"] = weight[k]
    means = torch.tensor([float(a.mean()) for a in credits], dtype=torch.float64)
    r = torch.tensor(list(rewards), dtype=torch.float64)
    if len(r) > 1 and float(means.std()) > 0 and float(r.std()) > 0:
        out["credit_reward_corr"] = float(torch.corrcoef(torch.stack([means, r]))[0, 1])
    else:
        out["credit_reward_corr"] = None
    cred = sum(float((lam * a).abs().sum()) for a in credits)
    rew = sum(abs(float(rt) - baseline) * len(a) for a, rt in zip(credits, rewards))
    out["credit_share"] = cred / (cred + rew) if cred + rew > 0 else 0.0
    return out
