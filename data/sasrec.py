"""
SASRec (Kang & McAuley 2018): the small self-attentive sequence model that CoARS uses for its
candidate lists, its turn-1 "prior" hint and the user embeddings that pick peers (PAPER.md
sections 1 and 2). It lives in its own file because it is a model of its own, trained on the
training split only, before and apart from the language-model agents.

Reference configuration used by the anchors (the defaults of SASRecConfig): hidden 64, 1 block,
1 head, max length 10, dropout 0.1, Adam lr 1e-3, binary cross-entropy with one sampled negative
per position, batch 256.

Items are 0-based indices; inside the model index 0 is padding, so item i is row i+1.

Run as a script, it checks itself against the SASRec paper's protocol and numbers:
    python data/sasrec.py --dataset ml-1m --protocol sasrec
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SASRecConfig:
    hidden: int = 64
    """embedding and hidden size"""
    blocks: int = 1
    """number of self-attention blocks"""
    heads: int = 1
    """attention heads"""
    maxlen: int = 10
    """longest input sequence (the agents' history length)"""
    dropout: float = 0.1
    """dropout on embeddings, attention and feed-forward"""
    lr: float = 1e-3
    """Adam learning rate"""
    batch: int = 256
    """windows per batch"""
    epochs: int = 20
    """passes over the training windows (each position is a target once per epoch)"""


class SASRec(nn.Module):
    def __init__(self, n_items, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.maxlen, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, cfg.hidden, cfg.dropout,
                                           activation="relu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(cfg.hidden)
        for name, p in self.named_parameters():  # small init as in the reference implementations;
            if p.dim() > 1:                        # N(0,1) embeddings times sqrt(hidden) never recover
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq):
        """seq (B,L) of item rows (0 = padding, left-padded) -> hidden states (B,L,H)."""
        L = seq.shape[1]
        x = self.item_emb(seq) * self.cfg.hidden ** 0.5 + self.pos_emb(torch.arange(L, device=seq.device))
        x = self.drop(x) * (seq > 0).unsqueeze(-1)
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).triu(1)  # True = blocked
        h = self.encoder(x, mask=causal)
        return self.ln(h) * (seq > 0).unsqueeze(-1)

    def item_vectors(self):
        """(n_items, H) embeddings of the real items (row 0, padding, dropped)."""
        return self.item_emb.weight[1:]


def left_pad(histories, maxlen):
    """list of item-index lists -> (N, maxlen) LongTensor of rows (item+1), left-padded with 0."""
    out = torch.zeros(len(histories), maxlen, dtype=torch.long)
    for r, h in enumerate(histories):
        h = list(h)[-maxlen:]
        if h:
            out[r, maxlen - len(h):] = torch.tensor(h) + 1
    return out


def training_windows(seqs, maxlen):
    """Cut each training sequence into windows: input s[e-L-1:e-1], targets s[e-L:e], for
    e = len(s), len(s)-L, ... so that every position after the first is a target once."""
    inputs, targets = [], []
    for s in seqs:
        for e in range(len(s), 1, -maxlen):
            lo = max(0, e - maxlen - 1)
            inputs.append(s[lo:e - 1])
            targets.append(s[lo + 1:e])
    return left_pad(inputs, maxlen), left_pad(targets, maxlen)


def train_sasrec(seqs, n_items, cfg: SASRecConfig, seed=0, progress=None):
    """Train SASRec on item sequences (lists of item indices). Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SASRec(n_items, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    inp, tgt = training_windows(seqs, cfg.maxlen)                      # (W,L) each
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(inp), generator=g)
        total = 0.0
        for s in range(0, len(inp), cfg.batch):
            b = perm[s:s + cfg.batch]
            x, pos = inp[b], tgt[b]                                       # (b,L)
            neg = torch.randint(1, n_items + 1, pos.shape, generator=g)   # one sampled negative
            h = model(x)                                                  # (b,L,H)
            pl = (h * model.item_emb(pos)).sum(-1)
            nl = (h * model.item_emb(neg)).sum(-1)
            m = pos > 0
            loss = (F.binary_cross_entropy_with_logits(pl[m], torch.ones_like(pl[m]))
                    + F.binary_cross_entropy_with_logits(nl[m], torch.zeros_like(nl[m])))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        if progress:
            progress(epoch, total / max(1, (len(inp) + cfg.batch - 1) // cfg.batch))
    model.eval()
    return model


@torch.no_grad()
def last_hidden(model, histories, batch=4096):
    """Hidden state at the last position for each history: (N, H) numpy float32 (the user
    embedding of PAPER.md section 1 when the history is the user's latest items)."""
    out = []
    for s in range(0, len(histories), batch):
        x = left_pad(histories[s:s + batch], model.cfg.maxlen)
        out.append(model(x)[:, -1].numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.hidden), np.float32)


@torch.no_grad()
def score_all(model, histories, batch=4096):
    """Yield (start, scores) blocks: scores (b, n_items) = SASRec's logit for every item as next."""
    items = model.item_vectors()
    for s in range(0, len(histories), batch):
        h = torch.from_numpy(last_hidden(model, histories[s:s + batch], batch))
        yield s, (h @ items.t()).numpy()


# --------------------------------------------------------------------------------------------------
# Self-check against the SASRec paper's own protocol (Kang & McAuley 2018, section IV): each user's
# last item is the test target and the one before it the validation target; the model is trained on
# the rest; each target is ranked against 100 items drawn uniformly from those the user never
# interacted with; HR@10 and NDCG@10. The paper reports HR@10 0.8245 / NDCG@10 0.5905 on ML-1M with
# hidden 50, 2 blocks, 1 head, max length 200 (50 elsewhere), dropout 0.2 (0.5 elsewhere), Adam
# lr 1e-3, batch 128, 200 epochs. This checks our SASRec, which CoARS uses with its own smaller
# configuration (SASRecConfig defaults) for candidates, prior and peers.


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


def bootstrap_ci(x, n=1000, seed=0):
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n, len(x)))].mean(1)
    return float(x.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


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
        out[split] = {"HR@10": bootstrap_ci(hr, seed=seed), "NDCG@10": bootstrap_ci(ndcg, seed=seed)}
    return out


def main(argv=None):
    import argparse
    import json
    import sys
    import time
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from data.prepare import DataConfig, DataError, locate, sequences
    from tqdm import tqdm

    p = argparse.ArgumentParser(description="SASRec self-check with the SASRec paper's protocol "
                                            "(leave-one-out, 100 random negatives, HR@10 and NDCG@10).")
    p.add_argument("--dataset", required=True, help="a source name of data/prepare.py or a custom folder")
    p.add_argument("--protocol", default="sasrec", choices=["sasrec"], help="the evaluation protocol")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parent))
    p.add_argument("--data-url", default="")
    p.add_argument("--data-sha256", default="")
    p.add_argument("--epochs", type=int, default=200, help="training epochs (the paper: 200)")
    p.add_argument("--seed", type=int, default=0)
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
