"""
Stage 1 of train.py [ours]: making the built-in base GPT a sequential recommender that can read and
write the agents' messages (docs/method.md section 5), on the training split only; and the optional
warm-up of a Hugging Face model's adapters. Not part of CoARS itself: the built-in GPT has no world
knowledge, and this is what a pretrained LLM brings to the paper.

What stage 1 trains on, every step (one batch):
  - Next-item language modelling: --pretrain-batch windows of up to --pretrain-window items of
    one user's stage-1 sequence, `<|hist|> i1 i2 ...`, every next item scored with a full softmax
    over the items, as SASRec is trained. The RecAgent prompt ends with `<|hist|> h1..h10`
    (env.py), so its answer is predicted where this model predicts the next item; half the windows
    (--pretrain-prefixed) come after the head of a RecAgent prompt with random candidates, so that
    the 20 candidates before the history are not read as more history.
  - Scripted dialogues (--pretrain-dialogues: half per agent), at a random turn of an episode whose
    earlier turns recommended wrong candidates that the user turned down (so the memory is used: a
    turned-down item is never the answer). The RecAgent's answer names the item the user really took
    next. The UserAgent judges an item: positive (click / star) for the user's real next item or one
    of its near-future items, negative (skip / dislike) for a random item. Half of the dialogues
    carry a hindsight reference (distill.py) in the prompt, so the teacher can read one.
    [ours] With a reference in the prompt, only the target is positive (a near-future item is
    then negative): the reference names the target, the teacher's judgement is the one Eq. 8
    rewards (accepting the target, sigma = +1; accepting any other item, sigma = -1), and the
    student prompt, without a reference, keeps docs/method.md section 5's rule (near-future items
    positive).
Samples [ours]: the last --stage2-last training samples of each user are stage 2's (stage2_rows);
stage 1 sees each user's training part without those targets, so stage 2 does not replay answers
stage 1 memorised. Stage 1 stops on validation: every --pretrain-eval-every steps the RecAgent's
HR@1 of ranking the validation candidates (no SASRec hint) is measured, the best weights are kept,
and training stops after --pretrain-patience evaluations without improvement (the model overfits
within minutes). The base is then frozen and cached in out/<run>/base.pt, reused when the data and
the stage-1 options are the same.

A Hugging Face chat model skips stage 1; `--warmup-steps N` gives its two adapters N supervised
steps on the same scripted dialogues (rendered in natural language by support/chat.py) before CoARS,
so that they can write the message format (warmup()).
"""

import copy
import dataclasses
import json
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from config import UserError
from data.prepare import stage2_rows  # noqa: F401  (train.py and the tests take it from here too)
from distill import hindsight_reference
from env import (ACTION_RANGE, Turn, closest_history_item, finish_turn, new_trajectory, record_user)
from support.checkpoint import (STOP, Stopped, check_bad_streak, data_fingerprint, finite,
                                log_jsonl, metrics_lines, plain_progress, prepared_digest,
                                rng_state, save_checkpoint, set_rng_state)
from model import build_model, causal_mask, freeze, positions
from scoring import logprobs_of, next_token_scores, pack


# --------------------------------------------------------------------------------------------------
# Which samples belong to which stage


def stage1_parts(data, n_last):
    """Each user's training part without the targets of its stage-2 samples: (list of item arrays,
    rows of the training split whose targets lie inside them)."""
    s2 = stage2_rows(data, n_last)
    n2 = np.bincount(data.train_user[s2], minlength=data.n_users)     # stage-2 samples per user
    parts = [data.train_items(u)[:len(data.train_items(u)) - n2[u]] for u in range(data.n_users)]
    rows = np.setdiff1d(np.arange(len(data.train_user)), s2)
    return parts, rows


def check_stage1_rows(cfg, data):
    """A UserError (one sentence) when the scripted dialogues of stage 1 (or of a chat model's
    warm-up) would have no training sample of their own: users so short that --stage2-last takes
    every training sample (tools/sparse.py's variants)."""
    needs = (cfg.pretrain_dialogues and cfg.pretrain_steps) if not cfg.model else cfg.warmup_steps
    if needs and len(stage1_parts(data, cfg.stage2_last)[1]) == 0:
        fix = ("lower --stage2-last, e.g. to 1" if cfg.stage2_last > 1 else
               "the users are too short for both stages: give them more events")
        raise UserError(f"stage 1 has no training sample of its own: with --stage2-last "
                        f"{cfg.stage2_last} every training sample of every user goes to stage 2; "
                        f"{fix}.")


# --------------------------------------------------------------------------------------------------
# Scripted dialogues


def wrong_turns(data, tok, traj, rng, n):
    """Play n turns in which the scripted RecAgent names a wrong candidate, never twice, and the
    user turns it down; these fill the memory of a dialogue document. Half the time the wrong item
    is the most plausible one (closest to the history by SASRec item embeddings), a quarter the
    SASRec prior when it is wrong, else a uniform one: a model that knows the user would pick such
    items itself, so the documents teach it that an item the user turned down is not named again
    (with uniform wrong items only, the trained pair repeated turned-down items;
    docs/results.md)."""
    v = data.item_vec
    taste = v[traj.hist].mean(0)                                          # (d,)
    for _ in range(n):
        used = {tr.item for tr in traj.turns}
        wrong = [c for c in traj.cands if c != traj.target and c not in used]
        u = rng.random()
        if u < 0.5:
            item = wrong[int(np.argmax(v[wrong] @ taste))]
        elif u < 0.75 and traj.prior in wrong:
            item = traj.prior
        else:
            item = wrong[int(rng.integers(len(wrong)))]
        # a rejection never ends it
        scripted_turn(data, tok, traj, rng, item, False, len(traj.turns) + 2)
    return traj


def scripted_turn(data, tok, traj, rng, item, positive, t_max):
    """Append one scripted turn: the RecAgent names `item` (rationale: the closest history item) and
    the user reacts (scripted_reaction); the episode ends at a click or at t_max turns."""
    why = closest_history_item(data, traj.hist, item)
    tr = Turn(rec_out=tok.rec_message(item, why), item=item, rec_valid=True)
    traj.turns.append(tr)
    record_user(data, traj, tr)
    tr.action, tr.score = scripted_reaction(rng, positive)
    tr.user_out, tr.user_valid = tok.user_message(tr.action, tr.score, why), True
    finish_turn(traj, tr, t_max)


def scripted_reaction(rng, positive):
    """(action, score): click (3 in 4) or star for an item the user wants, skip or dislike (1 in 2
    each) otherwise, the score uniform inside the action's interval (env.ACTION_RANGE). A greedy
    UserAgent then accepts where it believes the item wanted with probability above 0.4 (click's
    0.75 p against dislike's or skip's 0.5 (1 - p)), below an even split: a user that accepts only
    what it is sure of misses most of the F1 set's positives."""
    action = ("click" if rng.random() < 0.75
              else "star") if positive else ("dislike" if rng.random() < 0.5 else "skip")
    lo, hi = ACTION_RANGE[action]
    return action, round(min(hi - 0.01, lo + float(rng.random()) * (hi - lo)), 2)


def scripted_episode(data, tok, traj, rng, t_max):
    """A finished episode of the scripted agents: some wrong turns (wrong_turns), then the target
    clicked or starred, unless the turns ran out or the target is not a candidate."""
    wrong_turns(data, tok, traj, rng, int(rng.integers(t_max + 1)))
    if len(traj.turns) < t_max and traj.target in traj.cands:
        scripted_turn(data, tok, traj, rng, traj.target, True, t_max)
    return traj


def scripted_reference(data, tok, row, rng, t_max):
    """A hindsight reference as stage 2 would build it, from a scripted episode of the same
    sample."""
    return hindsight_reference(tok,
                               scripted_episode(data, tok, new_trajectory(data, "train", row), rng,
                                                t_max))


def dialogue_doc(data, tok, rng, cfg, agent, rows, parts):
    """One scripted dialogue turn of `agent` on a stage-1 sample: (prompt + answer ids, index where
    the answer starts)."""
    # a RecAgent document needs the target among the candidates (--candidates sasrec)
    for _ in range(50):
        row = int(rows[rng.integers(len(rows))])
        traj = new_trajectory(data, "train", row)
        if traj.target in traj.cands or agent == "user":
            break
    t = int(rng.integers(cfg.t_max))
    wrong_turns(data, tok, traj, rng, t)
    use_ref = rng.random() < cfg.p_reference
    ref = scripted_reference(data, tok, row, rng, cfg.t_max) if use_ref else ()
    if agent == "rec":
        prompt = tok.render_rec(traj, t, ref)
        why = closest_history_item(data, traj.hist, traj.target)
        return prompt + tok.rec_message(traj.target, why), len(prompt)
    items = parts[traj.user]
    j = int(np.flatnonzero(items == traj.target)[0]) if traj.target in items else len(items)
    if rng.random() < 0.5:  # something the user wants: the real next item or a near-future one
        future = items[j + 1:j + 1 + cfg.pretrain_future]
        if rng.random() < 0.7 or not len(future):
            item = traj.target
        else:
            item = int(future[rng.integers(len(future))])
    else:  # something random the user never took: a wrong candidate or any item
        seen = set(items.tolist()) | {traj.target}
        pool = [c for c in traj.cands if c not in seen]
        while True:
            if pool and rng.random() < 0.5:
                item = pool[int(rng.integers(len(pool)))]
            else:
                item = int(rng.integers(data.n_items))
            if item not in seen:
                break
    near_future = items[j + 1:j + 1 + cfg.pretrain_future]
    positive = item == traj.target if ref else item == traj.target or item in near_future
    why = closest_history_item(data, traj.hist, item)
    tr = Turn(rec_out=tok.rec_message(item, why), item=item, rec_valid=True)
    traj.turns.append(tr)
    record_user(data, traj, tr)
    prompt = tok.render_user(traj, t, ref)
    return prompt + tok.user_message(*scripted_reaction(rng, positive), why), len(prompt)


def sequence_doc(tok, rng, parts, weights, window, prefixed=0.0, n_cands=20):
    """Up to `window` consecutive items of one user's stage-1 sequence, every next item scored. With
    probability `prefixed` the window follows the head of a RecAgent prompt
    (env.Tokenizer.render_rec) whose candidates are random items outside the window and whose memory
    is empty: the RecAgent's answer is the item after `<|hist|> h1..h10` in a prompt that starts
    with 20 candidates, and a base trained only on bare windows reads those candidates as more
    history (it then ranks the candidates worse from the RecAgent prompt than from the bare history;
    docs/results.md)."""
    u = int(rng.choice(len(parts), p=weights))
    items = parts[u]
    s = int(rng.integers(max(1, len(items) - window + 1)))
    head = []
    if rng.random() < prefixed:
        seen = set(items[s:s + window].tolist())
        cands = []
        while len(cands) < n_cands:
            c = int(rng.integers(tok.n_items))
            if c not in seen and c not in cands:
                cands.append(c)
        head = [tok.sp("rec"), tok.sp("cands")] + [tok.item(c) for c in cands] + [tok.sp("mem")]
    return head + [tok.sp("hist")] + [tok.item(i) for i in items[s:s + window]], len(head) + 1


def lm_loss(model, docs, tok, device, precision="auto"):
    """Mean next-token loss over each document's scored part (head only on those positions)."""
    idx, valid, score = pack([d[:s] for d, s in docs], [d[s:] for d, s in docs], tok.pad_id)
    idx, valid, score = idx.to(device), valid.to(device), score.to(device)
    with autocast(device, precision):
        h = model(idx, positions(valid), causal_mask(valid))
    return -logprobs_of(h[score].float(), model.head_weight, idx[:, 1:][score[:, :-1]]).mean()


def autocast(device, precision="auto"):
    """The training passes' dtype (--precision): bf16 autocast, or float32. 'auto' = bf16 on a GPU,
    float32 on a CPU: bf16 is barely faster on CPUs with native bf16 and much slower on CPUs without
    it (docs/benchmarks.md), and float32 gives the same losses whatever the batch split (torchrun
    ranks, micro-batches) up to round-off, which bf16 does not (docs/reproducibility.md). Rollouts
    always decode in float32, so under bf16 (a GPU's default) the CoARS losses score the sampled
    messages under a distribution equal to the sampling one only up to bf16 round-off; 'fp32' makes
    them the same."""
    cuda = str(device).startswith("cuda")
    on = precision == "bf16" or (precision == "auto" and cuda)
    return torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=on)


def valid_hr1(model, tok, data, rows, device, batch=256):
    """Stage 1's validation measure: the share of validation samples whose target the RecAgent
    ranks first among its candidates from the prompt without the SASRec prior, by the logit of each
    candidate's item token (ties count for the target). eval.rank_metrics(..., hint=False)'s HR@1;
    the tests check that they agree."""
    hits = []
    for s in range(0, len(rows), batch):
        trajs = [new_trajectory(data, "valid", r) for r in rows[s:s + batch]]
        for tr in trajs:
            tr.prior = None
        prompts = [tok.render_rec(tr, 0) for tr in trajs]
        scores = next_token_scores(model, prompts,
                                   [[tok.item(c) for c in tr.cands] for tr in trajs],
                                   tok.pad_id, device)                                    # (B,20)
        for tr, sc in zip(trajs, scores):
            if tr.target in tr.cands:
                hits.append(float((sc > sc[tr.cands.index(tr.target)]).sum() == 0))
            else:
                hits.append(0.0)
    return float(np.mean(hits))


def stage1_key(cfg, data):
    return dict(raw_sha256=data.meta["raw_sha256"], data_options=data.meta["options"],
                model=[cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout],
                pretrain=[cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_window,
                          cfg.pretrain_prefixed, cfg.pretrain_dialogues, cfg.pretrain_lr,
                          cfg.pretrain_future, cfg.pretrain_eval_every, cfg.pretrain_eval_n,
                          cfg.pretrain_patience, cfg.p_reference, cfg.stage2_last, cfg.t_max,
                          cfg.seed, cfg.precision])


def stage1(cfg, data, tok, device, run_dir, log, ck=None):
    """Pretrain (or load) the base; returns it frozen. ck: a stage-1 checkpoint to continue from."""
    path = run_dir / "base.pt"
    key = stage1_key(cfg, data)
    model = build_model(cfg, tok.vocab_size, device)
    if path.exists() and not (ck and ck["stage"] == 1):
        saved = torch.load(path, map_location=device, weights_only=True)
        if saved.get("key") == json.dumps(key, sort_keys=True):
            model.load_state_dict(saved["model"])
            log(f"stage 1: reusing the pretrained base in {path}")
            return freeze(model)
        log(f"stage 1: {path} was pretrained with other data or options: pretraining again")
    rng = np.random.default_rng(cfg.seed)
    parts, rows = stage1_parts(data, cfg.stage2_last)
    lens = np.array([max(len(p) - 1, 0) for p in parts], float)      # next-item targets per user
    weights = lens / lens.sum()
    valid_rows = np.random.default_rng(cfg.seed).permutation(len(data.valid_user))
    valid_rows = valid_rows[:cfg.pretrain_eval_n]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2
             and not n.startswith(("wte", "wpe"))]
    rest = [p for n, p in model.named_parameters()
            if not (p.dim() >= 2 and not n.startswith(("wte", "wpe")))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.pretrain_lr, betas=(0.9, 0.98))
    warm = max(1, cfg.pretrain_steps // 20)
    t0 = time.time()
    start, n_bad, streak = 0, 0, 0
    best = dict(hr1=-1.0, step=0, since=0, model=None)           # early stopping on validation HR@1

    def checkpoint(step):
        save_checkpoint(run_dir,
                        dict(stage=1, step=step, model=model.state_dict(), opt=opt.state_dict(),
                             rng=rng_state(rng), torch_rng=torch.get_rng_state(),
                             n_bad=n_bad, best=best,
                             config=dataclasses.asdict(cfg), data=data_fingerprint(data),
                             data_arrays=prepared_digest(data),
                             metrics_lines=metrics_lines(run_dir)))

    if ck and ck["stage"] == 1:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        set_rng_state(rng, ck["rng"])
        torch.set_rng_state(ck["torch_rng"])
        start, n_bad, best = ck["step"], ck["n_bad"], ck["best"]
        log(f"stage 1: resuming after step {start}")
    model.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(start, cfg.pretrain_steps), desc="stage 1 pretrain", dynamic_ncols=True,
               disable=None, initial=start, total=cfg.pretrain_steps)
    for step in bar:
        lr = cfg.pretrain_lr * min((step + 1) / warm, 0.1
                                   + 0.9 * 0.5 * (1
                                                  + math.cos(math.pi * step / cfg.pretrain_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        seqs = [sequence_doc(tok, rng, parts, weights, cfg.pretrain_window, cfg.pretrain_prefixed,
                             data.train_cands.shape[1])
                for _ in range(cfg.pretrain_batch)]
        dias = [dialogue_doc(data, tok, rng, cfg, "rec" if k % 2 == 0 else "user", rows, parts)
                for k in range(cfg.pretrain_dialogues)]
        # two means, one per kind of document: the few answer tokens of the dialogues are not
        # drowned by the thousands of next-item targets of the sequences
        loss = lm_loss(model, seqs, tok, device, cfg.precision)
        if dias:
            loss = loss + lm_loss(model, dias, tok, device, cfg.precision)
        opt.zero_grad(set_to_none=True)
        ok = finite(loss)
        if ok:
            loss.backward()
            ok = finite(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        if ok:
            opt.step()
            streak = 0
        else:
            n_bad, streak = n_bad + 1, streak + 1
            check_bad_streak(cfg, streak, 1, step + 1, run_dir, log, lambda: checkpoint(step))
        rec = None
        if step % 20 == 0 or step == cfg.pretrain_steps - 1 or not ok:
            rec = dict(stage=1, step=step, loss=loss.item(), lr=lr, skipped=n_bad,
                       seconds=round(time.time() - t0, 1))
        if cfg.pretrain_eval_every and ((step + 1) % cfg.pretrain_eval_every == 0
                                        or step == cfg.pretrain_steps - 1):
            model.eval()  # what the RecAgent knows by itself: its ranking without the SASRec hint
            hr1 = valid_hr1(model, tok, data, valid_rows, device)
            model.train()
            rec = dict(rec or dict(stage=1, step=step, loss=loss.item(), lr=lr, skipped=n_bad,
                                   seconds=round(time.time() - t0, 1)), valid_hr1=hr1)
            if hr1 > best["hr1"]:
                best.update(hr1=hr1, step=step + 1, since=0,
                            model=copy.deepcopy(model.state_dict()))
            else:
                best["since"] += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", valid_hr1=f"{hr1:.3f}",
                            best=f"{best['hr1']:.3f}")
        if rec:
            log_jsonl(run_dir / "metrics.jsonl", rec)
        plain_progress(log, "stage 1", step + 1, cfg.pretrain_steps, t0, start,
                       f" (best validation HR@1 so far {best['hr1']:.4f})" if best["hr1"] >= 0
                       else "")
        done = cfg.pretrain_patience and best["since"] >= cfg.pretrain_patience
        if STOP.signum or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and not done):
            checkpoint(step + 1)
            if STOP.signum:
                raise Stopped(f"stage 1 step {step + 1}")
        if done:
            log(f"stage 1: validation HR@1 without the hint has not improved for {best['since']} "
                f"evaluations: stopping after step {step + 1}")
            break
    if cfg.pretrain_steps and start < cfg.pretrain_steps or (ck and ck["stage"] == 1):
        if best["model"] is not None:
            model.load_state_dict(best["model"])
            log(f"stage 1: keeping the weights of step {best['step']} (validation HR@1 without the "
                f"hint {best['hr1']:.4f} on {len(valid_rows)} samples)")
        tmp = path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "key": json.dumps(key, sort_keys=True),
                    "valid_hr1": best["hr1"], "best_step": best["step"]}, tmp)
        tmp.replace(path)
        log(f"stage 1: {time.time() - t0:.0f} s, last loss {loss.item():.3f}")
    return freeze(model)


def warmup(cfg, model, tok, data, device, log):
    """[ours, optional] cfg.warmup_steps supervised steps for each agent's adapter on scripted
    dialogues (dialogue_doc: the agent's own prompts and the scripted answers, half with a hindsight
    reference), so that a chat model writes the message format before CoARS. The base stays frozen.
    Its loss is plain next-token cross-entropy over the whole vocabulary, not the grammar's
    restricted softmax: under --decoding grammar (the default) the format is given by construction
    and the warm-up is needed only with --decoding free / item. Returns the mean loss of the last
    step per agent."""
    rng = np.random.default_rng(cfg.seed + 7)
    parts, rows = stage1_parts(data, cfg.stage2_last)
    agents = [a for a, on in (("rec", cfg.train_rec), ("user", cfg.train_user)) if on]
    params = {a: model.adapter_parameters(a) for a in agents}
    opt = torch.optim.Adam([p for a in agents for p in params[a]], lr=cfg.pretrain_lr)
    last = {}
    for step in tqdm(range(cfg.warmup_steps), desc="warm-up", dynamic_ncols=True, disable=None):
        opt.zero_grad(set_to_none=True)
        for a in agents:
            model.set_adapter(a)
            docs = [dialogue_doc(data, tok, rng, cfg, a, rows, parts)
                    for _ in range(cfg.pretrain_dialogues)]
            loss = lm_loss(model, docs, tok, device, cfg.precision)
            loss.backward()
            last[a] = loss.item()
        model.set_adapter(None)
        torch.nn.utils.clip_grad_norm_([p for a in agents for p in params[a]], 1.0)
        opt.step()
    if cfg.warmup_steps:
        log(f"warm-up: {cfg.warmup_steps} steps, last losses "
            + ", ".join(f"{a} {v:.3f}" for a, v in last.items()))
    return last
