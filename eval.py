"""
Evaluation of CoARS and its baselines (docs/method.md section 6).

    python eval.py --run out/ml-latest-small            # evaluate a finished training run
    python eval.py --run out/ml-latest-small --split valid
    python eval.py --run out/ml-latest-small --plot       # only its curves.png (support/watch.py)
    python eval.py --run out/smol --max-samples 200 --returns-n 100   # a subset, fewer returns
    python eval.py --run out/smol --untrained-only --max-samples 200  # the untrained rows alone
    python eval.py --run out/smol & python eval.py --run out/smol     # two processes share the work

Metrics, each with a 95% bootstrap interval over test samples (one sample per user):
  - Hit@1: the final recommended item is the target, over ALL samples (invalid = miss).
  - valid ratio of RecAgent and UserAgent messages; Hit@1 of turn 1; mean number of turns.
  - [ours] HR@k / NDCG@k from ranking the 20 candidates by the RecAgent's log-probability of
    naming each one as its turn-1 answer (one forward pass per sample).
  - UserAgent alignment [ours, after AFL]: the UserAgent judges real future items (positives) and
    as many never-touched items (negatives) one at a time; accept = click or star; micro
    precision / recall / F1, bootstrap over users.
Baselines: Random (a seeded uniform candidate), Pop (most popular candidate in the training
split), SASRec top-1 (the prior), and the memory-based (Reflexion-style) ARS: the same loop with
the agents before CoARS (the pretrained base, no adapters), learning only through in-episode
memory. Evaluation decodes greedily (temperature 0), so a checkpoint always scores the same.
Paired bootstrap intervals compare CoARS with each baseline on the same samples.
The parts of an evaluation (each agent pair's episodes, its two rankings, its UserAgent's
judgements; each user's returns) are kept beside the run folder (out/eval-parts/, part_key) as
they are finished: a stopped evaluation continues where it stopped, and the same command started
in several processes (one per core) shares the parts out among them
(support/checkpoint.kept_parts), each writing the same results file at the end.
"""

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data.prepare import stage2_rows
from env import (POSITIVE, Trajectory, Turn, candidate_bias, closest_history_item, new_trajectory,
                 record_user, rejected_items, rollout, write_messages)
from scoring import next_token_scores
from reward import turn_rewards
from support.chat import chat_candidate_scores
from support.checkpoint import code_digest, kept_parts, prepared_digest, weights_digest
from support.report import results_table, write_results

# --------------------------------------------------------------------------------------------------
# Uncertainty


def bootstrap(stat, n_units, n=1000, seed=0):
    """95% percentile interval of stat(indices) over n bootstrap resamples of n_units units."""
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n_units, n_units)) for _ in range(n)])
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def mean_ci(x, n=1000, seed=0):
    """(mean, lo, hi) of per-sample values x."""
    x = np.asarray(x, dtype=float)
    lo, hi = bootstrap(lambda i: x[i].mean(), len(x), n, seed)
    return float(x.mean()), lo, hi


def paired_diff_ci(a, b, n=1000, seed=0):
    """(mean(a - b), lo, hi): paired bootstrap of a difference measured on the same samples."""
    return mean_ci(np.asarray(a, float) - np.asarray(b, float), n, seed)


def prf(pred, label):
    """Micro precision, recall and F1 of binary predictions (accept = 1)."""
    pred, label = np.asarray(pred, bool), np.asarray(label, bool)
    tp = float((pred & label).sum())
    p = tp / max(pred.sum(), 1)
    r = tp / max(label.sum(), 1)
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _user_rows(groups):
    """Row indices of each user's judgements, for bootstraps that resample users."""
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    return [np.flatnonzero(inv == k) for k in range(inv.max() + 1)]


def f1_ci(pred, label, groups, n=1000, seed=0):
    """F1 with a bootstrap interval that resamples users (groups), not single judgements."""
    pred, label = np.asarray(pred, bool), np.asarray(label, bool)
    members = _user_rows(groups)

    def stat(idx):
        rows = np.concatenate([members[k] for k in idx])
        return prf(pred[rows], label[rows])[2]
    return bootstrap(stat, len(members), n, seed)


def f1_diff_ci(pred_a, pred_b, label, groups, n=1000, seed=0):
    """Paired bootstrap (over users) of F1(a) - F1(b)."""
    pa, pb, label = (np.asarray(x, bool) for x in (pred_a, pred_b, label))
    members = _user_rows(groups)

    def stat(idx):
        rows = np.concatenate([members[k] for k in idx])
        return prf(pa[rows], label[rows])[2] - prf(pb[rows], label[rows])[2]
    lo, hi = bootstrap(stat, len(members), n, seed)
    return prf(pa, label)[2] - prf(pb, label)[2], lo, hi


# --------------------------------------------------------------------------------------------------
# Methods


def baseline_hits(data, split, seed=0):
    """Per-sample Hit@1 of Random, Pop and SASRec top-1 on a split's fixed candidate lists."""
    cands, target = getattr(data, f"{split}_cands"), getattr(data, f"{split}_target")
    rng = np.random.default_rng(seed)
    pick_random = cands[np.arange(len(cands)), rng.integers(0, cands.shape[1], len(cands))]
    pick_pop = cands[np.arange(len(cands)), data.item_pop[cands].argmax(1)]
    return {"Random": (pick_random == target).astype(float),
            "Pop": (pick_pop == target).astype(float),
            "SASRec top-1": (getattr(data, f"{split}_prior") == target).astype(float)}


def progress(log, what, total):
    """A function n -> None that counts units done and, where stdout is not a terminal (a log file,
    a cluster job), logs a plain line about every 5% of `total` with the time left, as stages 1
    and 2 do (their tqdm bars show nothing there)."""
    if sys.stdout.isatty() or not total:
        return lambda n: None
    state = dict(done=0, next=max(1, total // 20), t0=time.time())

    def tick(n):
        state["done"] += n
        done = state["done"]
        if done >= state["next"] or done >= total:
            spent = time.time() - state["t0"]
            log(f"{what}: {done}/{total}, {spent:.0f} s, about "
                f"{spent / done * max(total - done, 0) / 60:.1f} min left")
            state["next"] = done + max(1, total // 20)
    return tick


def run_ars(model, tok, data, split, rows, adapters, t_max, device, batch=256, decoding="grammar",
            tick=None, **hooks):
    """Greedy episodes of the agent pair on the given samples -> per-sample metric arrays. tick:
    called with the number of episodes played, group by group (progress). hooks: env.rollout's
    seams (user, rec_items; tools/headroom.py)."""
    trajs = [new_trajectory(data, split, r) for r in rows]
    for s in range(0, len(trajs), batch):        # a group at a time, so that progress can be shown
        rollout(model, tok, data, trajs[s:s + batch], t_max=t_max, temperature=0.0, device=device,
                rec_adapter=adapters[0], user_adapter=adapters[1], batch=batch, decoding=decoding,
                **hooks)
        if tick:
            tick(len(trajs[s:s + batch]))
    rec_n = np.array([len(tr.turns) for tr in trajs], float)
    rec_ok = np.array([sum(t.rec_valid for t in tr.turns) for tr in trajs], float)
    user_n = np.array([sum(t.user_out is not None for t in tr.turns) for tr in trajs], float)
    user_ok = np.array([sum(t.user_valid for t in tr.turns) for tr in trajs], float)
    return trajs, dict(hit=np.array([tr.hit for tr in trajs], float),
                       hit_turn1=np.array([tr.turns[0].hit for tr in trajs], float),
                       turns=rec_n, rec_valid=rec_ok / rec_n,
                       user_valid=np.where(user_n > 0, user_ok / np.maximum(user_n, 1), np.nan),
                       repeat_rejected=np.array([repeats_rejected(tr) for tr in trajs], float))


def repeats_rejected(traj):
    """Share of the RecAgent's turns after the first that name an item the user already turned down
    (skip or dislike) in this episode: whether the RecAgent uses the conversation's memory (nan for
    one-turn episodes)."""
    later = traj.turns[1:]
    if not later:
        return float("nan")
    n = sum(tr.item is not None and tr.item in rejected_items(traj.turns[:k])
            for k, tr in enumerate(later, 1))
    return n / len(later)


@torch.no_grad()   # also where the adapters train (stage 2's validation): no graph is kept
def rank_metrics(model, tok, data, split, rows, adapter, device, ks=(1, 5, 10), batch=256,
                 hint=True, tick=None):
    """HR@k and NDCG@k of the candidates ranked by the RecAgent's turn-1 log-probability of naming
    each one (built-in model: the logit of each candidate's item token at the answer position, one
    forward pass per sample; a chat model: the log-prob of its title after "Recommendation:" under
    the title part of its grammar, summed over the title's tokens, chat_candidate_scores). A chat
    model also gets "HR@1 (token mean)": the same ranking by the per-token mean, which does not
    favour short titles the way a sum over the whole vocabulary would. Under --prior-weight the
    built-in model's logits carry the grammar's tilt (SASRec's opinion, Tokenizer.prior_bias).
    hint=False: the prompt without the SASRec prior (and without the tilt). A target that is not
    among the candidates (--candidates sasrec) is a miss at every k. tick: called with the samples
    ranked, batch by batch (progress)."""
    model.set_adapter(adapter)
    out = {f"{m}@{k}": [] for k in ks for m in ("HR", "NDCG")}
    if tok.chat:
        out["HR@1 (token mean)"] = []
    for s in range(0, len(rows), batch):
        trajs = [new_trajectory(data, split, r) for r in rows[s:s + batch]]
        for tr in trajs:
            tr.prior = tr.prior if hint else None
        prompts = [tok.render_rec(tr, 0) for tr in trajs]
        if tok.chat:
            scores, means = chat_candidate_scores(model, tok, trajs, prompts, device)  # (B,20) each
            out["HR@1 (token mean)"] += (target_rank(means, trajs) < 1).astype(float).tolist()
        else:
            scores = next_token_scores(model, prompts,
                                       [[tok.item(c) for c in tr.cands] for tr in trajs],
                                       tok.pad_id, device)
            bias = candidate_bias(tok, trajs)   # --prior-weight: the logits the item is drawn from
            if bias is not None:
                scores = scores + bias.to(scores.device)
        rank = target_rank(scores, trajs)
        for k in ks:
            out[f"HR@{k}"] += (rank < k).astype(float).tolist()
            out[f"NDCG@{k}"] += np.where(rank < k, 1 / np.log2(np.minimum(rank, 1e9) + 2),
                                         0.0).tolist()
        if tick:
            tick(len(trajs))
    model.set_adapter(None)
    return {k: np.array(v) for k, v in out.items()}


def target_rank(scores, trajs):
    """Each sample's target's 0-based rank among its candidates by (B,K) scores (ties count in its
    favour); inf where the target is not a candidate."""
    tpos = torch.tensor([tr.cands.index(tr.target) if tr.target in tr.cands else 0 for tr in trajs],
                        device=scores.device)
    # 0 = first
    rank = (scores > scores.gather(1, tpos[:, None])).sum(1).cpu().numpy().astype(float)
    rank[[tr.target not in tr.cands for tr in trajs]] = np.inf
    return rank


@torch.no_grad()
def user_judgements(model, tok, data, adapter, device, batch=256, f1_rows=None, decoding="grammar",
                    tick=None):
    """The UserAgent judges each item of the F1 set (or its rows f1_rows) alone (empty memory, a
    templated RecAgent message naming the item), greedily under --decoding. Returns accept (bool
    array), valid (bool array). tick: called with the items judged, batch by batch (progress)."""
    trajs = []
    for r in (range(len(data.f1_item)) if f1_rows is None else f1_rows):
        h = data.f1_hist[r]
        h = h[h >= 0].tolist()
        item = int(data.f1_item[r])
        tr = Trajectory("f1", r, int(data.f1_user[r]), h, -1, [item], item)
        turn = Turn(rec_out=tok.rec_message(item, closest_history_item(data, h, item)), item=item,
                    rec_valid=True)
        tr.turns.append(turn)
        record_user(data, tr, turn)
        trajs.append(tr)
    prompts = [tok.render_user(tr, 0) for tr in trajs]
    outs = []
    for s in range(0, len(trajs), batch):
        outs += write_messages(model, tok, trajs[s:s + batch], "user", adapter,
                               prompts[s:s + batch], 0.0, None, device, batch, decoding=decoding)
        if tick:
            tick(len(prompts[s:s + batch]))
    parsed = [tok.parse_user(o) for o in outs]
    return (np.array([p is not None and p[0] in POSITIVE for p in parsed]),
            np.array([p is not None for p in parsed]))


# --------------------------------------------------------------------------------------------------
# Reference rows [ours, docs/method.md section 6]: does the UserAgent game Eq. 8?

CONSTANT_USERS = {"always click (1.00)": lambda traj, turn: ("click", 1.0),
                  "always dislike (0.00)": lambda traj, turn: ("dislike", 0.0)}


@torch.no_grad()
def user_returns(model, tok, data, rows, keys, reward_cfg, t_max, device, rec_adapter="rec",
                 temperature=1.0, decoding="grammar", batch=256, n_boot=1000, seed=0,
                 users=(("trained UserAgent", "user"), ("untrained UserAgent", None)),
                 log=lambda *a: None, keep=None):
    """The UserAgent's Eq. 8 return per episode (the sum of its turns' R_user; left-out turns 0, an
    invalid message -1) on stage-2 training samples, rolled out as in training (temperature,
    keyed sampling with the given keys) against the RecAgent `rec_adapter`, for each user in
    `users` (name, adapter) and for the two constant users of CONSTANT_USERS. A trained UserAgent
    whose return is no higher than a constant's is gaming the reward, not judging. Returns
    {name: {"mean", "lo", "hi"}} plus the share of turns each user accepted. log: a progress line
    per user. keep: a folder where each user's returns are kept (as evaluate's parts are)."""
    out, parts = {}, []
    players = [(n, a, None) for n, a in users] + [(n, None, f) for n, f in CONSTANT_USERS.items()]
    for name, adapter, script in players:
        def play(name=name, adapter=adapter, script=script):
            log(f"constant users' returns: {name} on {len(rows)} stage-2 samples")
            trajs = [new_trajectory(data, "train", r) for r in rows]
            for tr, key in zip(trajs, keys):
                tr.key = int(key)
            tick = progress(log, f"returns of the {name}" if adapter or not script else
                            f"returns of {name}", len(trajs))
            for s in range(0, len(trajs), batch):
                rollout(model, tok, data, trajs[s:s + batch], t_max=t_max, temperature=temperature,
                        device=device, rec_adapter=rec_adapter, user_adapter=adapter, batch=batch,
                        decoding=decoding, user=script)
                tick(len(trajs[s:s + batch]))
            answered = [t for tr in trajs for t in tr.turns if t.user_valid]
            return dict(ret=[sum(r for _, r in turn_rewards(tr, **reward_cfg) if r is not None)
                             for tr in trajs],
                        accept=float(np.mean([t.action in POSITIVE for t in answered]))
                        if answered else float("nan"),
                        train_hit=float(np.mean([tr.hit for tr in trajs])))
        key = part_key(model, (rec_adapter, adapter), data, device, part=f"returns of {name}",
                       rows=rows, keys=keys, user=script and name, reward=reward_cfg, t_max=t_max,
                       temperature=temperature, decoding=decoding)
        parts.append((key, play))
    for (name, _, _), got in zip(players, kept_parts(keep, parts, log)):
        mu, lo, hi = mean_ci(got["ret"], n_boot, seed)
        out[name] = dict(mean=mu, lo=lo, hi=hi, accept=got["accept"], train_hit=got["train_hit"])
    model.set_adapter(None)
    return out


def part_key(model, adapters, data, device, **what):
    """The key of an evaluation part (support/checkpoint.kept_parts): the agents' weights (the base
    and the adapters in use), the code, the data (its raw files, its options and the prepared
    arrays, whose SASRec candidates and prior another machine may compute otherwise), the device
    type and `what` (the samples, the options); arrays enter by their sha1. A kept part is reused
    only where all of these match."""
    plain = {k: hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()
             if isinstance(v, np.ndarray) else v for k, v in what.items()}
    prepared = hashlib.sha1(json.dumps(prepared_digest(data), sort_keys=True).encode()).hexdigest()
    return dict(plain, weights=weights_digest(model, adapters), code=code_digest(),
                data=[data.meta["raw_sha256"], data.meta["options"], prepared],
                device=torch.device(device).type)


# an evaluation part's chunk: this many evaluation batches of samples (4 x as many F1 items, which
# are quicker); SmolLM2's batches of 16 give chunks of 64 samples, about 5 minutes on one core
CHUNK_BATCHES = 4


def pair_parts(model, tok, data, split, rows, f1_rows, name, adapters, t_max, device, decoding,
               log):
    """An agent pair's evaluation as parts (support/checkpoint.kept_parts), each a (key, compute)
    entry: its episodes (run_ars), the RecAgent's turn-1 ranking with the suggestion and without it
    (what it knows of the user by itself), and the UserAgent's judgements of the F1 set, each cut
    into chunks of whole evaluation batches (the same batches as uncut, so the same numbers), so
    that processes sharing an evaluation share its work evenly and a stop loses one chunk at most.
    A part's key holds only the adapters it uses, so pairs that share an agent (the untrained
    UserAgent of the memory-based ARS and of the SFT reference) share its parts. Progress: plain
    lines per part where stdout is not a terminal. Returns (parts, join): join(values) -> the
    pair's per-sample metrics and its judgements (accept, valid)."""
    rec, user = adapters
    lists = lambda m: {k: np.asarray(v, float).tolist() for k, v in m.items()}  # noqa: E731
    b = tok.eval_batch

    def episodes(part, what):
        def compute():
            log(f"{what}, {len(part)} {split} samples")
            tick = progress(log, what, len(part))
            return lists(run_ars(model, tok, data, split, part, adapters, t_max, device, batch=b,
                                 decoding=decoding, tick=tick)[1])
        return compute

    def ranking(part, what, hint):
        def compute():
            log(f"{what}, {len(part)} {split} samples")
            tick = progress(log, what, len(part))
            return lists(rank_metrics(model, tok, data, split, part, rec, device,
                                      ks=(1, 5, 10) if hint else (1,), batch=b, hint=hint,
                                      tick=tick))
        return compute

    def judgements(part, what):
        def compute():
            log(f"{what}, {len(part)} F1 items")
            tick = progress(log, what, len(part))
            acc, ok = user_judgements(model, tok, data, user, device, batch=b, f1_rows=part,
                                      decoding=decoding, tick=tick)
            return dict(accept=acc.tolist(), valid=ok.tolist())
        return compute

    def key(part, used, **what):
        return part_key(model, used, data, device, part=part, split=split, decoding=decoding,
                        **what)

    def cut(xs, n):                            # (chunk, its name's tail: where it starts)
        return [(xs[s:s + n], "" if n >= len(xs) else f" (from {s + 1})")
                for s in range(0, len(xs), n)]
    parts, kinds = [], []
    for xs, at in cut(rows, CHUNK_BATCHES * b):
        what = f"evaluating {name}: episodes" + at
        parts.append((key(what, adapters, rows=xs, t_max=t_max), episodes(xs, what)))
        kinds.append("episodes")
    for hint, label in ((True, "ranking"), (False, "ranking without the suggestion")):
        for xs, at in cut(rows, CHUNK_BATCHES * b):
            what = f"evaluating {name}: {label}" + at
            parts.append((key(f"the RecAgent's {label} ({rec or 'untrained'})" + at,
                              (rec, None), rows=xs), ranking(xs, what, hint)))
            kinds.append(label)
    for xs, at in cut(f1_rows, 4 * CHUNK_BATCHES * b):
        what = f"evaluating {name}: the UserAgent's judgements" + at
        parts.append((key(f"the UserAgent's judgements ({user or 'untrained'})" + at,
                          (None, user), rows=rows, f1_rows=xs), judgements(xs, what)))
        kinds.append("judgements")

    def join(values):
        def cat(kind):
            got = [v for v, k in zip(values, kinds) if k == kind]
            return {f: sum((g[f] for g in got), []) for f in got[0]} if got else {}
        m = dict(cat("episodes"), **cat("ranking"))
        nohint = cat("ranking without the suggestion")
        m["HR@1 no hint"] = nohint["HR@1"]
        if tok.chat:
            m["HR@1 no hint (token mean)"] = nohint["HR@1 (token mean)"]
        judged = cat("judgements")
        return m, (np.asarray(judged.get("accept", []), bool),
                   np.asarray(judged.get("valid", []), bool))
    return parts, join


# --------------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate(model, tok, data, split="test", t_max=5, device="cpu", n_boot=1000, seed=0,
             agents=(("Memory-based ARS", (None, None)), ("CoARS", ("rec", "user"))), log=print,
             max_samples=0, per_sample=False, decoding="grammar", keep=None):
    """Evaluate the baselines and each agent pair in `agents` on a split. Returns a results dict
    (JSON-ready) with per-method metrics and intervals, and paired comparisons to the last pair.
    max_samples > 0 evaluates a fixed random subset of the split (the same for every method).
    per_sample: also return the evaluated rows and, per method, its per-sample hits (and, per agent
    pair, its F1-set judgements), for pooling over seeds (tools/suite.py). Two chance references are
    rows of every table (docs/method.md section 6): a random pick's Hit@1 is 1/K whatever the number
    of turns (the last of up to 5 distinct random picks is still uniform over the K candidates), and
    a UserAgent that accepts everything has the F1 of the "Accept everything" row (2/3 with one
    negative per positive). keep: a folder where each part of a pair's evaluation (pair_parts) is
    kept (part_key), so that a stopped evaluation continues at the next part, a part another run
    already evaluated (the same base untrained) is read instead of played again, and processes
    started on the same evaluation share its parts (support/checkpoint.kept_parts)."""
    t0 = time.time()
    rows = np.arange(len(getattr(data, f"{split}_user")))
    f1_rows = np.arange(len(data.f1_item))
    if 0 < max_samples < len(rows):
        rows = np.sort(np.random.default_rng(seed).permutation(len(rows))[:max_samples])
        # the UserAgent is judged on the F1 items of the evaluated samples' users only
        f1_rows = np.flatnonzero(np.isin(data.f1_user, getattr(data, f"{split}_user")[rows]))
    f1_label, f1_user = data.f1_label[f1_rows], data.f1_user[f1_rows]
    per = {}      # method -> dict of per-sample arrays
    res = {"split": split, "n_samples": int(len(rows)), "methods": {}}
    cands, target = getattr(data, f"{split}_cands")[rows], getattr(data, f"{split}_target")[rows]
    # < 1 only with --candidates sasrec
    res["ceiling"] = float((cands == target[:, None]).any(1).mean())
    for name, hits in baseline_hits(data, split, seed).items():
        per[name] = {"hit": hits[rows]}
    f1_preds, pairs = {}, []
    for name, adapters in agents:
        pairs.append(pair_parts(model, tok, data, split, rows, f1_rows, name, adapters, t_max,
                                device, decoding, log))
    got = kept_parts(keep, [part for parts, _ in pairs for part in parts], log)
    for (name, _), (parts, join) in zip(agents, pairs):
        m, f1_preds[name] = join(got[:len(parts)])
        got = got[len(parts):]
        per[name] = {k: np.asarray(v, float) for k, v in m.items()}
    for name, m in per.items():
        r = {}
        for k, v in m.items():
            v = np.asarray(v, float)
            v = v[np.isfinite(v)]
            if len(v):
                mu, lo, hi = mean_ci(v, n_boot, seed)
                r[k] = {"mean": mu, "lo": lo, "hi": hi}
        if name in f1_preds:
            acc, ok = f1_preds[name]
            p, rc, f = prf(acc, f1_label)
            lo, hi = f1_ci(acc, f1_label, f1_user, n_boot, seed)
            r["user_precision"], r["user_recall"] = {"mean": p}, {"mean": rc}
            r["user_f1"] = {"mean": f, "lo": lo, "hi": hi}
            r["f1_valid"] = {"mean": float(ok.mean())}
        res["methods"][name] = r
    p, rc, f = prf(np.ones(len(f1_label), bool), f1_label)
    lo, hi = f1_ci(np.ones(len(f1_label), bool), f1_label, f1_user, n_boot, seed)
    res["methods"]["Chance: 1/K pick, accept everything"] = {
        "hit": {"mean": 1.0 / cands.shape[1]}, "user_precision": {"mean": p},
        "user_recall": {"mean": rc},
        "user_f1": {"mean": f, "lo": lo, "hi": hi}}
    f1_preds_all = dict(f1_preds, **{"Accept everything": (np.ones(len(f1_label), bool), None)})
    main = agents[-1][0]
    res["paired"] = {}
    for name in per:
        if name != main:
            mu, lo, hi = paired_diff_ci(per[main]["hit"], per[name]["hit"], n_boot, seed)
            res["paired"][f"{main} - {name} (Hit@1)"] = {"mean": mu, "lo": lo, "hi": hi}
    for name in f1_preds_all:
        if name != main:
            mu, lo, hi = f1_diff_ci(f1_preds[main][0], f1_preds_all[name][0], f1_label, f1_user,
                                    n_boot, seed)
            res["paired"][f"{main} - {name} (UserAgent F1)"] = {"mean": mu, "lo": lo, "hi": hi}
    if per_sample:
        res["rows"] = rows.tolist()
        res["per_sample"] = {name: dict(hit=per[name]["hit"].tolist(),
                                        f1_accept=f1_preds[name][0].tolist(),
                                        f1_label=f1_label.tolist()) for name, _ in agents}
        res["per_sample"].update({name: dict(hit=h[rows].tolist())
                                  for name, h in baseline_hits(data, split, seed).items()})
    res["seconds"] = round(time.time() - t0, 1)
    return res


def evaluate_run(cfg, model, tok, data, device, log=print, keep=None):
    """The test evaluation of a finished run (train.py's, and eval.py's again): Random, Pop, SASRec
    top-1, the memory-based ARS (--memory-row), the reference row 'SFT on stage-2 samples' when the
    model has that adapter (train.sft_reference), CoARS; then the UserAgent's Eq. 8 return beside
    the constant users' on --eval-returns-n stage-2 samples (user_returns). res["phase_s"]: the
    seconds of each phase. Every phase starts with a log line (a caller may stop there). keep: the
    folder of kept parts (evaluate), where a stopped evaluation continues."""
    res = evaluate(model, tok, data, "test", cfg.t_max, device, cfg.n_boot, cfg.seed,
                   agents=run_agents(model, cfg.memory_row), max_samples=cfg.eval_test_n,
                   decoding=cfg.decoding, log=log, per_sample=True, keep=keep)
    res["phase_s"] = {"test_evaluation": res["seconds"]}
    if cfg.eval_returns_n:
        t0 = time.time()
        res["user_returns"] = run_user_returns(cfg, model, tok, data, device, log, keep)
        res["phase_s"]["constant_users_returns"] = round(time.time() - t0, 1)
    return res


def run_agents(model, memory=True):
    """The agent pairs a finished run is evaluated with: the memory-based ARS (no adapters; not
    with memory=False, --no-memory-row), the SFT reference where the model has its adapter, CoARS
    (last: the paired rows compare to it)."""
    sft = (("SFT on stage-2 samples", ("sft", None)),) if model.has_adapter("sft") else ()
    mem = (("Memory-based ARS", (None, None)),) if memory else ()
    return mem + sft + (("CoARS", ("rec", "user")),)


def run_user_returns(cfg, model, tok, data, device, log=lambda *a: None, keep=None):
    """user_returns with a run's options, on its --eval-returns-n stage-2 samples
    (returns_sample)."""
    rows, keys = returns_sample(cfg, data)
    return user_returns(model, tok, data, rows, keys, cfg.reward_options(), cfg.t_max, device,
                        temperature=cfg.temperature, decoding=cfg.decoding, batch=tok.eval_batch,
                        n_boot=cfg.n_boot, seed=cfg.seed, log=log, keep=keep)


def parts_folder(run_dir):
    """Where the evaluation parts of a run are kept: beside the run folder, shared by the runs of
    one --out-dir (a part is keyed by what it depends on, not by the run)."""
    return Path(run_dir).resolve().parent / "eval-parts"


def validation_samples(cfg, data, train_rows, n):
    """(validation rows, training rows): stage 2's validation curve's samples (train.Stage2Run,
    n = --eval-valid-n), the first n of the validation split and of train_rows in one seeded order,
    the validation split's drawn first; tools/prior_use.py --max-samples measures the same ones."""
    pick = np.random.default_rng(cfg.seed).permutation
    return pick(len(data.valid_user))[:n], pick(train_rows)[:n]


def returns_sample(cfg, data):
    """(rows, keys): a fixed random subset of --eval-returns-n stage-2 samples and their episode
    keys."""
    rng = np.random.default_rng(cfg.seed + 7)
    rows = rng.permutation(stage2_rows(data, cfg.stage2_last))[:cfg.eval_returns_n]
    return rows, rng.integers(0, 1 << 31, len(rows))


def main(argv=None):
    from config import UserError
    from support.distributed import device_of
    from support.runs import add_run_args, load_run  # loading a saved run is machinery
    p = argparse.ArgumentParser(description="Evaluate a CoARS training run (see the module "
                                            "docstring).")
    add_run_args(p, "test", "the split to evaluate; 'valid' writes results_valid.* beside the "
                            "run's test results")
    p.add_argument("--max-samples", type=int, default=-1,
                   help="evaluate a fixed random subset of this size (0 = all; default: the "
                        "run's --eval-test-n on test, all on valid)")
    p.add_argument("--returns-n", type=int, default=-1,
                   help="stage-2 samples for the constant users' Eq. 8 returns on test (0 = "
                        "none; default: the run's --eval-returns-n)")
    p.add_argument("--plot", action="store_true",
                   help="only write the run's curves.png from its metrics.jsonl (needs "
                        "matplotlib), without evaluating")
    p.add_argument("--untrained-only", action="store_true",
                   help="only the untrained rows (Random, Pop, SASRec top-1, the memory-based "
                        "ARS: no adapter used) on the samples of the run's final evaluation; a "
                        "run still training will do (its newest checkpoint); written to "
                        "results_untrained[_N].json, which tools/suite.py --rows reads")
    a = p.parse_args(argv)
    if a.plot:
        from support.watch import plot_run
        if not (Path(a.run) / "metrics.jsonl").exists():
            sys.exit(f"error: {Path(a.run) / 'metrics.jsonl'} does not exist: point --run at a "
                     "folder written by train.py.")
        path = plot_run(a.run)
        if path is None:
            sys.exit(1)
        print(f"training curves: {path}")
        return
    try:
        in_progress = a.untrained_only and not (Path(a.run) / "coars.pt").exists()
        cfg, model, tok, data = load_run(Path(a.run), a.device, checkpoint=in_progress, log=print)
    except UserError as e:
        sys.exit(f"error: {e}")
    device = device_of(a.device)
    keep = parts_folder(a.run)          # a stopped evaluation continues where it stopped
    default = a.max_samples < 0 and a.returns_n < 0
    if a.untrained_only:
        n = cfg.eval_test_n if a.split == "test" and a.max_samples < 0 else max(a.max_samples, 0)
        res = evaluate(model, tok, data, a.split, cfg.t_max, device, cfg.n_boot, cfg.seed,
                       agents=(("Memory-based ARS", (None, None)),), max_samples=n,
                       decoding=cfg.decoding, per_sample=True, keep=keep)
        name = "results_untrained" + (f"_{a.split}" if a.split != "test" else "") + \
            (f"_{n}" if n else "")
        write_results(res, a.run, name)
        print(results_table(res))
        print(f"\nwritten to {Path(a.run) / name}.md and .json")
        return
    if a.split == "test":
        cfg = dataclasses.replace(
            cfg, eval_test_n=cfg.eval_test_n if a.max_samples < 0 else a.max_samples,
            eval_returns_n=cfg.eval_returns_n if a.returns_n < 0 else a.returns_n)
        res = evaluate_run(cfg, model, tok, data, device, keep=keep)
    else:
        res = evaluate(model, tok, data, a.split, cfg.t_max, device, cfg.n_boot, cfg.seed,
                       agents=run_agents(model, cfg.memory_row),
                       max_samples=max(a.max_samples, 0), decoding=cfg.decoding, per_sample=True,
                       keep=keep)
    # the run's own test evaluation is its results.json (as train.py writes it); any other goes
    # beside it
    n = cfg.eval_test_n if a.split == "test" else max(a.max_samples, 0)
    name = "results" if a.split == "test" and default else \
        f"results_{a.split}" + (f"_{n}" if n else "") + \
        (f"_returns{a.returns_n}" if a.returns_n >= 0 else "")
    write_results(res, a.run, name)
    print(results_table(res))
    print(f"\nwritten to {Path(a.run) / name}.md and .json")


if __name__ == "__main__":
    main()
