"""
Train CoARS end to end (docs/method.md section 5) and print the results table.

    python train.py --dataset ml-latest-small --data-url file:///path/to/ml-latest-small.zip
    python train.py --dataset ml-1m              # downloads ml-1m from GroupLens
    python train.py --model smollm2-135m ...      # a Hugging Face chat model (support/hf.py)
    torchrun --nproc_per_node=2 train.py ...     # DDP over 2 processes (GPUs, or gloo on CPU)
    python train.py --help                       # every option, with its default

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

Several processes (torchrun, support/distributed.py): each rank rolls out its share of the batch and
the adapters' gradients are summed over ranks; with keyed sampling (sampling.sample_next) the run
equals a single-process one (the test checks it). Rank 0 alone prepares the data first, pretrains
the base, logs, evaluates and writes checkpoints. Checkpoints, resumption and stops:
support/checkpoint.py.
"""

import argparse
import dataclasses
import json
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from config import (QUICK, Config, UserError, add_config_args, config_defaults, config_from,
                    lora_targets, loss_group, shared_prefix, validate)
from data.prepare import DataError, prepare, probe_writable
from distill import (ReferenceBuffer, coars_objective, collect_messages, credit_stats,
                     token_kinds)
from env import closest_history_item, message_grammar, new_trajectory, rollout
from eval import evaluate_run, parts_folder, rank_metrics, run_ars, validation_samples
from support.report import results_table, write_results
from support.checkpoint import (CKPT_NAMES, SINKS, STOP, BadSteps, Stopped, buffer_state,
                                check_bad_streak, data_fingerprint, finite, load_checkpoint,
                                log_jsonl, metrics_lines, plain_progress, prepared_digest,
                                prepared_warning, rng_state,
                                save_checkpoint, set_buffer_state, set_rng_state, truncate_metrics)
from support.distributed import (all_gather, all_reduce_grads, barrier, dist_info, init_distributed,
                                 merge_stats)
from support import hf
from support.runs import chat_backbone
from support.watch import TrackerError, Trackers, plot_run
from env import Tokenizer
from scoring import branch_logprobs, run_trunk, shares, token_logprobs, trunk_of
from pretrain import autocast, check_stage1_rows, stage1, stage2_rows, warmup
from sampling import CompileError


def parse_args(argv=None) -> Config:
    """The options: --config PATH (a saved config.json) gives the defaults, the other flags override
    them."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="PATH",
                   help="start from a saved config.json (e.g. out/<run>/config.json); the flags "
                        "given with it override it (a new --run-name keeps the old run)")
    p.add_argument("--quick", action="store_true",
                   help="a first try: every stage, the evaluation and the constant users' returns "
                        "shrunk (" + " ".join(f"--{k.replace('_', '-')} {v}"
                                              for k, v in QUICK.items())
                        + "); the flags given with it override it")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        saved, _ = config_defaults(argv)
    except UserError as e:
        sys.exit(f"error: {e}")
    if "--quick" in argv:
        saved = {**saved, **QUICK}
    add_config_args(p, saved)
    return config_from(p.parse_args(argv))


def check_run_dir(cfg):
    """The run folder must be writable; --resume needs a checkpoint in it."""
    run_dir = cfg.run_dir()
    try:
        probe_writable(run_dir)
    except OSError as e:
        raise UserError(f"cannot write to the run folder {run_dir} ({e.strerror or e}): choose "
                        "another --out-dir or --run-name.")
    if cfg.resume and not any((run_dir / n).exists() for n in CKPT_NAMES):
        raise UserError(f"--resume: there is no checkpoint in {run_dir}; start the run without "
                        "--resume.")
    return run_dir


# options that may change between a run and its resumption (they do not change what is computed)
RESUMABLE = {"resume", "ckpt_every", "skip_eval", "device", "n_boot", "eval_test_n",
             "eval_returns_n", "max_bad_steps", "rollout_batch", "loss_batch",
             "grad_checkpointing", "compile", "tensorboard", "wandb", "shared_prefix",
             "out_dir", "memory_row"}   # out_dir: a run folder may move


def check_resumable(ck, cfg, data=None):
    """Refuse to resume with other options (checked before any data work, so a refusal costs
    seconds) or, given the data, other data, naming the first difference."""
    old, new = ck["config"], dataclasses.asdict(cfg)
    for k in new:
        if k not in RESUMABLE and old.get(k) != new[k]:
            raise UserError(f"--resume: the run was started with --{k.replace('_', '-')} "
                            f"{old.get(k)!r}, not {new[k]!r}; resume with the same options (python "
                            f"train.py --config {cfg.run_dir() / 'config.json'} --resume) or "
                            "choose another --run-name.")
    if data is not None and ck["data"] != data_fingerprint(data):
        raise UserError("--resume: the data differs from the data the run was started with (other "
                        "raw files or data options); resume with the same data or choose another "
                        "--run-name.")


# --------------------------------------------------------------------------------------------------
# Stage 2: CoARS (docs/method.md sections 3-5)


def stage2(cfg, model, tok, data, device, run_dir, log, ck=None):
    """Train both agents' adapters with CoARS from the same rollouts; ck: a stage-2 checkpoint to
    continue from. The loop is the method; Stage2Run (below) holds what a run needs around it."""
    torch.manual_seed(stage2_seed(cfg))
    agents, params = add_agents(cfg, model)          # a LoRA adapter per agent on the frozen base
    opt = torch.optim.Adam(params, lr=cfg.lr) if params else None
    rng = np.random.default_rng(stage2_seed(cfg) + 1)    # the samples and the episodes' keys
    buffer = ReferenceBuffer()                       # each sample's latest trajectory (section 4)
    train_rows = stage2_rows(data, cfg.stage2_last)  # samples whose targets stage 1 never saw
    run = Stage2Run(cfg, model, tok, data, device, run_dir, log, opt, rng, buffer, train_rows, ck)
    for step in run.steps():
        # 1. draw a batch of training samples, and a sampling key per episode
        rows = train_rows[rng.integers(0, len(train_rows), cfg.batch)]
        keys = rng.integers(0, 1 << 31, cfg.batch)
        # 2. roll out this rank's share of the episodes: the multi-turn loop (section 2)
        trajs = run.rollout(rows, keys)
        # 3. per agent: rewards (Eq. 7, 8), token credits (Eq. 10), loss (Eq. 11, 12), backward
        for agent in agents:
            model.set_adapter(agent)
            with autocast(device, cfg.precision):
                loss, stats = agent_loss(model, tok, trajs, buffer, agent, loss_options(cfg, agent),
                                         device, backward=True, n_episodes=cfg.batch,
                                         timing=run.split)
            run.record(agent, loss, stats)
        model.set_adapter(None)
        # 4. each agent is its own learner: its gradient clipped by its own norm, then one step
        if opt:
            all_reduce_grads(params)
            norms = {a: clip_agent(model.adapter_parameters(a), cfg.grad_clip, run.ok)
                     for a in agents}
            if run.finite_update(norms):             # a non-finite loss or gradient: no step
                opt.step()
            opt.zero_grad(set_to_none=True)
        # 5. the finished episodes are their samples' next hindsight references
        trajs = run.whole_batch(trajs)
        buffer.add(trajs)
        # 6. log; validate every --eval-every steps; checkpoint; honour a stop
        run.end_step(step, trajs)
    if run.lead:
        save_adapters(model, cfg, data, run_dir / "coars.pt")
    return model


@dataclasses.dataclass
class LossOptions:
    """How agent_loss scores an agent's messages: reward = reward.turn_rewards' options (plus
    user_balance, distill.collect_messages); lam the credit's weight (Eq. 11, 12); baseline 'none'
    or 'mean' [ext]; decoding and temperature those of the rollout, so that every token is scored
    over the distribution it was drawn from; kl the --user-kl weight [ext]; micro > 0: messages
    per teacher / student pass when back-propagating group by group; clip Eq. 10's
    (--credit-clip); shared: the passes go episode by episode, sharing the prompts' prefix
    (loss_passes; --shared-prefix)."""
    reward: dict = dataclasses.field(default_factory=dict)
    lam: float = 0.1
    baseline: str = "none"
    decoding: str = "grammar"
    temperature: float = 1.0
    kl: float = 0.0
    micro: int = 0
    clip: float = 1.0
    shared: bool = False


def loss_options(cfg, agent):
    """One agent's LossOptions under the run's options."""
    return LossOptions(reward=dict(cfg.reward_options(), user_balance=cfg.user_balance),
                       lam=cfg.lam, clip=cfg.credit_clip, baseline=cfg.baseline,
                       decoding=cfg.decoding,
                       temperature=cfg.temperature, kl=cfg.user_kl if agent == "user" else 0.0,
                       micro=loss_group(cfg), shared=shared_prefix(cfg))


def agent_loss(model, tok, trajs, buffer, agent, opts=None, device="cpu", backward=False,
               n_episodes=None, timing=None):
    """One agent's CoARS loss on a batch of finished trajectories (distill.coars_objective, Eq.
    10-12, over its messages from distill.collect_messages), and its statistics.

    The agent's adapter must be active. Per group of messages: the teacher pass (the hindsight
    reference in the prompt) without gradient, the student pass with it, for opts.kl > 0 the
    base's pass (no adapter, without gradient; the agent's adapter is active again afterwards),
    then the objective. With backward=True and opts.micro > 0 the messages go through the passes
    `micro` at a time and each group's part is back-propagated at once, so only one group's
    activations are alive: Eq. 11 / 12 is a sum over messages divided by the number of episodes,
    so the gradient is the whole batch's (up to the order of sums); the returned loss is then
    detached. n_episodes: the episodes the expectation is over (default len(trajs); under torchrun
    the whole batch, of which trajs is this rank's share). timing: an optional dict to which
    teacher_s and student_s are added (with backward=True the student's includes the backward and
    the base's pass). opts: LossOptions (None = the paper's defaults)."""
    opts = opts or LossOptions()
    owner = []                                # the episode of each message
    msgs = collect_messages(tok, trajs, buffer, agent, opts.reward, opts.decoding, owner)
    if not msgs:
        return torch.zeros((), device=device), dict(messages=0)
    rs_all = [m[3] for m in msgs]
    b = sum(rs_all) / len(rs_all) if opts.baseline == "mean" else 0.0
    n = n_episodes or len(trajs)
    if opts.shared:                           # one episode's messages per group
        groups = [[i for i, o in enumerate(owner) if o == e] for e in dict.fromkeys(owner)]
    else:
        step = opts.micro if (opts.micro and backward) else len(msgs)
        groups = [list(range(s, min(s + step, len(msgs)))) for s in range(0, len(msgs), step)]
    total, credits, t_teacher, t_student, kl_sum = 0.0, [], 0.0, 0.0, 0.0
    kinds = [token_kinds(tok, m[2], m[4]) for m in msgs]    # where the credit falls (statistics)
    for g in groups:
        student_p, teacher_p, ys, rs, grammar = zip(*[msgs[i] for i in g])
        t_lp, s_lp, b_lp, dt = loss_passes(model, tok, agent, student_p, teacher_p, ys, grammar,
                                           opts, device)
        loss, cr, pen = coars_objective(s_lp, t_lp, rs, opts.lam, n_episodes=n, baseline=b,
                                        base_lp=b_lp, kl=opts.kl, clip=opts.clip)
        if opts.kl:
            kl_sum = kl_sum + float(pen.detach())
        t1 = time.perf_counter()
        if backward:
            loss.backward()
            loss = loss.detach()
        total = total + loss
        credits += cr
        t_teacher += dt[0]
        t_student += dt[1] + time.perf_counter() - t1
    if timing is not None:
        timing["teacher_s"] = timing.get("teacher_s", 0.0) + t_teacher
        timing["student_s"] = timing.get("student_s", 0.0) + t_student
    flat = torch.cat(credits)
    stats = dict(messages=len(msgs), reward=sum(rs_all) / len(rs_all), credit=float(flat.mean()),
                 credit_abs=float(flat.abs().mean()),
                 **credit_stats(kinds, [c.detach() for c in credits], rs_all, opts.lam, b))
    if opts.kl:
        stats["kl"] = kl_sum          # the penalty before its weight (per episode)
    return total, stats


def loss_passes(model, tok, agent, student_p, teacher_p, ys, grammar, opts, device):
    """The log-probs of one group of an agent's messages: (teacher's or None when lam = 0,
    student's with gradient, the base's for --user-kl or None, (teacher seconds, student
    seconds)).

    opts.shared (--shared-prefix): the student prompts' trunk (scoring.trunk_of, e.g. the system
    text, the history and the candidates, and the memory lines of the longest prompt) runs once
    with gradient; the teacher's and the student's branches (what each prompt adds, then the
    message) run against its keys and values, the teacher's without gradient: its prompt is the
    student's with the hindsight reference inserted after the shared part, so it shares the same
    trunk. The plain path, and the fallback where the prompts share no prefix: every message under
    its own whole prompt (scoring.token_logprobs). The two agree to round-off (the tests)."""
    lp = dict(grammar=grammar, temperature=opts.temperature)
    trunk, shared = trunk_of(student_p) if opts.shared else ([], None)
    t0 = time.perf_counter()
    # the trunk with gradient: the student back-propagates into its keys and values
    kv = run_trunk(model, trunk, device) if trunk else None
    t1 = time.perf_counter()

    def score(prompts, kv, shared):
        if not trunk:
            return token_logprobs(model, prompts, ys, tok.pad_id, device, **lp)
        return branch_logprobs(model, kv, prompts, shared, ys, tok.pad_id, device, **lp)
    with torch.no_grad():
        t_lp = (score(teacher_p, kv, shares(teacher_p, trunk) if trunk else None) if opts.lam
                else None)
    t2 = time.perf_counter()
    s_lp = score(student_p, kv, shared)
    b_lp = None
    if opts.kl:                  # the untrained base: no adapter, its own trunk
        model.set_adapter(None)
        with torch.no_grad():
            b_lp = score(student_p, run_trunk(model, trunk, device) if trunk else None, shared)
        model.set_adapter(agent)
    return t_lp, s_lp, b_lp, (t2 - t1, (t1 - t0) + time.perf_counter() - t2)


def clip_agent(params, max_norm, ok=True):
    """Clip one agent's adapter gradient by its own norm; returns the norm before clipping (nan when
    the step is already known to be bad)."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm) if ok else torch.tensor(float("nan"))


# --------------------------------------------------------------------------------------------------
# What a stage-2 run needs around the method (a reader can skip it): the adapters' set-up,
# checkpoints and resumption, torchrun's shares and gathering, the rollout's out-of-memory retry,
# non-finite steps, timing, metrics, the validation curve and the progress bar.


def stage2_seed(cfg):
    return cfg.stage2_seed if cfg.stage2_seed >= 0 else cfg.seed


def add_agents(cfg, model):
    """The RecAgent's and the UserAgent's LoRA adapters on the frozen base: (the trained agents,
    their parameters, which now require gradients)."""
    try:
        model.add_lora(("rec", "user"), r=cfg.lora_r, alpha=cfg.lora_alpha,
                       targets=lora_targets(cfg))
    except ValueError as e:
        raise UserError(f"--lora-targets: {e}; name linear layers of the model.")
    agents = [a for a, on in (("rec", cfg.train_rec), ("user", cfg.train_user)) if on]
    params = [p for a in agents for p in model.adapter_parameters(a)]
    for p in params:
        p.requires_grad_(True)
    return agents, params


class Stage2Run:
    """The run around stage 2's loop: it resumes from a checkpoint (or warms a Hugging Face model's
    adapters up and checkpoints step 0), iterates the steps with a progress bar, rolls out this
    rank's share, gathers statistics and trajectories over ranks, counts non-finite steps, logs
    metrics.jsonl, measures the validation curve and writes checkpoints."""

    def __init__(self, cfg, model, tok, data, device, run_dir, log, opt, rng, buffer, train_rows,
                 ck=None):
        self.cfg, self.model, self.tok, self.data, self.device = cfg, model, tok, data, device
        self.run_dir, self.log, self.opt, self.rng, self.buffer = run_dir, log, opt, rng, buffer
        rank, world = dist_info()
        self.lead = rank == 0
        self.share = slice(rank * cfg.batch // world, (rank + 1) * cfg.batch // world)
        self.micro = cfg.rollout_batch or cfg.batch
        # as many stage-2 training samples as validation ones, evaluated greedily beside them: a
        # gap between the two would show memorised answers
        self.valid_rows, self.train_check = validation_samples(cfg, data, train_rows,
                                                               cfg.eval_valid_n)
        self.start, self.n_bad, self.streak = 0, 0, 0
        if ck and ck["stage"] == 2:
            model.load_state_dict(ck["adapters"], strict=False)
            if opt:
                opt.load_state_dict(ck["opt"])
            set_rng_state(rng, ck["rng"])
            torch.set_rng_state(ck["torch_rng"])
            set_buffer_state(buffer, ck["buffer"])
            self.start, self.n_bad = ck["step"], ck["n_bad"]
            log(f"stage 2: resuming after step {self.start}")
        else:
            if cfg.warmup_steps:
                warmup(cfg, model, tok, data, device, log)
            self.checkpoint(0)        # stage 1 is done: a resume starts from here, not from stage 1

    def steps(self):
        cfg = self.cfg
        self.t_stage = time.time()
        self.bar = tqdm(range(self.start + 1, cfg.steps + 1), desc="stage 2 CoARS",
                        dynamic_ncols=True, disable=None if self.lead else True, initial=self.start,
                        total=cfg.steps)
        for step in self.bar:
            self.t0 = time.time()
            self.rec = dict(stage=2, step=step)
            self.ok = True
            self.split = dict(teacher_s=0.0, student_s=0.0)
            yield step

    def rollout(self, rows, keys):
        """This rank's episodes, played to their end (rollout_with_retry)."""
        trajs, self.micro = rollout_with_retry(self.model, self.tok, self.data, rows[self.share],
                                               keys[self.share], self.cfg, self.device, self.micro,
                                               self.log)
        self.t1 = time.time()
        return trajs

    def record(self, agent, loss, stats):
        """One agent's loss and statistics, summed over ranks (each rank's part of the loss is
        already divided by the whole batch)."""
        losses, stats = zip(*all_gather((loss.item(), stats)))
        loss = sum(losses)
        self.ok = self.ok and finite(loss)
        self.rec.update({f"{agent}_{k}": v for k, v in merge_stats(stats).items()},
                        **{f"{agent}_loss": loss})
        self.t2 = time.time()

    def finite_update(self, norms):
        """Record the agents' gradient norms; True when the step may update the adapters."""
        self.ok = self.ok and all(finite(g) for g in norms.values())
        self.rec.update({f"{a}_grad_norm": float(g) for a, g in norms.items()})
        self.rec["grad_norm"] = float(torch.stack(list(norms.values())).norm())
        return self.ok

    def whole_batch(self, trajs):
        """The whole batch's trajectories, in row order (gathered over ranks)."""
        if self.ok:
            self.streak = 0
        else:         # the update was skipped: the adapters and the optimiser stay as they were
            self.n_bad, self.streak = self.n_bad + 1, self.streak + 1
            self.log(f"warning: stage 2 step {self.rec['step']}: non-finite loss or gradient, "
                     f"update skipped ({self.streak} in a row)")
        self.rec.update(skipped=self.n_bad, rollout_batch=self.micro,
                        update_s=round(time.time() - self.t2, 3),
                        **{k: round(v, 3) for k, v in self.split.items()})
        return [tr for part in all_gather(trajs) for tr in part]

    def end_step(self, step, trajs):
        """The step's metrics, the validation curve, metrics.jsonl, checkpoints and stops."""
        cfg, rec, t0, t1 = self.cfg, self.rec, self.t0, self.t1
        n_tok = sum(len(t.rec_out) + len(t.user_out or []) for tr in trajs for t in tr.turns)
        turns = [t for tr in trajs for t in tr.turns]
        user_valid = [t.user_valid for t in turns if t.user_out is not None] or [0]
        rec.update(train_hit=float(np.mean([tr.hit for tr in trajs])),
                   rec_valid=float(np.mean([t.rec_valid for t in turns])),
                   user_valid=float(np.mean(user_valid)),
                   turns=len(turns) / len(trajs), rollout_s=round(t1 - t0, 3),
                   loss_s=round(self.t2 - t1, 3), step_s=round(time.time() - t0, 3),
                   gen_tokens_per_s=round(n_tok / max(t1 - t0, 1e-9)),
                   tokens_per_s=round(n_tok / max(time.time() - t0, 1e-9)))
        if self.lead and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            self.validate(step)
        self.bar.set_postfix(hit=f"{rec['train_hit']:.2f}",
                             R_rec=f"{rec.get('rec_reward', 0):+.2f}",
                             A=f"{rec.get('rec_credit', 0):+.2f}", s=f"{rec['step_s']:.1f}",
                             tok_s=rec["tokens_per_s"],
                             split=f"roll {rec['rollout_s']:.1f}/teach {rec['teacher_s']:.1f}/stud "
                                   f"{rec['student_s']:.1f}")
        if self.lead:
            log_jsonl(self.run_dir / "metrics.jsonl", rec)
            plain_progress(self.log, "stage 2", step, cfg.steps, self.t_stage, self.start,
                           f" (training Hit@1 {rec['train_hit']:.3f})")
        if not self.ok:
            check_bad_streak(cfg, self.streak, 2, step, self.run_dir, self.log,
                             lambda: self.checkpoint(step))
        if STOP.signum or step == cfg.steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            self.checkpoint(step)
            if STOP.signum and step < cfg.steps:
                raise Stopped(f"stage 2 step {step}")

    def validate(self, step):
        """Greedy Hit@1 of the pair on validation samples and on as many stage-2 training
        samples; and on the validation samples the RecAgent's turn-1 ranking of its candidates
        (eval.rank_metrics: HR@1 and NDCG@10), which moves before a whole episode's hit does."""
        m, tok, data, cfg, rec = self.model, self.tok, self.data, self.cfg, self.rec
        opts = dict(batch=tok.eval_batch, decoding=cfg.decoding)
        _, v = run_ars(m, tok, data, "valid", self.valid_rows, ("rec", "user"), cfg.t_max,
                       self.device, **opts)
        _, t = run_ars(m, tok, data, "train", self.train_check, ("rec", "user"), cfg.t_max,
                       self.device, **opts)
        r = rank_metrics(m, tok, data, "valid", self.valid_rows, "rec", self.device, ks=(1, 10),
                         batch=tok.eval_batch)
        rec["valid_hit"], rec["train_greedy_hit"] = float(v["hit"].mean()), float(t["hit"].mean())
        rec["valid_rank_hit"], rec["valid_ndcg10"] = float(r["HR@1"].mean()), float(
            r["NDCG@10"].mean())
        self.log(f"step {step}: greedy Hit@1 validation {rec['valid_hit']:.4f}, stage-2 training "
                 f"samples {rec['train_greedy_hit']:.4f} ({len(self.valid_rows)} samples each); "
                 f"validation ranking HR@1 {rec['valid_rank_hit']:.4f}, NDCG@10 "
                 f"{rec['valid_ndcg10']:.4f}")

    def checkpoint(self, step):
        if self.lead:
            opt, cfg = self.opt, self.cfg
            save_checkpoint(self.run_dir, dict(
                stage=2, step=step, adapters=adapter_state(self.model),
                opt=opt.state_dict() if opt else {}, rng=rng_state(self.rng),
                torch_rng=torch.get_rng_state(), buffer=buffer_state(self.buffer), n_bad=self.n_bad,
                config=dataclasses.asdict(cfg), data=data_fingerprint(self.data),
                data_arrays=prepared_digest(self.data), metrics_lines=metrics_lines(self.run_dir)))

# --------------------------------------------------------------------------------------------------
# Reference rows [ours, docs/method.md section 6]


def stage2_draws(cfg, data):
    """(rows, keys) of every stage-2 step, as stage2() draws them from its seed: the samples an
    SFT reference trains on and the keys of their episodes."""
    seed = stage2_seed(cfg)
    rng = np.random.default_rng(seed + 1)
    train_rows = stage2_rows(data, cfg.stage2_last)
    out = []
    for _ in range(cfg.steps):
        rows = train_rows[rng.integers(0, len(train_rows), cfg.batch)]
        out.append((rows, rng.integers(0, 1 << 31, cfg.batch)))
    return out


def sft_reference(cfg, model, tok, data, device, log=print):
    """The reference row 'SFT on stage-2 samples' (docs/method.md section 6, [ours]): a third
    adapter, "sft", trained by cross-entropy on the RecAgent's turn-1 message naming the target
    (rationale: the closest history item) for exactly the samples stage 2 draws, with stage 2's
    budget (steps, batch, optimiser, learning rate, clipping), --loss-batch messages per pass. Its
    log-probs are taken under the message's grammar, the policy's own support. What those samples
    can teach the RecAgent at all: an RL gain on them is read against it. The base stays frozen;
    model has the adapter afterwards."""
    seed = stage2_seed(cfg)
    torch.manual_seed(seed)
    model.add_lora(("sft",), r=cfg.lora_r, alpha=cfg.lora_alpha, targets=lora_targets(cfg))
    params = model.adapter_parameters("sft")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    model.set_adapter("sft")
    t0, losses = time.time(), []
    log(f"SFT reference: training the 'sft' adapter for {cfg.steps} steps")
    for step, (rows, _) in enumerate(stage2_draws(cfg, data), 1):
        if STOP.signum:
            raise Stopped(f"SFT reference step {step}")
        trajs = [new_trajectory(data, "train", r) for r in rows]
        prompts = [tok.render_rec(tr, 0) for tr in trajs]
        answers = [tok.rec_message(tr.target, closest_history_item(data, tr.hist, tr.target))
                   for tr in trajs]
        grammars = [message_grammar(tok, tr, "rec", cfg.decoding) for tr in trajs]
        # --candidates sasrec: not always
        keep = [k for k, tr in enumerate(trajs) if tr.target in tr.cands]
        if not keep:
            continue
        # --loss-batch messages at a time, each group's backward before the next: the same gradient
        # as the whole batch's mean (a test holds them equal), with one group's activations alive
        # (a chat model's 8 prompts of ~800 tokens at once held 14 GB)
        g, loss = loss_group(cfg), 0.0
        for s in range(0, len(keep), g):
            part = keep[s:s + g]
            with autocast(device, cfg.precision):
                lp = token_logprobs(model, [prompts[k] for k in part], [answers[k] for k in part],
                                    tok.pad_id, device, grammar=[grammars[k] for k in part])
                part_loss = -torch.stack([x.sum() for x in lp]).sum() / len(keep)
            part_loss.backward()
            loss += part_loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        plain_progress(log, "SFT reference", step, cfg.steps, t0)
    model.set_adapter(None)
    for p in params:
        p.requires_grad_(False)
    log(f"SFT reference: {len(losses)} steps in {time.time() - t0:.0f} s, loss "
        f"{np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}" if losses
        else "SFT reference: no step (no target among the candidates)")
    return model


def final_evaluation(cfg, model, tok, data, device, run_dir, log=print):
    """The test evaluation of a finished run, with the reference rows (eval.evaluate_run): the SFT
    reference is trained first (--sft-reference) and saved with the run's adapters at once. A
    stop (SIGTERM, Ctrl-C) is acted on at the start of each phase, at each SFT step and at each
    progress line (Stopped); the evaluation's finished parts are kept (eval.parts_folder), so
    that eval.py --run continues it."""
    def log_or_stop(msg):
        if STOP.signum:
            raise Stopped("at the start of a phase")
        log(msg)
    t0 = time.time()
    if cfg.sft_reference and cfg.steps and not model.has_adapter("sft"):
        sft_reference(cfg, model, tok, data, device, log_or_stop)
        save_adapters(model, cfg, data, run_dir / "coars.pt")
    t_sft = round(time.time() - t0, 1)
    res = evaluate_run(cfg, model, tok, data, device, log_or_stop, keep=parts_folder(run_dir))
    res["phase_s"] = {"SFT_reference": t_sft, **res["phase_s"]}
    return res


def adapter_state(model):
    return {k: v for k, v in model.state_dict().items() if ".adapters." in k}


def save_adapters(model, cfg, data, path):
    """coars.pt (every adapter, the config and the prepared data's digests, which
    support/runs.load_run compares; what eval.py and the tools load); for a Hugging Face backbone
    also each adapter as a PEFT folder, out/<run>/peft/<agent>/ (support/hf.export_peft)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"adapters": adapter_state(model), "config": dataclasses.asdict(cfg),
                "data_arrays": prepared_digest(data)}, tmp)
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
            rollout(model, tok, data, trajs, t_max=cfg.t_max, temperature=cfg.temperature,
                    device=device, batch=micro, compile=cfg.compile, decoding=cfg.decoding)
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
        tok = Tokenizer(data.n_items, cfg.prior_tilt())
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
                hf.check(cfg.model, config=True)      # before the data work
            except hf.ModelLoadError as e:
                raise UserError(str(e))
        device = init_distributed(cfg)
        rank, world = dist_info()
        lead = rank == 0
        # one writability probe, not one per rank
        run_dir = check_run_dir(cfg) if lead else cfg.run_dir()
        ck = None
        if cfg.resume:
            ck = load_checkpoint(run_dir, print if lead else (lambda *a: None))
            if ck is None:
                raise UserError(f"--resume: every checkpoint in {run_dir} is damaged; start the "
                                "run again without --resume.")
            check_resumable(ck, cfg)          # the options, before the data is built
        elif lead:
            for name in CKPT_NAMES + ("metrics.jsonl",):
                (run_dir / name).unlink(missing_ok=True)
        t_start = time.time()
        if not lead:
            barrier()                             # rank 0 downloads and builds the data cache first
        data = prepare(cfg.data_config(), log=print if lead else (lambda *a: None))
        t_data = time.time()
        check_stage1_rows(cfg, data)
        if lead:
            barrier()
        if ck:
            check_resumable(ck, cfg, data)
            if lead:
                truncate_metrics(run_dir, ck["metrics_lines"])
                print(f"resuming {run_dir} from its stage-{ck['stage']} checkpoint at step "
                      f"{ck['step']}")
                warning = prepared_warning(ck, data, "the checkpoint was written with",
                                           "the run goes on with this data (docs/long-runs.md, "
                                           "\"Moving a run to another machine\")")
                if warning:
                    print(warning)
        if lead:
            (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
            if cfg.tensorboard or cfg.wandb:  # after the resume's truncation of metrics.jsonl
                SINKS.append(Trackers(run_dir, cfg.tensorboard, cfg.wandb, dataclasses.asdict(cfg),
                                      cfg.resume))
    except (UserError, DataError, TrackerError) as e:
        sys.exit(f"error: {e}")
    try:
        run(cfg, data, device, run_dir, ck, t_start, t_data)
    finally:
        for sink in SINKS:
            sink.close()
        SINKS.clear()


def run(cfg, data, device, run_dir, ck, t_start, t_data):
    """Stages 1 and 2, curves.png, the final evaluation (main's options already checked);
    t_start, t_data: when the data preparation began and ended (results.json's timing_s)."""
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
        log(f"stopped by {STOP.name} after {e}; checkpoint written in {run_dir}; continue with the "
            "same command and --resume")
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
    try:
        res = final_evaluation(cfg, model, tok, data, device, run_dir)
    except Stopped as e:
        log(f"stopped by {STOP.name} during the final evaluation ({e}); the trained adapters are "
            f"in {run_dir}/coars.pt: continue the evaluation (its finished parts are kept) with "
            f"python eval.py --run {run_dir}")
        sys.exit(128 + STOP.signum)
    save_adapters(model, cfg, data, run_dir / "coars.pt")     # with the SFT reference's adapter
    # data: this run's preparation (building the cache, or loading it); its phases, from the build
    # that made the cache, are in the data folder's processed.json ("phase_s")
    res["timing_s"] = dict(data=round(t_data - t_start, 1), stage1=round(t_s1 - t_data, 1),
                           stage2=round(t_s2 - t_s1, 1),
                           **res["phase_s"], total=round(time.time() - t_start, 1))
    res["device"] = device
    write_results(res, run_dir)
    print(results_table(res))
    print(f"\ntimes (s): {res['timing_s']}; results in {run_dir}/results.md and results.json")


if __name__ == "__main__":
    main()
