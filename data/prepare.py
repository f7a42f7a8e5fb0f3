"""
Datasets for CoARS (docs/method.md sections 1 and 6): download, verify, parse, split, SASRec
candidates, SASRec prior, peers, and a cache in plain NPZ + JSON.

    python data/prepare.py --dataset ml-latest-small --data-url file:///path/to/ml-latest-small.zip
    python data/prepare.py --dataset lastfm --stats   # the processed data's statistics
    python data/prepare.py --dataset ml-1m            # downloads the official GroupLens zip

train.py calls prepare() itself when the processed data is missing or was built with other options.
Reading each source's raw files (formats, checksums, downloads) is in data/sources.py; everything
after parsing is the same for every source and is here.

The protocol ([ours] where docs/method.md section 1 marks it so):
  - Each user's interactions sorted by (timestamp, item id): ties in time are broken by item id so
    the order is deterministic. Repeated (user, item) events keep the first.
  - Leave-one-out: last item = test target, the one before = validation target, the rest = the
    training part. A sample's history is the <= 10 items before its target; samples with < 3
    history items are dropped. Training samples are all positions of every training part.
  - SASRec (data/sasrec.py) is trained on the training parts only. Candidates (docs/method.md
    section 1), shuffled with the seed: "random" (default), the target plus 19 items drawn uniformly
    from those not in the history (the AFL / LLaRA protocol); or "sasrec", SASRec's 20
    highest-scoring items not in the history as they are, the target NOT forced in (where SASRec
    missed it no agent can hit; meta["ceiling"] is the share of samples whose target is among the
    20). Never the target plus SASRec's 19 favourites: that makes the target the odd one out. The
    prior is SASRec's highest-scoring candidate.
  - [ours] Cross-fitting: training samples get their candidates and prior from a SASRec trained on
    the OTHER half of the users. A SASRec that was trained on a position ranks that position's
    target first far more often than it ever will at test time; agents trained on such lists
    would learn to trust the prior more than it deserves. Validation and test use the SASRec
    trained on all users' training parts.
  - Peers: the 5 other users nearest by cosine of SASRec user embeddings (hidden state after the
    user's last <= 10 training items); weights = positive similarities normalised to sum 1.
  - UserAgent F1 set [ours, after AFL]: per user, history = the validation sample's history,
    positives = the user's held-out future (validation and test items: with leave-one-out that is
    all the future there is, so at most 2 of the "up to 10"), as many negatives drawn uniformly
    from items the user never touched.
"""

import argparse
import json
import os
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make `data.sasrec` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.sasrec import SASRecConfig, last_hidden, score_all, train_sasrec  # noqa: E402
# the raw files of every source (data/sources.py) and getting them (data/fetch.py); Raw, the parsers
# and probe_writable are re-exported
from data.fetch import is_custom, locate, probe_writable  # noqa: E402,F401
from data.sources import (SOURCES, DataError, Parsed, Raw, parse_lastfm,  # noqa: E402,F401
                          parse_ml100k)

CACHE_VERSION = 5
DATA_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------------
# Options and the processed dataset


@dataclass
class DataConfig:
    dataset: str = "ml-latest-small"
    """name of a dataset in SOURCES"""
    data_dir: str = str(DATA_DIR)
    """folder that holds <dataset>/ (downloads and the processed cache)"""
    data_url: str = ""
    """where to download the raw zip from ('' = the official address; file:// works)"""
    data_sha256: str = ""
    """expected sha256 of the raw zip ('' = the official file's; 'none' = do not check)"""
    candidates: str = "random"
    """'random': target + 19 uniform non-history items; 'sasrec': SASRec's top-20 non-history items
    (target not forced)"""
    n_candidates: int = 20
    """candidate list length, target included"""
    train_prior: str = "crossfit"
    """[ours, docs/method.md section 5] the SASRec that gives training samples their candidates
    (with 'sasrec' candidates) and their prior: 'crossfit' (one trained on the other half of the
    users, so the hint is no better on training samples than at test time) or 'full' (the SASRec of
    validation and test, which trained on those samples)"""
    history: int = 10
    """longest history shown to the agents"""
    min_history: int = 3
    """samples with fewer history items are dropped"""
    n_peers: int = 5
    """peers per user"""
    f1_max_pos: int = 10
    """most positives per user in the UserAgent F1 set"""
    seed: int = 0
    """seed for SASRec, candidate shuffling and the F1 negatives"""
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)


class Data:
    """The processed dataset: numpy arrays as attributes, plus meta (dict) and titles (list).

    Per split s in ("train", "valid", "test"): s_user (N,), s_hist (N, history) right-padded with
    -1, s_target (N,), s_cands (N, n_candidates), s_prior (N,), s_prior_lp (N, n_candidates)
    float32: the log-softmax of SASRec's scores over the candidates, in s_cands' order (the SASRec
    that gave the prior; --prior-weight, docs/method.md section 2). Also: seq_ptr / seq_items /
    seq_rating (training parts of all users, CSR), peers / peer_w (U, k), item_vec (I, 64) SASRec
    item embeddings, item_pop (I,), f1_user / f1_hist / f1_item / f1_label."""

    def __init__(self, arrays, meta):
        self.__dict__.update(arrays)
        self.array_names = sorted(arrays)      # what support/checkpoint.prepared_digest covers
        self.meta = meta
        self.titles = list(arrays["titles"])
        self.n_items = int(meta["n_items"])
        self.n_users = int(meta["n_users"])
        self.has_ratings = bool(meta["has_ratings"])
        self._train_sets = None

    def history(self, split, r):
        h = getattr(self, f"{split}_hist")[r]
        return h[h >= 0].tolist()

    def train_items(self, u):
        """Item indices in user u's training part, in time order."""
        return self.seq_items[self.seq_ptr[u]:self.seq_ptr[u + 1]]

    def train_sets(self):
        """One {item: rating} dict per user (training part), built once, for peer look-ups."""
        if self._train_sets is None:
            ratings = [self.seq_rating[self.seq_ptr[u]:self.seq_ptr[u + 1]].tolist()
                       for u in range(self.n_users)]
            self._train_sets = [dict(zip(self.train_items(u).tolist(), ratings[u]))
                                for u in range(self.n_users)]
        return self._train_sets


def stage2_rows(data, n_last):
    """Rows of the training split that stage 2 trains on: each user's last n_last training samples.
    (data/prepare.py writes the training rows user by user, each user's in time order.)"""
    u = data.train_user                                                   # (N,) sorted
    last_row = np.searchsorted(u, u, side="right") - 1  # (N,) last row of each row's user
    return np.flatnonzero(last_row - np.arange(len(u)) < n_last)


def _options(cfg: DataConfig):
    d = asdict(cfg)
    for k in ("data_dir", "data_url", "data_sha256"):
        d.pop(k)
    return d


def peer_weights(sim, k):
    """Each user's k most similar users (sim: (U,U) cosine similarities, -inf on the diagonal) and
    their weights w_j (docs/method.md section 2): negative similarities count as 0, the rest are
    normalised to sum to 1, and a user whose k similarities are all <= 0 weighs them equally."""
    peers = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return peers, _weights(np.take_along_axis(sim, peers, 1), k)


def _weights(top, k):
    w = np.maximum(top, 0)
    return np.where(w.sum(1, keepdims=True) > 0, w / np.maximum(w.sum(1, keepdims=True), 1e-12),
                    1.0 / max(k, 1))


def nearest_peers(emb, is_peer, k, chunk=1024):
    """peer_weights of the cosine similarities of the unit rows of emb (a user is never its own
    peer; only users with is_peer are peers), without the (U,U) matrix: `chunk` rows at a time,
    and per row only the entries at least its k-th largest are sorted (ties broken by the lower
    index, as peer_weights' stable sort does). Memory O(chunk x U) instead of O(U^2)."""
    n = len(emb)
    peers, w = np.zeros((n, k), np.int64), np.zeros((n, k), np.float64)
    for s in range(0, n, chunk):
        sim = emb[s:s + chunk] @ emb.T                                  # (c, U)
        sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -np.inf
        sim[:, ~is_peer] = -np.inf
        kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]              # each row's k-th largest
        for i, row in enumerate(sim):
            idx = np.flatnonzero(row >= kth[i])                         # ascending: stable ties
            peers[s + i] = idx[np.argsort(-row[idx], kind="stable")[:k]]
        w[s:s + len(sim)] = _weights(np.take_along_axis(sim, peers[s:s + len(sim)], 1), k)
    return peers, w


def prepare(cfg: DataConfig, log=print, rebuild=False) -> Data:
    """Load the processed dataset from the cache, or build it (download + parse + SASRec + ...)."""
    if cfg.candidates not in ("sasrec", "random"):
        raise DataError(f"--candidates must be 'sasrec' or 'random', not {cfg.candidates!r}.")
    if cfg.train_prior not in ("crossfit", "full"):
        raise DataError(f"--train-prior must be 'crossfit' or 'full', not {cfg.train_prior!r}.")
    src, raw, folder, fingerprint = locate(cfg, log)
    meta_path, npz_path = folder / "processed.json", folder / "processed.npz"
    want = dict(version=CACHE_VERSION, options=_options(cfg), raw_sha256=fingerprint)
    if not rebuild and meta_path.exists() and npz_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if all(meta.get(k) == v for k, v in want.items()):
                with np.load(npz_path, allow_pickle=False) as z:
                    return Data({k: z[k] for k in z.files}, meta)
            log(f"{meta_path} was built with other options or data: rebuilding")
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
            log(f"{npz_path} is unreadable ({e}): rebuilding")
    t0 = time.time()
    parsed = src["parse"](raw)
    t_parse = time.time() - t0
    arrays, meta = build(parsed, cfg, log)
    meta["phase_s"] = dict(parse=round(t_parse, 2), **meta["phase_s"])
    meta.update(want)
    meta["dataset"] = cfg.dataset
    write_cache(folder, arrays, meta)
    return Data(arrays, meta)


def write_cache(folder: Path, arrays, meta):
    """Write the arrays, then the JSON that vouches for them: a crash or a full disk between the two
    leaves no JSON, and prepare() does not trust an NPZ without its JSON."""
    meta_path, npz_path = folder / "processed.json", folder / "processed.npz"
    tmp = folder / "processed.tmp.npz"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, npz_path)
        part = meta_path.with_suffix(".json.part")
        part.write_text(json.dumps(meta, indent=1))
        os.replace(part, meta_path)
    except OSError as e:
        for f in (tmp, meta_path.with_suffix(".json.part")):
            f.unlink(missing_ok=True)
        raise DataError(f"cannot write the processed data to {folder} ({e.strerror or e}): free "
                        "some space or choose another --data-dir.")


# --------------------------------------------------------------------------------------------------
# Building: everything after parsing is shared by all sources.


def sequences(parsed: Parsed, name, log=print):
    """The shared ordering rule for every source: ids are mapped to 0-based indices in sorted id
    order; each user's events are sorted by (timestamp, item id), so ties in time are broken by the
    item id; a repeated (user, item) keeps its first event (counted and reported).
    Returns (seqs, rates, users_raw, items_raw, n_duplicates): one item-index array and one rating
    array per user."""
    if not parsed.user:
        raise DataError(f"{name} has no interactions.")
    users_raw, user = np.unique(np.asarray(parsed.user), return_inverse=True)
    # items that only a published candidate list names (custom format: they must be in items.csv)
    extra = sorted({i for _, _, ids, _ in parsed.cand_lists or [] for i in ids
                    if i in parsed.titles}
                   - set(parsed.item))
    items_raw, item = np.unique(np.asarray(list(parsed.item) + extra), return_inverse=True)
    item = item[:len(parsed.item)]
    rating, ts = np.asarray(parsed.rating, np.float64), np.asarray(parsed.ts, np.float64)
    order = np.lexsort((item, ts, user))  # user, then time, then item
    user, item, rating = user[order], item[order], rating[order]
    key = user.astype(np.int64) * len(items_raw) + item
    _, first = np.unique(key, return_index=True)  # first (user, item) in time
    keep = np.zeros(len(key), bool)
    keep[first] = True
    n_dup = int((~keep).sum())
    if n_dup:
        log(f"dropped {n_dup} repeated (user, item) events (kept the first of each)")
    user, item, rating = user[keep], item[keep], rating[keep]
    bounds = np.r_[0, np.flatnonzero(np.diff(user)) + 1, len(user)]
    seqs = [item[bounds[u]:bounds[u + 1]] for u in range(len(users_raw))]
    rates = [rating[bounds[u]:bounds[u + 1]] for u in range(len(users_raw))]
    return seqs, rates, users_raw, items_raw, n_dup


def build(parsed: Parsed, cfg: DataConfig, log=print):
    """Everything after parsing, shared by all sources: order, split, SASRec, candidates, prior,
    peers, F1 set. Returns (arrays, meta)."""
    t0 = clock = time.time()
    phase_s = {}                        # seconds per phase of the build, kept in processed.json

    def lap(name):
        nonlocal clock
        phase_s[name] = round(time.time() - clock, 2)
        clock = time.time()

    seqs, rates, users_raw, items_raw, n_dup = sequences(parsed, cfg.dataset, log)
    n_items, n_users = len(items_raw), len(users_raw)
    titles, genres = parsed.titles, parsed.genres
    n_untitled = sum(i.item() not in titles for i in items_raw)
    if n_untitled:
        log(f"{n_untitled} items have no title; they are called 'item <id>'")
    n_short = sum(len(s) < cfg.min_history + 1 for s in seqs)  # a test sample needs min_history + 1
    if n_short:
        log(f"{n_short} users have fewer than {cfg.min_history + 1} interactions and give no test "
            "sample (their events still train SASRec)")
    if n_short == n_users:
        raise DataError(f"{cfg.dataset} is empty after filtering: no user has the "
                        f"{cfg.min_history + 1} interactions a test sample needs.")
    item = np.concatenate(seqs)
    H, K = cfg.history, cfg.n_candidates
    if n_items < K + H:
        raise DataError(f"{cfg.dataset} has {n_items} items, too few for {K} candidates beside a "
                        f"{H}-item history.")
    # users.csv (custom format): each user's role; without it every user is split leave-one-out
    role = None if parsed.roles is None else [parsed.roles[u] for u in users_raw.tolist()]
    samples = {s: ([], [], []) for s in ("train", "valid", "test")}  # user, history, target
    for u, s in enumerate(seqs):
        n = len(s)
        for j in range(1, n):
            if role is None:
                split = "test" if j == n - 1 else "valid" if j == n - 2 else "train"
            elif role[u] == "train":        # a training user: every position is a training sample
                split = "train"
            elif j == n - 1:                # a valid or test user: one sample, its last event
                split = role[u]
            else:
                continue
            lo = max(0, j - H)
            if j - lo >= cfg.min_history:
                samples[split][0].append(u)
                samples[split][1].append(s[lo:j])
                samples[split][2].append(s[j])
    if not samples["test"][0] or not samples["train"][0]:
        raise DataError(f"{cfg.dataset} has no usable samples after filtering (users need at least "
                        f"{cfg.min_history + 3} interactions).")
    if role is None:
        held_out = [2] * n_users  # validation and test items
    else:  # valid / test users: all of it
        held_out = [0 if r == "train" else len(seqs[u]) for u, r in enumerate(role)]
    train_seqs = [s[:len(s) - h] if len(s) > h else s[:0] for s, h in zip(seqs, held_out)]

    rng = np.random.default_rng(cfg.seed)
    n_models = 3 if cfg.train_prior == "crossfit" else 1
    log(f"{cfg.dataset}: {n_users} users, {n_items} items, {len(item)} interactions; training "
        f"SASRec ({n_models} model{'s' if n_models > 1 else ''}, {cfg.sasrec.epochs} "
        f"epoch{'s' if cfg.sasrec.epochs > 1 else ''} each)")
    lap("split")
    progress = sasrec_progress(log, n_models, cfg.sasrec.epochs)
    full = train_sasrec(train_seqs, n_items, cfg.sasrec, seed=cfg.seed, progress=progress)
    lap("sasrec")
    fold = rng.permutation(n_users) % 2                                  # cross-fitting halves
    if cfg.train_prior == "crossfit":
        halves = [train_sasrec([s if fold[u] == f else s[:0] for u, s in enumerate(train_seqs)],
                               n_items, cfg.sasrec, seed=cfg.seed + 1 + f, progress=progress)
                  for f in (0, 1)]
    else:  # 'full': the one SASRec; the same halves' order below, so the random draws match
        halves = [full, full]
    progress.close()
    lap("sasrec_halves")

    arrays = {}
    for split, (us, hs, ts_) in samples.items():
        us, ts_ = np.array(us), np.array(ts_)
        cands = np.zeros((len(us), K), np.int64)
        prior = np.zeros(len(us), np.int64)
        prior_lp = np.zeros((len(us), K), np.float32)
        fixed = fixed_candidates(parsed, split, us, hs, ts_, users_raw, items_raw, K)
        # each half's samples scored by the model that never saw them (or by `full`)
        if split == "train":
            for f in (0, 1):
                rows_f = np.flatnonzero(fold[us] != f)
                _candidates(halves[f], [hs[r] for r in rows_f], ts_[rows_f], n_items, cfg, rng,
                            cands, prior, prior_lp, rows_f)
        else:
            _candidates(full, hs, ts_, n_items, cfg, rng, cands, prior, prior_lp,
                        np.arange(len(us)), fixed)
        hist = np.full((len(us), H), -1, np.int64)
        for r, h in enumerate(hs):
            hist[r, :len(h)] = h
        arrays.update({f"{split}_user": us, f"{split}_hist": hist, f"{split}_target": ts_,
                       f"{split}_cands": cands, f"{split}_prior": prior,
                       f"{split}_prior_lp": prior_lp})

    lap("candidates_and_prior")
    # peers: cosine of SASRec user embeddings after each user's last training items
    # (a valid or test user of users.csv: after its history; only training users are peers)
    is_train = np.array([h == 0 or role is None for h in held_out])
    emb = last_hidden(full,
                      [s[-H:] if is_train[u] else seqs[u][:-1][-H:]
                       for u, s in enumerate(train_seqs)])
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
    peers, w = nearest_peers(emb, is_train, min(cfg.n_peers, int(is_train.sum()) - 1))
    lap("peers")

    # UserAgent F1 set (docs/method.md section 6): every test user. Its history is the one before
    # its validation sample where it has one (its positives are then the validation and test items,
    # the user's real future), else the one before its test item (a test user with too short a
    # history for a validation sample, or a test user of users.csv: one positive, the test item).
    f1_user, f1_hist, f1_item, f1_label = [], [], [], []
    valid_row = {int(u): r for r, u in enumerate(arrays["valid_user"])}
    for r, u in enumerate(arrays["test_user"]):
        u = int(u)
        if u in valid_row:
            hist, pos = arrays["valid_hist"][valid_row[u]], list(seqs[u][len(seqs[u]) - 2:])
        else:
            hist, pos = arrays["test_hist"][r], [int(arrays["test_target"][r])]
        pos = pos[:cfg.f1_max_pos]
        touched = set(seqs[u].tolist())
        neg = []
        while len(neg) < len(pos):
            i = int(rng.integers(n_items))
            if i not in touched and i not in neg:
                neg.append(i)
        for i, lab in [(i, 1) for i in pos] + [(i, 0) for i in neg]:
            f1_user.append(u)
            f1_hist.append(hist)
            f1_item.append(i)
            f1_label.append(lab)

    ptr = np.r_[0, np.cumsum([len(s) for s in train_seqs])]
    rating = np.concatenate(rates)
    has_ratings = bool(np.isfinite(rating).all() and (rating != 0).any())
    arrays.update(
        seq_ptr=ptr, seq_items=np.concatenate(train_seqs).astype(np.int64),
        seq_rating=np.concatenate([r[:len(r) - h] if len(r) > h else r[:0]
                                   for r, h in zip(rates, held_out)]).astype(np.float32),
        peers=peers.astype(np.int64), peer_w=w.astype(np.float32),
        item_vec=full.item_vectors().detach().numpy().astype(np.float32),
        item_pop=np.bincount(np.concatenate(train_seqs).astype(np.int64), minlength=n_items),
        f1_user=np.array(f1_user, np.int64), f1_hist=np.array(f1_hist, np.int64).reshape(-1, H),
        f1_item=np.array(f1_item, np.int64), f1_label=np.array(f1_label, np.int64),
        titles=np.array([titles.get(i.item(), f"item {i.item()}") for i in items_raw]),
        genres=np.array([genres.get(i.item(), "") for i in items_raw]),
        item_raw=items_raw, user_raw=users_raw,
    )
    lap("f1_set_and_arrays")
    meta = dict(n_users=n_users, n_items=n_items, n_interactions=int(len(item)), n_duplicates=n_dup,
                n_untitled=n_untitled, n_users_without_test=n_short, has_ratings=has_ratings,
                split="users.csv" if role is not None else "leave-one-out",
                fixed_candidates=len(parsed.cand_lists or []),
                samples={s: int(len(arrays[f"{s}_user"])) for s in samples},
                prior_hit={s: float((arrays[f"{s}_prior"] == arrays[f"{s}_target"]).mean())
                           for s in samples},
                ceiling={s: float((arrays[f"{s}_cands"]
                                   == arrays[f"{s}_target"][:, None]).any(1).mean())
                         for s in samples},
                build_seconds=round(time.time() - t0, 1), phase_s=phase_s)
    log(f"built in {meta['build_seconds']} s; SASRec prior hit rate (train/valid/test): "
        + " / ".join(f"{meta['prior_hit'][s]:.3f}" for s in samples)
        + ("; ceiling (target among the candidates): "
           + " / ".join(f"{meta['ceiling'][s]:.3f}" for s in samples) if cfg.candidates == "sasrec"
           else ""))
    return arrays, meta


class sasrec_progress:
    """train_sasrec's progress callback for every SASRec of a build: one bar over all their
    epochs, or, where stdout is no terminal (tqdm then shows nothing), a plain line every 5
    epochs with the time left."""

    def __init__(self, log, n_models, epochs):
        self.log, self.total, self.done, self.t0 = log, n_models * epochs, 0, time.time()
        self.bar = tqdm(total=self.total, desc="SASRec", dynamic_ncols=True, disable=None)

    def __call__(self, epoch, loss):
        self.done += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if self.bar.disable and (self.done % 5 == 0 or self.done == self.total):
            rate = (time.time() - self.t0) / self.done
            self.log(f"SASRec: epoch {self.done}/{self.total}, loss {loss:.3f}, about "
                     f"{rate * (self.total - self.done) / 60:.1f} min left")

    def close(self):
        self.bar.close()


def fixed_candidates(parsed, split, us, hs, ts_, users_raw, items_raw, K):
    """{row of the split: candidate item indices} from candidates.csv (custom format), each list
    checked: K known items, no repeat, the target in it, no history item. Errors name the line."""
    if not parsed.cand_lists or split == "train":
        return {}
    row_of = {int(u): r for r, u in enumerate(us)}
    user_index = {u: k for k, u in enumerate(users_raw.tolist())}
    item_index = {i: k for k, i in enumerate(items_raw.tolist())}
    out = {}
    for user, sp, ids, at in parsed.cand_lists:
        if sp != split:
            continue
        r = row_of.get(user_index.get(user, -1))
        if r is None:
            raise DataError(f"{at}: user {user!r} has no {split} sample (unknown user, another "
                            "role in users.csv, or fewer than the history's minimum of events).")
        if len(ids) != K:
            raise DataError(f"{at}: {len(ids)} candidates, expected {K} item ids separated by "
                            "spaces.")
        unknown = [i for i in ids if i not in item_index]
        if unknown:
            raise DataError(f"{at}: item {unknown[0]!r} is in neither interactions.csv nor "
                            "items.csv.")
        c = [item_index[i] for i in ids]
        if len(set(c)) != K:
            raise DataError(f"{at}: an item is listed twice.")
        if int(ts_[r]) not in c:
            raise DataError(f"{at}: the list does not hold the user's target (its last event, "
                            f"{str(items_raw[ts_[r]])!r}).")
        in_hist = set(c) & set(np.asarray(hs[r]).tolist())
        if in_hist:
            raise DataError(f"{at}: item {str(items_raw[in_hist.pop()])!r} is in the user's "
                            "history.")
        out[r] = np.array(c, np.int64)
    return out


def _candidates(model, hists, targets, n_items, cfg, rng, cands_out, prior_out, lp_out, rows_out,
                fixed=None):
    """Fill cands_out[rows_out], prior_out[rows_out] and lp_out[rows_out] (SASRec's log-softmax
    over each row's candidates) for the given histories and targets.
    fixed {row: candidate item indices}: those rows take exactly that list (candidates.csv); the
    random draws are the same with or without it, so the other rows' lists do not change."""
    K = cfg.n_candidates
    for s, scores in score_all(model, hists):
        b = len(scores)
        hb, tb, rb = hists[s:s + b], targets[s:s + b], rows_out[s:s + b]
        excluded = np.zeros_like(scores, dtype=bool)
        for r, h in enumerate(hb):
            excluded[r, h] = True
        # the top K as they are: the target only where SASRec ranked it there
        if cfg.candidates == "sasrec":
            masked = torch.from_numpy(np.where(excluded, -np.inf, scores))
            c = torch.topk(masked, K, dim=1, sorted=False).indices.numpy()            # (b,K)
        else:                             # the target and K-1 uniform items outside the history
            excluded[np.arange(b), tb] = True
            neg = np.zeros((b, K - 1), np.int64)
            for r in range(b):
                pick = []
                while len(pick) < K - 1:
                    i = int(rng.integers(n_items))
                    if not excluded[r, i] and i not in pick:
                        pick.append(i)
                neg[r] = pick
            c = np.concatenate([tb[:, None], neg], 1)
        c = rng.permuted(c, axis=1)  # (b,K) shuffled
        for r, row in enumerate(rb):
            if fixed and int(row) in fixed:
                c[r] = fixed[int(row)]
        cands_out[rb] = c
        sc = np.take_along_axis(scores, c, 1)                                          # (b,K)
        prior_out[rb] = c[np.arange(b), sc.argmax(1)]
        lp_out[rb] = torch.log_softmax(torch.from_numpy(sc).double(), 1).numpy().astype(np.float32)


def stats(d: Data):
    """One line per statistic of a processed dataset."""
    m = d.meta
    lines = [f"dataset          {m['dataset']}", f"users            {m['n_users']}",
             f"items            {m['n_items']}", f"interactions     {m['n_interactions']}"]
    for s in ("train", "valid", "test"):
        hl = (getattr(d, f"{s}_hist") >= 0).sum(1)
        lines.append(f"{s:<6} samples   {m['samples'][s]:<8} mean history {hl.mean():.2f}  SASRec "
                     f"prior hit {m['prior_hit'][s]:.3f}")
    return "\n".join(lines)


def add_args(p: argparse.ArgumentParser):
    c = DataConfig()
    p.add_argument("--dataset", default=c.dataset,
                   help=f"one of {', '.join(sorted(SOURCES))}, or the path of a folder with "
                        "interactions.csv and items.csv (see docs/datasets.md)")
    p.add_argument("--data-dir", default=c.data_dir,
                   help="folder for downloads and the processed cache")
    p.add_argument("--data-url", default=c.data_url,
                   help="address of the raw file (file:// works), or a local folder of extracted "
                        "files")
    p.add_argument("--data-sha256", default=c.data_sha256,
                   help="expected sha256 of the raw file ('none' skips the check)")
    p.add_argument("--candidates", default=c.candidates, choices=["sasrec", "random"],
                   help="candidate lists: 'random' (the target and 19 uniform items) or 'sasrec' "
                        "(SASRec's top 20) (default: %(default)s)")
    p.add_argument("--sasrec-epochs", type=int, default=c.sasrec.epochs,
                   help="SASRec training epochs (default: %(default)s)")


def config_from_args(a) -> DataConfig:
    return DataConfig(dataset=a.dataset, data_dir=a.data_dir, data_url=a.data_url,
                      data_sha256=a.data_sha256, candidates=a.candidates,
                      seed=getattr(a, "seed", 0), sasrec=SASRecConfig(epochs=a.sasrec_epochs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the split's candidates and of SASRec (default: %(default)s)")
    p.add_argument("--stats", action="store_true", help="print dataset statistics")
    p.add_argument("--rebuild", action="store_true", help="ignore the cache")
    a = p.parse_args(argv)
    try:
        d = prepare(config_from_args(a), rebuild=a.rebuild)
    except DataError as e:
        sys.exit(f"error: {e}")
    if a.stats:
        print(stats(d))


if __name__ == "__main__":
    main()
