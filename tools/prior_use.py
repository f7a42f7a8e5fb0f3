"""
How the RecAgent uses the SASRec prior its turn-1 prompt shows it (docs/method.md section 2).

    python tools/prior_use.py --run out/ml-latest-small --split valid

For every sample of the split, the RecAgent's first pick (the top candidate by the logit of its
item token at the answer position, which is what greedy decoding under the grammar names) is taken
twice: from the prompt with the prior and from the same prompt without it (its own ranking). The
table says how often each pick is the prior, separately where the prior is right and where it is
wrong, and the Hit@1 of the prior, of the agent's own ranking, of the hinted pick and of the better
of the first two per sample (an upper bound on what combining them could give). A RecAgent that
used the prior would follow it more where it is right than where it is wrong, and more than its
own ranking already agrees with it. The first pick is under the run's own --prior-weight;
--weights 0,0.5,1,2 adds the first pick's Hit@1 under each weight (the validation sweep that chooses
--prior-weight, docs/results.md). --gate asks whether a per-sample weight could do better than one
weight for all: a weight exp(theta . f) of the sample's confidences f (both opinions' entropies and
top probabilities, whether their tops agree) and a temperature of the agent's own logits, fitted on
the validation split by maximum likelihood of the target, then measured on --split (the untrained
agent; fit_gate). Works on a finished run (support/runs.load_run), or with --checkpoint on a run
still training (its newest stage-2 checkpoint): the untrained agent (the adapter-free base) and the
trained RecAgent (after a run of --steps 0, the two are the same). A chat model (--model) ranks by the
log-prob of each candidate's title under its grammar (support/chat.chat_candidate_scores, what
eval.rank_metrics ranks by); --max-samples N measures the first N samples stage 2 validates on
(N = the run's --eval-valid-n: the very samples of its validation curve), e.g. a SmolLM2 pilot:

    python tools/prior_use.py --run out/smol-pilot --checkpoint --max-samples 48
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from anywhere

import numpy as np  # noqa: E402

from config import UserError  # noqa: E402
from env import new_trajectory  # noqa: E402
from eval import mean_ci, validation_samples  # noqa: E402
from scoring import next_token_scores  # noqa: E402
from support.chat import chat_candidate_scores  # noqa: E402
from support.distributed import device_of  # noqa: E402
from support.runs import add_run_args, load_run  # noqa: E402


def first_scores(model, tok, data, split, rows, adapter, device, hint, batch=256):
    """(N,20) each sample's RecAgent logits of its candidates' item tokens at the answer position,
    untilted (the --prior-weight tilt is added by the caller), from the prompt with or without the
    prior; for a chat model the log-prob of each candidate's title (chat_candidate_scores)."""
    model.set_adapter(adapter)
    out = []
    for s in range(0, len(rows), batch):
        trajs = [new_trajectory(data, split, r) for r in rows[s:s + batch]]
        for tr in trajs:
            tr.prior = tr.prior if hint else None
        prompts = [tok.render_rec(tr, 0) for tr in trajs]
        if tok.chat:
            z = chat_candidate_scores(model, tok, trajs, prompts, device)[0]
        else:
            z = next_token_scores(model, prompts, [[tok.item(c) for c in tr.cands] for tr in trajs],
                                  tok.pad_id, device)
        out.append(z.double().cpu().numpy())
    model.set_adapter(None)
    return np.concatenate(out)


def split_prior_lp(data, split):
    """(N,20) SASRec's log-softmax over each sample's candidates in `split`, or a UserError when
    the run's data cache is from before --prior-weight and has none."""
    lp = getattr(data, f"{split}_prior_lp", None)
    if lp is None:
        raise UserError("this run's data carry no SASRec scores of the candidates (a cache from "
                        "before --prior-weight): delete its processed.json to rebuild it.")
    return lp


def validated_rows(cfg, data, split, n):
    """The split's samples measured: on validation the first n in stage 2's validation order
    (eval.validation_samples: the run's --eval-valid-n of them are its validation curve's); on
    test the first n of the same seeded order of the test split; all, in order, for n = 0."""
    total = len(getattr(data, f"{split}_user"))
    if not n:
        return np.arange(total)
    if split == "valid":
        return validation_samples(cfg, data, [], n)[0]
    return np.random.default_rng(cfg.seed).permutation(total)[:n]


def prior_use(model, tok, data, split, adapter, device, n_boot=1000, weights=(), rows=None):
    """The measurements of the module docstring, as a dict of (mean, lo, hi) or counts. The first
    pick is under the run's own --prior-weight (tok.prior_weight); weights: also the Hit@1 of the
    first pick under each of these weights instead (the validation sweep of --prior-weight). rows:
    the samples of the split (default all)."""
    rows = np.arange(len(getattr(data, f"{split}_user"))) if rows is None else np.asarray(rows)
    target, prior = getattr(data, f"{split}_target")[rows], getattr(data, f"{split}_prior")[rows]
    cands = getattr(data, f"{split}_cands")[rows]
    # SASRec's scores: required by a tilt or a sweep; zeros for an old cache that needs neither
    w0 = getattr(tok, "prior_weight", 0.0)   # the run's tilt; a chat model has none
    old_cache = getattr(data, f"{split}_prior_lp", None) is None
    lp = (np.zeros(cands.shape) if old_cache and not (weights or w0)
          else split_prior_lp(data, split)[rows])
    z = first_scores(model, tok, data, split, rows, adapter, device, True)
    pick = lambda w: cands[np.arange(len(rows)), (z + w * lp).argmax(1)]  # noqa: E731
    hinted = pick(w0)
    own = cands[np.arange(len(rows)),
                first_scores(model, tok, data, split, rows, adapter, device, False).argmax(1)]
    right = prior == target
    ci = lambda x: mean_ci(x, n_boot)  # noqa: E731
    out = {"samples": int(len(rows)), "prior right": float(right.mean()),
           "first pick = prior | prior right": ci(hinted[right] == prior[right]),
           "first pick = prior | prior wrong": ci(hinted[~right] == prior[~right]),
           "own ranking = prior | prior right": ci(own[right] == prior[right]),
           "own ranking = prior | prior wrong": ci(own[~right] == prior[~right]),
           "first pick = own ranking": ci(hinted == own),
           "Hit@1 SASRec prior": ci(right),
           "Hit@1 own ranking (no hint)": ci(own == target),
           "Hit@1 first pick (with the prior)": ci(hinted == target),
           "Hit@1 better of prior and own, per sample (bound)": ci((own == target) | right)}
    for w in weights:
        hit = (pick(w) == target).astype(float)
        out[f"Hit@1 first pick, --prior-weight {w:g}"] = ci(hit)
        # paired (the same samples): the question is whether the pick beats both of its sources
        out[f"  --prior-weight {w:g} minus SASRec prior (paired)"] = ci(hit - right)
        out[f"  --prior-weight {w:g} minus own ranking (paired)"] = ci(hit - (own == target))
    return out


# --------------------------------------------------------------------------------------------------
# A per-sample weight of the prior, fitted on validation (--gate)


def log_softmax(x):
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def gate_features(z, lp):
    """(N,6) a constant and, per sample, the entropy and top probability of the agent's opinion
    (log-softmax of its logits z) and of SASRec's (lp), and whether their tops agree."""
    lz = log_softmax(z)
    pz, pl = np.exp(lz), np.exp(lp)
    return np.stack([np.ones(len(z)), -(pz * lz).sum(1), -(pl * lp).sum(1), pz.max(1), pl.max(1),
                     (z.argmax(1) == lp.argmax(1)).astype(float)], 1)


def standardised(f, mu, sd):
    """gate_features f with every column but the constant standardised by (mu, sd)."""
    return np.concatenate([f[:, :1], (f[:, 1:] - mu) / sd], 1)


def fit_gate(z, lp, y, iters=200):
    """The gate's parameters on samples of logits z (N,K), SASRec log-probs lp (N,K) and target
    columns y (N,): theta (6,) and a, the scores being exp(a) z + exp(theta . f) lp with f the
    standardised gate_features, fitted by L-BFGS on the cross-entropy of the target."""
    import torch
    f = gate_features(z, lp)
    mu, sd = f[:, 1:].mean(0), f[:, 1:].std(0) + 1e-9
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    fn = t(standardised(f, mu, sd))                                     # (N,6)
    zt, lt, yt = t(z), t(lp), torch.tensor(y)
    theta = torch.zeros(f.shape[1], dtype=torch.float64, requires_grad=True)
    a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta, a], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        scores = a.exp() * zt + (fn @ theta).exp()[:, None] * lt          # (N,K)
        loss = torch.nn.functional.cross_entropy(scores, yt)
        loss.backward()
        return loss
    opt.step(closure)
    return dict(theta=theta.detach().numpy(), a=float(a.detach()), mu=mu, sd=sd)


def gate_scores(gate, z, lp):
    """(scores (N,K), the per-sample weight of lp relative to the agent's logits (N,))."""
    w = np.exp(standardised(gate_features(z, lp), gate["mu"], gate["sd"]) @ gate["theta"])
    return np.exp(gate["a"]) * z + w[:, None] * lp, w / np.exp(gate["a"])


def gate_table(model, tok, data, split, device, n_boot=1000):
    """--gate: the untrained agent's first pick under a gate fitted on the validation split,
    measured on `split`, beside SASRec and the run's one weight (paired, the same samples)."""
    def arrays(sp):
        rows = np.arange(len(getattr(data, f"{sp}_user")))
        cands, target = getattr(data, f"{sp}_cands")[rows], getattr(data, f"{sp}_target")[rows]
        lp = split_prior_lp(data, sp)[rows]
        z = first_scores(model, tok, data, sp, rows, None, device, True)
        return z, lp, (cands == target[:, None]).argmax(1)
    gate = fit_gate(*arrays("valid"))
    z, lp, y = arrays(split)
    scores, w = gate_scores(gate, z, lp)
    hit = (scores.argmax(1) == y).astype(float)
    fixed = ((z + tok.prior_weight * lp).argmax(1) == y).astype(float)
    prior = (lp.argmax(1) == y).astype(float)
    ci = lambda x: mean_ci(x, n_boot)  # noqa: E731
    return {"samples": int(len(y)), "gate weight, 10/50/90% of samples":
            [float(q) for q in np.quantile(w, [0.1, 0.5, 0.9])],
            "Hit@1 gate (fitted on valid)": ci(hit),
            f"Hit@1 --prior-weight {tok.prior_weight:g}": ci(fixed),
            "Hit@1 SASRec prior": ci(prior), "gate minus SASRec (paired)": ci(hit - prior),
            f"gate minus --prior-weight {tok.prior_weight:g} (paired)": ci(hit - fixed)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, "valid", "the split measured")
    p.add_argument("--out", default="", help="also write the table as JSON to this file")
    p.add_argument("--weights", default="",
                   help="comma-separated --prior-weight values: the first pick's Hit@1 under each "
                        "(e.g. 0,0.5,1,2; the choice of --prior-weight on validation)")
    p.add_argument("--checkpoint", action="store_true",
                   help="a run still training: the adapters of its newest stage-2 checkpoint")
    p.add_argument("--max-samples", type=int, default=0,
                   help="the first N samples in stage 2's validation order (0 = the whole split)")
    p.add_argument("--gate", action="store_true",
                   help="instead: a per-sample weight fitted on the validation split, measured on "
                        "--split (the untrained agent)")
    a = p.parse_args(argv)
    run = Path(a.run)
    try:
        if a.max_samples < 0:
            raise UserError(f"--max-samples must be 0 (all) or a count, not {a.max_samples}.")
        cfg, model, tok, data = load_run(run, a.device, checkpoint=a.checkpoint, log=print)
        if tok.chat and (a.gate or a.weights):
            raise UserError("--gate and --weights weigh the built-in model's item logits against "
                            "SASRec's; this run used --model (a chat model has no tilt).")
    except UserError as e:
        sys.exit(f"error: {e}")
    device = device_of(a.device)
    if a.gate:
        try:
            g = gate_table(model, tok, data, a.split, device)
        except UserError as e:
            sys.exit(f"error: {e}")
        print(f"| {run.name}, {a.split} split, untrained RecAgent | |\n|---|---|")
        for k, c in g.items():
            sign = "+" if "minus" in k else ""
            cell = (f"{c[0]:{sign}.3f} [{c[1]:{sign}.3f}, {c[2]:{sign}.3f}]" if isinstance(c, tuple)
                    else ", ".join(f"{x:.2f}" for x in c) if isinstance(c, list) else str(c))
            print(f"| {k} | {cell} |")
        if a.out:
            Path(a.out).write_text(json.dumps(g, indent=1))
        return
    agents = [("untrained RecAgent", None), ("CoARS RecAgent", "rec")]
    try:
        weights = [float(w) for w in a.weights.split(",") if w.strip()]
        rows = validated_rows(cfg, data, a.split, a.max_samples)
        table = {name: prior_use(model, tok, data, a.split, ad, device, weights=weights, rows=rows)
                 for name, ad in agents}
    except ValueError:
        sys.exit(f"error: --weights must be comma-separated numbers, not {a.weights!r}.")
    except UserError as e:
        sys.exit(f"error: {e}")
    keys = list(next(iter(table.values())))
    print(f"| {run.name}, {a.split} split | " + " | ".join(n for n, _ in agents) + " |")
    print("|---" * (len(agents) + 1) + "|")
    for k in keys:
        cells = [v[k] for v in table.values()]
        print(f"| {k} | " + " | ".join(f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]" if isinstance(c, tuple)
                                       else (f"{c:.3f}" if isinstance(c, float) else str(c)) for c in cells) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
