"""
Converter from the data layout that LLaRA and AFL publish to this project's custom format, so that
our numbers sit in the same table as theirs (docs/datasets.md, "Comparing with published tables").
Its own file because it reads a foreign layout (pickled pandas DataFrames) and is needed only for
that.

    python data/llara.py --src path/to/their/lastfm --out data/lastfm-llara [--afl-candidates]
    python train.py --dataset data/lastfm-llara

Their folder holds train_data.df, Val_data.df and Test_data.df (pickled DataFrames with columns
`seq`: 10 item ids left-padded with the pad id = the number of items, `len_seq`, `next`; MovieLens
rows hold (id, rating) pairs, whose id is taken) and id2name.txt (`id::name` lines; MovieLens has
u.item instead, `id|title|...`, whose id - 1 is the item id, as their loader reads it).

  - Users are split 8:1:1 by them: each training row is a prefix of one user's sequence, a row of
    padding only starting a new user, so a training user's sequence is its rows' targets in order;
    each validation or test row is one user (its history, then its target). Rows with
    len_seq < 3 give no sample, as in their loaders (data/prepare.py drops samples with fewer than
    3 history items, which is the same rule).
  - Output: interactions.csv (timestamps are positions), items.csv (every id of id2name, so that
    candidates may name items no sequence holds), users.csv (train / valid / test).
  - --afl-candidates also writes candidates.csv for the test split with AFL's recipe, which
    reproduces AFL's published LastFM candidate sets: random.seed(303) once; the test rows in file
    order after the len_seq >= 3 filter; canset = the id2name ids in file order minus the history
    and the target; random.sample(canset, 19) + [target], then random.shuffle of that list.
  - The pickles are read with an allow-list of the classes a DataFrame of plain values needs
    (never a plain pickle.load of a downloaded file: unpickling can run any code). pandas is needed
    for that, and only here.
"""

import argparse
import csv
import importlib.util
import io
import pickle
import random
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `data.sources` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.sources import DataError  # noqa: E402

# (module, name) pairs a pickled DataFrame of ints, lists and tuples refers to, in pandas 1.x to 3.x
ALLOWED = {
    ("builtins", "slice"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "object"),
    ("functools", "partial"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("pandas", "DataFrame"), ("pandas.core.frame", "DataFrame"),
    ("pandas", "Index"), ("pandas", "RangeIndex"), ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.base", "_new_Index"), ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.indexes.numeric", "Int64Index"), ("pandas.core.indexes.numeric", "UInt64Index"),
    ("pandas.core.indexes.numeric", "Float64Index"),
    ("pandas.core.internals.managers", "BlockManager"),
           ("pandas.core.internals.blocks", "new_block"),
    ("pandas.core.internals.blocks", "make_block"), ("pandas._libs.internals", "_unpickle_block"),
    ("pandas", "StringDtype"), ("pandas.arrays", "StringArray"),
           ("pandas.core.arrays.string_", "StringArray"),
    ("pandas.core.arrays.string_", "StringDtype"),
           ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
}


# classes that moved since pandas 1.x / numpy 1.x wrote the published files: pandas 2 dropped the
# numeric index classes (its own read_pickle maps them to Index the same way), numpy 2 renamed
# numpy.core to numpy._core (the old name still works, with a DeprecationWarning; numpy 1.x
# reads numpy 2's pickles under the old name)
NUMPY2 = int(np.__version__.split(".")[0]) >= 2
MOVED = {("pandas.core.indexes.numeric", n): ("pandas.core.indexes.base", "Index")
         for n in ("Int64Index", "UInt64Index", "Float64Index")}


class _AllowListUnpickler(pickle.Unpickler):
    where = ""

    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise DataError(f"{self.where}: refusing to unpickle {module}.{name}: only DataFrames "
                            "of plain values are read (is this the published file?).")
        if (module, name) in MOVED and importlib.util.find_spec(module) is None:
            module, name = MOVED[(module, name)]
        if module.startswith(("numpy.core.", "numpy._core.")):     # the name this numpy uses
            module = ("numpy._core." if NUMPY2 else "numpy.core.") + module.split(".", 2)[2]
        return super().find_class(module, name)


def read_frame(path):
    """Rows of a pickled DataFrame as a list of dicts with seq, len_seq, next (allow-listed)."""
    try:
        import pandas  # noqa: F401  (the pickle's classes live there)
    except ImportError:
        raise DataError("the converter needs pandas to read the .df files: pip install "
                        "pandas.") from None
    try:
        u = _AllowListUnpickler(io.BytesIO(Path(path).read_bytes()))
        u.where = str(path)
        df = u.load()
    except FileNotFoundError:
        raise DataError(f"{path} is missing: a LLaRA-style folder holds train_data.df, "
                        "Val_data.df, Test_data.df and id2name.txt (or u.item).") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
            ImportError) as e:
        raise DataError(f"{path} is not a readable pickled DataFrame ({e}).") from None
    missing = {"seq", "len_seq", "next"} - set(getattr(df, "columns", []))
    if missing:
        raise DataError(f"{path} has no column {sorted(missing)[0]!r}: expected seq, len_seq and "
                        "next.")
    return [dict(seq=[_id(x) for x in r.seq], len_seq=int(r.len_seq), next=_id(r.next))
            for r in df.itertuples(index=False)]


def _id(x):
    """An item id: an int, or the first field of MovieLens's (id, rating) pairs."""
    return int(x[0]) if isinstance(x, (tuple, list)) else int(x)


def read_names(src):
    """{item id: name} in file order: id2name.txt (`id::name`) or MovieLens's u.item (id - 1)."""
    src = Path(src)
    names = {}
    if (src / "id2name.txt").is_file():
        for n, line in enumerate((src / "id2name.txt").read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                if "::" not in line:
                    raise DataError(f"{src / 'id2name.txt'} line {n}: expected 'id::name'.")
                i, name = line.split("::", 1)
                names[int(i)] = name.strip()
    elif (src / "u.item").is_file():
        for line in (src / "u.item").read_text(encoding="latin-1").splitlines():
            if line.strip():
                f = line.split("|")
                names[int(f[0]) - 1] = f[1]
    else:
        raise DataError(f"{src} has neither id2name.txt nor u.item: is it a LLaRA-style data "
                        "folder?")
    return names


def convert(src, out, afl_candidates=False, log=print):
    """Write the custom folder `out` from the LLaRA-style folder `src`."""
    src, out = Path(src), Path(out)
    names = read_names(src)
    train = read_frame(src / "train_data.df")
    valid = read_frame(src / "Val_data.df")
    test = read_frame(src / "Test_data.df")
    pad = len(names)
    users = []                                    # (user id, role, items)
    for row in train:                             # a row of padding only starts a new user
        if not users or all(x == pad for x in row["seq"]):
            users.append([f"train{len(users)}", "train", []])
        users[-1][2].append(row["next"])
    kept = {}
    for role, rows in (("valid", valid), ("test", test)):
        kept[role] = [r for r in rows if r["len_seq"] >= 3]
        for k, r in enumerate(kept[role]):
            users.append([f"{role}{k}", role, [x for x in r["seq"] if x != pad] + [r["next"]]])
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "interactions.csv", ["user", "item", "timestamp"],
               ([u, i, t] for u, _, items in users for t, i in enumerate(items)))
    _write_csv(out / "items.csv", ["item", "title"],
               ([i, name or f"item {i}"] for i, name in names.items()))
    _write_csv(out / "users.csv", ["user", "role"], ([u, role] for u, role, _ in users))
    (out / "candidates.csv").unlink(missing_ok=True)
    if afl_candidates:
        lists = afl_test_candidates(names, kept["test"], pad)
        _write_csv(out / "candidates.csv", ["user", "split", "candidates"],
                   ([f"test{k}", "test", " ".join(map(str, c))] for k, c in enumerate(lists)))
    log(f"wrote {out}: {sum(r == 'train' for _, r, _ in users)} train, {len(kept['valid'])} valid "
        f"and {len(kept['test'])} test users, {len(names)} items"
        + (", AFL's test candidates" if afl_candidates else ""))


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def afl_test_candidates(names, test_rows, pad):
    """AFL's candidate recipe for the test rows (already filtered to len_seq >= 3, in file
    order)."""
    random.seed(303)
    ids = list(names)
    lists = []
    for r in test_rows:
        hist = {x for x in r["seq"] if x != pad}
        canset = [i for i in ids if i not in hist and i != r["next"]]
        c = random.sample(canset, 19) + [r["next"]]
        random.shuffle(c)
        lists.append(c)
    return lists


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a LLaRA / AFL data folder to the custom "
                                            "format.")
    p.add_argument("--src", required=True,
                   help="folder with train_data.df, Val_data.df, Test_data.df, id2name.txt")
    p.add_argument("--out", required=True, help="custom-format folder to write")
    p.add_argument("--afl-candidates", action="store_true",
                   help="also write AFL's test candidate lists")
    a = p.parse_args(argv)
    try:
        convert(a.src, a.out, a.afl_candidates)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
