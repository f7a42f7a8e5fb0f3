"""
What a run costs as the data grows (a tool beside the method, not part of it; a file of its own
because it runs the real commands at several sizes, which tools/bench.py's kernel races do not).

    python tools/scaling.py                                  # docs/benchmarks.md's scaling table
    python tools/scaling.py --sizes 610:9742:100836 6040:3706:1000209 --out scaling.json
    python tools/scaling.py --table scaling.json             # the tables again from a saved run
    python tools/scaling.py --quick --sizes 60:300:4000      # a smoke test (seconds)

Each size USERS:ITEMS:RATINGS is synthetic data in ML-1M's exact file format (data/synthetic.py),
put through the real code in fresh processes, each waited for with os.wait4, whose ru_maxrss is
that process's peak resident set:
  1. the data build alone (data.prepare.prepare with train.py's options for these flags), its
     phases from the cache's processed.json (parse, split, SASRec, the cross-fitted halves,
     candidates and prior, peers, the F1 set);
  2. python train.py on that cache with a few steps of each stage: seconds per stage-1 step and
     per stage-2 step (metrics.jsonl), the SFT reference, the test evaluation and the constant
     users' returns per sample (results.json).
SASRec runs 1 epoch per model here (--sasrec-epochs, the default run has 20): its column is per
epoch. Then, in this process, one stage-1 step of the built-in model on that data against its own
lower bound: its floating-point work (torch.utils.flop_counter) at this machine's measured
float32 matrix-product rate, for the whole step and for its output head over every item alone.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent          # `python tools/scaling.py` from anywhere
sys.path.insert(0, str(ROOT))

from tools.bench import machine, race  # noqa: E402

# (name, users, items, ratings): ml-latest-small's and Last.fm's shapes, ML-1M's, an
# Instruments-sized user count, and one well beyond ML-1M
SIZES = [("ml-latest-small-sized", 610, 9742, 100_836), ("Last.fm-sized", 1892, 17_632, 92_834),
         ("ML-1M-sized", 6040, 3706, 1_000_209), ("25k users", 24_772, 9922, 500_000),
         ("50k users, 5M ratings", 50_000, 10_000, 5_000_000)]
BUILD_PHASES = ["parse", "split", "sasrec", "sasrec_halves", "candidates_and_prior", "peers",
                "f1_set_and_arrays"]
# train.py's steps at every size: small, so the largest size fits on 2 cores
RUN_ARGS = ["--sasrec-epochs", "1", "--pretrain-steps", "12", "--pretrain-eval-every", "0",
            "--steps", "4", "--eval-every", "0", "--eval-test-n", "100", "--eval-returns-n", "24",
            "--n-boot", "100"]
# --quick (a smoke test of this script, not a measurement): fewer and smaller steps
QUICK_ARGS = ["--sasrec-epochs", "1", "--pretrain-steps", "4", "--pretrain-eval-every", "0",
              "--pretrain-batch", "8", "--pretrain-dialogues", "4", "--steps", "3", "--batch", "4",
              "--eval-every", "0", "--eval-test-n", "10", "--eval-returns-n", "4", "--n-boot", "20"]


def waited(cmd, env=None):
    """Run cmd to its end: (return code, stdout + stderr, wall seconds, peak resident MB)."""
    t = time.time()
    with tempfile.TemporaryFile("w+") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        f.seek(0)
        out = f.read()
    return p.returncode, out, time.time() - t, usage.ru_maxrss / 1024      # ru_maxrss: KB on Linux


def build_only(train_args):
    """The subprocess of step 1: build the data cache exactly as train.py would."""
    from data.prepare import prepare
    from train import parse_args
    prepare(parse_args(train_args).data_config())


def stage1_floor(train_args, repeat=3):
    """One stage-1 step of the built-in model on the cached data (the same documents as
    pretrain.stage1's loop), timed, against its float32 floating-point work at this machine's
    matrix-product rate; the same for the output head (logprobs_of over every item token) alone."""
    from torch.utils.flop_counter import FlopCounterMode

    from data.prepare import prepare
    from env import Tokenizer
    from model import build_model
    from scoring import logprobs_of
    from pretrain import dialogue_doc, lm_loss, sequence_doc, stage1_parts
    from train import parse_args
    cfg = parse_args(train_args)
    data = prepare(cfg.data_config(), log=lambda *a: None)
    tok = Tokenizer(data.n_items)
    model = build_model(cfg, tok.vocab_size, "cpu").train()
    rng = np.random.default_rng(0)
    parts, rows = stage1_parts(data, cfg.stage2_last)
    lens = np.array([max(len(p) - 1, 0) for p in parts], float)
    weights = lens / lens.sum()

    def batch():
        seqs = [sequence_doc(tok, rng, parts, weights, cfg.pretrain_window, cfg.pretrain_prefixed,
                             data.train_cands.shape[1]) for _ in range(cfg.pretrain_batch)]
        dias = [dialogue_doc(data, tok, rng, cfg, "rec" if k % 2 == 0 else "user", rows, parts)
                for k in range(cfg.pretrain_dialogues)]
        return seqs, dias

    docs = batch()

    def step():
        model.zero_grad(set_to_none=True)
        (lm_loss(model, docs[0], tok, "cpu", "fp32") + lm_loss(model, docs[1], tok, "cpu", "fp32")).backward()

    n_rows = sum(len(d) - s for d, s in docs[0]) + sum(len(d) - s for d, s in docs[1])
    d_model = model.head_weight.shape[1]
    h = torch.randn(n_rows, d_model, requires_grad=True)
    w = model.head_weight.detach().clone().requires_grad_(True)      # the head's weight, trained in stage 1
    tgt = torch.randint(0, tok.vocab_size, (n_rows,))

    def head():
        h.grad = w.grad = None
        logprobs_of(h, w, tgt).sum().backward()

    flops = {}
    for name, fn in (("step", step), ("head", head)):
        with FlopCounterMode(display=False) as fc:
            fn()
        flops[name] = fc.get_total_flops()
    a, b = torch.randn(n_rows, d_model), torch.randn(d_model, tok.vocab_size)
    sq = torch.randn(2048, 2048)
    t = race({"step": step, "head": head, "batch": batch, "mm_head": lambda: a @ b,
              "mm_2048": lambda: sq @ sq}, "cpu", repeat)
    rate = {"head_shape": 2 * n_rows * d_model * tok.vocab_size / t["mm_head"],
            "square_2048": 2 * 2048 ** 3 / t["mm_2048"]}
    peak = max(rate.values())
    return dict(vocab=tok.vocab_size, scored_rows=n_rows, step_s=t["step"], batch_s=t["batch"],
                head_s=t["head"], step_gflop=flops["step"] / 1e9, head_gflop=flops["head"] / 1e9,
                gflops={k: v / 1e9 for k, v in rate.items()},
                step_floor_s=flops["step"] / peak, head_floor_s=flops["head"] / peak)


def measure(name, users, items, ratings, work, log=print, quick=False):
    """Every column of one size (see the module docstring)."""
    from data.synthetic import make_ml1m_zip
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    z = work / "ml-1m.zip"
    t = time.time()
    sha = make_ml1m_zip(z, users, items, ratings)
    log(f"{name}: wrote {z} in {time.time() - t:.0f} s")
    data_args = ["--dataset", "ml-1m", "--data-url", z.as_uri(), "--data-sha256", sha,
                 "--data-dir", str(work / "data")]
    steps = QUICK_ARGS if quick else RUN_ARGS
    args = data_args + steps + ["--out-dir", str(work / "out"), "--run-name", "run"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    code, out, wall, rss = waited([sys.executable, __file__, "--build-only", "--"] + args, env)
    if code:
        raise SystemExit(f"error: the data build of {name} failed:\n{out[-3000:]}")
    meta = json.loads((work / "data" / "ml-1m" / "processed.json").read_text())
    row = dict(name=name, users=users, items=items, ratings=ratings,
               interactions=meta["n_interactions"], train_samples=meta["samples"]["train"],
               build_s=wall, build_rss_mb=rss, build_phase_s=meta["phase_s"])
    log(f"{name}: data built in {wall:.0f} s, peak {rss:.0f} MB: {meta['phase_s']}")
    code, out, wall, rss = waited([sys.executable, "train.py"] + args, env)
    if code:
        raise SystemExit(f"error: train.py on {name} failed:\n{out[-3000:]}")
    run_dir = work / "out" / "run"
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    s1 = [r for r in recs if r["stage"] == 1 and "seconds" in r]
    s2 = [r["step_s"] for r in recs if r["stage"] == 2 and "step_s" in r][1:]   # the first warms up
    res = json.loads((run_dir / "results.json").read_text())
    times = res["timing_s"]
    row.update(run_s=wall, run_rss_mb=rss, timing_s=times,
               stage1_step_s=(s1[-1]["seconds"] - s1[0]["seconds"]) / (s1[-1]["step"] - s1[0]["step"]),
               stage2_step_s=float(np.mean(s2)), eval_samples=res["n_samples"],
               eval_per_sample_s=times["test_evaluation"] / res["n_samples"],
               returns_per_sample_s=times.get("constant_users_returns", 0.0)
               / int(steps[steps.index("--eval-returns-n") + 1]))
    log(f"{name}: train.py in {wall:.0f} s, peak {rss:.0f} MB; stage 1 {row['stage1_step_s']:.2f} s/step, "
        f"stage 2 {row['stage2_step_s']:.2f} s/step, evaluation {row['eval_per_sample_s']:.3f} s/sample")
    row["floor"] = stage1_floor(args)
    f = row["floor"]
    log(f"{name}: stage-1 step {f['step_s']:.3f} s against a floor of {f['step_floor_s']:.3f} s; "
        f"head {f['head_s']:.3f} s against {f['head_floor_s']:.3f} s")
    return row


def table(res):
    """docs/benchmarks.md's tables from a saved run."""
    out = [f"Machine: {res['machine']}; `{res['command']}`.", "",
           "| data | users | items | interactions | training samples | parse s | split s | SASRec s/epoch "
           "| halves s/epoch | candidates + prior s | peers s | F1 set s | build peak GB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        p = r["build_phase_s"]
        out.append(f"| {r['name']} | {r['users']:,} | {r['items']:,} | {r['interactions']:,} | "
                   f"{r['train_samples']:,} | " + " | ".join(f"{p[k]:.1f}" for k in BUILD_PHASES)
                   + f" | {r['build_rss_mb'] / 1024:.2f} |")
    out += ["", "| data | stage 1 s/step | stage 2 s/step | SFT reference s | evaluation s/sample "
            "| constant users s/sample | train.py peak GB | stage-1 step: measured / floor s "
            "| head: measured / floor s | head share of step |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        f, t = r["floor"], r["timing_s"]
        out.append(f"| {r['name']} | {r['stage1_step_s']:.2f} | {r['stage2_step_s']:.2f} | "
                   f"{t.get('SFT_reference', 0):.0f} | {r['eval_per_sample_s']:.3f} | "
                   f"{r['returns_per_sample_s']:.3f} | {r['run_rss_mb'] / 1024:.2f} | "
                   f"{f['step_s']:.3f} / {f['step_floor_s']:.3f} | {f['head_s']:.3f} / "
                   f"{f['head_floor_s']:.3f} | {f['head_s'] / f['step_s']:.0%} |")
    out += ["", "Matrix-product rate (float32): " + "; ".join(
        f"{r['name']}: {r['floor']['gflops']['square_2048']:.0f} GFLOP/s at 2048 x 2048, "
        f"{r['floor']['gflops']['head_shape']:.0f} at the head's shape ({r['floor']['scored_rows']} x "
        f"{r['floor']['vocab']})" for r in res["rows"][:1])]
    return "\n".join(out)


def parse_size(s):
    try:
        users, items, ratings = (int(x) for x in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not USERS:ITEMS:RATINGS (three integers)")
    if min(users, items, ratings) < 1 or ratings < 20 * users or items < 60:
        raise argparse.ArgumentTypeError(f"{s}: needs at least 20 ratings a user and 60 items")
    return (f"{users:,} users", users, items, ratings)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--build-only"]:                       # step 1's subprocess (measure)
        return build_only(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    p = argparse.ArgumentParser(description="What a run costs as the data grows (see the module docstring).")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=None, metavar="USERS:ITEMS:RATINGS",
                   help="the sizes to measure (default: the five of docs/benchmarks.md)")
    p.add_argument("--work", default="", help="folder for the synthetic data and runs (default: a temporary one)")
    p.add_argument("--out", default="", help="write every number to this JSON file")
    p.add_argument("--table", default="", metavar="JSON", help="print the tables of a saved run and stop")
    p.add_argument("--quick", action="store_true", help="fewer, smaller steps: a smoke test, not a measurement")
    a = p.parse_args(argv)
    if a.table:
        try:
            print(table(json.loads(Path(a.table).read_text())))
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"error: {a.table} is not a saved scaling run ({e}).")
        return
    if a.out and not Path(a.out).resolve().parent.is_dir():
        p.error(f"--out {a.out}: its folder does not exist; create it first")
    sizes = a.sizes or SIZES
    res = dict(machine=machine(), command="python " + " ".join(["tools/scaling.py"] + argv), rows=[])
    print(res["machine"])
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, users, items, ratings) in enumerate(sizes):
            work = Path(a.work or tmp) / f"size{k}"
            res["rows"].append(measure(name, users, items, ratings, work, quick=a.quick))
            if a.out:                                   # after every size: a stop keeps what is done
                part = Path(a.out + ".part")
                part.write_text(json.dumps(res, indent=1))
                part.replace(a.out)
    print(table(res))


if __name__ == "__main__":
    main()
