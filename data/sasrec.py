"""
SASRec (Kang & McAuley 2018): the small self-attentive sequence model that CoARS uses for its
candidate lists, its turn-1 "prior" hint and the user embeddings that pick peers (docs/method.md
sections 1 and 2). It lives in its own file because it is a model of its own, trained on the
training split only, before and apart from the language-model agents.

Reference configuration used by the anchors (the defaults of SASRecConfig): hidden 64, 1 block,
1 head, max length 10, dropout 0.1, Adam lr 1e-3, binary cross-entropy with one sampled negative
per position, batch 256.

Items are 0-based indices; inside the model index 0 is padding, so item i is row i+1.

Its check against the SASRec paper's own protocol and numbers is tools/sasrec_check.py:
    python tools/sasrec_check.py --dataset ml-1m
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
            if p.dim() > 1:  # N(0,1) embeddings times sqrt(hidden) never recover
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq):
        """seq (B,L) of item rows (0 = padding, left-padded) -> hidden states (B,L,H)."""
        L = seq.shape[1]
        pos = self.pos_emb(torch.arange(L, device=seq.device))
        x = self.item_emb(seq) * self.cfg.hidden ** 0.5 + pos
        x = self.drop(x) * (seq > 0).unsqueeze(-1)
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).triu(1)  # True = blocked
        h = self.encoder(x, mask=causal)
        return self.ln(h) * (seq > 0).unsqueeze(-1)

    def item_vectors(self):
        """(n_items, H) embeddings of the real items (row 0, padding, dropped)."""
        return self.item_emb.weight[1:]


def left_pad(histories, maxlen):
    """list of item-index lists -> (N, maxlen) LongTensor of rows (item+1), left-padded with 0:
    row r ends with the last maxlen items of histories[r]. One scatter of all rows at once (a
    per-row tensor copy was a fifth of data preparation on ML-100K); the plain per-row loop is
    the test's reference."""
    tails = [np.asarray(h, dtype=np.int64).reshape(-1)[-maxlen:] if maxlen
             else np.zeros(0, np.int64) for h in histories]
    lens = np.array([len(t) for t in tails], dtype=np.int64)                  # (N,)
    out = np.zeros((len(histories), maxlen), dtype=np.int64)
    if lens.sum():
        rows = np.repeat(np.arange(len(tails)), lens)                         # (total,)
        ends = np.cumsum(lens)
        cols = np.arange(int(ends[-1])) - np.repeat(ends - lens,
                                                    lens) + np.repeat(maxlen - lens, lens)
        out[rows, cols] = np.concatenate(tails) + 1
    return torch.from_numpy(out)


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
    embedding of docs/method.md section 1 when the history is the user's latest items)."""
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
