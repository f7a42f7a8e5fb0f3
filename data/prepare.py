"""
Datasets for CoARS (PAPER.md sections 1 and 6): download, verify, parse, split, SASRec candidates,
SASRec prior, peers, and a cache in plain NPZ + JSON.

    python data/prepare.py --dataset ml-latest-small --data-url file:///path/to/ml-latest-small.zip --stats
    python data/prepare.py --dataset ml-1m            # downloads the official GroupLens zip

train.py calls prepare() itself when the processed data is missing or was built with other options.

The protocol ([ours] where PAPER.md marks it so):
  - Each user's interactions sorted by (timestamp, item id): ties in time are broken by item id so
    the order is deterministic. Repeated (user, item) events keep the first.
  - Leave-one-out: last item = test target, the one before = validation target, the rest = the
    training part. A sample's history is the <= 10 items before its target; samples with < 3
    history items are dropped. Training samples are all positions of every training part.
  - SASRec (data/sasrec.py) is trained on the training parts only. Candidates: the target plus the
    19 SASRec-highest items not in the history, shuffled with the seed ("sasrec"); or the target
    plus 19 uniform items not in the history ("random", the AFL / LLaRA protocol). The prior is
    SASRec's highest-scoring candidate.
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
import csv
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `data.sasrec` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.sasrec import SASRecConfig, last_hidden, score_all, train_sasrec  # noqa: E402

CACHE_VERSION = 1
DATA_DIR = Path(__file__).resolve().parent


class DataError(Exception):
    """A problem with the input data or its options; the message is one sentence for the user."""


# --------------------------------------------------------------------------------------------------
# Sources: where each dataset comes from and how its files are parsed into
# (user, item, rating, timestamp) rows plus item titles and genres.


def _lines(zf, member, encoding):
    try:
        raw = zf.read(member)
    except KeyError:
        raise DataError(f"{zf.filename} has no member {member}: is this the right zip for the dataset?")
    try:
        return raw.decode(encoding).splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{member} in {zf.filename} is not valid {encoding} text ({e.reason} at byte {e.start}).")


def _int(value, where):
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{where}: expected a whole number, found {value!r}.")


def _float(value, where):
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{where}: expected a number, found {value!r}.")


def parse_ml1m(zf):
    """ml-1m: ratings.dat `UserID::MovieID::Rating::Timestamp`, movies.dat `MovieID::Title::Genres`,
    both latin-1."""
    rows = []
    for n, line in enumerate(_lines(zf, "ml-1m/ratings.dat", "latin-1"), 1):
        if not line.strip():
            continue
        f = line.split("::")
        where = f"ml-1m/ratings.dat line {n}"
        if len(f) != 4:
            raise DataError(f"{where}: expected 4 fields separated by '::', found {len(f)}.")
        rows.append((_int(f[0], where), _int(f[1], where), _float(f[2], where), _int(f[3], where)))
    titles, genres = {}, {}
    for n, line in enumerate(_lines(zf, "ml-1m/movies.dat", "latin-1"), 1):
        if not line.strip():
            continue
        f = line.split("::")
        if len(f) != 3:
            raise DataError(f"ml-1m/movies.dat line {n}: expected 3 fields separated by '::', found {len(f)}.")
        i = _int(f[0], f"ml-1m/movies.dat line {n}")
        titles[i], genres[i] = f[1], f[2]
    return rows, titles, genres


def parse_ml_latest_small(zf):
    """ml-latest-small: ratings.csv `userId,movieId,rating,timestamp`, movies.csv
    `movieId,title,genres` (UTF-8, quoted CSV)."""
    rows = []
    lines = _lines(zf, "ml-latest-small/ratings.csv", "utf-8")
    for n, f in enumerate(csv.reader(lines[1:]), 2):
        if not f:
            continue
        where = f"ml-latest-small/ratings.csv line {n}"
        if len(f) != 4:
            raise DataError(f"{where}: expected 4 comma-separated fields, found {len(f)}.")
        rows.append((_int(f[0], where), _int(f[1], where), _float(f[2], where), _int(f[3], where)))
    titles, genres = {}, {}
    for n, f in enumerate(csv.reader(_lines(zf, "ml-latest-small/movies.csv", "utf-8")[1:]), 2):
        if len(f) != 3:
            raise DataError(f"ml-latest-small/movies.csv line {n}: expected 3 comma-separated fields, found {len(f)}.")
        i = _int(f[0], f"ml-latest-small/movies.csv line {n}")
        titles[i], genres[i] = f[1], f[2]
    return rows, titles, genres


SOURCES = {
    "ml-1m": dict(
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        file="ml-1m.zip", parse=parse_ml1m),
    "ml-latest-small": dict(
        url="https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",
        sha256="696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
        file="ml-latest-small.zip", parse=parse_ml_latest_small),
}


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url, dest: Path, sha256, log=print):
    """Download url to dest unless it is there, then verify its sha256 (None = do not check).
    A download goes to dest.part first, so an interrupted one never looks complete."""
    if not dest.exists():
        log(f"downloading {url} -> {dest}")
        part = dest.with_name(dest.name + ".part")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url) as r, open(part, "wb") as f:
                while block := r.read(1 << 20):
                    f.write(block)
        except (urllib.error.URLError, OSError, ValueError) as e:
            part.unlink(missing_ok=True)
            raise DataError(f"could not download {url} ({getattr(e, 'reason', e)}): check the address "
                            f"(--data-url) or put the file at {dest} yourself.")
        got = sha256_of(part)
        if sha256 and got != sha256:
            part.unlink()
            raise DataError(f"the file downloaded from {url} has sha256 {got}, expected {sha256}: the "
                            f"download is corrupt or not the official file (pass --data-sha256 {got} if you trust it).")
        os.replace(part, dest)
    elif sha256:
        got = sha256_of(dest)
        if got != sha256:
            raise DataError(f"{dest} has sha256 {got}, expected {sha256}: delete it to download it again, "
                            f"or pass --data-sha256 {got} if you trust this file.")


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
    candidates: str = "sasrec"
    """'sasrec': target + 19 SASRec-highest non-history items; 'random': target + 19 uniform items"""
    n_candidates: int = 20
    """candidate list length, target included"""
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
    -1, s_target (N,), s_cands (N, n_candidates), s_prior (N,). Also: seq_ptr / seq_items /
    seq_rating (training parts of all users, CSR), peers / peer_w (U, k), item_vec (I, 64) SASRec
    item embeddings, item_pop (I,), f1_user / f1_hist / f1_item / f1_label."""

    def __init__(self, arrays, meta):
        self.__dict__.update(arrays)
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
            self._train_sets = [dict(zip(self.train_items(u).tolist(),
                                         self.seq_rating[self.seq_ptr[u]:self.seq_ptr[u + 1]].tolist()))
                                for u in range(self.n_users)]
        return self._train_sets


def _options(cfg: DataConfig):
    d = asdict(cfg)
    for k in ("data_dir", "data_url", "data_sha256"):
        d.pop(k)
    return d


def prepare(cfg: DataConfig, log=print, rebuild=False) -> Data:
    """Load the processed dataset from the cache, or build it (download + parse + SASRec + ...)."""
    if cfg.dataset not in SOURCES:
        raise DataError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(sorted(SOURCES))}.")
    if cfg.candidates not in ("sasrec", "random"):
        raise DataError(f"--candidates must be 'sasrec' or 'random', not {cfg.candidates!r}.")
    src = SOURCES[cfg.dataset]
    folder = Path(cfg.data_dir) / cfg.dataset
    raw = folder / src["file"]
    sha = None if cfg.data_sha256.lower() == "none" else (cfg.data_sha256 or src["sha256"])
    fetch(cfg.data_url or src["url"], raw, sha, log)
    fingerprint = sha256_of(raw)
    meta_path, npz_path = folder / "processed.json", folder / "processed.npz"
    want = dict(version=CACHE_VERSION, options=_options(cfg), raw_sha256=fingerprint)
    if not rebuild and meta_path.exists() and npz_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if all(meta.get(k) == v for k, v in want.items()):
                with np.load(npz_path, allow_pickle=False) as z:
                    return Data({k: z[k] for k in z.files}, meta)
            log(f"{meta_path} was built with other options or data: rebuilding")
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
            log(f"{npz_path} is unreadable ({e}): rebuilding")
    try:
        zf = zipfile.ZipFile(raw)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{raw} is not a readable zip ({e}): it may be truncated; delete it and run again.")
    with zf:
        rows, titles, genres = src["parse"](zf)
    arrays, meta = build(rows, titles, genres, cfg, log)
    meta.update(want)
    meta["dataset"] = cfg.dataset
    # Write the arrays, then the JSON that vouches for them: a crash between the two leaves a cache
    # that the check above does not trust.
    try:
        folder.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)
        tmp = folder / "processed.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, npz_path)
        meta_path.write_text(json.dumps(meta, indent=1))
    except OSError as e:
        raise DataError(f"cannot write the processed data to {folder} ({e.strerror}): free space or choose "
                        f"another --data-dir.")
    return Data(arrays, meta)


# --------------------------------------------------------------------------------------------------
# Building: everything after parsing is shared by all sources.


def build(rows, titles, genres, cfg: DataConfig, log=print):
    t0 = time.time()
    if not rows:
        raise DataError(f"{cfg.dataset} has no interactions.")
    a = np.array(rows, dtype=np.float64)
    user_raw, item_raw, rating, ts = a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2], a[:, 3]
    order = np.lexsort((item_raw, ts, user_raw))                         # user, then time, then item
    user_raw, item_raw, rating, ts = user_raw[order], item_raw[order], rating[order], ts[order]
    # repeated (user, item): keep the first in time
    key = user_raw * (item_raw.max() + 1) + item_raw
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(len(key), bool)
    keep[first] = True
    n_dup = int((~keep).sum())
    if n_dup:
        log(f"dropped {n_dup} repeated (user, item) events (kept the first of each)")
    user_raw, item_raw, rating = user_raw[keep], item_raw[keep], rating[keep]
    items_raw, item = np.unique(item_raw, return_inverse=True)
    users_raw, user = np.unique(user_raw, return_inverse=True)
    n_items, n_users = len(items_raw), len(users_raw)
    bounds = np.r_[0, np.flatnonzero(np.diff(user)) + 1, len(user)]
    seqs = [item[bounds[u]:bounds[u + 1]] for u in range(n_users)]
    rates = [rating[bounds[u]:bounds[u + 1]] for u in range(n_users)]

    H, K = cfg.history, cfg.n_candidates
    if n_items < K + H:
        raise DataError(f"{cfg.dataset} has {n_items} items, too few for {K} candidates beside a {H}-item history.")
    samples = {s: ([], [], []) for s in ("train", "valid", "test")}  # user, history, target
    for u, s in enumerate(seqs):
        n = len(s)
        for j in range(1, n):
            split = "test" if j == n - 1 else "valid" if j == n - 2 else "train"
            lo = max(0, j - H)
            if j - lo >= cfg.min_history:
                samples[split][0].append(u)
                samples[split][1].append(s[lo:j])
                samples[split][2].append(s[j])
    if not samples["test"][0] or not samples["train"][0]:
        raise DataError(f"{cfg.dataset} has no usable samples after filtering (users need at least "
                        f"{cfg.min_history + 3} interactions).")
    train_seqs = [s[:-2] if len(s) > 2 else s[:0] for s in seqs]

    rng = np.random.default_rng(cfg.seed)
    log(f"{cfg.dataset}: {n_users} users, {n_items} items, {len(item)} interactions; training SASRec")
    full = train_sasrec(train_seqs, n_items, cfg.sasrec, seed=cfg.seed)
    fold = rng.permutation(n_users) % 2                                  # cross-fitting halves
    halves = [train_sasrec([s if fold[u] == f else s[:0] for u, s in enumerate(train_seqs)], n_items,
                           cfg.sasrec, seed=cfg.seed + 1 + f) for f in (0, 1)]

    arrays = {}
    for split, (us, hs, ts_) in samples.items():
        us, ts_ = np.array(us), np.array(ts_)
        cands = np.zeros((len(us), K), np.int64)
        prior = np.zeros(len(us), np.int64)
        if split == "train":  # each half's samples scored by the model that never saw them
            for f in (0, 1):
                rows_f = np.flatnonzero(fold[us] != f)
                _candidates(halves[f], [hs[r] for r in rows_f], ts_[rows_f], n_items, cfg, rng,
                            cands, prior, rows_f)
        else:
            _candidates(full, hs, ts_, n_items, cfg, rng, cands, prior, np.arange(len(us)))
        hist = np.full((len(us), H), -1, np.int64)
        for r, h in enumerate(hs):
            hist[r, :len(h)] = h
        arrays.update({f"{split}_user": us, f"{split}_hist": hist, f"{split}_target": ts_,
                       f"{split}_cands": cands, f"{split}_prior": prior})

    # peers: cosine of SASRec user embeddings after each user's last training items
    emb = last_hidden(full, [s[-H:] for s in train_seqs])
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    k = min(cfg.n_peers, n_users - 1)
    peers = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    w = np.maximum(np.take_along_axis(sim, peers, 1), 0)
    w = np.where(w.sum(1, keepdims=True) > 0, w / np.maximum(w.sum(1, keepdims=True), 1e-12), 1.0 / max(k, 1))

    # UserAgent F1 set
    f1_user, f1_hist, f1_item, f1_label = [], [], [], []
    vu = arrays["valid_user"]
    for r, u in enumerate(vu):
        pos = list(seqs[u][len(seqs[u]) - 2:])[:cfg.f1_max_pos]
        touched = set(seqs[u].tolist())
        neg = []
        while len(neg) < len(pos):
            i = int(rng.integers(n_items))
            if i not in touched and i not in neg:
                neg.append(i)
        for i, lab in [(i, 1) for i in pos] + [(i, 0) for i in neg]:
            f1_user.append(u)
            f1_hist.append(arrays["valid_hist"][r])
            f1_item.append(i)
            f1_label.append(lab)

    ptr = np.r_[0, np.cumsum([len(s) for s in train_seqs])]
    has_ratings = bool(np.isfinite(rating).all() and (rating != 0).any())
    arrays.update(
        seq_ptr=ptr, seq_items=np.concatenate(train_seqs).astype(np.int64),
        seq_rating=np.concatenate([r[:-2] if len(r) > 2 else r[:0] for r in rates]).astype(np.float32),
        peers=peers.astype(np.int64), peer_w=w.astype(np.float32),
        item_vec=full.item_vectors().detach().numpy().astype(np.float32),
        item_pop=np.bincount(np.concatenate(train_seqs).astype(np.int64), minlength=n_items),
        f1_user=np.array(f1_user, np.int64), f1_hist=np.array(f1_hist, np.int64).reshape(-1, H),
        f1_item=np.array(f1_item, np.int64), f1_label=np.array(f1_label, np.int64),
        titles=np.array([titles.get(int(i), f"item {int(i)}") for i in items_raw]),
        genres=np.array([genres.get(int(i), "") for i in items_raw]),
        item_raw=items_raw, user_raw=users_raw,
    )
    n_untitled = sum(int(i) not in titles for i in items_raw)
    meta = dict(n_users=n_users, n_items=n_items, n_interactions=int(len(item)), n_duplicates=n_dup,
                n_untitled=n_untitled, has_ratings=has_ratings,
                samples={s: int(len(arrays[f"{s}_user"])) for s in samples},
                prior_hit={s: float((arrays[f"{s}_prior"] == arrays[f"{s}_target"]).mean()) for s in samples},
                build_seconds=round(time.time() - t0, 1))
    log(f"built in {meta['build_seconds']} s; SASRec prior hit rate (train/valid/test): "
        + " / ".join(f"{meta['prior_hit'][s]:.3f}" for s in samples))
    return arrays, meta


def _candidates(model, hists, targets, n_items, cfg, rng, cands_out, prior_out, rows_out):
    """Fill cands_out[rows_out] and prior_out[rows_out] for the given histories and targets."""
    K = cfg.n_candidates
    for s, scores in score_all(model, hists):
        b = len(scores)
        hb, tb, rb = hists[s:s + b], targets[s:s + b], rows_out[s:s + b]
        excluded = np.zeros_like(scores, dtype=bool)
        for r, h in enumerate(hb):
            excluded[r, h] = True
        excluded[np.arange(b), tb] = True
        if cfg.candidates == "sasrec":
            neg = np.argpartition(np.where(excluded, -np.inf, scores), -(K - 1), axis=1)[:, -(K - 1):]
        else:
            neg = np.zeros((b, K - 1), np.int64)
            for r in range(b):
                pick = []
                while len(pick) < K - 1:
                    i = int(rng.integers(n_items))
                    if not excluded[r, i] and i not in pick:
                        pick.append(i)
                neg[r] = pick
        c = rng.permuted(np.concatenate([tb[:, None], neg], 1), axis=1)   # (b,K) shuffled
        cands_out[rb] = c
        prior_out[rb] = c[np.arange(b), np.take_along_axis(scores, c, 1).argmax(1)]


def stats(d: Data):
    """One line per statistic of a processed dataset."""
    m = d.meta
    lines = [f"dataset          {m['dataset']}", f"users            {m['n_users']}",
             f"items            {m['n_items']}", f"interactions     {m['n_interactions']}"]
    for s in ("train", "valid", "test"):
        hl = (getattr(d, f"{s}_hist") >= 0).sum(1)
        lines.append(f"{s:<6} samples   {m['samples'][s]:<8} mean history {hl.mean():.2f}  "
                     f"SASRec prior hit {m['prior_hit'][s]:.3f}")
    return "\n".join(lines)


def add_args(p: argparse.ArgumentParser):
    c = DataConfig()
    p.add_argument("--dataset", default=c.dataset, help=f"one of {', '.join(sorted(SOURCES))}")
    p.add_argument("--data-dir", default=c.data_dir, help="folder for downloads and the processed cache")
    p.add_argument("--data-url", default=c.data_url, help="download address of the raw zip (file:// works)")
    p.add_argument("--data-sha256", default=c.data_sha256, help="expected sha256 of the raw zip ('none' skips the check)")
    p.add_argument("--candidates", default=c.candidates, choices=["sasrec", "random"])
    p.add_argument("--sasrec-epochs", type=int, default=c.sasrec.epochs)


def config_from_args(a) -> DataConfig:
    return DataConfig(dataset=a.dataset, data_dir=a.data_dir, data_url=a.data_url, data_sha256=a.data_sha256,
                      candidates=a.candidates, seed=getattr(a, "seed", 0),
                      sasrec=SASRecConfig(epochs=a.sasrec_epochs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.add_argument("--seed", type=int, default=0)
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
