"""
train.py's options: the typed Config (one documented default per knob, which --help prints), its
flags, and the checks that refuse impossible options before any work starts. Its own file because
suite.py and eval.py build and check the same options, and so train.py holds only the training.

    python train.py --help                                # every option, with its default
"""

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data.prepare import DataConfig, SOURCES, is_custom
from data.sasrec import SASRecConfig
from env import DECODING


class UserError(Exception):
    """A wrong option or unusable input; the message is one sentence for the user."""


@dataclass
class Config:
    # ---- data ----
    dataset: str = "ml-latest-small"
    """ml-1m, ml-100k, ml-latest-small, lastfm, instruments, or the path of a folder in the custom
    format (docs/datasets.md)"""
    data_dir: str = str(Path(__file__).resolve().parent / "data")
    """folder for downloads and processed caches"""
    data_url: str = ""
    """address of the raw dataset file ('' = official; file:// works; a local folder of extracted
    files is read in place)"""
    data_sha256: str = ""
    """expected sha256 of the raw file ('' = the official file's where published, 'none' = skip the
    check)"""
    candidates: str = "random"
    """candidate lists: 'random' (target + 19 uniform non-history items, the AFL / LLaRA protocol)
    or 'sasrec' (SASRec's top 20, the target not forced in; the results print the ceiling)"""
    train_prior: str = "crossfit"
    """[ours] the SASRec behind the training samples' prior (and 'sasrec' candidates): 'crossfit'
    (trained on the other half of the users, so the hint is no better on training samples than at
    test time) or 'full' (the one SASRec of validation and test, which trained on those samples)"""
    sasrec_epochs: int = 20
    """SASRec training epochs"""
    # ---- model ----
    model: str = ""
    """'' = the built-in GPT; else a Hugging Face chat model: hub id, local folder, .gguf file, or
    the shortcut smollm2-135m (support/hf.py)"""
    lora_targets: str = ""
    """comma-separated names of the linear layers that get LoRA ('' = the model's default:
    qkv,proj,fc,fc2 for the built-in GPT, q_proj,v_proj,gate_proj,up_proj,down_proj for a Hugging
    Face model)"""
    grad_checkpointing: bool = False
    """recompute a Hugging Face model's activations in the backward pass (less memory, ~30% more
    time)"""
    precision: str = "auto"
    """dtype of the training passes (stage 1, warm-up, CoARS losses): 'bf16' autocast, 'fp32', or
    'auto' (bf16 on a GPU, fp32 on a CPU; pretrain.autocast says why)"""
    compile: bool = False
    """run the built-in GPT's decode steps in rollouts through torch.compile (the same tokens; it
    pays only where decode steps dominate: docs/benchmarks.md)"""
    warmup_steps: int = 0
    """supervised warm-up steps of the adapters on scripted dialogues before CoARS (for --model; 0 =
    none)"""
    n_layer: int = 4
    """transformer blocks of the built-in GPT"""
    n_head: int = 4
    """attention heads"""
    n_embd: int = 128
    """width"""
    # ---- stage 1: pretraining the built-in base [ours] ----
    pretrain_steps: int = 1000
    """most optimiser steps of stage 1 (it stops earlier on validation; 0 = skip: only sensible with
    a base from an earlier run)"""
    pretrain_batch: int = 32
    """item-sequence windows per stage-1 step (next-item language modelling, every position
    scored)"""
    pretrain_window: int = 50
    """longest item-sequence window"""
    pretrain_prefixed: float = 0.5
    """share of those windows that follow the head of a RecAgent prompt (`<|rec|><|cands|>` 20
    random items `<|mem|><|hist|>`), so that the base predicts the next item from the history
    whatever precedes it"""
    pretrain_dialogues: int = 64
    """scripted dialogue documents per stage-1 step, half per agent (also the warm-up's batch per
    agent)"""
    pretrain_lr: float = 2e-3
    """peak learning rate of stage 1 (cosine decay to 10%), and the learning rate of the warm-up"""
    pretrain_future: int = 5
    """the scripted UserAgent also likes the user's next this-many items after the target"""
    pretrain_eval_every: int = 50
    """measure validation HR@1 (RecAgent ranking, no hint) every this many stage-1 steps; the best
    weights are kept (0 = never: the last weights)"""
    pretrain_eval_n: int = 1000
    """validation samples of that measurement (a fixed random subset; all when the split is
    smaller)"""
    pretrain_patience: int = 6
    """stop stage 1 after this many validation measurements without improvement (0 = never stop
    early)"""
    dropout: float = 0.1
    """dropout of the built-in GPT in stage 1 (the frozen base runs without it)"""
    p_reference: float = 0.5
    """fraction of scripted dialogues whose prompt carries a hindsight reference"""
    stage2_last: int = 3
    """the last this-many training samples of each user are stage 2's; stage 1 never trains on their
    targets"""
    # ---- stage 2: CoARS ----
    steps: int = 100
    """CoARS optimiser steps"""
    batch: int = 48
    """episodes per CoARS step"""
    lr: float = 5e-4
    """adapter learning rate (Adam)"""
    loss_batch: int = 0
    """messages per teacher / student pass (and per pass of the SFT reference), back-propagated
    group by group to bound memory (0 = 32 for the built-in GPT, 4 for a Hugging Face model, whose
    activations are far larger); with --shared-prefix a group is instead one episode's messages of
    one agent"""
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
    credit_clip: float = 1.0
    """[ext] the token credit of Eq. 10 is clipped to [-credit_clip, credit_clip] (1 in the
    method)"""
    alpha: float = 0.1
    """alpha, weight of the peer signal in Eq. 8"""
    stage_gamma: float = -1.0
    """D_t = stage_gamma^(t-1) in Eq. 7; negative = D_t = 1 [ours]"""
    decoding: str = "grammar"
    """how messages are decoded [ours, docs/method.md section 5; env.py]: 'grammar' (each agent's
    message under its grammar, valid by construction), 'item' (only the RecAgent's item restricted
    to the candidates: invalid messages happen, the default before the grammar) or 'free' (nothing
    restricted). Sampling and every log-prob use the same support"""
    prior_weight: float = -1.0
    """[ours, docs/method.md section 2] w: the RecAgent's item is drawn from softmax(logit + w log
    p_SASRec) over its candidates, p_SASRec SASRec's softmax over the same candidates, at every turn
    (a product of the two opinions; the prompt still shows the prior). 0 = the paper's agent, which
    sees SASRec's top candidate in its turn-1 prompt only. w > 0 needs the built-in model and
    --decoding grammar or item; negative = the default: 1 there (chosen on validation), 0 for a
    chat model or --decoding free"""
    use_filter: bool = True
    """leave out turns with a wrong item that the user met positively"""
    user_filter: bool = True
    """the filter also leaves the turn out of the UserAgent's loss (paper); --no-user-filter [ext]:
    the UserAgent is still trained on wrong items it accepted, so accepting everything is not
    free"""
    user_balance: bool = False
    """[ext] the UserAgent's turns on right and on wrong items weigh the same in its loss
    (distill.balance_user); meant with --no-user-filter"""
    user_kl: float = 0.0
    """[ext] weight of a penalty keeping the UserAgent near the untrained one (distill.kl_to_base,
    an estimate of KL(user || base user) on its own messages); 0 = off, as in the paper"""
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
    eval_returns_n: int = 480
    """stage-2 training samples on which the UserAgent's Eq. 8 return is set beside two constant
    users' (rolled out as in training; 0 = skip)"""
    sft_reference: bool = True
    """train and evaluate the reference row 'SFT on stage-2 samples': a RecAgent adapter trained by
    cross-entropy on the targets of the same samples with stage 2's budget (steps x batch, lr),
    paired with the untrained UserAgent"""
    memory_row: bool = True
    """evaluate the memory-based ARS (the base without adapters) beside the trained pair; off for
    a run that trains one row of a table whose memory-based ARS another evaluation holds
    (tools/suite.py --rows)"""
    n_boot: int = 1000
    """bootstrap resamples for the intervals"""
    skip_eval: bool = False
    """do not run the final test evaluation"""
    # ---- run and output ----
    out_dir: str = "out"
    """runs are written to out_dir/run_name"""
    run_name: str = ""
    """run folder name ('' = the dataset name)"""
    device: str = "auto"
    """'cpu', 'cuda' or 'auto' (cuda when available)"""
    seed: int = 0
    """seed for data, initialisation, sampling and bootstrap"""
    stage2_seed: int = -1
    """seed of stage 2 alone (adapter initialisation, training samples, rollouts; -1 = --seed):
    seeds over a fixed dataset and base"""
    # watching a run (support/watch.py)
    tensorboard: bool = False
    """write every metric to TensorBoard event files under out_dir/run_name/tensorboard (needs the
    tensorboard package)"""
    wandb: str = ""
    """log every metric to this Weights & Biases project ('' = off; needs the wandb package;
    WANDB_MODE=offline works)"""
    # surviving long runs (support/checkpoint.py)
    resume: bool = False
    """continue the run in out_dir/run_name from its last checkpoint"""
    ckpt_every: int = 50
    """write a checkpoint every this many steps of either stage (0 = only at the end and on a
    stop)"""
    max_bad_steps: int = 3
    """stop after this many non-finite losses or gradients in a row (each one is skipped)"""
    rollout_batch: int = 0
    """rollout micro-batch (0 = the whole batch); halved on a GPU out-of-memory error"""
    shared_prefix: str = "auto"
    """how the loss passes run an agent's messages (the same log-probs either way, up to round-off;
    train.loss_passes): 'on' one episode at a time, the prompts' shared prefix once and each
    message's branch against it; 'off' --loss-batch messages at a time, each under its whole
    prompt; 'auto' whichever is faster for the backbone (docs/benchmarks.md)"""

    def data_config(self):
        return DataConfig(dataset=self.dataset, data_dir=self.data_dir, data_url=self.data_url,
                          data_sha256=self.data_sha256, candidates=self.candidates,
                          train_prior=self.train_prior, seed=self.seed,
                          sasrec=SASRecConfig(epochs=self.sasrec_epochs))

    def reward_options(self):
        """reward.turn_rewards' options (stage_gamma < 0: D_t = 1)."""
        return dict(mode=self.reward_mode, alpha=self.alpha, use_filter=self.use_filter,
                    user_filter=self.user_filter,
                    stage_gamma=self.stage_gamma if self.stage_gamma >= 0 else None)

    def can_tilt(self):
        """Whether the RecAgent names its item by a restricted item token, which --prior-weight
        tilts: the built-in model under --decoding grammar or item (a chat model names its item by
        a title, and --decoding free restricts nothing)."""
        return not self.model and self.decoding != "free"

    def prior_tilt(self):
        """The --prior-weight in force: the option, or where it is negative (the default) 1 where
        the tilt can act (can_tilt) and 0 elsewhere."""
        if self.prior_weight >= 0:
            return self.prior_weight
        return 1.0 if self.can_tilt() else 0.0

    def run_dir(self):
        return Path(self.out_dir) / (self.run_name or Path(self.dataset).name)


def field_docs(cls):
    """The docstring under each dataclass field, for --help (one source of truth for the
    defaults)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)}


# train.py --quick: a run that finishes in about a minute on a 2-core CPU, every part of it kept
QUICK = dict(sasrec_epochs=1, pretrain_steps=30, pretrain_eval_every=15, pretrain_eval_n=100,
             steps=4, batch=4, eval_every=2, eval_valid_n=10, eval_test_n=50, eval_returns_n=8,
             n_boot=100)


# --help's groups: (title, the first Config field of the group), in the order of the fields
HELP_GROUPS = [("data", "dataset"), ("model", "model"),
               ("stage 1: pretraining the built-in base [ours]", "pretrain_steps"),
               ("stage 2: CoARS", "steps"), ("evaluation", "eval_every"),
               ("run and output", "out_dir")]


def add_config_args(p: argparse.ArgumentParser, defaults=None):
    """One flag per Config field, documented by the field's docstring and its default (defaults
    may be overridden), in --help's groups (HELP_GROUPS)."""
    # argparse formats help with %
    docs = {k: v.replace("%", "%%") for k, v in field_docs(Config).items()}
    starts = {first: title for title, first in HELP_GROUPS}
    group = p
    for f in dataclasses.fields(Config):
        if f.name in starts:
            group = p.add_argument_group(starts[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        text = " ".join(docs.get(f.name, "").split()) + " (default: %(default)s)"
        if f.type is bool or f.type == "bool":
            group.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                               help=text)
        else:
            group.add_argument(flag, default=default, type=type(f.default), help=text)


def saved_options(saved):
    """A saved config.json's options as today's Config fields: a run from before --decoding had
    free_answer (True = 'free'; False = 'item', the RecAgent's item alone restricted), and one from
    before --prior-weight had none (the paper's agent, 0)."""
    saved = dict(saved)
    saved.setdefault("prior_weight", 0.0)
    if "free_answer" in saved:
        saved["decoding"] = "free" if saved.pop("free_answer") else "item"
    return saved


def config_defaults(argv):
    """--config PATH among argv: the options of that saved config.json (a run's,
    out/<run>/config.json), to be the defaults that the other flags override. Returns ({} or the
    options, argv without it). A missing or unreadable file, or a key that is no option, is a
    UserError naming it."""
    argv = list(argv)
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return {}, argv
    k = next(i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config="))
    if argv[k] == "--config":
        if k + 1 >= len(argv):
            raise UserError("--config needs the path of a config.json, e.g. --config "
                            "out/ml-latest-small/config.json.")
        path, rest = argv[k + 1], argv[:k] + argv[k + 2:]
    else:
        path, rest = argv[k].split("=", 1)[1], argv[:k] + argv[k + 1:]
    try:
        saved = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror or e}); give the "
                        "config.json of a run folder.")
    except json.JSONDecodeError as e:
        raise UserError(f"--config {path}: not valid JSON (line {e.lineno}); give the config.json "
                        "of a run folder.")
    if not isinstance(saved, dict):
        raise UserError(f"--config {path}: expected an object of options, as train.py writes "
                        "config.json.")
    saved = saved_options(saved)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in saved.items():
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            raise UserError(f"--config {path}: {key!r} is not an option"
                            + (f" (did you mean {near[0]!r}?)" if near else "")
                            + "; fix or remove it.")
        want = type(fields[key].default)
        if not (isinstance(value, want)
                or (want is float and isinstance(value, int) and not isinstance(value, bool))):
            raise UserError(f"--config {path}: {key!r} is {value!r}, expected a {want.__name__}.")
    return saved, rest


def config_from(ns) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(ns).items() if k in names})


def validate(cfg: Config):
    """Refuse impossible options before any work starts, one sentence each."""
    checks = [
        (cfg.dataset in SOURCES or is_custom(cfg.dataset),
         f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(sorted(SOURCES))}, or a "
         "folder path."),
        (cfg.candidates in ("sasrec", "random"), "--candidates must be 'sasrec' or 'random'."),
        (cfg.train_prior in ("crossfit", "full"), "--train-prior must be 'crossfit' or 'full'."),
        (cfg.precision in ("auto", "bf16", "fp32"),
         "--precision must be 'auto', 'bf16' or 'fp32'."),
        (cfg.decoding in DECODING, "--decoding must be 'grammar', 'item' or 'free'."),
        (cfg.reward_mode in ("interaction", "outcome"),
         "--reward-mode must be 'interaction' or 'outcome'."),
        (cfg.baseline in ("none", "mean"), "--baseline must be 'none' or 'mean'."),
        (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
         "--device must be auto, cpu or cuda."),
        (not cfg.device.startswith("cuda") or torch.cuda.is_available(),
         "--device cuda was asked for but no GPU is visible; use --device cpu."),
        (cfg.t_max >= 1, "--t-max must be at least 1."),
        (cfg.steps >= 0 and cfg.pretrain_steps >= 0,
         "--steps and --pretrain-steps cannot be negative."),
        (cfg.batch >= 1 and cfg.pretrain_batch >= 1,
         "--batch and --pretrain-batch must be at least 1."),
        (cfg.lam >= 0, "--lam must be >= 0."),
        (cfg.user_kl >= 0, "--user-kl must be >= 0 (0 = off)."),
        (0 <= cfg.alpha <= 1, "--alpha must be in [0, 1] (Eq. 8)."),
        (cfg.temperature > 0, "--temperature must be positive (evaluation is greedy anyway)."),
        (cfg.n_embd % cfg.n_head == 0, "--n-embd must be a multiple of --n-head."),
        (cfg.pretrain_window >= 2 and cfg.pretrain_dialogues >= 0 and cfg.pretrain_future >= 0
         and 0 <= cfg.pretrain_prefixed <= 1,
         "--pretrain-window must be at least 2, --pretrain-dialogues and --pretrain-future at "
         "least 0, --pretrain-prefixed in [0, 1]."),
        (cfg.pretrain_eval_every >= 0 and cfg.pretrain_patience >= 0,
         "--pretrain-eval-every and --pretrain-patience cannot be negative."),
        (0 <= cfg.dropout < 1, "--dropout must be in [0, 1)."),
        (cfg.stage2_last >= 1, "--stage2-last must be at least 1."),
        (cfg.lora_r >= 1, "--lora-r must be at least 1."),
        (cfg.eval_test_n >= 0 and cfg.eval_valid_n >= 0 and cfg.eval_returns_n >= 0,
         "--eval-test-n, --eval-valid-n and --eval-returns-n cannot be negative."),
        (cfg.eval_every >= 0, "--eval-every cannot be negative (0 = never)."),
        (cfg.lr > 0 and cfg.pretrain_lr > 0, "--lr and --pretrain-lr must be positive."),
        (cfg.grad_clip > 0, "--grad-clip must be positive."),
        (cfg.credit_clip > 0, "--credit-clip must be positive."),
        (cfg.prior_weight <= 0 or cfg.can_tilt(),
         "--prior-weight needs the built-in model and --decoding grammar or item (it tilts the "
         "RecAgent's item token)."),
        (cfg.n_boot >= 1, "--n-boot must be at least 1."),
        (cfg.ckpt_every >= 0,
         "--ckpt-every cannot be negative (0 = only at the end and on a stop)."),
        (cfg.max_bad_steps >= 1, "--max-bad-steps must be at least 1."),
        (cfg.rollout_batch >= 0, "--rollout-batch cannot be negative (0 = the whole batch)."),
        (cfg.loss_batch >= 0, "--loss-batch cannot be negative (0 = the backbone's default)."),
        (cfg.shared_prefix in ("auto", "on", "off"), "--shared-prefix must be 'auto', 'on' or "
         "'off'."),
        (cfg.train_rec or cfg.train_user or cfg.steps == 0,
         "--no-train-rec with --no-train-user leaves nothing to train: drop one, or use --steps "
         "0."),
        (cfg.n_layer >= 1 and cfg.n_head >= 1 and cfg.n_embd >= 1,
         "--n-layer, --n-head and --n-embd must be at least 1."),
        (0 <= cfg.p_reference <= 1, "--p-reference must be within [0, 1]."),
        (cfg.warmup_steps >= 0, "--warmup-steps cannot be negative."),
        (not cfg.grad_checkpointing or cfg.model,
         "--grad-checkpointing applies to a Hugging Face --model only."),
        (not (cfg.compile and cfg.model),
         "--compile applies to the built-in model only (not with --model)."),
        (all(t.strip() for t in cfg.lora_targets.split(",")) or not cfg.lora_targets,
         "--lora-targets must be comma-separated layer names, e.g. q_proj,v_proj."),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def lora_targets(cfg):
    """The layer names of --lora-targets, or None for the backbone's default."""
    return [t.strip() for t in cfg.lora_targets.split(",")] if cfg.lora_targets else None


def shared_prefix(cfg):
    """Whether the loss passes share prompt prefixes (--shared-prefix; 'auto': for a Hugging Face
    model, whose long prompts share most of their tokens, and not for the built-in GPT, whose short
    prompts run faster as larger batches: docs/benchmarks.md)."""
    return cfg.shared_prefix == "on" or (cfg.shared_prefix == "auto" and bool(cfg.model))


def loss_group(cfg):
    """Messages per teacher / student pass (--loss-batch; 0 = the backbone's default)."""
    return cfg.loss_batch or (4 if cfg.model else 32)
