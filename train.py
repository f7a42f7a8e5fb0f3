"""
Train CoARS end to end (PAPER.md section 5) and print the results table.

    python train.py --dataset ml-latest-small --data-url file:///path/to/ml-latest-small.zip
    python train.py --dataset ml-1m                       # downloads ml-1m from GroupLens
    python train.py --model smollm2-135m --warmup-steps 20 ...   # a Hugging Face chat model (hf.py)
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

Several processes (torchrun, distributed.py): each rank rolls out its share of the batch and the
adapters' gradients are summed over ranks; with keyed sampling (sampling.sample_next) the run equals
a single-process one (the test checks it). Rank 0 alone prepares the data first, pretrains the
base, logs, evaluates and writes checkpoints. Checkpoints, resumption and stops: checkpoint.py.
"""

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.prepare import DataConfig, DataError, SOURCES, is_custom, prepare, probe_writable
from data.sasrec import SASRecConfig
from checkpoint import (CKPT_NAMES, FAULTS, STOP, BadSteps, Stopped, buffer_state, check_bad_streak,  # noqa: F401
                        data_fingerprint, finite, load_checkpoint, log_jsonl, metrics_lines, rng_state,
                        save_checkpoint, set_buffer_state, set_rng_state, truncate_metrics)
from distill import ReferenceBuffer, coars_loss
from distributed import all_gather, device_of, all_reduce_grads, barrier, dist_info, init_distributed, merge_stats
from env import new_trajectory, rollout
from eval import evaluate, results_table, run_ars, write_results
from model import Tokenizer
from sampling import CompileError
from pretrain import autocast, build_model, freeze, stage1, warmup  # noqa: F401  (build_model, freeze: suite.py)


class UserError(Exception):
    """A wrong option or unusable input; the message is one sentence for the user."""


@dataclass
class Config:
    # ---- data ----
    dataset: str = "ml-latest-small"
    """ml-1m, ml-100k, ml-latest-small, lastfm, instruments, or the path of a folder in the custom format (README)"""
    data_dir: str = str(Path(__file__).resolve().parent / "data")
    """folder for downloads and processed caches"""
    data_url: str = ""
    """address of the raw dataset file ('' = official; file:// works; a local folder of extracted files is read in place)"""
    data_sha256: str = ""
    """expected sha256 of the raw file ('' = the official file's where published, 'none' = skip the check)"""
    candidates: str = "sasrec"
    """candidate lists: 'sasrec' (PAPER.md default) or 'random' (AFL / LLaRA protocol)"""
    sasrec_epochs: int = 20
    """SASRec training epochs"""
    # ---- run ----
    out_dir: str = "out"
    """runs are written to out_dir/run_name"""
    run_name: str = ""
    """run folder name ('' = the dataset name)"""
    device: str = "auto"
    """'cpu', 'cuda' or 'auto' (cuda when available)"""
    seed: int = 0
    """seed for data, initialisation, sampling and bootstrap"""
    stage2_seed: int = -1
    """seed of stage 2 alone (adapter initialisation, training samples, rollouts; -1 = --seed): seeds
    over a fixed dataset and base"""
    # ---- the language model ----
    model: str = ""
    """'' = the built-in GPT; else a Hugging Face chat model: hub id, local folder, .gguf file, or the shortcut
    smollm2-135m (hf.py)"""
    lora_targets: str = ""
    """comma-separated names of the linear layers that get LoRA ('' = the model's default: qkv,proj,fc,fc2 for
    the built-in GPT, q_proj,v_proj,gate_proj,up_proj,down_proj for a Hugging Face model)"""
    grad_checkpointing: bool = False
    """recompute a Hugging Face model's activations in the backward pass (less memory, ~30% more time)"""
    compile: bool = False
    """run the built-in GPT's decode steps in rollouts through torch.compile (same tokens; 15-30 s to compile; no gain
    measured on CPU with the default short messages, see README Benchmarks)"""
    warmup_steps: int = 0
    """supervised warm-up steps of the adapters on scripted dialogues before CoARS (for --model; 0 = none)"""
    n_layer: int = 4
    """transformer blocks of the built-in GPT"""
    n_head: int = 4
    """attention heads"""
    n_embd: int = 128
    """width"""
    # ---- stage 1: pretraining the base [ours] ----
    pretrain_steps: int = 2000
    """optimiser steps of stage 1 (0 = skip: only sensible with a base from an earlier run)"""
    pretrain_batch: int = 48
    """documents per stage-1 step"""
    pretrain_lr: float = 3e-3
    """peak learning rate of stage 1 (cosine decay to 10%), and the learning rate of the warm-up"""
    p_target: float = 0.34
    """scripted RecAgent without a reference: prob. of naming the true next item"""
    p_prior: float = 0.33
    """scripted RecAgent without a reference: prob. of naming the SASRec prior (else uniform)"""
    p_reference: float = 0.5
    """fraction of scripted dialogues whose prompt carries a hindsight reference"""
    # ---- stage 2: CoARS ----
    steps: int = 100
    """CoARS optimiser steps"""
    batch: int = 48
    """episodes per CoARS step"""
    lr: float = 5e-4
    """adapter learning rate (Adam)"""
    loss_batch: int = 0
    """messages per teacher / student pass, back-propagated group by group to bound memory (0 = 32 for the
    built-in GPT, 4 for a Hugging Face model: one SmolLM2-135M step on a CPU peaked at 19.4 GB with 32, 5.2 GB with 4)"""
    lora_r: int = 8
    """LoRA rank"""
    lora_alpha: float = 16.0
    """LoRA scale numerator (scale = alpha / r)"""
    t_max: int = 5
    """turn limit T_max [ours: 5]"""
    temperature: float = 1.0
    """sampling temperature of training rollouts (evaluation is greedy)"""
    lam: float = 0.1
    """lambda, weight of the token credit (Eq. 11-12; 0 = no self-distillation)"""
    alpha: float = 0.1
    """alpha, weight of the peer signal in Eq. 8"""
    stage_gamma: float = -1.0
    """D_t = stage_gamma^(t-1) in Eq. 7; negative = D_t = 1 [ours]"""
    use_filter: bool = True
    """leave out turns with a wrong item that the user met positively"""
    reward_mode: str = "interaction"
    """'interaction' (Eq. 7-8) or 'outcome' (final hit only, the ablation/baseline)"""
    train_rec: bool = True
    """train the RecAgent adapter"""
    train_user: bool = True
    """train the UserAgent adapter (off = 'without user co-evolution')"""
    baseline: str = "none"
    """'none' (paper) or 'mean': subtract the batch-mean reward [ours, extension]"""
    grad_clip: float = 1.0
    """clip the adapters' gradient norm"""
    # ---- evaluation ----
    eval_every: int = 40
    """validation Hit@1 every this many CoARS steps (0 = never)"""
    eval_valid_n: int = 200
    """validation samples for the Hit@1 curve during stage 2"""
    eval_test_n: int = 0
    """final evaluation on this many test samples, a fixed random subset (0 = all)"""
    n_boot: int = 1000
    """bootstrap resamples for the intervals"""
    skip_eval: bool = False
    """do not run the final test evaluation"""
    # ---- surviving long runs ----
    resume: bool = False
    """continue the run in out_dir/run_name from its last checkpoint"""
    ckpt_every: int = 50
    """write a checkpoint every this many steps of either stage (0 = only at the end and on a stop)"""
    max_bad_steps: int = 3
    """stop after this many non-finite losses or gradients in a row (each one is skipped)"""
    rollout_batch: int = 0
    """rollout micro-batch (0 = the whole batch); halved on a GPU out-of-memory error"""

    def data_config(self):
        return DataConfig(dataset=self.dataset, data_dir=self.data_dir, data_url=self.data_url,
                          data_sha256=self.data_sha256, candidates=self.candidates, seed=self.seed,
                          sasrec=SASRecConfig(epochs=self.sasrec_epochs))

    def run_dir(self):
        return Path(self.out_dir) / (self.run_name or Path(self.dataset).name)


def field_docs(cls):
    """The docstring under each dataclass field, for --help (one source of truth for the defaults)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def add_config_args(p: argparse.ArgumentParser, defaults=None):
    """One flag per Config field, documented by the field's docstring (defaults may be overridden)."""
    docs = {k: v.replace("%", "%%") for k, v in field_docs(Config).items()}     # argparse formats help with %
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=docs.get(f.name))
        else:
            p.add_argument(flag, default=default, type=type(f.default), help=f"{docs.get(f.name)} (default: %(default)s)")


def config_from(ns) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(ns).items() if k in names})


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    return config_from(p.parse_args(argv))


def validate(cfg: Config):
    """Refuse impossible options before any work starts, one sentence each."""
    checks = [
        (cfg.dataset in SOURCES or is_custom(cfg.dataset), f"unknown dataset {cfg.dataset!r}: choose one of "
                                                         f"{', '.join(sorted(SOURCES))}, or a folder path."),
        (cfg.candidates in ("sasrec", "random"), "--candidates must be 'sasrec' or 'random'."),
        (cfg.reward_mode in ("interaction", "outcome"), "--reward-mode must be 'interaction' or 'outcome'."),
        (cfg.baseline in ("none", "mean"), "--baseline must be 'none' or 'mean'."),
        (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"), "--device must be auto, cpu or cuda."),
        (not cfg.device.startswith("cuda") or torch.cuda.is_available(), "--device cuda was asked for but no GPU is visible; use --device cpu."),
        (cfg.t_max >= 1, "--t-max must be at least 1."),
        (cfg.steps >= 0 and cfg.pretrain_steps >= 0, "--steps and --pretrain-steps cannot be negative."),
        (cfg.batch >= 1 and cfg.pretrain_batch >= 1, "--batch and --pretrain-batch must be at least 1."),
        (cfg.lam >= 0, "--lam must be >= 0."),
        (0 <= cfg.alpha <= 1, "--alpha must be in [0, 1] (Eq. 8)."),
        (cfg.temperature > 0, "--temperature must be positive (evaluation is greedy anyway)."),
        (cfg.n_embd % cfg.n_head == 0, "--n-embd must be a multiple of --n-head."),
        (0 <= cfg.p_target + cfg.p_prior <= 1, "--p-target + --p-prior must be within [0, 1]."),
        (cfg.lora_r >= 1, "--lora-r must be at least 1."),
        (cfg.eval_test_n >= 0 and cfg.eval_valid_n >= 0, "--eval-test-n and --eval-valid-n cannot be negative."),
        (cfg.eval_every >= 0, "--eval-every cannot be negative (0 = never)."),
        (cfg.lr > 0 and cfg.pretrain_lr > 0, "--lr and --pretrain-lr must be positive."),
        (cfg.grad_clip > 0, "--grad-clip must be positive."),
        (cfg.n_boot >= 1, "--n-boot must be at least 1."),
        (cfg.ckpt_every >= 0, "--ckpt-every cannot be negative (0 = only at the end and on a stop)."),
        (cfg.max_bad_steps >= 1, "--max-bad-steps must be at least 1."),
        (cfg.rollout_batch >= 0, "--rollout-batch cannot be negative (0 = the whole batch)."),
        (cfg.loss_batch >= 0, "--loss-batch cannot be negative (0 = the backbone's default)."),
        (cfg.train_rec or cfg.train_user or cfg.steps == 0,
         "--no-train-rec with --no-train-user leaves nothing to train: drop one, or use --steps 0."),
        (cfg.n_layer >= 1 and cfg.n_head >= 1 and cfg.n_embd >= 1, "--n-layer, --n-head and --n-embd must be at least 1."),
        (0 <= cfg.p_reference <= 1, "--p-reference must be within [0, 1]."),
        (cfg.warmup_steps >= 0, "--warmup-steps cannot be negative."),
        (not cfg.grad_checkpointing or cfg.model, "--grad-checkpointing applies to a Hugging Face --model only."),
        (not (cfg.compile and cfg.model), "--compile applies to the built-in model only (not with --model)."),
        (all(t.strip() for t in cfg.lora_targets.split(",")) or not cfg.lora_targets,
         "--lora-targets must be comma-separated layer names, e.g. q_proj,v_proj."),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


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
             "loss_batch", "grad_checkpointing", "compile"}


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


def pick_device(name):
    return device_of(name)


# --------------------------------------------------------------------------------------------------
# Stage 2: CoARS


def stage2(cfg, model, tok, data, device, run_dir, log, ck=None):
    """Train both adapters with CoARS from the same rollouts (PAPER.md section 5).
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
    reward_cfg = dict(mode=cfg.reward_mode, alpha=cfg.alpha, use_filter=cfg.use_filter,
                      stage_gamma=cfg.stage_gamma if cfg.stage_gamma >= 0 else None)
    valid_rows = np.random.default_rng(cfg.seed).permutation(len(data.valid_user))[:cfg.eval_valid_n]
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
    bar = tqdm(range(start + 1, cfg.steps + 1), desc="stage 2 CoARS", dynamic_ncols=True, disable=None if lead else True,
               initial=start, total=cfg.steps)
    for step in bar:
        t0 = time.time()
        rows = rng.integers(0, len(data.train_user), cfg.batch)
        keys = rng.integers(0, 1 << 31, cfg.batch)        # each episode's sampling key (sampling.sample_next)
        trajs, micro = rollout_with_retry(model, tok, data, rows[share], keys[share], cfg, device, micro, log)
        t1 = time.time()
        rec = dict(stage=2, step=step)
        ok = True
        split = dict(teacher_s=0.0, student_s=0.0)
        for agent in agents:
            model.set_adapter(agent)
            timing = {}
            with autocast(device):                 # back-propagates loss_batch messages at a time
                loss, st = coars_loss(model, tok, trajs, buffer, agent, reward_cfg, cfg.lam, cfg.baseline, device,
                                      timing=timing, micro=loss_group(cfg), backward=True, n_episodes=cfg.batch)
            loss = FAULTS.loss(loss, 2, step)
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
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if ok else torch.tensor(float("nan"))
            ok = ok and finite(gn)
            if ok:
                opt.step()
            opt.zero_grad(set_to_none=True)
            rec["grad_norm"] = float(gn)
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
            _, m = run_ars(model, tok, data, "valid", valid_rows, ("rec", "user"), cfg.t_max, device, batch=tok.eval_batch)
            rec["valid_hit"] = float(m["hit"].mean())
            log(f"step {step}: validation Hit@1 {rec['valid_hit']:.4f} on {len(valid_rows)} samples")
        bar.set_postfix(hit=f"{rec['train_hit']:.2f}", R_rec=f"{rec.get('rec_reward', 0):+.2f}",
                        A=f"{rec.get('rec_credit', 0):+.2f}", s=f"{rec['step_s']:.1f}", tok_s=rec["tokens_per_s"],
                        split=f"roll {rec['rollout_s']:.1f}/teach {rec['teacher_s']:.1f}/stud {rec['student_s']:.1f}")
        if lead:
            log_jsonl(run_dir / "metrics.jsonl", rec)
        if not ok:
            check_bad_streak(cfg, streak, 2, step, run_dir, log, lambda: checkpoint(step))
        if STOP.signum or step == cfg.steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            checkpoint(step)
            if STOP.signum and step < cfg.steps:
                raise Stopped(f"stage 2 step {step}")
    if lead:
        save_adapters(model, cfg, run_dir / "coars.pt")
    return model


def lora_targets(cfg):
    """The layer names of --lora-targets, or None for the backbone's default."""
    return [t.strip() for t in cfg.lora_targets.split(",")] if cfg.lora_targets else None


def loss_group(cfg):
    """Messages per teacher / student pass (--loss-batch; 0 = the backbone's default)."""
    return cfg.loss_batch or (4 if cfg.model else 32)


def adapter_state(model):
    return {k: v for k, v in model.state_dict().items() if ".adapters." in k}


def save_adapters(model, cfg, path):
    tmp = path.with_suffix(".tmp")
    torch.save({"adapters": adapter_state(model), "config": dataclasses.asdict(cfg)}, tmp)
    tmp.replace(path)


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
                    batch=micro, compile=cfg.compile)
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
    first, the others then load its base.pt), or a Hugging Face chat model (hf.py, chat.py)."""
    if not cfg.model:
        tok = Tokenizer(data.n_items)
        if dist_info()[0] == 0:
            model = stage1(cfg, data, tok, device, run_dir, log, ck)
        barrier()
        if dist_info()[0] != 0:
            model = stage1(cfg, data, tok, device, run_dir, lambda *a: None, None)
        return model, tok
    import hf
    from chat import ChatTokenizer
    try:
        model, hf_tok = hf.load(cfg.model, device, grad_checkpointing=cfg.grad_checkpointing)
    except hf.ModelLoadError as e:
        raise UserError(str(e))
    log(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, frozen; "
        f"stage 1 skipped")
    return model, ChatTokenizer(hf_tok, data.titles)


def load_run(run_dir: Path, device="auto"):
    """(cfg, model with both adapters, tokenizer, data) of a finished run, for eval.py."""
    path = run_dir / "coars.pt"
    if not path.exists():
        raise UserError(f"{path} does not exist: point --run at a folder written by train.py.")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    cfg = Config(**ck["config"])
    device = pick_device(device)
    try:
        data = prepare(cfg.data_config(), log=lambda *a: None)
    except DataError as e:
        raise UserError(str(e))
    if cfg.model:
        model, tok = backbone(cfg, data, device, run_dir, lambda *a: None)
    else:
        tok = Tokenizer(data.n_items)
        model = build_model(cfg, tok, device)
        model.load_state_dict(torch.load(run_dir / "base.pt", map_location=device, weights_only=True)["model"])
    model.add_lora(("rec", "user"), r=cfg.lora_r, alpha=cfg.lora_alpha, targets=lora_targets(cfg))
    model.load_state_dict(ck["adapters"], strict=False)
    return cfg, freeze(model), tok, data


def main(argv=None):
    cfg = parse_args(argv)
    try:
        validate(cfg)
        if cfg.model:
            import hf
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
    except (UserError, DataError) as e:
        sys.exit(f"error: {e}")
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
    if cfg.skip_eval or not lead:
        return
    res = evaluate(model, tok, data, "test", cfg.t_max, device, cfg.n_boot, cfg.seed, max_samples=cfg.eval_test_n)
    res["timing_s"] = dict(data_and_stage1=round(t_s1 - t_start, 1), stage2=round(t_s2 - t_s1, 1),
                           eval=res["seconds"], total=round(time.time() - t_start, 1))
    res["device"] = device
    write_results(res, run_dir)
    print(results_table(res))
    print(f"\ntimes (s): {res['timing_s']}; results in {run_dir}/results.md and results.json")


if __name__ == "__main__":
    main()
