"""
Train CoARS end to end (docs/method.md section 5) and print the results table.

    python train.py --dataset ml-latest-small --data-url file:///path/to/ml-latest-small.zip
    python train.py --dataset ml-1m                       # downloads ml-1m from GroupLens
    python train.py --model smollm2-135m ...               # a Hugging Face chat model (support/hf.py)
    torchrun --nproc_per_node=2 train.py ...              # DDP over 2 processes (GPUs, or gloo on CPU)
    python train.py --help                                # every option, with its default

Stages:
  0. data/prepare.py builds (or loads from its cache) the splits, SASRec candidates, prior, peers.
  1. Pretrain the built-in base GPT on the training split only [ours] (pretrain.py), then freeze it.
     A Hugging Face model (--model) skips this: it is frozen as loaded; --warmup-steps gives its
     adapters a short supervised warm-up on scripted dialogues first.
  2. CoARS: two LoRA adapters (RecAgent, UserAgent) on the frozen base, trained together from the
     same batched multi-turn rollouts with the interaction reward (reward.py, Eq. 7-8) plus the
     self-distilled token credit (distill.py, Eq. 10-12).
  3. Evaluate on the test split (eval.py) against Random, Pop, SASRec top-1 and the memory-based
     ARS (the same agents before stage 2) and write results.json / results.md.

This is the REINFORCE-style objective of the paper (no PPO ratio, no KL, no group normalisation);
see distill.py for the one optional extension.

Several processes (torchrun, support/distributed.py): each rank rolls out its share of the batch and the
adapters' gradients are summed over ranks; with keyed sampling (sampling.sample_next) the run equals
a single-process one (the test checks it). Rank 0 alone prepares the data first, pretrains the
base, logs, evaluates and writes checkpoints. Checkpoints, resumption and stops: support/checkpoint.py.
"""

import argparse
import dataclasses
import json
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from config import (Config, UserError, add_config_args, config_defaults, config_from, lora_targets, loss_group,
                    validate)
from data.prepare import DataError, prepare, probe_writable
from distill import ReferenceBuffer, coars_objective, collect_messages
from env import closest_history_item, message_grammar, new_trajectory, rollout
from eval import evaluate_run, results_table, run_ars, write_results
from support.checkpoint import (CKPT_NAMES, SINKS, STOP, BadSteps, Stopped, buffer_state, check_bad_streak, data_fingerprint,
                               finite, load_checkpoint, log_jsonl, metrics_lines, plain_progress, rng_state,
                               save_checkpoint, set_buffer_state, set_rng_state, truncate_metrics)
from support.distributed import all_gather, all_reduce_grads, barrier, dist_info, init_distributed, merge_stats
from support import hf
from support.runs import chat_backbone
from support.watch import TrackerError, Trackers, plot_run
from env import Tokenizer
from model import token_logprobs
from pretrain import autocast, stage1, stage2_rows, warmup
from sampling import CompileError


def parse_args(argv=None) -> Config:
    """The options: --config PATH (a saved config.json) gives the defaults, the other flags override them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="PATH", help="start from a saved config.json (e.g. out/<run>/config.json); "
                   "the flags given with it override it (a new --run-name keeps the old run)")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        saved, _ = config_defaults(argv)
    except UserError as e:
        sys.exit(f"error: {e}")
    add_config_args(p, saved)
    return config_from(p.parse_args(argv))


def check_run_dir(cfg):
    """The run folder must be writable; --resume needs a checkpoint in it."""
    run_dir = cfg.run_dir()
    try:
        probe_writable(run_dir)
    except OSError as e:
        raise UserError(f"cannot write to the run folder {run_dir} ({e.strerror or e}): choose another --out-dir "
                        f"or --run-name.")
    if cfg.resume and not any((run_dir / n).exists() for n in CKPT_NAMES):
        raise UserError(f"--resume: there is no checkpoint in {run_dir}; start the run without --resume.")
    return run_dir


# options that may change between a run and its resumption (they do not change what is computed)
RESUMABLE = {"resume", "ckpt_every", "skip_eval", "device", "n_boot", "eval_test_n", "max_bad_steps", "rollout_batch",
             "loss_batch", "grad_checkpointing", "compile", "tensorboard", "wandb"}


def check_resumable(ck, cfg, data):
    """Refuse to resume with other options or other data, naming the first difference."""
    old, new = ck["config"], dataclasses.asdict(cfg)
    for k in new:
        if k not in RESUMABLE and old.get(k) != new[k]:
            raise UserError(f"--resume: the run was started with --{k.replace('_', '-')} {old.get(k)!r}, not "
                            f"{new[k]!r}; resume with the same options or choose another --run-name.")
    if ck["data"] != data_fingerprint(data):
        raise UserError("--resume: the data differs from the data the run was started with (other raw files or "
                        "data options); resume with the same data or choose another --run-name.")


# --------------------------------------------------------------------------------------------------
# Stage 2: CoARS


def stage2(cfg, model, tok, data, device, run_dir, log, ck=None):
    """Train both adapters with CoARS from the same rollouts (docs/method.md section 5).
    ck: a stage-2 checkpoint to continue from."""
    seed = cfg.stage2_seed if cfg.stage2_seed >= 0 else cfg.seed
    rank, world = dist_info()
    lead = rank == 0
    torch.manual_seed(seed)
    try:
        model.add_lora(("rec", "user"), r=cfg.lora_r, alpha=cfg.lora_alpha, targets=lora_targets(cfg))
    except ValueError as e:
        raise UserError(f"--lora-targets: {e}; name linear layers of the model.")
    agents = [a for a, on in (("rec", cfg.train_rec), ("user", cfg.train_user)) if on]
    params = [p for a in agents for p in model.adapter_parameters(a)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr) if params else None
    rng = np.random.default_rng(seed + 1)
    buffer = ReferenceBuffer()
    reward_cfg = dict(cfg.reward_options(), user_balance=cfg.user_balance)   # collect_messages' options
    valid_rows = np.random.default_rng(cfg.seed).permutation(len(data.valid_user))[:cfg.eval_valid_n]
    train_rows = stage2_rows(data, cfg.stage2_last)      # samples whose targets stage 1 never trained on
    # the same number of them, evaluated greedily beside validation: a gap would show memorised answers
    train_check = np.random.default_rng(cfg.seed).permutation(train_rows)[:cfg.eval_valid_n]
    start, n_bad, streak = 0, 0, 0
    share = slice(rank * cfg.batch // world, (rank + 1) * cfg.batch // world)   # this rank's episodes
    micro = cfg.rollout_batch or cfg.batch

    def checkpoint(step):
        if lead:
            save_checkpoint(run_dir, dict(stage=2, step=step, adapters=adapter_state(model),
                                          opt=opt.state_dict() if opt else {}, rng=rng_state(rng),
                                          torch_rng=torch.get_rng_state(), buffer=buffer_state(buffer),
                                          n_bad=n_bad, config=dataclasses.asdict(cfg), data=data_fingerprint(data),
                                          metrics_lines=metrics_lines(run_dir)))

    if ck and ck["stage"] == 2:
        model.load_state_dict(ck["adapters"], strict=False)
        if opt:
            opt.load_state_dict(ck["opt"])
        set_rng_state(rng, ck["rng"])
        torch.set_rng_state(ck["torch_rng"])
        set_buffer_state(buffer, ck["buffer"])
        start, n_bad = ck["step"], ck["n_bad"]
        log(f"stage 2: resuming after step {start}")
    else:
        if cfg.warmup_steps:
            warmup(cfg, model, tok, data, device, log)
        checkpoint(0)                 # stage 1 is done: a resume starts from here, not from stage 1
    t_stage = time.time()
    bar = tqdm(range(start + 1, cfg.steps + 1), desc="stage 2 CoARS", dynamic_ncols=True, disable=None if lead else True,
               initial=start, total=cfg.steps)
    for step in bar:
        t0 = time.time()
        rows = train_rows[rng.integers(0, len(train_rows), cfg.batch)]
        keys = rng.integers(0, 1 << 31, cfg.batch)        # each episode's sampling key (sampling.sample_next)
        trajs, micro = rollout_with_retry(model, tok, data, rows[share], keys[share], cfg, device, micro, log)
        t1 = time.time()
        rec = dict(stage=2, step=step)
        ok = True
        split = dict(teacher_s=0.0, student_s=0.0)
        for agent in agents:
            model.set_adapter(agent)
            timing = {}
            with autocast(device, cfg.precision):   # back-propagates loss_batch messages at a time
                loss, st = agent_loss(model, tok, trajs, buffer, agent, reward_cfg, cfg.lam, cfg.baseline, device,
                                      timing=timing, micro=loss_group(cfg), backward=True, n_episodes=cfg.batch,
                                      decoding=cfg.decoding, kl=cfg.user_kl if agent == "user" else 0.0,
                                      temperature=cfg.temperature)
            split["teacher_s"] += timing.get("teacher_s", 0.0)
            split["student_s"] += timing.get("student_s", 0.0)
            losses, stats = zip(*all_gather((loss.item(), st)))
            loss = sum(losses)                     # each rank's part is already divided by the whole batch
            ok = ok and finite(loss)
            rec.update({f"{agent}_{k}": v for k, v in merge_stats(stats).items()}, **{f"{agent}_loss": loss})
        model.set_adapter(None)
        t2 = time.time()
        if opt:
            all_reduce_grads(params)
            # each agent is its own learner (docs/method.md section 4): its gradient is clipped by its own
            # norm, so one agent's large gradient never shrinks the other's step
            norms = {a: clip_agent(model.adapter_parameters(a), cfg.grad_clip, ok) for a in agents}
            ok = ok and all(finite(g) for g in norms.values())
            if ok:
                opt.step()
            opt.zero_grad(set_to_none=True)
            rec.update({f"{a}_grad_norm": float(g) for a, g in norms.items()})
            rec["grad_norm"] = float(torch.stack(list(norms.values())).norm())
        if ok:
            streak = 0
        else:  # skip the update: the adapters and the optimiser stay as they were
            n_bad, streak = n_bad + 1, streak + 1
            log(f"warning: stage 2 step {step}: non-finite loss or gradient, update skipped ({streak} in a row)")
        rec.update(skipped=n_bad, rollout_batch=micro, update_s=round(time.time() - t2, 3),
                   **{k: round(v, 3) for k, v in split.items()})
        trajs = [tr for part in all_gather(trajs) for tr in part]    # the whole batch, in row order
        buffer.add(trajs)
        n_tok = sum(len(t.rec_out) + len(t.user_out or []) for tr in trajs for t in tr.turns)
        turns = [t for tr in trajs for t in tr.turns]
        rec.update(train_hit=float(np.mean([tr.hit for tr in trajs])),
                   rec_valid=float(np.mean([t.rec_valid for t in turns])),
                   user_valid=float(np.mean([t.user_valid for t in turns if t.user_out is not None] or [0])),
                   turns=len(turns) / len(trajs), rollout_s=round(t1 - t0, 3), loss_s=round(t2 - t1, 3),
                   step_s=round(time.time() - t0, 3), gen_tokens_per_s=round(n_tok / max(t1 - t0, 1e-9)),
                   tokens_per_s=round(n_tok / max(time.time() - t0, 1e-9)))
        if lead and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            _, m = run_ars(model, tok, data, "valid", valid_rows, ("rec", "user"), cfg.t_max, device, batch=tok.eval_batch,
                           decoding=cfg.decoding)
            _, mt = run_ars(model, tok, data, "train", train_check, ("rec", "user"), cfg.t_max, device,
                            batch=tok.eval_batch, decoding=cfg.decoding)
            rec["valid_hit"], rec["train_greedy_hit"] = float(m["hit"].mean()), float(mt["hit"].mean())
            log(f"step {step}: greedy Hit@1 validation {rec['valid_hit']:.4f}, stage-2 training samples "
                f"{rec['train_greedy_hit']:.4f} ({len(valid_rows)} samples each)")
        bar.set_postfix(hit=f"{rec['train_hit']:.2f}", R_rec=f"{rec.get('rec_reward', 0):+.2f}",
                        A=f"{rec.get('rec_credit', 0):+.2f}", s=f"{rec['step_s']:.1f}", tok_s=rec["tokens_per_s"],
                        split=f"roll {rec['rollout_s']:.1f}/teach {rec['teacher_s']:.1f}/stud {rec['student_s']:.1f}")
        if lead:
            log_jsonl(run_dir / "metrics.jsonl", rec)
            plain_progress(log, "stage 2", step, cfg.steps, t_stage, start, f" (training Hit@1 {rec['train_hit']:.3f})")
        if not ok:
            check_bad_streak(cfg, streak, 2, step, run_dir, log, lambda: checkpoint(step))
        if STOP.signum or step == cfg.steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            checkpoint(step)
            if STOP.signum and step < cfg.steps:
                raise Stopped(f"stage 2 step {step}")
    if lead:
        save_adapters(model, cfg, run_dir / "coars.pt")
    return model


# --------------------------------------------------------------------------------------------------
# Reference rows [ours, docs/method.md section 6]


def stage2_draws(cfg, data):
    """(rows, keys) of every stage-2 step, as stage2() draws them from its seed: the samples an
    SFT reference trains on and the keys of their episodes."""
    seed = cfg.stage2_seed if cfg.stage2_seed >= 0 else cfg.seed
    rng = np.random.default_rng(seed + 1)
    train_rows = stage2_rows(data, cfg.stage2_last)
    out = []
    for _ in range(cfg.steps):
        rows = train_rows[rng.integers(0, len(train_rows), cfg.batch)]
        out.append((rows, rng.integers(0, 1 << 31, cfg.batch)))
    return out


def sft_reference(cfg, model, tok, data, device, log=print):
    """The reference row 'SFT on stage-2 samples' (docs/method.md section 6, [ours]): a third adapter,
    "sft", trained by cross-entropy on the RecAgent's turn-1 message naming the target (rationale:
    the closest history item) for exactly the samples stage 2 draws, with stage 2's budget (steps,
    batch, optimiser, learning rate, clipping). Its log-probs are taken under the message's grammar,
    the policy's own support. What those samples can teach the RecAgent at all: an RL gain on them
    is read against it. The base stays frozen; model has the adapter afterwards."""
    seed = cfg.stage2_seed if cfg.stage2_seed >= 0 else cfg.seed
    torch.manual_seed(seed)
    model.add_lora(("sft",), r=cfg.lora_r, alpha=cfg.lora_alpha, targets=lora_targets(cfg))
    params = model.adapter_parameters("sft")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    model.set_adapter("sft")
    t0, losses = time.time(), []
    for rows, _ in stage2_draws(cfg, data):
        trajs = [new_trajectory(data, "train", r) for r in rows]
        prompts = [tok.render_rec(tr, 0) for tr in trajs]
        answers = [tok.rec_message(tr.target, closest_history_item(data, tr.hist, tr.target)) for tr in trajs]
        grammars = [message_grammar(tok, tr, "rec", cfg.decoding) for tr in trajs]
        keep = [k for k, tr in enumerate(trajs) if tr.target in tr.cands]      # --candidates sasrec: not always
        if not keep:
            continue
        with autocast(device, cfg.precision):
            lp = token_logprobs(model, [prompts[k] for k in keep], [answers[k] for k in keep], tok.pad_id, device,
                                grammar=[grammars[k] for k in keep])
            loss = -torch.stack([x.sum() for x in lp]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.set_adapter(None)
    for p in params:
        p.requires_grad_(False)
    log(f"SFT reference: {len(losses)} steps in {time.time() - t0:.0f} s, loss {np.mean(losses[:5]):.3f} -> "
        f"{np.mean(losses[-5:]):.3f}" if losses else "SFT reference: no step (no target among the candidates)")
    return model


def final_evaluation(cfg, model, tok, data, device, log=print):
    """The test evaluation of a finished run, with the reference rows (eval.evaluate_run): the SFT
    reference is trained first (--sft-reference) and saved with the run's adapters."""
    if cfg.sft_reference and cfg.steps and not cfg.model and not model.has_adapter("sft"):
        sft_reference(cfg, model, tok, data, device, log)
    return evaluate_run(cfg, model, tok, data, device, log)


def clip_agent(params, max_norm, ok=True):
    """Clip one agent's adapter gradient by its own norm; returns the norm before clipping (nan when
    the step is already known to be bad)."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm) if ok else torch.tensor(float("nan"))


def adapter_state(model):
    return {k: v for k, v in model.state_dict().items() if ".adapters." in k}


def agent_loss(model, tok, trajs, buffer, agent, reward_cfg, lam=0.1, baseline="none", device="cpu", timing=None,
               micro=0, backward=False, n_episodes=None, decoding="grammar", kl=0.0, temperature=1.0):
    """One agent's CoARS loss on a batch of finished trajectories (distill.coars_objective, Eq.
    10-12, over its messages from distill.collect_messages), and its statistics.

    The agent's adapter must be active. Per group of messages: the teacher pass (reference in the
    prompt) without gradient, the student pass with it, for kl > 0 the base's pass (no adapter,
    without gradient; the agent's adapter is active again afterwards), then the objective.
    timing: an optional dict that receives teacher_s and student_s (with backward=True the
    student time includes the backward and the base's pass).
    micro > 0 with backward=True: the messages go through the passes `micro` at a time and each
    group's part of the loss is back-propagated at once, so only one group's activations are alive.
    Eq. 11 / 12 is a sum over messages divided by the number of episodes, so the gradient is that
    of the whole batch (up to the order of floating-point sums); the returned loss is then detached.
    n_episodes: the episodes the expectation is over (default len(trajs); under torchrun the whole
    batch, of which trajs is this rank's share). decoding: the rollout's --decoding (env.py), so
    that every token is scored over the support it was drawn from; temperature: the rollout's, so
    that the log-probs (teacher's, student's and the base's alike) are those of the distribution
    the tokens were drawn from."""
    msgs = collect_messages(tok, trajs, buffer, agent, reward_cfg, decoding)
    if not msgs:
        return torch.zeros((), device=device), dict(messages=0)
    rs_all = [m[3] for m in msgs]
    b = sum(rs_all) / len(rs_all) if baseline == "mean" else 0.0
    n = n_episodes or len(trajs)
    step = micro if (micro and backward) else len(msgs)
    total, credits, t_teacher, t_student, kl_sum = 0.0, [], 0.0, 0.0, 0.0
    for s in range(0, len(msgs), step):
        student_p, teacher_p, ys, rs, grammar = zip(*msgs[s:s + step])
        opts = dict(grammar=grammar, temperature=temperature)
        t0 = time.perf_counter()
        with torch.no_grad():
            t_lp = token_logprobs(model, teacher_p, ys, tok.pad_id, device, **opts) if lam else None
        t1 = time.perf_counter()
        s_lp = token_logprobs(model, student_p, ys, tok.pad_id, device, **opts)
        b_lp = None
        if kl:
            model.set_adapter(None)
            with torch.no_grad():
                b_lp = token_logprobs(model, student_p, ys, tok.pad_id, device, **opts)
            model.set_adapter(agent)
        loss, cr, pen = coars_objective(s_lp, t_lp, rs, lam, n_episodes=n, baseline=b, base_lp=b_lp, kl=kl)
        if kl:
            kl_sum = kl_sum + float(pen.detach())
        if backward:
            loss.backward()
            loss = loss.detach()
        total = total + loss
        credits += cr
        t_teacher += t1 - t0
        t_student += time.perf_counter() - t1
    if timing is not None:
        timing.update(teacher_s=t_teacher, student_s=t_student)
    flat = torch.cat(credits)
    stats = dict(messages=len(msgs), reward=sum(rs_all) / len(rs_all), credit=float(flat.mean()),
                 credit_abs=float(flat.abs().mean()))
    if kl:
        stats["kl"] = kl_sum          # the penalty before its weight (per episode)
    return total, stats


def save_adapters(model, cfg, path):
    """coars.pt (every adapter and the config; what eval.py and the tools load); for a Hugging Face
    backbone also each adapter as a PEFT folder, out/<run>/peft/<agent>/ (support/hf.export_peft)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"adapters": adapter_state(model), "config": dataclasses.asdict(cfg)}, tmp)
    tmp.replace(path)
    if cfg.model:
        for name in ("rec", "user", "sft"):
            if model.has_adapter(name):
                hf.export_peft(model, name, path.parent / "peft" / name, cfg.model)


def rollout_with_retry(model, tok, data, rows, keys, cfg, device, micro, log):
    """Roll out the episodes in micro-batches; on a GPU out-of-memory error, halve the micro-batch,
    start the episodes again and go on with the smaller size (keyed sampling: the same episodes).
    Returns (trajs, micro)."""
    while True:
        trajs = [new_trajectory(data, "train", r) for r in rows]
        for tr, k in zip(trajs, keys):
            tr.key = int(k)
        try:
            rollout(model, tok, data, trajs, t_max=cfg.t_max, temperature=cfg.temperature, device=device,
                    batch=micro, compile=cfg.compile, decoding=cfg.decoding)
            return trajs, micro
        except CompileError as e:
            raise UserError(str(e))
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
            micro = max(1, micro // 2)
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
            log(f"warning: out of memory during the rollout; rollout micro-batch halved to {micro}")


def backbone(cfg, data, device, run_dir, log, ck=None):
    """(frozen base model, tokenizer): the built-in GPT, pretrained or loaded by stage 1 (rank 0
    first, the others then load its base.pt), or a Hugging Face chat model (support/runs.py)."""
    if not cfg.model:
        tok = Tokenizer(data.n_items)
        if dist_info()[0] == 0:
            model = stage1(cfg, data, tok, device, run_dir, log, ck)
        barrier()
        if dist_info()[0] != 0:
            model = stage1(cfg, data, tok, device, run_dir, lambda *a: None, None)
        return model, tok
    return chat_backbone(cfg, data, device, log)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        validate(cfg)
        if cfg.model:
            from support import hf
            try:
                hf.check(cfg.model)
            except hf.ModelLoadError as e:
                raise UserError(str(e))
        device = init_distributed(cfg)
        rank, world = dist_info()
        lead = rank == 0
        run_dir = check_run_dir(cfg) if lead else cfg.run_dir()    # one writability probe, not one per rank
        ck = None
        if cfg.resume:
            ck = load_checkpoint(run_dir, print if lead else (lambda *a: None))
            if ck is None:
                raise UserError(f"--resume: every checkpoint in {run_dir} is damaged; start the run again without "
                                f"--resume.")
        elif lead:
            for name in CKPT_NAMES + ("metrics.jsonl",):
                (run_dir / name).unlink(missing_ok=True)
        t_start = time.time()
        if not lead:
            barrier()                             # rank 0 downloads and builds the data cache first
        data = prepare(cfg.data_config(), log=print if lead else (lambda *a: None))
        if lead:
            barrier()
        if ck:
            check_resumable(ck, cfg, data)
            if lead:
                truncate_metrics(run_dir, ck["metrics_lines"])
                print(f"resuming {run_dir} from its stage-{ck['stage']} checkpoint at step {ck['step']}")
        if lead:
            (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
            if cfg.tensorboard or cfg.wandb:          # after the resume's truncation of metrics.jsonl
                SINKS.append(Trackers(run_dir, cfg.tensorboard, cfg.wandb, dataclasses.asdict(cfg), cfg.resume))
    except (UserError, DataError, TrackerError) as e:
        sys.exit(f"error: {e}")
    try:
        run(cfg, data, device, run_dir, ck, t_start)
    finally:
        for sink in SINKS:
            sink.close()
        SINKS.clear()


def run(cfg, data, device, run_dir, ck, t_start):
    """Stages 1 and 2, curves.png, the final evaluation (main's options already checked)."""
    rank, world = dist_info()
    lead = rank == 0
    log = print if lead else (lambda *a: None)
    torch.manual_seed(cfg.seed)
    log(f"run folder {run_dir}; device {device}" + (f" x {world} processes" if world > 1 else "")
        + f"; {data.n_items} items, {len(data.train_user)} training samples")
    STOP.install()
    try:
        model, tok = backbone(cfg, data, device, run_dir, log, ck)
        t_s1 = time.time()
        model = stage2(cfg, model, tok, data, device, run_dir, log, ck)
    except UserError as e:
        sys.exit(f"error: {e}")
    except Stopped as e:
        log(f"stopped by {STOP.name} after {e}; checkpoint written in {run_dir}; continue with the same "
            f"command and --resume")
        sys.exit(128 + STOP.signum)
    except BadSteps as e:
        sys.exit(f"error: {e}")
    t_s2 = time.time()
    if lead:
        path = plot_run(run_dir, log)
        if path:
            log(f"training curves: {path}")
    if cfg.skip_eval or not lead:
        return
    res = final_evaluation(cfg, model, tok, data, device)
    save_adapters(model, cfg, run_dir / "coars.pt")          # with the SFT reference's adapter
    res["timing_s"] = dict(data_and_stage1=round(t_s1 - t_start, 1), stage2=round(t_s2 - t_s1, 1),
                           eval=res["seconds"], total=round(time.time() - t_start, 1))
    res["device"] = device
    write_results(res, run_dir)
    print(results_table(res))
    print(f"\ntimes (s): {res['timing_s']}; results in {run_dir}/results.md and results.json")


if __name__ == "__main__":
    main()
