"""
Train CoARS end to end (PAPER.md section 5) and print the results table.

    python train.py --dataset ml-latest-small --data-url file:///path/to/ml-latest-small.zip
    python train.py --dataset ml-1m                       # downloads ml-1m from GroupLens
    python train.py --help                                # every option, with its default

Stages:
  0. data/prepare.py builds (or loads from its cache) the splits, SASRec candidates, prior, peers.
  1. Pretrain the built-in base GPT on the training split only [ours]: item sequences, item titles
     and scripted dialogues in both agents' message formats, half of them with a hindsight
     reference in the prompt, so the base can read every part of the format the agents and the
     teacher will meet. The base is then frozen. It is cached in out/<run>/base.pt and reused
     when the data and the stage-1 options are the same.
  2. CoARS: two LoRA adapters (RecAgent, UserAgent) on the frozen base, trained together from the
     same batched multi-turn rollouts with the interaction reward (reward.py, Eq. 7-8) plus the
     self-distilled token credit (distill.py, Eq. 10-12).
  3. Evaluate on the test split (eval.py) against Random, Pop, SASRec top-1 and the memory-based
     ARS (the same agents before stage 2) and write results.json / results.md.

This is the REINFORCE-style objective of the paper (no PPO ratio, no KL, no group normalisation);
see distill.py for the one optional extension.
"""

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.prepare import DataConfig, DataError, SOURCES, is_custom, prepare, probe_writable
from data.sasrec import SASRecConfig
from distill import ReferenceBuffer, coars_loss, hindsight_reference
from env import (Trajectory, Turn, closest_history_item, new_trajectory, rec_message, render_rec, render_user, rollout,
                 scripted_episode, scripted_rec_choice, scripted_user_reaction, user_message)
from eval import evaluate, results_table, run_ars, write_results
from model import GPT, GPTConfig, Tokenizer, causal_mask, logprobs_of, pack, positions


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
    # ---- built-in model ----
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
    """peak learning rate of stage 1 (cosine decay to 10%)"""
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
    loss_batch: int = 32
    """messages per teacher / student pass, back-propagated group by group to bound memory (0 = all at once)"""
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
    docs = field_docs(Config)
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
        (cfg.loss_batch >= 0, "--loss-batch cannot be negative (0 = all messages at once)."),
        (cfg.train_rec or cfg.train_user or cfg.steps == 0,
         "--no-train-rec with --no-train-user leaves nothing to train: drop one, or use --steps 0."),
        (cfg.n_layer >= 1 and cfg.n_head >= 1 and cfg.n_embd >= 1, "--n-layer, --n-head and --n-embd must be at least 1."),
        (0 <= cfg.p_reference <= 1, "--p-reference must be within [0, 1]."),
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


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def log_jsonl(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# --------------------------------------------------------------------------------------------------
# Checkpoints, stops and faults. A checkpoint holds everything a run needs to continue bit for bit:
# the trained weights (the whole base in stage 1, the adapters in stage 2, whose base is base.pt),
# the optimiser, the step, every random generator, the hindsight-reference buffer, the config, the
# data fingerprint and how many lines of metrics.jsonl belong to it. It is written to a temporary
# file and renamed; the one before it is kept as ckpt.prev.pt, used when ckpt.pt is damaged.

CKPT_NAMES = ("ckpt.pt", "ckpt.prev.pt")
CKPT_FORMAT = 1
# options that may change between a run and its resumption (they do not change what is computed)
RESUMABLE = {"resume", "ckpt_every", "skip_eval", "device", "n_boot", "eval_test_n", "max_bad_steps", "rollout_batch",
             "loss_batch"}


class Stopped(Exception):
    """A stop was asked for (SIGTERM, Ctrl-C) and a checkpoint was written."""


class StopFlag:
    """SIGTERM and Ctrl-C set a flag; the training loops check it after each step, write a
    checkpoint and stop. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = None

    def install(self):
        def handler(signum, frame):
            self.signum = signum
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
        return self

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else ""


STOP = StopFlag()


def save_checkpoint(run_dir: Path, state: dict):
    tmp = run_dir / "ckpt.tmp"
    torch.save(dict(state, format=CKPT_FORMAT), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    cur = run_dir / "ckpt.pt"
    if cur.exists():
        os.replace(cur, run_dir / "ckpt.prev.pt")
    os.replace(tmp, cur)


def load_checkpoint(run_dir: Path, log=print):
    """The newest readable checkpoint, or None. A damaged one is reported and skipped."""
    for name in CKPT_NAMES:
        path = run_dir / name
        if not path.exists():
            continue
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
                raise ValueError("not a checkpoint of this version")
            return ck
        except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
            why = (str(e).splitlines() or [type(e).__name__])[0][:120]
            log(f"warning: {path} is damaged or incomplete ({why}); "
                f"trying the previous checkpoint")
    return None


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


def data_fingerprint(data):
    return dict(raw_sha256=data.meta["raw_sha256"], options=data.meta["options"])


def rng_state(rng):
    return json.dumps(rng.bit_generator.state)


def set_rng_state(rng, text):
    rng.bit_generator.state = json.loads(text)


def buffer_state(buffer):
    return json.dumps([[list(k), dataclasses.asdict(tr)] for k, tr in buffer.last.items()], default=_plain)


def set_buffer_state(buffer, text):
    for k, tr in json.loads(text):
        turns = [Turn(**t) for t in tr.pop("turns")]
        buffer.last[tuple(k)] = Trajectory(**tr, turns=turns)


def _plain(x):
    return x.item() if hasattr(x, "item") else str(x)


def metrics_lines(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def truncate_metrics(run_dir, n):
    """Keep the first n lines of metrics.jsonl: the steps after the checkpoint are redone."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)[:n]
        path.write_text("".join(lines))


def finite(*xs):
    return all(bool(torch.isfinite(torch.as_tensor(x)).all()) for x in xs)


# --------------------------------------------------------------------------------------------------
# Stage 1: pretraining documents [ours]


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
            answer = rec_message(tok, traj.cands.index(item), closest_history_item(data, traj.hist, item))
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


def lm_loss(model, docs, tok, device):
    """Mean next-token loss over each document's scored part (head only on those positions)."""
    idx, valid, score = pack([d[:s] for d, s in docs], [d[s:] for d, s in docs], tok.pad_id)
    idx, valid, score = idx.to(device), valid.to(device), score.to(device)
    with autocast(device):
        h = model(idx, positions(valid), causal_mask(valid))
    return -logprobs_of(h[score].float(), model.head_weight, idx[:, 1:][score[:, :-1]]).mean()


def autocast(device):
    """bf16 autocast for training passes: ~1.4x faster on CPU, standard on GPU."""
    return torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)


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
        loss = FAULTS.loss(lm_loss(model, docs, tok, device), 1, step + 1)
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


# --------------------------------------------------------------------------------------------------
# Stage 2: CoARS


def stage2(cfg, model, tok, data, device, run_dir, log, ck=None):
    """Train both adapters with CoARS from the same rollouts (PAPER.md section 5).
    ck: a stage-2 checkpoint to continue from."""
    seed = cfg.stage2_seed if cfg.stage2_seed >= 0 else cfg.seed
    torch.manual_seed(seed)
    model.add_lora(("rec", "user"), r=cfg.lora_r, alpha=cfg.lora_alpha)
    agents = [a for a, on in (("rec", cfg.train_rec), ("user", cfg.train_user)) if on]
    params = [p for a in agents for p in model.adapter_parameters(a)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr) if params else None
    rng = np.random.default_rng(seed + 1)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    buffer = ReferenceBuffer()
    reward_cfg = dict(mode=cfg.reward_mode, alpha=cfg.alpha, use_filter=cfg.use_filter,
                      stage_gamma=cfg.stage_gamma if cfg.stage_gamma >= 0 else None)
    valid_rows = np.random.default_rng(cfg.seed).permutation(len(data.valid_user))[:cfg.eval_valid_n]
    start, n_bad, streak = 0, 0, 0
    micro = cfg.rollout_batch or cfg.batch

    def checkpoint(step):
        save_checkpoint(run_dir, dict(stage=2, step=step, adapters=adapter_state(model),
                                      opt=opt.state_dict() if opt else {}, rng=rng_state(rng),
                                      gen=gen.get_state(), torch_rng=torch.get_rng_state(), buffer=buffer_state(buffer),
                                      n_bad=n_bad, config=dataclasses.asdict(cfg), data=data_fingerprint(data),
                                      metrics_lines=metrics_lines(run_dir)))

    if ck and ck["stage"] == 2:
        model.load_state_dict(ck["adapters"], strict=False)
        if opt:
            opt.load_state_dict(ck["opt"])
        set_rng_state(rng, ck["rng"])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        set_buffer_state(buffer, ck["buffer"])
        start, n_bad = ck["step"], ck["n_bad"]
        log(f"stage 2: resuming after step {start}")
    else:
        checkpoint(0)                 # stage 1 is done: a resume starts from here, not from stage 1
    bar = tqdm(range(start + 1, cfg.steps + 1), desc="stage 2 CoARS", dynamic_ncols=True, disable=None,
               initial=start, total=cfg.steps)
    for step in bar:
        t0 = time.time()
        rows = rng.integers(0, len(data.train_user), cfg.batch)
        trajs, micro = rollout_with_retry(model, tok, data, rows, cfg, gen, device, micro, log)
        t1 = time.time()
        rec = dict(stage=2, step=step)
        ok = True
        split = dict(teacher_s=0.0, student_s=0.0)
        for agent in agents:
            model.set_adapter(agent)
            timing = {}
            with autocast(device):                 # back-propagates loss_batch messages at a time
                loss, st = coars_loss(model, tok, trajs, buffer, agent, reward_cfg, cfg.lam, cfg.baseline, device,
                                      timing=timing, micro=cfg.loss_batch, backward=True)
            loss = FAULTS.loss(loss, 2, step)
            ok = ok and finite(loss)
            split["teacher_s"] += timing.get("teacher_s", 0.0)
            split["student_s"] += timing.get("student_s", 0.0)
            rec.update({f"{agent}_{k}": v for k, v in st.items()}, **{f"{agent}_loss": loss.item()})
        model.set_adapter(None)
        t2 = time.time()
        if opt:
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
        buffer.add(trajs)
        n_tok = sum(len(t.rec_out) + len(t.user_out or []) for tr in trajs for t in tr.turns)
        turns = [t for tr in trajs for t in tr.turns]
        rec.update(train_hit=float(np.mean([tr.hit for tr in trajs])),
                   rec_valid=float(np.mean([t.rec_valid for t in turns])),
                   user_valid=float(np.mean([t.user_valid for t in turns if t.user_out is not None] or [0])),
                   turns=len(turns) / len(trajs), rollout_s=round(t1 - t0, 3), loss_s=round(t2 - t1, 3),
                   step_s=round(time.time() - t0, 3), gen_tokens_per_s=round(n_tok / max(t1 - t0, 1e-9)),
                   tokens_per_s=round(n_tok / max(time.time() - t0, 1e-9)))
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            _, m = run_ars(model, tok, data, "valid", valid_rows, ("rec", "user"), cfg.t_max, device)
            rec["valid_hit"] = float(m["hit"].mean())
            log(f"step {step}: validation Hit@1 {rec['valid_hit']:.4f} on {len(valid_rows)} samples")
        bar.set_postfix(hit=f"{rec['train_hit']:.2f}", R_rec=f"{rec.get('rec_reward', 0):+.2f}",
                        A=f"{rec.get('rec_credit', 0):+.2f}", s=f"{rec['step_s']:.1f}", tok_s=rec["tokens_per_s"],
                        split=f"roll {rec['rollout_s']:.1f}/teach {rec['teacher_s']:.1f}/stud {rec['student_s']:.1f}")
        log_jsonl(run_dir / "metrics.jsonl", rec)
        if not ok:
            check_bad_streak(cfg, streak, 2, step, run_dir, log, lambda: checkpoint(step))
        if STOP.signum or step == cfg.steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            checkpoint(step)
            if STOP.signum and step < cfg.steps:
                raise Stopped(f"stage 2 step {step}")
    save_adapters(model, cfg, run_dir / "coars.pt")
    return model


def adapter_state(model):
    return {k: v for k, v in model.state_dict().items() if ".adapters." in k}


def save_adapters(model, cfg, path):
    tmp = path.with_suffix(".tmp")
    torch.save({"adapters": adapter_state(model), "config": dataclasses.asdict(cfg)}, tmp)
    tmp.replace(path)


class BadSteps(Exception):
    """Too many non-finite steps in a row; the message says where the last good state is."""


def check_bad_streak(cfg, streak, stage, step, run_dir, log, checkpoint):
    if streak >= cfg.max_bad_steps:
        checkpoint()
        raise BadSteps(f"stage {stage} step {step}: {streak} non-finite losses or gradients in a row, so the run "
                       f"stopped; the last good state is checkpointed in {run_dir} (lower --lr or "
                       f"--pretrain-lr, then --resume).")


class Faults:
    """Testing aid: loss(x, stage, step) returns x, or NaN at the (stage, step) pairs in `nan_at`
    (set by the tests; empty in real runs)."""

    def __init__(self):
        self.nan_at = set()

    def loss(self, x, stage, step):
        return x * float("nan") if (stage, step) in self.nan_at else x


FAULTS = Faults()


def rollout_with_retry(model, tok, data, rows, cfg, gen, device, micro, log):
    """Roll out the batch in micro-batches; on a GPU out-of-memory error, halve the micro-batch,
    start the batch's episodes again and go on with the smaller size. Returns (trajs, micro)."""
    while True:
        trajs = [new_trajectory(data, "train", r) for r in rows]
        try:
            rollout(model, tok, data, trajs, t_max=cfg.t_max, temperature=cfg.temperature, generator=gen,
                    device=device, batch=micro)
            return trajs, micro
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
            micro = max(1, micro // 2)
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
            log(f"warning: out of memory during the rollout; rollout micro-batch halved to {micro}")


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
    tok = Tokenizer(data.n_items)
    model = build_model(cfg, tok, device)
    model.load_state_dict(torch.load(run_dir / "base.pt", map_location=device, weights_only=True)["model"])
    model.add_lora(("rec", "user"), r=cfg.lora_r, alpha=cfg.lora_alpha)
    model.load_state_dict(ck["adapters"], strict=False)
    return cfg, freeze(model), tok, data


def main(argv=None):
    cfg = parse_args(argv)
    try:
        validate(cfg)
        run_dir = check_run_dir(cfg)
        ck = None
        if cfg.resume:
            ck = load_checkpoint(run_dir)
            if ck is None:
                raise UserError(f"--resume: every checkpoint in {run_dir} is damaged; start the run again without "
                                f"--resume.")
        else:
            for name in CKPT_NAMES + ("metrics.jsonl",):
                (run_dir / name).unlink(missing_ok=True)
        t_start = time.time()
        data = prepare(cfg.data_config(), log=print)
        if ck:
            check_resumable(ck, cfg, data)
            truncate_metrics(run_dir, ck["metrics_lines"])
            print(f"resuming {run_dir} from its stage-{ck['stage']} checkpoint at step {ck['step']}")
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    except (UserError, DataError) as e:
        sys.exit(f"error: {e}")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tok = Tokenizer(data.n_items)
    print(f"run folder {run_dir}; device {device}; {data.n_items} items, {len(data.train_user)} training samples")
    STOP.install()
    try:
        model = stage1(cfg, data, tok, device, run_dir, print, ck)
        t_s1 = time.time()
        model = stage2(cfg, model, tok, data, device, run_dir, print, ck)
    except Stopped as e:
        print(f"stopped by {STOP.name} after {e}; checkpoint written in {run_dir}; continue with the same "
              f"command and --resume")
        sys.exit(128 + STOP.signum)
    except BadSteps as e:
        sys.exit(f"error: {e}")
    t_s2 = time.time()
    if cfg.skip_eval:
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
