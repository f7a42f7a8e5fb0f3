"""
Does a Hugging Face chat model answer in the format, and does it know the users? (issue 25; the
numbers of docs/huggingface-and-gpus.md). Its own file because it measures a backbone before any
training, which neither train.py nor eval.py does: train.py needs a run, eval.py a finished one.

    python tools/chat_check.py --model smollm2-135m --dataset ml-latest-small --n 100

On a fixed random subset of --n test samples (the subset eval.py --max-samples draws with the same
--seed), for the untrained pair (the base model as both agents, no adapter) and each --decoding:
  - the greedy multi-turn episodes (up to --t-max turns): Hit@1, turns, the share of valid RecAgent
    and UserAgent messages, seconds;
  - SASRec top-1's Hit@1 on the same samples (the hint the RecAgent is shown in turn 1);
  - the candidates ranked by the constrained title log-probs (eval.rank_metrics): HR@1 with the
    hint and without it (does the base know the user by itself, docs/method.md section 5), each summed
    over the title's tokens and as the per-token mean.
95% bootstrap intervals over the samples. Peak memory of the process at the end. Writes the table
and a JSON file (--out, default chat_check_<model>.json).
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from config import Config, UserError  # noqa: E402
from data.prepare import DataError, prepare  # noqa: E402
from env import DECODING  # noqa: E402
from eval import baseline_hits, mean_ci, rank_metrics, run_ars  # noqa: E402
from support.distributed import device_of  # noqa: E402
from support.runs import chat_backbone  # noqa: E402


def ci(x):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    mu, lo, hi = mean_ci(x, 1000, 0)
    return {"mean": mu, "lo": lo, "hi": hi, "n": int(len(x))}


def check(model, tok, data, rows, t_max, decodings, device, log=print):
    """{row name: {metric: ci}} on the test samples `rows` (module docstring)."""
    out = {"SASRec top-1": {"hit": ci(baseline_hits(data, "test")["SASRec top-1"][rows])}}
    for dec in decodings:
        t0 = time.time()
        _, m = run_ars(model, tok, data, "test", rows, (None, None), t_max, device, batch=tok.eval_batch, decoding=dec)
        out[f"untrained pair, --decoding {dec}"] = {k: ci(v) for k, v in m.items()} | {"seconds": time.time() - t0}
        log(f"--decoding {dec}: Hit@1 {np.mean(m['hit']):.3f}, RecAgent valid {np.nanmean(m['rec_valid']):.3f}, "
            f"UserAgent valid {np.nanmean(m['user_valid']):.3f} ({time.time() - t0:.0f} s)")
    t0 = time.time()
    for hint in (True, False):
        r = rank_metrics(model, tok, data, "test", rows, None, device, ks=(1,), batch=tok.eval_batch, hint=hint)
        name = "candidate ranking, " + ("with the hint" if hint else "no hint")
        out[name] = {"HR@1 summed": ci(r["HR@1"]), "HR@1 token mean": ci(r.get("HR@1 (token mean)", r["HR@1"]))}
    out["candidate ranking, no hint"]["seconds"] = time.time() - t0
    return out


def table(res):
    f = lambda v: "-" if v is None else f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"  # noqa: E731
    lines = ["| | Hit@1 [95% CI] | RecAgent valid | UserAgent valid | turns | seconds |", "|---|---|---|---|---|---|"]
    for name, m in res.items():
        if "hit" in m:
            g = lambda k: f"{m[k]['mean']:.3f}" if k in m else "-"  # noqa: E731
            lines.append(f"| {name} | {f(m['hit'])} | {g('rec_valid')} | {g('user_valid')} | {g('turns')} | "
                         f"{m['seconds']:.0f} |" if "seconds" in m else f"| {name} | {f(m['hit'])} | | | | |")
    lines += ["", "| candidate ranking (constrained title log-probs) | HR@1 summed | HR@1 per-token mean |", "|---|---|---|"]
    for name, m in res.items():
        if "HR@1 summed" in m:
            lines.append(f"| {name.split(', ', 1)[1]} | {f(m['HR@1 summed'])} | {f(m['HR@1 token mean'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="A Hugging Face chat model's format and knowledge before training "
                                            "(module docstring).")
    p.add_argument("--model", required=True, help="hub id, local folder, .gguf file or smollm2-135m (support/hf.py)")
    p.add_argument("--dataset", default="ml-latest-small",
                   help="the dataset, as train.py --dataset (default: %(default)s)")
    p.add_argument("--data-url", default="",
                   help="address of the raw dataset file, as train.py --data-url ('' = official)")
    p.add_argument("--data-sha256", default="", help="as train.py's")
    p.add_argument("--data-dir", default=Config.data_dir, help="as train.py's")
    p.add_argument("--n", type=int, default=100, help="test samples (a fixed random subset; 0 = all)")
    p.add_argument("--t-max", type=int, default=5,
                   help="most turns per conversation, T_max (default: %(default)s)")
    p.add_argument("--decoding", default="free,grammar", help=f"comma-separated, of {', '.join(DECODING)}")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data and the sampled subset (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--out", default="",
                   help="also write the results as JSON to this path ('' = do not)")
    a = p.parse_args(argv)
    decodings = [d for d in a.decoding.split(",") if d]
    if not decodings or any(d not in DECODING for d in decodings):
        sys.exit(f"error: --decoding {a.decoding!r}: give a comma-separated list of {', '.join(DECODING)}.")
    cfg = Config(dataset=a.dataset, data_url=a.data_url, data_sha256=a.data_sha256, data_dir=a.data_dir, model=a.model,
                 seed=a.seed)
    device = device_of(a.device)
    try:
        data = prepare(cfg.data_config())
        model, tok = chat_backbone(cfg, data, device, print)
    except (DataError, UserError) as e:
        sys.exit(f"error: {e}")
    n_test = len(data.test_user)
    rows = np.arange(n_test) if not 0 < a.n < n_test else np.sort(np.random.default_rng(a.seed).permutation(n_test)[:a.n])
    print(f"{len(rows)} test samples of {a.dataset}; device {device}; {torch.get_num_threads()} threads")
    with torch.no_grad():
        res = check(model, tok, data, rows, a.t_max, decodings, device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6       # kB -> GB (Linux)
    text = table(res) + f"\n\n{len(rows)} test samples (seed {a.seed}); peak RSS {peak:.1f} GB."
    print(text)
    out = Path(a.out or f"chat_check_{Path(a.model).name}.json")
    out.write_text(json.dumps({"model": a.model, "dataset": a.dataset, "rows": rows.tolist(), "results": res,
                               "peak_rss_gb": peak}, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
