"""
The paper's experiment in one command: baselines, ablations, seeds, intervals, plots
(docs/method.md section 6). A file of its own because it orchestrates many training runs:

    python tools/suite.py --suite paper --dataset ml-latest-small --data-url file:///path/ml-latest-small.zip
    python tools/suite.py --suite lambda --dataset lastfm --seeds 1          # sensitivity to lambda
    python tools/suite.py --suite paper --seeds 3 --steps 50                 # any train.py option
    python tools/suite.py --suite paper --seeds 3 --full-seeds               # seeds over the whole pipeline
    python tools/suite.py --suite paper --methods coars,coars-w-o-filter     # a part of it (e.g. one per process)
    python tools/suite.py --pool out/r-s0 out/r-s1 out/r-s2                  # pool train.py runs of 3 seeds
    python tools/suite.py --pool out/a-s0 out/a-s1 --against out/b-s0 out/b-s1 --split valid   # setting A - B
    python tools/suite.py --pool out/r-s1 S/seed0/coars-seed0 --against out/a-s1 S/seed0/outcome-reward-rl-seed0 --trained
    python tools/suite.py --rows "Outcome-reward RL=out/o" "CoARS w/o self-distillation=out/l0" CoARS=out/c
                                                                   # one row per train.py run (resumed runs)

Seeds, two ways:
  --full-seeds (docs/method.md section 6: seeds cover the whole pipeline) each seed s (0 .. --seeds - 1)
      is --seed s for everything: SASRec, the candidate lists, stage 1 (its own base, kept in
      <suite dir>/seed<s>/base.pt and reused), stage 2 and the bootstrap. Every method of a seed
      meets that seed's test candidates; the users are the same in every seed, so per-user results
      are averaged over seeds and the intervals hold stage 1's variance too.
  default: the base is pretrained once (stage 1, `--seed`) and shared; the seeds (as --stage2-seed)
      vary stage 2 only (the adapters' initialisation, the training samples, the rollouts), and
      every method is evaluated on the same fixed test candidates.
Methods:
  Random, Pop, SASRec top-1         on the candidate lists (eval.baseline_hits)
  Memory-based ARS                  the base without adapters (in-episode memory only)
  SFT on stage-2 samples            [ours, reference row] the RecAgent adapter trained by cross-entropy
                                    on the same samples with the same budget (train.sft_reference)
  Outcome-reward RL                 REINFORCE on the final hit, RecAgent only, UserAgent frozen
  CoARS w/o interaction reward      outcome reward for both agents (with self-distillation)
  CoARS w/o self-distillation       lambda = 0
  CoARS w/o user co-evolution       UserAgent frozen
  CoARS w/o filter                  the filter off
  CoARS, user trained on filtered   [ours, extension] the filter spares the RecAgent only (--no-user-filter)
  CoARS                             the full method
--methods trains only the named methods (their folder names, e.g. coars, sft-on-stage-2-samples), so
that two processes can share a suite's work in one --suite-dir; the table is written by the run
that finds every method finished (run the suite once more without --methods: finished runs are
reused).
Sensitivity suites: lambda (0, 0.05, 0.1, 0.2, 0.5), alpha (0, 0.1, 0.3), tmax (1, 3, 5).

Results: Hit@1 with a 95% bootstrap interval over test samples of the per-sample hit averaged
over seeds, the spread (standard deviation) of the per-seed Hit@1, valid ratios, turn-1 Hit@1,
mean turns, UserAgent P / R / F1, training time; a paired bootstrap of CoARS (the suite's last
method) against every other method on the same samples; and, per trained method, the UserAgent's
Eq. 8 return on stage-2 samples beside the always-click and always-dislike users' (eval.user_returns). Written to <suite dir>/suite.json and
suite.md, with training curves and a bar chart as PNG when matplotlib is installed. Each finished
run keeps its results, so an interrupted suite continues where it stopped.
"""

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # `python tools/suite.py` from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from config import UserError, add_config_args, config_from, validate  # noqa: E402
from data.prepare import DataError, prepare  # noqa: E402
from eval import baseline_hits, evaluate, mean_ci, paired_diff_ci, prf, run_user_returns  # noqa: E402
from tools.bench import machine  # noqa: E402
from support.distributed import device_of  # noqa: E402
from train import backbone, sft_reference, stage2  # noqa: E402

PAPER = [
    ("Outcome-reward RL", dict(reward_mode="outcome", lam=0.0, train_user=False)),
    ("CoARS w/o interaction reward", dict(reward_mode="outcome")),
    ("CoARS w/o self-distillation", dict(lam=0.0)),
    ("CoARS w/o user co-evolution", dict(train_user=False)),
    ("CoARS w/o filter", dict(use_filter=False)),
    ("CoARS, user trained on filtered turns [ext]", dict(user_filter=False)),
    ("CoARS", dict()),
]
SUITES = {
    "paper": PAPER,
    "lambda": [(f"lambda={v}", dict(lam=v)) for v in (0.0, 0.05, 0.2, 0.5)] + [("CoARS", dict(lam=0.1))],
    "alpha": [(f"alpha={v}", dict(alpha=v)) for v in (0.0, 0.3)] + [("CoARS", dict(alpha=0.1))],
    "tmax": [(f"T_max={v}", dict(t_max=v)) for v in (1, 3)] + [("CoARS", dict(t_max=5))],
}
# What a suite changes by default on a 2-core CPU (any flag overrides it): fewer CoARS steps than a
# single run, and validation curves every 10 steps on 100 samples.
SUITE_DEFAULTS = dict(steps=20, eval_every=5, eval_valid_n=100)
CURVES = [("valid_hit", "validation Hit@1"), ("rec_reward", "RecAgent mean reward"),
          ("user_reward", "UserAgent mean reward"), ("rec_credit", "RecAgent mean token credit"),
          ("rec_valid", "RecAgent valid ratio")]


def run_variant(cfg, name, base, data, tok, device, folder, log):
    """Stage 2 from the shared base, then the test evaluation of this one agent pair. Returns the
    results dict with per-sample arrays (cached in folder: a finished run is not redone)."""
    res = done_before(cfg, folder, log)
    if res:
        return res
    (folder / "metrics.jsonl").unlink(missing_ok=True)
    model = copy.deepcopy(base)               # the shared frozen base; this run adds its own adapters
    t0 = time.time()
    model = stage2(cfg, model, tok, data, device, folder, log)
    seconds = time.time() - t0
    res = evaluate(model, tok, data, "test", cfg.t_max, device, cfg.n_boot, cfg.seed, agents=((name, ("rec", "user")),),
                   log=log, max_samples=cfg.eval_test_n, per_sample=True, decoding=cfg.decoding)
    if cfg.eval_returns_n:
        res["user_returns"] = run_user_returns(cfg, model, tok, data, device)
    return keep(res, cfg, seconds, folder)


def done_before(cfg, folder, log):
    """The results a finished run of these options left in folder (None: run it); makes folder."""
    done = folder / "results.json"
    if done.exists():
        res = json.loads(done.read_text())
        if res.get("config") == dataclasses.asdict(cfg):
            log(f"  {folder.name}: done before, reusing its results")
            return dict(res, folder=str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    return None


def keep(res, cfg, seconds, folder):
    """Write a finished run's results (with its options and training time) to folder/results.json."""
    res.update(config=dataclasses.asdict(cfg), train_seconds=round(seconds, 1), folder=str(folder))
    tmp = folder / "results.tmp"
    tmp.write_text(json.dumps(res))
    tmp.replace(folder / "results.json")
    return res


def run_sft(cfg, base, data, tok, device, folder, log):
    """The reference row 'SFT on stage-2 samples' from the shared base (train.sft_reference), then
    its test evaluation with the untrained UserAgent (cached in folder as run_variant's are)."""
    res = done_before(cfg, folder, log)
    if res:
        return res
    model = copy.deepcopy(base)
    t0 = time.time()
    sft_reference(cfg, model, tok, data, device, log)
    seconds = time.time() - t0
    res = evaluate(model, tok, data, "test", cfg.t_max, device, cfg.n_boot, cfg.seed,
                   agents=((SFT, ("sft", None)),), log=log, max_samples=cfg.eval_test_n, per_sample=True,
                   decoding=cfg.decoding)
    return keep(res, cfg, seconds, folder)


SFT = "SFT on stage-2 samples"
BASELINES = ("Random", "Pop", "SASRec top-1")      # eval.baseline_hits' rows, first in every table
UNTRAINED = BASELINES + ("Memory-based ARS", SFT)   # the rows beside a run's trained pair


def has_sft(cfg):
    """Whether the suite has the SFT reference row: --sft-reference and stage-2 steps."""
    return bool(cfg.sft_reference and cfg.steps)


def run_suite(cfg, suite, seeds, suite_dir, log=print, full_seeds=False, methods=None):
    """Train and evaluate every method of the suite for every seed; returns the summary dict.
    full_seeds: each seed is --seed (the whole pipeline: data draws, SASRec, stage 1, stage 2);
    else the seeds are stage-2 seeds over one base (module docstring). methods: the slugs of the
    methods to train (None: all); when some are left out, returns None after training the others."""
    if suite not in SUITES:
        raise UserError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}.")
    known = [slug(SFT)] * has_sft(cfg) + [slug(n) for n, _ in SUITES[suite]]
    if methods is not None:
        wrong = [m for m in methods if m not in known]
        if wrong or not methods:
            raise UserError(f"--methods: unknown method {', '.join(wrong) or '(none given)'} in suite {suite}: "
                            f"choose among {', '.join(known)}.")
    if seeds < 1:
        raise UserError("--seeds must be at least 1.")
    if not cfg.memory_row and methods is None:
        raise UserError("--no-memory-row goes with --methods: the suite's table needs the memory-based ARS "
                        "(evaluate it with the table's run, without --no-memory-row).")
    validate(cfg)
    suite_dir.mkdir(parents=True, exist_ok=True)
    device = device_of(cfg.device)
    t_base = time.time()
    per_base = []           # one entry per base: (data, memory-based ARS results, {method: [results]})
    bases = [dataclasses.replace(cfg, seed=b) for b in range(seeds)] if full_seeds else [cfg]
    for bcfg in bases:
        bdir = suite_dir / f"seed{bcfg.seed}" if full_seeds else suite_dir
        bdir.mkdir(parents=True, exist_ok=True)
        data = prepare(bcfg.data_config(), log=log)
        torch.manual_seed(bcfg.seed)
        base, tok = backbone(bcfg, data, device, bdir, log)      # built-in: cached in bdir/base.pt
        # the memory-based ARS (the base without adapters) is deterministic: evaluated once per base
        # (not with --no-memory-row, which goes with --methods: another evaluation holds it)
        mem_file = bdir / "memory_ars.json"
        if not bcfg.memory_row:
            mem = None
        elif mem_file.exists() and json.loads(mem_file.read_text()).get("config") == dataclasses.asdict(bcfg):
            mem = json.loads(mem_file.read_text())
        else:
            mem = evaluate(base, tok, data, "test", bcfg.t_max, device, bcfg.n_boot, bcfg.seed,
                           agents=(("Memory-based ARS", (None, None)),), log=log, max_samples=bcfg.eval_test_n,
                           per_sample=True, decoding=bcfg.decoding)
            mem["config"] = dataclasses.asdict(bcfg)
            mem_file.write_text(json.dumps(mem))
        runs = {}
        stage2_seeds = [-1] if full_seeds else list(range(seeds))      # -1: stage 2 takes --seed
        for s in stage2_seeds:
            tag = f"seed{bcfg.seed if s < 0 else s}"
            if has_sft(bcfg):
                scfg = dataclasses.replace(bcfg, stage2_seed=s)
                folder = (bdir if full_seeds else suite_dir) / f"sft-{tag}"
                if methods is None or slug(SFT) in methods:
                    log(f"{SFT}, {tag} -> {folder}")
                    runs.setdefault(SFT, []).append(run_sft(scfg, base, data, tok, device, folder, log))
            for name, over in SUITES[suite]:
                if methods is not None and slug(name) not in methods:
                    continue
                vcfg = dataclasses.replace(bcfg, stage2_seed=s, **over)
                validate(vcfg)
                folder = (bdir if full_seeds else suite_dir) / f"{slug(name)}-{tag}"
                log(f"{name}, {tag} -> {folder}")
                runs.setdefault(name, []).append(run_variant(vcfg, name, base, data, tok, device, folder, log))
        per_base.append((data, bcfg, mem, runs))
    base_seconds = time.time() - t_base
    if methods is not None and set(known) - set(methods):
        log(f"trained {', '.join(methods)}; the table needs every method: run the suite again without --methods "
            f"(finished runs are reused)")
        return None
    summary = summarise(per_base, cfg, seeds, suite, full_seeds)
    summary.update(suite=suite, dataset=cfg.dataset, suite_seconds=round(base_seconds, 1), device=device,
                   machine=machine(), options={k: v for k, v in dataclasses.asdict(cfg).items()})
    (suite_dir / "suite.json").write_text(json.dumps(summary, indent=1))
    (suite_dir / "suite.md").write_text(suite_table(summary) + "\n")
    plot(summary, {k: [r for _, _, _, runs in per_base for r in runs.get(k, [])] for k in per_base[0][3]},
         suite_dir, log)
    return summary


def load_results(run_dirs, split="test"):
    """The results of finished train.py runs on `split`: results.json (test, as train.py writes it)
    or results_valid.json (python eval.py --run RUN --split valid), with per-sample hits of every
    method, all on the same samples."""
    name = "results.json" if split == "test" else f"results_{split}.json"
    again = "python eval.py --run {}" + ("" if split == "test" else f" --split {split}")
    res = []
    for d in run_dirs:
        path = Path(d) if str(d).endswith(".json") else Path(d) / name     # a results file itself
        if not path.exists():
            raise UserError(f"{path} does not exist: evaluate the run with `{again.format(d)}`.")
        r = json.loads(path.read_text())
        if "per_sample" not in r or "SASRec top-1" not in r["per_sample"]:
            raise UserError(f"{path} has no per-sample results of every method: evaluate the run again "
                            f"with `{again.format(d)}`.")
        res.append(r)
    if any(r["rows"] != res[0]["rows"] for r in res):
        raise UserError(f"the runs were evaluated on different {split} samples (another dataset or --eval-test-n).")
    return res


def trained_method(r, path):
    """The trained agent pair of one run's results: "CoARS" in a train.py run; in a suite's method
    folder (e.g. <suite dir>/seed0/outcome-reward-rl-seed0) its one method."""
    if "CoARS" in r["per_sample"]:
        return "CoARS"
    names = [n for n in r["per_sample"] if n not in UNTRAINED]
    if len(names) != 1:
        raise UserError(f"{path} holds {len(names)} trained methods ({', '.join(names) or 'none'}): --trained "
                        f"needs a train.py run or one method folder of a suite.")
    return names[0]


def compare_pools(a_dirs, b_dirs, split="valid", n_boot=1000, seed=0, trained=False):
    """Runs of one setting (a_dirs, e.g. --seed 0, 1, 2) against runs of another (b_dirs, the same
    seeds): per method, the per-user hit averaged over each pool's seeds and the paired difference
    A - B with its bootstrap interval over users (the way to choose a setting on validation).
    trained: one row only, each run's trained pair (trained_method) against the other pool's, so
    train.py runs of an ablation's options and a suite's method folders can be pooled together."""
    a, b = load_results(a_dirs, split), load_results(b_dirs, split)
    if a[0]["rows"] != b[0]["rows"]:
        raise UserError(f"the two pools were evaluated on different {split} samples.")
    if trained:
        for r, d in zip(a + b, list(a_dirs) + list(b_dirs)):
            r["per_sample"]["trained pair"] = r["per_sample"][trained_method(r, d)]
        names = ["trained pair"]
    else:
        names = [n for n in a[0]["per_sample"] if all(n in r["per_sample"] for r in a + b)]
    out = {"split": split, "n_samples": len(a[0]["rows"]), "n_a": len(a), "n_b": len(b), "methods": {}}
    for n in names:
        ha = np.mean([r["per_sample"][n]["hit"] for r in a], axis=0)
        hb = np.mean([r["per_sample"][n]["hit"] for r in b], axis=0)
        mu, lo, hi = paired_diff_ci(ha, hb, n_boot, seed)
        out["methods"][n] = {"a": float(ha.mean()), "b": float(hb.mean()), "diff": {"mean": mu, "lo": lo, "hi": hi},
                             "a_per_seed": [float(np.mean(r["per_sample"][n]["hit"])) for r in a],
                             "b_per_seed": [float(np.mean(r["per_sample"][n]["hit"])) for r in b]}
    return out


def compare_table(c, a_name="A", b_name="B"):
    lines = [f"| method | Hit@1 {a_name} (per seed) | Hit@1 {b_name} (per seed) | {a_name} - {b_name} [95% CI] |",
             "|---|---|---|---|"]
    for n, m in c["methods"].items():
        per = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        d = m["diff"]
        lines.append(f"| {n} | {m['a']:.4f} ({per(m['a_per_seed'])}) | {m['b']:.4f} ({per(m['b_per_seed'])}) | "
                     f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] |")
    lines += ["", f"{c['split']} split, {c['n_samples']} users; {c['n_a']} and {c['n_b']} runs; paired bootstrap over "
              f"users of the seed-averaged hits."]
    return "\n".join(lines)


def pool_runs(run_dirs, n_boot=1000, seed=0, split="test"):
    """Pool finished train.py runs of one dataset over seeds (e.g. --seed 0, 1, 2: full-pipeline
    seeds, docs/method.md section 6) from their results.json: per method, the per-user hit averaged over
    the runs (the users are the same; each run has its own candidate draws), a bootstrap interval
    over users, the per-seed values, paired intervals of CoARS against every other method; UserAgent
    F1 per seed beside accept-all's; the UserAgent returns beside the constant users' (seed means)."""
    res = load_results(run_dirs, split)
    names = [n for n in res[0]["per_sample"] if all(n in r["per_sample"] for r in res)]
    names = [n for n in BASELINES if n in names] + [n for n in names if n not in BASELINES]
    hits = {n: np.mean([r["per_sample"][n]["hit"] for r in res], axis=0) for n in names}
    out = {"n_runs": len(res), "n_samples": len(res[0]["rows"]), "split": split, "methods": {}, "paired": {}}
    for n in names:
        mu, lo, hi = mean_ci(hits[n], n_boot, seed)
        m = {"hit": {"mean": mu, "lo": lo, "hi": hi},
             "hit_per_seed": [float(np.mean(r["per_sample"][n]["hit"])) for r in res]}
        if "f1_accept" in res[0]["per_sample"][n]:
            m["user_f1_per_seed"] = [prf(r["per_sample"][n]["f1_accept"], r["per_sample"][n]["f1_label"])[2] for r in res]
        for k in ("turns", "rec_valid", "user_valid", "HR@1 no hint"):
            if all(k in r["methods"].get(n, {}) for r in res):
                m[k] = float(np.mean([r["methods"][n][k]["mean"] for r in res]))
        out["methods"][n] = m
    for n in names:
        if n != "CoARS" and "CoARS" in hits:
            mu, lo, hi = paired_diff_ci(hits["CoARS"], hits[n], n_boot, seed)
            out["paired"][f"CoARS - {n}"] = {"mean": mu, "lo": lo, "hi": hi}
    out["accept_all_f1"] = [prf(np.ones(len(r["per_sample"]["CoARS"]["f1_label"]), bool),
                                r["per_sample"]["CoARS"]["f1_label"])[2] for r in res]
    if all(r.get("user_returns") for r in res):
        out["user_returns"] = {k: [r["user_returns"][k]["mean"] for r in res] for k in res[0]["user_returns"]}
    return out


def pool_table(p):
    """Markdown of pool_runs' result."""
    lines = [f"| method | Hit@1, mean of {p['n_runs']} seeds [95% CI] | per seed | turns | UserAgent F1 per seed |",
             "|---|---|---|---|---|"]
    for n, m in p["methods"].items():
        h = m["hit"]
        f1 = ", ".join(f"{x:.3f}" for x in m["user_f1_per_seed"]) if "user_f1_per_seed" in m else "-"
        lines.append(f"| {n} | {h['mean']:.4f} [{h['lo']:.4f}, {h['hi']:.4f}] | "
                     + ", ".join(f"{x:.3f}" for x in m["hit_per_seed"]) + " | "
                     + (f"{m['turns']:.2f}" if "turns" in m else "-") + f" | {f1} |")
    lines.append("| Accept everything (UserAgent) | | | | " + ", ".join(f"{x:.3f}" for x in p["accept_all_f1"]) + " |")
    lines += ["", f"{p.get('split', 'test')} split, {p['n_samples']} users; each seed its own data draws, SASRec, stage 1 and stage 2; "
              "interval: 95% bootstrap over users of the seed-averaged hit.", "",
              "| paired difference (Hit@1) | mean | 95% CI |", "|---|---|---|"]
    for k, v in p["paired"].items():
        lines.append(f"| {k} | {v['mean']:+.4f} | [{v['lo']:+.4f}, {v['hi']:+.4f}] |")
    if p.get("user_returns"):
        lines += ["", "| UserAgent (against the trained RecAgent, stage-2 samples) | Eq. 8 return per episode, per seed |",
                  "|---|---|"]
        for k, v in p["user_returns"].items():
            lines.append(f"| {k} | " + ", ".join(f"{x:+.3f}" for x in v) + " |")
    return "\n".join(lines)


def table_of_runs(named, n_boot=1000, seed=0):
    """The paper's table from finished train.py runs that each train one row (named: [(row name,
    run folder)], the main row last), for rows too long to train in one process (a chat model
    resumed over days): the baselines, the memory-based ARS and the SFT reference as the runs
    evaluated them (the untrained rows are the same in every run of one --out-dir: eval.py keeps
    each agent pair's results), then each run's trained pair under its row name. Per row: Hit@1 with
    a bootstrap interval over the test samples, turn-1 Hit@1, turns, the UserAgent's F1 (and the
    run's own paired interval against a UserAgent that accepts everything); paired Hit@1 intervals
    of the main row against every other row and of every trained row against the memory-based ARS;
    the UserAgent's Eq. 8 returns beside the constant users' (each run's eval.user_returns); the
    credit by token kind (each kind's part of Eq. 11's weight, self-distillation's share of the
    per-token weight: means over the run's steps in metrics.jsonl); steps, episodes, seconds.
    A name of None: a folder whose results give untrained rows only (an evaluation of the
    memory-based ARS alone, kept where the run folders of other rows were not)."""
    if not any(name for name, _ in named):
        raise UserError("--rows needs at least one NAME=RUN.")
    res = load_results([d for _, d in named])
    first = res[0]
    notes, rows, per = [], {}, {}
    # every untrained row as the first run that has it evaluated it, noted where another differs;
    # Random, Pop and SASRec top-1 are functions of the prepared data alone, so where those differ
    # the runs were evaluated on data prepared otherwise (SASRec trained again on another CPU can
    # change a suggestion) and paired differences between their rows mix in other inputs there
    for n in UNTRAINED:
        have = [(r, d) for r, (_, d) in zip(res, named) if n in r["per_sample"]]
        if not have:
            continue
        if n not in BASELINES:
            rows[n] = have[0][0]
        per[n] = np.asarray(have[0][0]["per_sample"][n]["hit"], float)
        for r, d in have[1:]:
            k = int((np.asarray(r["per_sample"][n]["hit"], float) != per[n]).sum())
            if k:
                notes.append(f"{n}: {d} differs from {have[0][1]} in {k} samples (the first is "
                             "shown)" + (": the two were evaluated on data prepared otherwise, so "
                                         "paired differences between their rows mix in other "
                                         "inputs there" if n in BASELINES else ""))
    for (name, d), r in zip(named, res):
        if name is None:
            continue
        if name in per:
            raise UserError(f"--rows: the row name {name!r} is taken; name each run's row apart.")
        m = trained_method(r, d)
        per[name] = np.asarray(r["per_sample"][m]["hit"], float)
        rows[name] = dict(r, trained=m, run=str(d))
    out = {"n_samples": len(first["rows"]), "methods": {}, "paired": {}, "notes": notes}
    for n, h in per.items():
        mu, lo, hi = mean_ci(h, n_boot, seed)
        row = {"hit": {"mean": mu, "lo": lo, "hi": hi}}
        r = rows.get(n)
        if r is not None:
            m = r.get("trained", n)
            for k in ("hit_turn1", "turns"):
                if k in r["methods"].get(m, {}):
                    row[k] = r["methods"][m][k]["mean"]
            ps = r["per_sample"][m]
            if "f1_accept" in ps:
                label = np.asarray(ps["f1_label"])
                row["user_f1"] = prf(np.asarray(ps["f1_accept"], bool), label)[2]
                row["accept_all_f1"] = prf(np.ones(len(label), bool), label)[2]
                f1 = r.get("paired", {}).get(f"{m} - Accept everything (UserAgent F1)")
                if "trained" in r and f1:
                    row["user_f1_minus_accept_all"] = f1
            if "trained" in r:
                row.update(run=r["run"], **run_training(r["run"]))
                if r.get("user_returns"):
                    row["user_returns"] = {k: v["mean"] for k, v in r["user_returns"].items()}
        out["methods"][n] = row
    trained = [name for name, _ in named if name]
    main = trained[-1]
    for n in per:
        if n != main:
            mu, lo, hi = paired_diff_ci(per[main], per[n], n_boot, seed)
            out["paired"][f"{main} - {n}"] = {"mean": mu, "lo": lo, "hi": hi}
    if "Memory-based ARS" in per:
        for name in trained[:-1]:
            mu, lo, hi = paired_diff_ci(per[name], per["Memory-based ARS"], n_boot, seed)
            out["paired"][f"{name} - Memory-based ARS"] = {"mean": mu, "lo": lo, "hi": hi}
    return out


def run_training(run_dir):
    """What a train.py run's metrics.jsonl says of its stage 2: steps, episodes, seconds (the
    steps' own, validations left out) and, as means over its steps, each token kind's part of the
    RecAgent's Eq. 11 weight (rec_credit_<kind>_weight: answer / forced / reason for a chat model,
    item / rationale for the built-in one) and self-distillation's share of each agent's weight."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    steps = [x for x in lines if x.get("stage") == 2 and "step_s" in x]
    cfg = json.loads((Path(run_dir) / "config.json").read_text()) \
        if (Path(run_dir) / "config.json").exists() else {}
    out = {"steps": len(steps), "episodes": len(steps) * cfg.get("batch", 0),
           "train_seconds": round(sum(x["step_s"] for x in steps), 1), "credit_weight": {}}
    kinds = [k for k in (steps[0] if steps else {}) if k.startswith("rec_credit_") and
             k.endswith("_weight")]
    for k in kinds + ["rec_credit_share", "user_credit_share"]:
        vals = [x[k] for x in steps if k in x]
        if vals:
            if k.endswith("_weight"):
                out["credit_weight"][k[len("rec_credit_"):-len("_weight")]] = float(np.mean(vals))
            else:
                out[k] = float(np.mean(vals))
    return out


def runs_table(t):
    """Markdown of table_of_runs' result."""
    def f(m, k, fmt="{:.3f}"):
        return fmt.format(m[k]) if k in m else "-"
    lines = ["| row | Hit@1 [95% CI] | turn-1 Hit@1 | turns | UserAgent F1 (accept all) | steps "
             "(episodes) | train s |", "|---|---|---|---|---|---|---|"]
    for n, m in t["methods"].items():
        h = m["hit"]
        f1 = f"{m['user_f1']:.3f} ({m['accept_all_f1']:.3f})" if "user_f1" in m else "-"
        steps = f"{m['steps']} ({m['episodes']})" if "steps" in m else "-"
        lines.append(f"| {n} | {h['mean']:.4f} [{h['lo']:.4f}, {h['hi']:.4f}] | {f(m, 'hit_turn1')} "
                     f"| {f(m, 'turns', '{:.2f}')} | {f1} | {steps} | {f(m, 'train_seconds', '{:.0f}')} |")
    lines += ["", f"test split, {t['n_samples']} samples, one run per trained row; interval: 95% "
              "bootstrap over samples.", "", "| paired difference | mean | 95% CI |", "|---|---|---|"]
    for k, v in t["paired"].items():
        lines.append(f"| {k} (Hit@1) | {v['mean']:+.4f} | [{v['lo']:+.4f}, {v['hi']:+.4f}] |")
    for n, m in t["methods"].items():
        if "user_f1_minus_accept_all" in m:
            v = m["user_f1_minus_accept_all"]
            lines.append(f"| {n} - accept everything (UserAgent F1) | {v['mean']:+.4f} | "
                         f"[{v['lo']:+.4f}, {v['hi']:+.4f}] |")
    rets = {n: m["user_returns"] for n, m in t["methods"].items() if "user_returns" in m}
    if rets:
        cols = list(next(iter(rets.values())))
        lines += ["", "Eq. 8 return per episode on stage-2 samples, against the row's RecAgent:", "",
                  "| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for n, r in rets.items():
            lines.append(f"| {n} | " + " | ".join(f"{r[c]:+.3f}" if c in r else "-" for c in cols)
                         + " |")
    credit = {n: m for n, m in t["methods"].items() if m.get("credit_weight")}
    if credit:
        kinds = list(next(iter(credit.values()))["credit_weight"])
        lines += ["", "Credit by token kind (means over the run's steps): each kind's part of the "
                  "RecAgent's Eq. 11 weight, and self-distillation's share of the per-token weight:",
                  "", "| row | " + " | ".join(kinds) + " | RecAgent credit share | UserAgent credit "
                  "share |", "|---" * (len(kinds) + 3) + "|"]
        for n, m in credit.items():
            lines.append(f"| {n} | " + " | ".join(f(m["credit_weight"], k) for k in kinds) + " | "
                         f"{f(m, 'rec_credit_share')} | {f(m, 'user_credit_share')} |")
    lines += [f"\nnote: {x}" for x in t["notes"]]
    return "\n".join(lines)


def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def summarise(per_base, cfg, seeds, suite, full_seeds=False):
    """One row per method: per-sample hits averaged over every run of it (every seed, and with
    full seeds every base), a bootstrap interval over samples, the spread over seeds, the other
    metrics averaged, paired differences, and the UserAgent returns beside the constant users'.
    per_base: one (data, config, memory-based ARS results, {method: [results per stage-2 seed]})
    per base (one base unless full_seeds)."""
    rows = np.array(per_base[0][2]["rows"])
    per_sample, methods = {}, {}
    for name in BASELINES:
        hits = [baseline_hits(d, "test", b.seed)[name][rows] for d, b, _, _ in per_base]
        per_sample[name] = np.mean(hits, axis=0)
        methods[name] = {"hit_per_seed": [float(h.mean()) for h in hits]}
    mems = [m for _, _, m, _ in per_base]
    per_sample["Memory-based ARS"] = np.mean([np.array(m["per_sample"]["Memory-based ARS"]["hit"]) for m in mems], axis=0)
    methods["Memory-based ARS"] = _other_metrics(mems, "Memory-based ARS")
    methods["Memory-based ARS"]["hit_per_seed"] = [float(np.mean(m["per_sample"]["Memory-based ARS"]["hit"]))
                                                   for m in mems]
    names = list(per_base[0][3])
    for name in names:
        rs = [r for _, _, _, runs in per_base for r in runs[name]]
        per_sample[name] = np.mean([np.array(r["per_sample"][name]["hit"]) for r in rs], axis=0)
        methods[name] = _other_metrics(rs, name)
        methods[name]["hit_per_seed"] = [float(np.mean(r["per_sample"][name]["hit"])) for r in rs]
        methods[name]["train_seconds"] = float(np.mean([r["train_seconds"] for r in rs]))
        rets = [r["user_returns"] for r in rs if r.get("user_returns")]
        if rets:
            methods[name]["user_returns"] = {k: float(np.mean([x[k]["mean"] for x in rets])) for k in rets[0]}
    for name, m in methods.items():
        mu, lo, hi = mean_ci(per_sample[name], cfg.n_boot, cfg.seed)
        m["hit"] = {"mean": mu, "lo": lo, "hi": hi, "seed_sd": float(np.std(m["hit_per_seed"]))}
    # the chance references (docs/method.md section 6): a 1/K pick, and a UserAgent that accepts everything
    label = np.array(mems[0]["per_sample"]["Memory-based ARS"]["f1_label"])
    p, rc, f = prf(np.ones(len(label), bool), label)
    k = 1.0 / per_base[0][0].test_cands.shape[1]
    methods = {"Chance: 1/K pick, accept everything": dict(hit={"mean": k, "lo": k, "hi": k, "seed_sd": 0.0},
                                                           user_precision=p, user_recall=rc, user_f1=f), **methods}
    main = names[-1]
    paired = {}
    for name in per_sample:
        if name != main:
            mu, lo, hi = paired_diff_ci(per_sample[main], per_sample[name], cfg.n_boot, cfg.seed)
            paired[f"{main} - {name}"] = {"mean": mu, "lo": lo, "hi": hi}
    return dict(methods=methods, paired=paired, n_samples=int(len(rows)), seeds=seeds, full_seeds=full_seeds)


def _other_metrics(results, name):
    out = {}
    for key in ("hit_turn1", "turns", "rec_valid", "user_valid"):
        vals = [r["methods"][name][key]["mean"] for r in results if key in r["methods"][name]]
        if vals:
            out[key] = float(np.mean(vals))
    p, rc, f = [], [], []
    for r in results:
        ps = r["per_sample"][name]
        if "f1_accept" in ps:
            a, b, c = prf(np.array(ps["f1_accept"], bool), np.array(ps["f1_label"]))
            p.append(a), rc.append(b), f.append(c)
    if f:
        out.update(user_precision=float(np.mean(p)), user_recall=float(np.mean(rc)), user_f1=float(np.mean(f)),
                   user_f1_seed_sd=float(np.std(f)))
    return out


def suite_table(s):
    """Markdown table and paired differences of a suite summary."""
    head = ("| method | Hit@1 [95% CI] | seed sd | turn-1 Hit@1 | turns | Rec valid | User valid | User P | "
            "User R | User F1 | train s |")
    lines = [head, "|---" * 11 + "|"]
    for name, m in s["methods"].items():
        h = m["hit"]

        def f(k, fmt="{:.3f}"):
            return fmt.format(m[k]) if k in m else "-"
        lines.append(f"| {name} | {h['mean']:.4f} [{h['lo']:.4f}, {h['hi']:.4f}] | "
                     f"{h['seed_sd']:.4f} | {f('hit_turn1')} | {f('turns', '{:.2f}')} | {f('rec_valid')} | "
                     f"{f('user_valid')} | {f('user_precision')} | {f('user_recall')} | {f('user_f1')} | "
                     f"{f('train_seconds', '{:.0f}')} |")
    seeds = (f"{s['seeds']} full-pipeline seed(s) (data draws, SASRec, stage 1, stage 2)" if s.get("full_seeds")
             else f"{s['seeds']} seed(s) of stage 2 over one shared base")
    lines += ["", f"test split, {s['n_samples']} samples; {seeds}; "
              "Hit@1 interval: 95% bootstrap over samples of the seed-averaged hit; seed sd: standard deviation "
              "of the per-seed Hit@1.", "", "| paired difference (Hit@1) | mean | 95% CI |", "|---|---|---|"]
    for k, v in s["paired"].items():
        lines.append(f"| {k} | {v['mean']:+.4f} | [{v['lo']:+.4f}, {v['hi']:+.4f}] |")
    rets = {n: m["user_returns"] for n, m in s["methods"].items() if m.get("user_returns")}
    if rets:
        cols = list(next(iter(rets.values())))
        lines += ["", "UserAgent's return per episode on stage-2 samples (training temperature), against the "
                  "method's RecAgent, seed mean; the return of the reward the method trains on: Eq. 8, the outcome "
                  "reward for --reward-mode outcome:", "", "| method | " + " | ".join(cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for n, r in rets.items():
            lines.append(f"| {n} | " + " | ".join(f"{r[c]:+.3f}" for c in cols) + " |")
    return "\n".join(lines)


def plot(summary, runs, folder, log=print):
    """training_curves.png and methods.png; without matplotlib, say how to get them."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plots skipped: matplotlib is not installed (pip install matplotlib, then run the suite again: "
            "finished runs are reused)")
        return
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for name, rs in runs.items():
        for ax, (key, title) in zip(axes, CURVES):
            series = []
            for r in rs:
                path = Path(r["folder"]) / "metrics.jsonl"
                if not path.exists():               # the SFT reference logs no stage-2 curves
                    continue
                lines = [json.loads(l) for l in path.read_text().splitlines()]
                pts = [(l["step"], l[key]) for l in lines if l.get("stage") == 2 and key in l]
                if pts:
                    series.append(pts)
            if series:
                steps = [p[0] for p in series[0]]
                vals = np.mean([[p[1] for p in s_[:len(steps)]] for s_ in series if len(s_) >= len(steps)], axis=0)
                if key != "valid_hit" and len(vals) >= 5:     # per-step values are noisy: moving mean of 5
                    vals = np.convolve(vals, np.ones(5) / 5, mode="valid")
                    steps = steps[4:]
                ax.plot(steps, vals, label=name, marker="." if key == "valid_hit" else None)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("CoARS step", fontsize=8)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "training_curves.png", dpi=110)
    plt.close(fig)
    names = list(summary["methods"])
    h = [summary["methods"][n]["hit"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(range(len(names)), [x["mean"] for x in h],
           yerr=[[x["mean"] - x["lo"] for x in h], [x["hi"] - x["mean"] for x in h]], capsize=3, color="#4878a8")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("test Hit@1 (95% CI)")
    fig.tight_layout()
    fig.savefig(folder / "methods.png", dpi=110)
    plt.close(fig)
    log(f"plots: {folder / 'training_curves.png'}, {folder / 'methods.png'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", help=f"one of {', '.join(SUITES)}")
    p.add_argument("--pool", nargs="+", metavar="RUN", help="instead of a suite: pool finished train.py runs over "
                   "their seeds (e.g. out/r-s0 out/r-s1 out/r-s2) into one table (pool_runs)")
    p.add_argument("--against", nargs="+", metavar="RUN", help="with --pool: runs of another setting on the same "
                   "seeds; prints the paired differences (the --pool runs minus these) per method (compare_pools)")
    p.add_argument("--trained", action="store_true", help="with --against: compare only each run's trained pair "
                   "(CoARS of a train.py run, or the one method of a suite's method folder)")
    p.add_argument("--rows", nargs="+", metavar="NAME=RUN", help="instead of a suite: the paper's table "
                   "from finished train.py runs, one trained row each, the main row last (e.g. 'Outcome-reward "
                   "RL=out/o' CoARS=out/c; table_of_runs); a bare RUN (or a results file, e.g. eval.py --untrained-only's) "
                   "gives its untrained rows only; --out FILE "
                   "also writes it as JSON")
    p.add_argument("--out", default="", help="with --rows: write the table's numbers to this JSON file")
    p.add_argument("--split", default="test", choices=["test", "valid"], help="with --pool: the results to read "
                   "(valid: each run's results_valid.json from `eval.py --run RUN --split valid`)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per trained method (stage 2's, or with --full-seeds "
                   "the whole pipeline's)")
    p.add_argument("--full-seeds", action="store_true", help="each seed reruns the whole pipeline (data draws, "
                   "SASRec, stage 1, stage 2), so the intervals include stage 1's variance (docs/method.md section 6)")
    p.add_argument("--suite-dir", default="", help="output folder (default: out/<dataset>-<suite>)")
    p.add_argument("--methods", default="", help="comma-separated folder names of the methods to train (e.g. "
                   "coars,sft-on-stage-2-samples; default: all); the table is written once every method is done")
    add_config_args(p, SUITE_DEFAULTS)
    a = p.parse_args(argv)
    if a.against and not a.pool:
        p.error("--against compares with the runs of --pool RUN ...")
    if a.trained and not a.against:
        p.error("--trained goes with --pool RUN ... --against RUN ...")
    if a.rows:
        try:
            named = [tuple(x.split("=", 1)) if "=" in x else (None, x) for x in a.rows]
            bad = [x for x, (n, d) in zip(a.rows, named) if n == "" or not d]
            if bad:
                raise UserError(f"--rows takes NAME=RUN (or RUN for its untrained rows only), not "
                                f"{bad[0]!r}.")
            t = table_of_runs(named)
        except (UserError, OSError, json.JSONDecodeError) as e:
            sys.exit(f"error: {e}")
        print(runs_table(t))
        if a.out:
            Path(a.out).write_text(json.dumps(t, indent=1))
        return
    if a.pool:
        try:
            if a.against:
                print(compare_table(compare_pools(a.pool, a.against, a.split, trained=a.trained), "--pool",
                                    "--against"))
            else:
                print(pool_table(pool_runs(a.pool, split=a.split)))
        except (UserError, OSError, json.JSONDecodeError) as e:
            sys.exit(f"error: {e}")
        return
    if not a.suite:
        p.error("give --suite NAME (or --pool RUN ..., or --rows NAME=RUN ...)")
    cfg = config_from(a)
    suite_dir = Path(a.suite_dir or Path(cfg.out_dir) / f"{Path(cfg.dataset).name}-{a.suite}")
    t0 = time.time()
    try:
        methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
        s = run_suite(cfg, a.suite, a.seeds, suite_dir, full_seeds=a.full_seeds, methods=methods)
    except (UserError, DataError) as e:
        sys.exit(f"error: {e}")
    if s is None:
        return
    print(suite_table(s))
    print(f"\nsuite {a.suite} on {cfg.dataset}: {time.time() - t0:.0f} s; results in {suite_dir}/suite.md, suite.json")


if __name__ == "__main__":
    main()
