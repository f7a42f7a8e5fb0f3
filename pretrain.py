"""
Stage 1 of train.py [ours]: pretraining the built-in base GPT, and the optional warm-up of a
Hugging Face model's adapters. Not part of CoARS itself (PAPER.md section 5): the built-in GPT has no
world knowledge, so it first learns, on the training split only, item names, history sequences and
scripted dialogues in both agents' message formats (half of them with a hindsight reference in the
prompt, so the base can read every part of the format the agents and the teacher will meet). The
base is then frozen and cached in out/<run>/base.pt, reused when the data and the stage-1 options
are the same.

A Hugging Face chat model skips stage 1; `--warmup-steps N` gives its two adapters N supervised
steps on the same scripted dialogues (rendered in natural language by chat.py) before CoARS, so
that they can write the message format (warmup()).
"""

import dataclasses
import json
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import (FAULTS, STOP, Stopped, check_bad_streak, data_fingerprint, finite, log_jsonl, metrics_lines,
                        rng_state, save_checkpoint, set_rng_state)
from distill import hindsight_reference
from env import (closest_history_item, new_trajectory, rec_message, render_rec, render_user, scripted_episode,
                 scripted_rec_choice, scripted_user_reaction, user_message)
from model import GPT, GPTConfig, causal_mask, logprobs_of, pack, positions


def user_future(data, traj, k=10):
    """The k items after the sample's target in the user's training part (for the scripted user)."""
    items = data.train_items(traj.user)
    j = np.flatnonzero(items == traj.target)
    return set(items[j[0]:j[0] + k].tolist()) if len(j) else {traj.target}


def dialogue_doc(data, tok, rng, cfg, agent):
    """One scripted dialogue turn: (prompt + answer ids, index where the answer starts)."""
    row = int(rng.integers(len(data.train_user)))
    traj = new_trajectory(data, "train", row)
    future = user_future(data, traj)
    scripted_episode(data, tok, traj, rng, cfg.t_max, cfg.p_target, cfg.p_prior, future)
    t = int(rng.integers(len(traj.turns)))
    ref = ()
    if rng.random() < cfg.p_reference:
        # an earlier trajectory of the same sample (or, as in stage 2 when none exists, this one)
        other = traj if rng.random() < 0.3 else scripted_episode(
            data, tok, new_trajectory(data, "train", row), rng, cfg.t_max, cfg.p_target, cfg.p_prior, future)
        ref = hindsight_reference(tok, other)
    tr = traj.turns[t]
    if agent == "rec":
        prompt = render_rec(tok, traj, t, ref)
        if ref:
            prefix = dataclasses.replace(traj, turns=traj.turns[:t])
            item = scripted_rec_choice(prefix, rng, cfg.p_target, cfg.p_prior, reference=True)
            answer = rec_message(tok, traj.cands, item, closest_history_item(data, traj.hist, item))
        else:
            answer = tr.rec_out
    else:
        prompt = render_user(tok, traj, t, ref)
        if ref:
            a, s = scripted_user_reaction(data, traj, tr.item, tr.q, rng, future, reference=True)
            answer = user_message(tok, a, s, closest_history_item(data, traj.hist, tr.item))
        else:
            answer = tr.user_out
    return prompt + answer, len(prompt)


def pretrain_doc(data, tok, rng, cfg):
    """A random stage-1 document: (ids, first position whose token is in the loss)."""
    u = rng.random()
    # Mix [ours]: dialogues dominate. Sequence documents teach item co-occurrence, but each scores
    # ~12 next-item predictions; with a larger share they drown the single item of a RecAgent
    # answer and the base learns to name items it expects next instead of a candidate.
    if u < 0.6:
        return dialogue_doc(data, tok, rng, cfg, "rec")
    if u < 0.9:
        return dialogue_doc(data, tok, rng, cfg, "user")
    if u < 0.95:  # an item sequence from one user's training part
        user = int(rng.integers(data.n_users))
        items = data.train_items(user)
        s = int(rng.integers(max(1, len(items) - 12)))
        return [tok.sp("seq")] + [tok.item(i) for i in items[s:s + 12]], 1
    item = int(rng.integers(data.n_items))  # an item and its title
    title = data.titles[item].encode("utf-8")[:32].decode("utf-8", "ignore")
    return [tok.sp("title"), tok.item(item)] + tok.text(title) + [tok.end_id], 2


def lm_loss(model, docs, tok, device, precision="auto"):
    """Mean next-token loss over each document's scored part (head only on those positions)."""
    idx, valid, score = pack([d[:s] for d, s in docs], [d[s:] for d, s in docs], tok.pad_id)
    idx, valid, score = idx.to(device), valid.to(device), score.to(device)
    with autocast(device, precision):
        h = model(idx, positions(valid), causal_mask(valid))
    return -logprobs_of(h[score].float(), model.head_weight, idx[:, 1:][score[:, :-1]]).mean()


def autocast(device, precision="auto"):
    """The training passes' dtype (--precision): bf16 autocast, or float32. 'auto' = bf16 on a GPU,
    float32 on a CPU. Measured on a 2-core AMD EPYC with native bf16 (avx512_bf16): bf16 only 1.06x
    faster for a stage-1 step, and 4x SLOWER where oneDNN may not use those instructions
    (ONEDNN_MAX_CPU_ISA=AVX2, as on CPUs without them); an Intel AMX machine measured float32
    faster. float32 on a CPU also gives the same losses whatever the batch split (torchrun ranks,
    micro-batches) up to float32 round-off, which bf16 does not (docs/reproducibility.md)."""
    cuda = str(device).startswith("cuda")
    on = precision == "bf16" or (precision == "auto" and cuda)
    return torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=on)


def stage1_key(cfg, data):
    return dict(raw_sha256=data.meta["raw_sha256"], data_options=data.meta["options"],
                model=[cfg.n_layer, cfg.n_head, cfg.n_embd],
                pretrain=[cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_lr, cfg.p_target, cfg.p_prior,
                          cfg.p_reference, cfg.t_max, cfg.seed])


def build_model(cfg, tok, device):
    torch.manual_seed(cfg.seed)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd)).to(device)


def stage1(cfg, data, tok, device, run_dir, log, ck=None):
    """Pretrain (or load) the base; returns it frozen. ck: a stage-1 checkpoint to continue from."""
    path = run_dir / "base.pt"
    key = stage1_key(cfg, data)
    model = build_model(cfg, tok, device)
    if path.exists() and not (ck and ck["stage"] == 1):
        saved = torch.load(path, map_location=device, weights_only=True)
        if saved.get("key") == json.dumps(key, sort_keys=True):
            model.load_state_dict(saved["model"])
            log(f"stage 1: reusing the pretrained base in {path}")
            return freeze(model)
        log(f"stage 1: {path} was pretrained with other data or options: pretraining again")
    rng = np.random.default_rng(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(("wte", "wpe"))]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith(("wte", "wpe")))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.pretrain_lr, betas=(0.9, 0.98))
    warm = max(1, cfg.pretrain_steps // 20)
    t0 = time.time()
    start, n_bad, streak = 0, 0, 0

    def checkpoint(step):
        save_checkpoint(run_dir, dict(stage=1, step=step, model=model.state_dict(), opt=opt.state_dict(),
                                      rng=rng_state(rng), torch_rng=torch.get_rng_state(), n_bad=n_bad,
                                      config=dataclasses.asdict(cfg), data=data_fingerprint(data),
                                      metrics_lines=metrics_lines(run_dir)))

    if ck and ck["stage"] == 1:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        set_rng_state(rng, ck["rng"])
        torch.set_rng_state(ck["torch_rng"])
        start, n_bad = ck["step"], ck["n_bad"]
        log(f"stage 1: resuming after step {start}")
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(start, cfg.pretrain_steps), desc="stage 1 pretrain", dynamic_ncols=True, disable=None,
               initial=start, total=cfg.pretrain_steps)
    for step in bar:
        lr = cfg.pretrain_lr * min((step + 1) / warm, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.pretrain_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        docs = [pretrain_doc(data, tok, rng, cfg) for _ in range(cfg.pretrain_batch)]
        loss = FAULTS.loss(lm_loss(model, docs, tok, device, cfg.precision), 1, step + 1)
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
        if step % 20 == 0 or step == cfg.pretrain_steps - 1 or not ok:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log_jsonl(run_dir / "metrics.jsonl", dict(stage=1, step=step, loss=loss.item(), lr=lr, skipped=n_bad,
                                                      seconds=round(time.time() - t0, 1)))
        if STOP.signum or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0):
            checkpoint(step + 1)
            if STOP.signum:
                raise Stopped(f"stage 1 step {step + 1}")
    if cfg.pretrain_steps and start < cfg.pretrain_steps or (ck and ck["stage"] == 1):
        tmp = path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "key": json.dumps(key, sort_keys=True)}, tmp)
        tmp.replace(path)
        log(f"stage 1: {cfg.pretrain_steps} steps in {time.time() - t0:.0f} s, final loss {loss.item():.3f}")
    return freeze(model)


def freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def warmup(cfg, model, tok, data, device, log):
    """[ours, optional] cfg.warmup_steps supervised steps for each agent's adapter on scripted
    dialogues (dialogue_doc: the agent's own prompts and the scripted answers, half with a hindsight
    reference), so that a chat model writes the message format before CoARS. The base stays frozen.
    Returns the mean loss of the last step per agent."""
    rng = np.random.default_rng(cfg.seed + 7)
    agents = [a for a, on in (("rec", cfg.train_rec), ("user", cfg.train_user)) if on]
    params = {a: model.adapter_parameters(a) for a in agents}
    opt = torch.optim.Adam([p for a in agents for p in params[a]], lr=cfg.pretrain_lr)
    last = {}
    for step in tqdm(range(cfg.warmup_steps), desc="warm-up", dynamic_ncols=True, disable=None):
        opt.zero_grad(set_to_none=True)
        for a in agents:
            model.set_adapter(a)
            docs = [dialogue_doc(data, tok, rng, cfg, a) for _ in range(cfg.pretrain_batch)]
            loss = lm_loss(model, docs, tok, device, cfg.precision)
            loss.backward()
            last[a] = loss.item()
        model.set_adapter(None)
        torch.nn.utils.clip_grad_norm_([p for a in agents for p in params[a]], 1.0)
        opt.step()
    if cfg.warmup_steps:
        log(f"warm-up: {cfg.warmup_steps} steps, last losses " + ", ".join(f"{a} {v:.3f}" for a, v in last.items()))
    return last
