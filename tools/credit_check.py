"""
Does the self-distilled credit A_{t,n} (Eq. 10) say anything the reward R_t does not? (A tool
beside the method, not part of it.)

    python tools/credit_check.py --run out/lastfm --n 300                # the trained pair
    python tools/credit_check.py --run out/lastfm --n 300 --untrained    # as at CoARS's first step

Plays n conversations of the split as training does (sampled at the run's temperature, one key per
sample; tools/viewer.conversations), takes every token's credit with the finished conversation as
its hindsight reference, and prints, per agent and kind of token (distill.token_kinds): how many,
the mean credit on turns whose recommended item is right (the target) and on those where it is
wrong, the AUC of the credit for telling the two apart (0.5: no information; 1: the credit is
higher on every right turn than on every wrong one), how often the credit's sign is the sign of
the turn's R_t minus the batch mean (the direction the reward already pushes), and the share
of Eq. 11's per-token weight |lam A| / (|R_t - b| + |lam A|) at the run's lam and --baseline (b = 0
by default; metrics.jsonl's credit_share). A credit that only
repeats right / wrong adds a tenth of what R_t says (lam 0.1, clip 1); one that varies within
right turns and within wrong ones, or disagrees with R_t's sign, is information the reward lacks.
For a chat model (--model runs) a second table asks whether the credit rises on the tokens of the
free text that the hindsight reference contains (its titles, "right", "wrong", the actions).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from anywhere

import numpy as np  # noqa: E402

from config import UserError  # noqa: E402
from support.runs import add_run_args, load_run  # noqa: E402
from tools.viewer import conversations  # noqa: E402


def auc(pos, neg):
    """P(a random value of pos > a random value of neg) + half the ties (Mann-Whitney); None if
    either is empty."""
    if not len(pos) or not len(neg):
        return None
    x = np.concatenate([pos, neg])
    order = x.argsort(kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):                       # ties share their mean rank
        at = x == v
        ranks[at] = ranks[at].mean()
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def in_reference(piece, reference):
    """Whether a token's text is a word of the hindsight reference: at least 4 letters or digits
    once stripped, found in the reference's text (case ignored)."""
    w = piece.strip().strip("\u00ab\u00bb\"'.,;:!?()").lower()
    return len(w) >= 4 and any(ch.isalnum() for ch in w) and w in reference.lower()


def reference_table(convs):
    """For a chat model's free text (kinds 'answer' and 'reason'): the mean credit of the tokens
    whose text the hindsight reference contains (in_reference) and of the others."""
    out = {}
    for agent in ("rec", "user"):
        for kind in ("answer", "reason"):
            xs = {True: [], False: []}
            for c in convs:
                for turn in c["turns"]:
                    m = turn["msgs"].get(agent)
                    for piece, k, x in (m["tokens"] if m else []):
                        if k == kind:
                            xs[in_reference(piece, c["reference"])].append(x)
            if xs[True] or xs[False]:
                out[f"{agent} {kind}"] = {
                    w: dict(tokens=len(v), mean=float(np.mean(v)) if v else None)
                    for w, v in (("in the reference", xs[True]), ("not in it", xs[False]))}
    return out


def credit_table(convs, lam, baseline="none"):
    """Rows (agent, kind) -> the statistics of the module docstring; baseline: the run's
    --baseline, the b of the share's |R_t - b| (0 for 'none', as in training's credit_share)."""
    toks = []                                    # (agent, kind, credit, hit, R_t)
    for c in convs:
        for turn in c["turns"]:
            for agent, m in turn["msgs"].items():
                r = turn["rewards"][agent]
                for _, kind, x in m["tokens"]:
                    toks.append((agent, kind, x, bool(turn["hit"]), r))
    out = {}
    for agent in ("rec", "user"):
        mine = [t for t in toks if t[0] == agent and t[4] is not None]
        if not mine:
            continue
        b = float(np.mean([t[4] for t in mine]))
        b_loss = b if baseline == "mean" else 0.0
        for kind in sorted({t[1] for t in mine}):
            sel = [t for t in mine if t[1] == kind]
            x = np.array([t[2] for t in sel])
            hit = np.array([t[3] for t in sel])
            r = np.array([t[4] for t in sel])
            adv = r - b
            moved = (x != 0) & (adv != 0)
            out[f"{agent} {kind}"] = dict(
                tokens=len(sel), mean=float(x.mean()),
                mean_right=float(x[hit].mean()) if hit.any() else None,
                mean_wrong=float(x[~hit].mean()) if (~hit).any() else None,
                auc_right_vs_wrong=auc(x[hit], x[~hit]),
                sign_as_reward=float((np.sign(x[moved]) == np.sign(adv[moved])).mean()) if moved.any() else None,
                share=float(np.sum(np.abs(lam * x)) / max(np.sum(np.abs(r - b_loss) + np.abs(lam * x)), 1e-12)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, "valid", "the split whose samples are played")
    p.add_argument("--n", type=int, default=300, help="conversations to play (default: %(default)s)")
    p.add_argument("--untrained", action="store_true",
                   help="the untrained pair (no adapter), its own teacher, as at CoARS's first step")
    p.add_argument("--out", default="", help="also write the table as JSON to this file")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be at least 1")
    try:
        loaded = load_run(Path(a.run), a.device)
    except UserError as e:
        sys.exit(f"error: {e}")
    cfg = loaded[0]
    convs = conversations(a.run, a.n, a.split, a.device, temperature=cfg.temperature,
                          trained=not a.untrained, loaded=loaded)
    table = credit_table(convs, cfg.lam if cfg.lam else 0.1, cfg.baseline)
    who = "untrained pair" if a.untrained else "trained pair"
    hits = [t["hit"] for c in convs for t in c["turns"]]
    print(f"{Path(a.run).name}, {a.split} split, {who}: {len(convs)} conversations, {len(hits)} turns, "
          f"{np.mean(hits):.3f} of them right; lam {cfg.lam if cfg.lam else 0.1}, temperature {cfg.temperature}")
    print("| agent, token kind | tokens | mean A | mean A, right item | mean A, wrong item | AUC right vs wrong "
          "| sign as R_t - mean | share of Eq. 11's weight |")
    print("|---|---|---|---|---|---|---|---|")
    f = lambda v: "-" if v is None else f"{v:+.3f}"  # noqa: E731
    g = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for k, r in table.items():
        print(f"| {k} | {r['tokens']} | {f(r['mean'])} | {f(r['mean_right'])} | {f(r['mean_wrong'])} | "
              f"{g(r['auc_right_vs_wrong'])} | {g(r['sign_as_reward'])} | {g(r['share'])} |")
    ref = reference_table(convs) if loaded[2].chat else {}
    if ref:
        print("\n| chat model: agent, kind | tokens in the reference: n, mean A | other tokens: n, mean A |")
        print("|---|---|---|")
        for k, r in ref.items():
            i, o = r["in the reference"], r["not in it"]
            print(f"| {k} | {i['tokens']}, {f(i['mean'])} | {o['tokens']}, {f(o['mean'])} |")
    if a.out:
        Path(a.out).write_text(json.dumps(dict(run=str(a.run), split=a.split, who=who, table=table,
                                               reference=ref), indent=1))


if __name__ == "__main__":
    main()
