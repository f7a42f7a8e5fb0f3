"""
A sparse variant of a dataset, written as a custom-format folder (data/sources.parse_custom), for
the hard case where SASRec knows the users better than the built-in base (issue: the RecAgent and
the SASRec prior; the real case is Amazon Instruments, 8.3 events a user):

    python tools/sparse.py --dataset ml-latest-small --data-url path/to/ml-latest-small.zip \
        --out /tmp/mls-sparse --events 8
    python train.py --dataset /tmp/mls-sparse ...

Each real user's events, in the order data/prepare.sequences gives them (time, then item id), are
cut into consecutive chunks of --events items; each chunk becomes a user of its own
(`<user>#<k>`), with the chunk's events and their timestamps. A last chunk shorter than --events
is dropped, so every new user has exactly --events events: many users with few events each, the
shape of Instruments (ml-latest-small at 8: about 12,600 users of 8 events over its 9,700 items).
Ratings and titles are kept. A file of its own because it is a tool for making an experiment's
data, not part of the method; the folder it writes is data, never to be committed.

Caveat, by construction: the chunks of one real user are different users here, so a chunk's
validation and test items come before the same person's later chunks, which are training data.
Both SASRec and the base see those later chunks alike; the variant is for comparing the two on
short histories, not a leak-free benchmark.
"""

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from anywhere

from data.prepare import DataConfig, DataError, locate, sequences  # noqa: E402
from data.sources import SOURCES  # noqa: E402


def chunk_users(seqs, rates, times, events):
    """[(chunk's user index, k, items, ratings, timestamps)] of every full chunk of `events`
    items."""
    out = []
    for u, (s, r, t) in enumerate(zip(seqs, rates, times)):
        for k in range(len(s) // events):
            lo = k * events
            out.append((u, k, s[lo:lo + events], r[lo:lo + events], t[lo:lo + events]))
    return out


def write_sparse(parsed, name, out, events, log=print):
    """Write interactions.csv and items.csv of the sparse variant of `parsed` into folder `out`;
    returns (users, items, interactions) written."""
    seqs, rates, users_raw, items_raw, _ = sequences(parsed, name, log)
    # each ordered event's timestamp (sequences() returns items and ratings only)
    ts = {}
    for u, i, t in zip(parsed.user, parsed.item, parsed.ts):
        ts[(u, i)] = min(t, ts.get((u, i), t))     # a repeated (user, item) keeps its first event
    times = [[ts[(users_raw[u], items_raw[i])] for i in s] for u, s in enumerate(seqs)]
    chunks = chunk_users(seqs, rates, times, events)
    if not chunks:
        raise DataError(f"no user of {name} has {events} events: choose a smaller --events.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    used = set()
    with open(out / "interactions.csv.part", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "timestamp", "rating"])
        for u, k, s, r, t in chunks:
            for i, ri, ti in zip(s, r, t):
                used.add(int(i))
                w.writerow([f"{users_raw[u]}#{k}", items_raw[i], repr(float(ti)),
                            "" if ri != ri else repr(float(ri))])
    with open(out / "items.csv.part", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["item", "title", "genres"])
        for i in sorted(used):
            rid = items_raw[i]
            key = rid.item() if hasattr(rid, "item") else rid
            w.writerow([rid, parsed.titles.get(key, f"item {rid}"), parsed.genres.get(key, "")])
    for n in ("interactions.csv", "items.csv"):      # both complete, or neither replaced
        (out / f"{n}.part").replace(out / n)
    return len(chunks), len(used), len(chunks) * events


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help=f"the source: {', '.join(sorted(SOURCES))}")
    p.add_argument("--data-url", default="", help="address of its raw file ('' = official)")
    p.add_argument("--data-dir", default="", help="folder for its download (default: data/<name>)")
    p.add_argument("--data-sha256", default="", help="expected sha256 of the raw file ('' = the "
                   "official one where known, 'none' = do not check)")
    p.add_argument("--out", required=True, help="folder to write the custom-format dataset into")
    p.add_argument("--events", type=int, default=8,
                   help="events per new user (default: %(default)s)")
    a = p.parse_args(argv)
    if a.events < 5:
        sys.exit("error: --events must be at least 5 (a test sample needs 3 history items, and "
                 "validation one more).")
    if a.dataset not in SOURCES:
        sys.exit(f"error: unknown dataset {a.dataset!r}: choose one of "
                 f"{', '.join(sorted(SOURCES))}.")
    try:
        src, raw, _, _ = locate(DataConfig(dataset=a.dataset, data_dir=a.data_dir,
                                           data_url=a.data_url, data_sha256=a.data_sha256),
                                log=print)
        users, items, n = write_sparse(src["parse"](raw), a.dataset, a.out, a.events)
    except DataError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: cannot write {a.out} ({e.strerror or e}).")
    print(f"wrote {a.out}: {users} users of {a.events} events, {items} items, {n} interactions; "
          f"train on it with: python train.py --dataset {a.out}")


if __name__ == "__main__":
    main()
