"""
SASRec against its own paper (Kang & McAuley 2018, section IV), a check of data/sasrec.py beside
the method, not part of it:

    python tools/sasrec_check.py --dataset ml-1m        # the paper: HR@10 0.8245, NDCG@10 0.5905

Each user's last item is the test target and the one before it the validation target; the model is
trained on the rest; each target is ranked against 100 items drawn uniformly from those the user
never interacted with; HR@10 and NDCG@10 with 95% bootstrap intervals over users (eval.mean_ci).
The paper's configuration: hidden 50, 2 blocks, 1 head, max length 200 for ML-1M (50 elsewhere),
dropout 0.2 (0.5 elsewhere), Adam lr 1e-3, batch 128, 200 epochs. CoARS itself uses SASRec with
its own smaller configuration (SASRecConfig's defaults) for candidates, prior and peers.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                      # `python tools/sasrec_check.py` from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.prepare import DataConfig, DataError, locate, sequences  # noqa: E402
from data.sasrec import SASRecConfig, last_hidden, train_sasrec  # noqa: E402
from eval import mean_ci  # noqa: E402


def paper_config(dataset, epochs=200):
    ml1m = dataset == "ml-1m"
    return SASRecConfig(hidden=50, blocks=2, heads=1, maxlen=200 if ml1m else 50, dropout=0.2 if ml1m else 0.5,
                        lr=1e-3, batch=128, epochs=epochs)


def hits_at(ranks, k=10):
    """ranks: 0-based rank of each target among its 101 items -> (HR@k, NDCG@k) per user."""
    ranks = np.asarray(ranks)
    hr = (ranks < k).astype(np.float64)
    return hr, np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


@torch.no_grad()
def rank_targets(model, inputs, targets, excluded, n_items, n_neg=100, seed=0):
    """0-based rank of each target among itself and n_neg uniform items outside excluded[r].
    Ties count against the target (a model that scores everything equally ranks it last)."""
    rng = np.random.default_rng(seed)
    ranks = []
    for s in range(0, len(inputs), 1024):
        h = torch.from_numpy(last_hidden(model, inputs[s:s + 1024]))
        items = []
        for r in range(s, min(s + 1024, len(inputs))):
            seen, neg = excluded[r], []
            while len(neg) < n_neg:
                i = int(rng.integers(n_items))
                if i not in seen:
                    neg.append(i)
            items.append([targets[r]] + neg)
        e = model.item_emb(torch.tensor(items) + 1)                  # (b, 101, H)
        sc = (e * h[:, None]).sum(-1)
        ranks += (sc[:, 1:] >= sc[:, :1]).sum(1).tolist()
    return np.array(ranks)


def sasrec_protocol(seqs, n_items, cfg: SASRecConfig, seed=0, n_neg=100, progress=None):
    """Train on all but each user's last two items; report validation and test HR@10 / NDCG@10
    with 95% bootstrap intervals over users. Users with fewer than 3 items are left out."""
    seqs = [np.asarray(s) for s in seqs if len(s) >= 3]
    model = train_sasrec([s[:-2] for s in seqs], n_items, cfg, seed=seed, progress=progress)
    excluded = [set(s.tolist()) for s in seqs]
    out = dict(users=len(seqs), items=n_items, negatives=n_neg, config=cfg.__dict__)
    for split, cut in (("valid", 2), ("test", 1)):
        ranks = rank_targets(model, [s[:-cut] for s in seqs], [int(s[-cut]) for s in seqs], excluded, n_items,
                             n_neg, seed + cut)
        hr, ndcg = hits_at(ranks)
        out[split] = {"HR@10": mean_ci(hr, seed=seed), "NDCG@10": mean_ci(ndcg, seed=seed)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="SASRec self-check with the SASRec paper's protocol "
                                            "(leave-one-out, 100 random negatives, HR@10 and NDCG@10).")
    p.add_argument("--dataset", required=True, help="a source name of data/prepare.py or a custom folder")
    p.add_argument("--protocol", default="sasrec", choices=["sasrec"], help="the evaluation protocol")
    p.add_argument("--data-dir", default=str(ROOT / "data"),
                   help="where raw and processed data are kept (default: %(default)s)")
    p.add_argument("--data-url", default="",
                   help="address of the raw dataset file ('' = official)")
    p.add_argument("--data-sha256", default="",
                   help="expected sha256 of the raw file ('' = official, 'none' = skip the check)")
    p.add_argument("--epochs", type=int, default=200, help="training epochs (the paper: 200)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of SASRec and of the sampled negatives (default: %(default)s)")
    p.add_argument("--out", default="", help="also write the numbers to this JSON file")
    a = p.parse_args(argv)
    if a.epochs < 1:
        sys.exit("error: --epochs must be at least 1.")
    try:
        src, raw, _, fingerprint = locate(DataConfig(dataset=a.dataset, data_dir=a.data_dir, data_url=a.data_url,
                                                     data_sha256=a.data_sha256))
        seqs, _, _, items_raw, _ = sequences(src["parse"](raw), a.dataset)
    except DataError as e:
        sys.exit(f"error: {e}")
    cfg = paper_config(a.dataset, a.epochs)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    bar = tqdm(total=cfg.epochs, desc="SASRec epochs")
    res = sasrec_protocol(seqs, len(items_raw), cfg, seed=a.seed,
                          progress=lambda e, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")))
    bar.close()
    res.update(dataset=a.dataset, raw_sha256=fingerprint, seconds=round(time.time() - t0, 1))
    print(f"{a.dataset}: {res['users']} users, {res['items']} items, {cfg.epochs} epochs, {res['seconds']} s")
    for split in ("valid", "test"):
        print(f"  {split:<5} " + "  ".join(f"{k} {m:.4f} [{lo:.4f}, {hi:.4f}]" for k, (m, lo, hi) in res[split].items()))
    if a.dataset == "ml-1m":
        print("  SASRec paper, ML-1M test: HR@10 0.8245  NDCG@10 0.5905")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
