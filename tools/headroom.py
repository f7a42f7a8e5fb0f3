"""
How much the conversation itself could add to a finished run, and what stands in the way (an
analysis beside the method, not part of it; docs/results.md reads its numbers):

    python tools/headroom.py --run out/ml-latest-small                 # validation split (default)
    python tools/headroom.py --run out/ml-latest-small --split test

The final Hit@1 of the loop is the first pick, minus the right first picks the user turns down,
plus the wrong ones the later turns recover. This replays greedy episodes of the untrained pair
(memory-based ARS) and of the trained pair (CoARS) on every sample of the split, four ways:
  - user: the run's UserAgent, or an ORACLE user that clicks the target and dislikes anything
    else (it sees the target, which the UserAgent never does: an upper bound, not a method);
  - RecAgent: as trained, or with the items the user has turned down in this episode removed
    from its answer choices (exclude rejected: a RecAgent that always uses its memory).
With the oracle user and the exclusion, the final Hit@1 is what five guesses of the RecAgent's
ranking reach; with the run's own UserAgent it is what the loop reaches. The difference says
whether the user (telling a right item from a plausible wrong one) or the RecAgent (moving on after
a turn-down) limits the loop. It also prints the UserAgent's judgement of the first picks and
whether the peer opinion p_t, the only thing the UserAgent sees that the RecAgent does not, tells
the target from the RecAgent's wrong first pick (AUC over those samples; 0.5 = no signal).
Built-in model runs only (the exclusion works on item tokens). Writes headroom_<split>.md to the run.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # `python tools/headroom.py` from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from config import UserError  # noqa: E402
from env import POSITIVE, peer_opinion, rejected_items  # noqa: E402
from eval import mean_ci, paired_diff_ci, run_ars  # noqa: E402
from support.distributed import device_of  # noqa: E402
from support.runs import add_run_args, load_run  # noqa: E402


def oracle_user(traj, turn):
    """A user who knows the target: click it, dislike everything else."""
    return ("click", 0.90) if turn.item == traj.target else ("dislike", 0.10)


def not_rejected(traj):
    """The memory forced: the candidates the user has not turned down in this episode (all of them
    when it turned every one down), the items env.rollout's RecAgent may then name."""
    rejected = rejected_items(traj.turns)
    return [i for i in traj.cands if i not in rejected] or traj.cands


def auc(pos, neg):
    """P(a positive scores above a negative), ties counted half."""
    pos, neg = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean()) if pos.size and neg.size else float("nan")


def first_pick_judgements(trajs):
    """(share of right first picks the user accepts, share of wrong first picks it turns down)."""
    right = [tr.turns[0] for tr in trajs if tr.turns[0].hit and tr.turns[0].user_valid]
    wrong = [tr.turns[0] for tr in trajs if tr.turns[0].rec_valid and not tr.turns[0].hit and tr.turns[0].user_valid]
    acc = np.mean([t.action in POSITIVE for t in right]) if right else float("nan")
    rej = np.mean([t.action not in POSITIVE for t in wrong]) if wrong else float("nan")
    return float(acc), float(rej)


def headroom(model, tok, data, split, t_max, device, n_boot=1000, decoding="grammar"):
    """Rows of the analysis (a dict per pair x user x exclusion) and the peer-signal AUC per pair."""
    rows = np.arange(len(getattr(data, f"{split}_user")))
    out, peers = [], {}
    for pair, adapters in (("untrained pair (memory-based ARS)", (None, None)), ("trained pair (CoARS)", ("rec", "user"))):
        base = {}
        for user in ("UserAgent", "oracle"):
            for exclude in (False, True):
                trajs, m = run_ars(model, tok, data, split, rows, adapters, t_max, device, batch=tok.eval_batch,
                                   user=oracle_user if user == "oracle" else None,
                                   rec_items=not_rejected if exclude else None,
                                   decoding=decoding)
                r = dict(pair=pair, user=user, exclude=exclude, hit=mean_ci(m["hit"], n_boot),
                         turn1=float(m["hit_turn1"].mean()), turns=float(m["turns"].mean()),
                         repeats=float(np.nanmean(m["repeat_rejected"])) if np.isfinite(m["repeat_rejected"]).any()
                         else float("nan"), judge=first_pick_judgements(trajs) if user == "UserAgent" else None)
                if exclude:
                    r["gain"] = paired_diff_ci(m["hit"], base[user], n_boot)
                base[user] = m["hit"]
                out.append(r)
                if user == "UserAgent" and not exclude:
                    wrong = [tr for tr in trajs if tr.turns[0].rec_valid and not tr.turns[0].hit]
                    q_t = [peer_opinion(data, tr.user, tr.target)[1] for tr in wrong]
                    q_w = [peer_opinion(data, tr.user, tr.turns[0].item)[1] for tr in wrong]
                    peers[pair] = (auc(q_t, q_w), len(wrong))
    return out, peers


def table(out, peers, split, n):
    lines = ["| pair | user | RecAgent | final Hit@1 [95% CI] | turn-1 Hit@1 | turns | repeats a rejected item | "
             "exclude - as trained [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for r in out:
        m, lo, hi = r["hit"]
        gain = f"{r['gain'][0]:+.3f} [{r['gain'][1]:+.3f}, {r['gain'][2]:+.3f}]" if "gain" in r else "-"
        lines.append(f"| {r['pair']} | {r['user']} | {'exclude rejected' if r['exclude'] else 'as trained'} | "
                     f"{m:.3f} [{lo:.3f}, {hi:.3f}] | {r['turn1']:.3f} | {r['turns']:.2f} | {r['repeats']:.3f} | {gain} |")
    lines += ["", f"{split} split, {n} samples, greedy; oracle: a user that clicks the target and dislikes anything "
              "else (an upper bound: the UserAgent never sees the target).", ""]
    for r in out:
        if r["judge"] and not r["exclude"]:
            lines.append(f"- {r['pair']}: the UserAgent accepts {r['judge'][0]:.3f} of the right first picks and turns "
                         f"down {r['judge'][1]:.3f} of the wrong ones.")
    for pair, (a, k) in peers.items():
        lines.append(f"- {pair}: peer opinion q_t of the target against the RecAgent's wrong first pick, AUC {a:.3f} "
                     f"over {k} samples (0.5: the peers do not tell them apart).")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="What the conversation could add to a finished run (module docstring).")
    add_run_args(p, "valid", "the split to measure on (test only for a final report)")
    p.add_argument("--n-boot", type=int, default=1000,
                   help="bootstrap resamples of each interval (default: %(default)s)")
    a = p.parse_args(argv)
    try:
        cfg, model, tok, data = load_run(Path(a.run), a.device)
        if tok.chat:
            raise UserError("tools/headroom.py works on runs of the built-in model only (its RecAgent answers with "
                            "item tokens); this run used --model.")
    except UserError as e:
        sys.exit(f"error: {e}")
    with torch.no_grad():
        out, peers = headroom(model, tok, data, a.split, cfg.t_max, device_of(a.device), a.n_boot, cfg.decoding)
    text = table(out, peers, a.split, len(getattr(data, f"{a.split}_user")))
    path = Path(a.run) / f"headroom_{a.split}.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    print(text)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
