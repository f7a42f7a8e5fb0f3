"""
Watching a run: live curves where researchers look for them, and a picture of every run. Its own
file because it is the one place the training loops' metrics leave the run folder; the loops
themselves only append to metrics.jsonl (support/checkpoint.log_jsonl), and everything here reads
what they wrote.

    python train.py --dataset ml-latest-small --tensorboard   # then: tensorboard --logdir out
    python train.py --dataset ml-latest-small --wandb coars   # WANDB_MODE=offline works
    python eval.py --run out/ml-latest-small --plot           # curves.png again from metrics.jsonl

  - Trackers (--tensorboard, --wandb PROJECT): every metric a stage writes to metrics.jsonl, with
    its step, goes to TensorBoard event files (out/<run>/tensorboard/stage1 and .../stage2, one
    TensorBoard run per stage, since the stages count their steps separately) and to a Weights &
    Biases run (keys "stage1/<metric>", "stage2/<metric>", each stage against its own step
    metric). Both packages are optional: a missing one is one sentence. Rank 0 alone logs under
    torchrun (only it writes metrics.jsonl). A resumed run continues the same curves: TensorBoard's
    files are written again from the metrics.jsonl the resume kept (so they hold exactly its
    records), and W&B resumes the run of the same id (kept in out/<run>/wandb_id), where a record
    logged again after the checkpoint carries the same values (resumption is bit for bit,
    docs/reproducibility.md).
  - curves.png (plot_run): stage 1's loss and validation HR@1, stage 2's mean reward per agent,
    valid ratios, turns and validation Hit@1, written at the end of stage 2 (also after a resume)
    when matplotlib is installed.
"""

import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np


class TrackerError(RuntimeError):
    """An optional package is missing or will not start; the message is one sentence."""


def _records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _scalars(rec):
    """The numeric metrics of one metrics.jsonl record (not its stage and step)."""
    return {k: float(v) for k, v in rec.items() if k not in ("stage", "step")
            and isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


class Trackers:
    """The run's live sinks; log(rec) is called with each record appended to metrics.jsonl."""

    def __init__(self, run_dir, tensorboard=False, wandb_project="", config=None, resume=False):
        self.run_dir, self.tb, self.wb = Path(run_dir), {}, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrackerError("--tensorboard needs the tensorboard package: pip install "
                                   "tensorboard (or drop --tensorboard).") from None
            folder = self.run_dir / "tensorboard"
            shutil.rmtree(folder, ignore_errors=True)  # written again from the kept metrics.jsonl
            self.tb = {s: SummaryWriter(str(folder / f"stage{s}")) for s in (1, 2)}
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise TrackerError("--wandb needs the wandb package: pip install wandb (or drop "
                                   "--wandb); WANDB_MODE=offline runs without an "
                                   "account.") from None
            id_file = self.run_dir / "wandb_id"
            resumed = resume and id_file.exists()
            run_id = id_file.read_text().strip() if resumed else secrets.token_hex(4)
            id_file.write_text(run_id)
            try:
                self.wb = wandb.init(project=wandb_project, id=run_id, resume="allow",
                                     config=config, name=self.run_dir.name, dir=str(self.run_dir))
            except Exception as e:  # wandb raises many kinds (no network, no login, bad project)
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise TrackerError(f"--wandb could not start a run ({why}); set "
                                   "WANDB_MODE=offline, or run `wandb login`.") from None
            for s in (1, 2):
                self.wb.define_metric(f"stage{s}/step")
                self.wb.define_metric(f"stage{s}/*", step_metric=f"stage{s}/step")
        if self.tb:             # a resumed run: the curves so far are those metrics.jsonl kept
            for rec in _records(self.run_dir):
                self._tensorboard(rec)

    def _tensorboard(self, rec):
        w = self.tb.get(rec.get("stage"))
        if w is not None:
            for k, v in _scalars(rec).items():
                w.add_scalar(k, v, rec["step"])

    def log(self, rec):
        if self.tb:
            self._tensorboard(rec)
        if self.wb is not None and rec.get("stage") in (1, 2):
            s = rec["stage"]
            self.wb.log({f"stage{s}/step": rec["step"],
                         **{f"stage{s}/{k}": v for k, v in _scalars(rec).items()}})

    def close(self):
        for w in self.tb.values():
            w.close()
        if self.wb is not None:
            self.wb.finish()


# --------------------------------------------------------------------------------------------------
# curves.png

PANELS = [(1, ("loss",), "stage 1: next-token loss"),
          (1, ("valid_hr1",), "stage 1: validation HR@1 (no hint)"),
          (2, ("rec_reward", "user_reward"), "stage 2: mean reward per agent"),
          (2, ("rec_valid", "user_valid"), "stage 2: valid ratio"),
          (2, ("turns",), "stage 2: turns per episode"),
          (2, ("valid_hit", "train_greedy_hit"), "stage 2: greedy Hit@1")]
# a run without stage 1 (a Hugging Face model) shows these in the stage-1 panels' place
NO_STAGE1 = [(2, ("valid_rank_hit", "valid_ndcg10"), "stage 2: turn-1 ranking, validation"),
             (2, ("user_kl",), "stage 2: UserAgent's KL to the base (--user-kl)")]
SPARSE = ("valid_hr1", "valid_hit", "train_greedy_hit", "valid_rank_hit", "valid_ndcg10")


def panels(recs):
    """The six (stage, keys, title) panels of curves.png for these metrics.jsonl records."""
    if any(r.get("stage") == 1 for r in recs):
        return PANELS
    return NO_STAGE1 + [p for p in PANELS if p[0] != 1]


def plot_run(run_dir, log=print):
    """Write run_dir/curves.png from its metrics.jsonl; returns its path, or None (with one
    sentence) when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("curves.png skipped: matplotlib is not installed (pip install matplotlib, then python "
            "eval.py --run <run> --plot)")
        return None
    recs = _records(run_dir)
    if not recs:
        log(f"curves.png skipped: {Path(run_dir) / 'metrics.jsonl'} holds no records yet")
        return None
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (stage, keys, title) in zip(axes.flat, panels(recs)):
        for key in keys:
            pts = [(r["step"], r[key]) for r in recs if r.get("stage") == stage
                   and isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            x, y = np.array(pts, float).T
            dense = key not in SPARSE and len(y) >= 5
            color = None
            if dense:  # per-step values are noisy: a moving mean of 5, as the suite's plot
                color = ax.plot(x, y, alpha=0.25, lw=0.8)[0].get_color()
                y, x = np.convolve(y, np.ones(5) / 5, mode="valid"), x[4:]
            ax.plot(x, y, label=key, marker=None if dense else ".", color=color)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"stage-{stage} step", fontsize=8)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(Path(run_dir).name, fontsize=10)
    fig.tight_layout()
    path = Path(run_dir) / "curves.png"
    tmp = path.with_name("curves.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
