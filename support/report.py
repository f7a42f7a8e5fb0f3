"""
The results table of an evaluation (eval.evaluate's results dict): results.md beside
results.json in a run's folder, and the same table printed at the end of train.py and eval.py.
Its own file because it is presentation, not a metric: eval.py computes, this writes.
"""

import json
import os
from pathlib import Path


def _fmt(d, key):
    if key not in d:
        return "-"
    v = d[key]
    if "lo" in v:
        return f"{v['mean']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}]"
    return f"{v['mean']:.3f}"


def results_table(res):
    """Markdown table of a results dict from evaluate()."""
    cols = [("Hit@1 [95% CI]", "hit"), ("turn-1 Hit@1", "hit_turn1"), ("turns", "turns"),
            ("Rec valid", "rec_valid"), ("User valid", "user_valid"),
            ("repeats a rejected item", "repeat_rejected"), ("HR@1 no hint", "HR@1 no hint"),
            ("HR@5", "HR@5"), ("NDCG@5", "NDCG@5"), ("User P", "user_precision"),
            ("User R", "user_recall"), ("User F1 [95% CI]", "user_f1")]
    # a chat model (rank_metrics)
    if any("HR@1 no hint (token mean)" in m for m in res["methods"].values()):
        cols.insert(7, ("HR@1 no hint, token mean", "HR@1 no hint (token mean)"))
    lines = ["| method | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in res["methods"].items():
        cells = []
        for _, k in cols:
            if k in m and "lo" in m[k] and k not in ("hit", "user_f1"):
                cells.append(f"{m[k]['mean']:.3f}")
            else:
                cells.append(_fmt(m, k))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ceiling = res.get("ceiling", 1.0)
    lines += ["",
              f"{res['split']} split, {res['n_samples']} samples (one per user); intervals: 95% "
              "bootstrap."
              + (f" Ceiling: the target is among the candidates in {ceiling:.3f} of the samples."
                 if ceiling < 1 else ""), "", "| paired difference | mean | 95% CI |",
              "|---|---|---|"]
    for k, v in res["paired"].items():
        lines.append(f"| {k} | {v['mean']:+.4f} | [{v['lo']:+.4f}, {v['hi']:+.4f}] |")
    if res.get("user_returns"):
        lines += ["",
                  "Constant users against the trained RecAgent (a trained UserAgent that earns no "
                  "more than a constant is gaming Eq. 8):",
                  ""] + user_returns_table(res["user_returns"])
    return "\n".join(lines)


def write_results(res, folder, name="results"):
    """<name>.json and <name>.md, each written whole and renamed (several eval.py processes sharing
    one evaluation each write them)."""
    folder = Path(folder)
    for path, text in ((folder / f"{name}.json", json.dumps(res, indent=1)),
                       (folder / f"{name}.md", results_table(res) + "\n")):
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


def user_returns_table(ret):
    """Markdown lines of user_returns' result."""
    lines = ["| UserAgent, on stage-2 samples at the training temperature | Eq. 8 return per "
             "episode [95% CI] | accepts | Hit@1 |", "|---|---|---|---|"]
    for name, r in ret.items():
        lines.append(f"| {name} | {r['mean']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | "
                     f"{r['accept']:.2f} | {r['train_hit']:.3f} |")
    return lines
