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
"""

import argparse
import hashlib
import io
import zipfile

import numpy as np

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western"]


def make_ml1m_zip(path, users=6040, items=3706, ratings=1_000_209, seed=0, min_per_user=20):
    """Write the zip to path; returns its sha256."""
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
        counts[room] += np.minimum(items // 2 - counts[room], max(1, short // len(room)))
    counts[np.flatnonzero(counts < items // 2)[:max(0, ratings - counts.sum())]] += 1
    lines = []
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
                seq[at] = by_genre[gg][np.minimum(np.searchsorted(cdf[gg], rng.random(len(at))), len(by_genre[gg]) - 1)]
            else:
                seq[at] = rng.choice(items, len(at), p=allp)
        _, first = np.unique(seq, return_index=True)
        seq = seq[np.sort(first)][:counts[u]]
        if len(seq) < counts[u]:  # small genres ran dry: top up with unseen items
            rest = np.setdiff1d(np.arange(items), seq)
            seq = np.concatenate([seq, rng.choice(rest, counts[u] - len(seq), replace=False)])
        ts = t0 + np.cumsum(rng.integers(1, 4000, len(seq)))
        rate = np.clip(np.round(3 + rng.normal(0, 1.1, len(seq))), 1, 5).astype(int)
        lines += [f"{u + 1}::{i + 1}::{r}::{t}" for i, r, t in zip(seq.tolist(), rate.tolist(), ts.tolist())]
    movies = []
    for i in range(items):
        title = "Am\u00e9lie (2001)" if i == 0 else f"Synthetic Movie {i + 1} ({1950 + i % 50})"
        movies.append(f"{i + 1}::{title}::{GENRES[genre[i]]}|{GENRES[(genre[i] + 1) % len(GENRES)]}")
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


def main():
    p = argparse.ArgumentParser(description="Write a synthetic dataset in ml-1m's file format.")
    p.add_argument("--out", required=True, help="zip file to write")
    p.add_argument("--users", type=int, default=6040)
    p.add_argument("--items", type=int, default=3706)
    p.add_argument("--ratings", type=int, default=1_000_209)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    sha = make_ml1m_zip(a.out, a.users, a.items, a.ratings, a.seed)
    print(f"wrote {a.out}\nsha256 {sha}\nuse: python train.py --dataset ml-1m --data-url file://{a.out} "
          f"--data-sha256 {sha} --data-dir <a folder of your own>")


if __name__ == "__main__":
    main()
