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
import ast
import csv
import datetime
import gzip
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `data.sasrec` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.sasrec import SASRecConfig, last_hidden, score_all, train_sasrec  # noqa: E402

CACHE_VERSION = 2
DATA_DIR = Path(__file__).resolve().parent


class DataError(Exception):
    """A problem with the input data or its options; the message is one sentence for the user."""


# --------------------------------------------------------------------------------------------------
# Raw files: wherever they are (a zip, a gzip file, an extracted folder), the parsers ask for a file
# by its name and get its lines; errors name the file and the line.


class Raw:
    """Read access to a dataset's raw files. `paths` are zips, plain files (.gz is unpacked) or
    folders; a file is found by its base name, so a zip with or without a top folder both work.
    `member_sha256` {name: sha256} checks files whose checksum is published member by member."""

    def __init__(self, paths, member_sha256=None):
        self.paths = [Path(p) for p in paths]
        self.member_sha256 = member_sha256 or {}

    def _find(self, name):
        for p in self.paths:
            if p.is_dir():
                hits = sorted(p.rglob(name))
                if hits:
                    return hits[0].read_bytes(), str(hits[0])
            elif p.name == name:
                return p.read_bytes(), str(p)
            elif p.suffix == ".zip":
                try:
                    with zipfile.ZipFile(p) as zf:
                        hits = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == name]
                        if hits:
                            return zf.read(hits[0]), f"{p.name}:{hits[0]}"
                except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                    raise DataError(f"{p} is not a readable zip ({e}): it may be truncated; delete it and run again.")
        raise DataError(f"{name} was not found in {', '.join(map(str, self.paths))}: is this the right file "
                        f"or folder for the dataset?")

    def data(self, name):
        """(bytes, where) of the file called name, unpacked if it is gzip, checked if its sha256 is known."""
        raw, where = self._find(name)
        want = self.member_sha256.get(name)
        if want and hashlib.sha256(raw).hexdigest() != want:
            raise DataError(f"{where} has sha256 {hashlib.sha256(raw).hexdigest()}, expected {want}: it is not "
                            f"the official file (pass --data-sha256 none if you trust it).")
        if name.endswith(".gz"):
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{where} is not a readable gzip file ({e}): it may be truncated; delete it and "
                                f"run again.")
        return raw, where

    def lines(self, name, encoding):
        """[(line number, text)] of the file called name, blank lines left out."""
        raw, where = self.data(name)
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise DataError(f"{where} is not valid {encoding} text ({e.reason} on line {line}): is it the "
                            f"original file?")
        return where, [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


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


def _fields(line, sep, n, where, at_least=False):
    f = line.split(sep)
    if len(f) < n if at_least else len(f) != n:
        raise DataError(f"{where}: expected {'at least ' if at_least else ''}{n} fields separated by "
                        f"{sep!r}, found {len(f)}: is the file in its original format?")
    return f


@dataclass
class Parsed:
    """What a parser returns: one entry per event in user / item (ids as in the files, int or str),
    rating (nan when the source has none) and ts (any number that orders a user's events), plus
    titles and genres keyed by item id (items without a title get 'item <id>', counted)."""
    user: list
    item: list
    rating: list
    ts: list
    titles: dict
    genres: dict


# --------------------------------------------------------------------------------------------------
# One parser per source. Each reads the files in their official format, nothing else.


def _rating_rows(raw, name, sep):
    """`user<sep>item<sep>rating<sep>timestamp` lines (latin-1, no header) of the GroupLens .dat files."""
    p = Parsed([], [], [], [], {}, {})
    where_, lines = raw.lines(name, "latin-1")
    for n, line in lines:
        where = f"{where_} line {n}"
        f = _fields(line, sep, 4, where)
        p.user.append(_int(f[0], where)), p.item.append(_int(f[1], where))
        p.rating.append(_float(f[2], where)), p.ts.append(_int(f[3], where))
    return p


def parse_ml1m(raw):
    """ml-1m: ratings.dat `UserID::MovieID::Rating::Timestamp`, movies.dat `MovieID::Title::Genres`,
    both latin-1."""
    p = _rating_rows(raw, "ratings.dat", "::")
    name, lines = raw.lines("movies.dat", "latin-1")
    for n, line in lines:
        f = _fields(line, "::", 3, f"{name} line {n}")
        i = _int(f[0], f"{name} line {n}")
        p.titles[i], p.genres[i] = f[1], f[2]
    return p


def parse_ml_latest_small(raw):
    """ml-latest-small: ratings.csv `userId,movieId,rating,timestamp`, movies.csv
    `movieId,title,genres` (UTF-8, quoted CSV, one header line)."""
    p = Parsed([], [], [], [], {}, {})
    name, lines = raw.lines("ratings.csv", "utf-8")
    for (n, _), f in zip(lines[1:], csv.reader([t for _, t in lines[1:]])):
        where = f"{name} line {n}"
        if len(f) != 4:
            raise DataError(f"{where}: expected 4 comma-separated fields, found {len(f)}.")
        p.user.append(_int(f[0], where)), p.item.append(_int(f[1], where))
        p.rating.append(_float(f[2], where)), p.ts.append(_int(f[3], where))
    name, lines = raw.lines("movies.csv", "utf-8")
    for (n, _), f in zip(lines[1:], csv.reader([t for _, t in lines[1:]])):
        if len(f) != 3:
            raise DataError(f"{name} line {n}: expected 3 comma-separated fields, found {len(f)}.")
        i = _int(f[0], f"{name} line {n}")
        p.titles[i], p.genres[i] = f[1], f[2]
    return p


ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]


def parse_ml100k(raw):
    """ml-100k: u.data `user \\t item \\t rating \\t timestamp`; u.item (latin-1, '|'-separated)
    `id|title|release date|video release date|IMDb URL|` then 19 genre flags (order of u.genre)."""
    p = _rating_rows(raw, "u.data", "\t")
    name, lines = raw.lines("u.item", "latin-1")
    for n, line in lines:
        where = f"{name} line {n}"
        f = _fields(line, "|", 5 + len(ML100K_GENRES), where)
        i = _int(f[0], where)
        p.titles[i] = f[1]
        p.genres[i] = "|".join(g for g, flag in zip(ML100K_GENRES, f[5:]) if flag.strip() == "1")
    return p


def parse_lastfm(raw):
    """HetRec 2011 Last.fm 2K. Only user_taggedartists.dat (`userID artistID tagID day month year`,
    tab-separated, one header line) carries time, so an interaction is a (user, artist) pair dated
    by the first day the user tagged that artist; several tags of one artist count once. Dates have
    day resolution, so many of a user's events share a day: like every source, ties are broken by
    the artist id (the shared ordering in build(): time, then item id). No ratings (plays in
    user_artists.dat are not ratings and have no time). Names come from artists.dat
    (`id name url pictureURL`, UTF-8)."""
    p = Parsed([], [], [], [], {}, {})
    first = {}
    name, lines = raw.lines("user_taggedartists.dat", "utf-8")
    for n, line in lines[1:]:
        where = f"{name} line {n}"
        f = _fields(line, "\t", 6, where)
        u, a = _int(f[0], where), _int(f[1], where)
        try:
            day = datetime.date(_int(f[5], where), _int(f[4], where), _int(f[3], where)).toordinal()
        except ValueError as e:
            raise DataError(f"{where}: {f[3]}.{f[4]}.{f[5]} is not a date ({e}).")
        if day < first.get((u, a), day + 1):
            first[(u, a)] = day
    for (u, a), day in first.items():
        p.user.append(u), p.item.append(a), p.rating.append(float("nan")), p.ts.append(day)
    name, lines = raw.lines("artists.dat", "utf-8")
    for n, line in lines[1:]:
        f = _fields(line, "\t", 2, f"{name} line {n}", at_least=True)
        p.titles[_int(f[0], f"{name} line {n}")] = f[1]
    return p


def _json_lines(raw, name):
    """Records of a gzipped JSON-lines file. Some Amazon metadata files hold Python dict literals
    instead of JSON; those lines are read with ast.literal_eval."""
    where, lines = raw.lines(name, "utf-8")
    for n, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            try:
                rec = ast.literal_eval(line)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise DataError(f"{where} line {n}: not a JSON record; is the file complete?")
        if not isinstance(rec, dict):
            raise DataError(f"{where} line {n}: expected a JSON object, found {type(rec).__name__}.")
        yield f"{where} line {n}", rec


def parse_instruments(raw):
    """Amazon Reviews 2018, Musical Instruments. Musical_Instruments_5.json.gz: the 5-core reviews,
    one JSON object per line with reviewerID, asin, overall (1-5 stars), unixReviewTime.
    meta_Musical_Instruments.json.gz: one object per product with asin, title, category (list) and
    description (list); the first record of a repeated asin wins."""
    p = Parsed([], [], [], [], {}, {})
    for where, r in _json_lines(raw, "Musical_Instruments_5.json.gz"):
        try:
            u, i, s, t = r["reviewerID"], r["asin"], r["overall"], r["unixReviewTime"]
        except KeyError as e:
            raise DataError(f"{where}: the review has no {e.args[0]!r} field.")
        p.user.append(str(u)), p.item.append(str(i))
        p.rating.append(_float(s, where)), p.ts.append(_int(t, where))
    for where, r in _json_lines(raw, "meta_Musical_Instruments.json.gz"):
        i = str(r.get("asin", ""))
        title = " ".join(str(r.get("title", "")).split())
        if i and title and i not in p.titles:
            p.titles[i] = title
            cat = r.get("category") or []
            p.genres[i] = "|".join(str(c) for c in cat[1:]) if isinstance(cat, list) else str(cat)
    return p


def parse_custom(raw):
    """Your own data: a folder with two UTF-8 CSV files with a header line (columns by name, in any
    order; other columns are ignored; quote fields that hold commas):
      interactions.csv  user,item,timestamp[,rating]   ids are any strings; timestamp is a number
                        (seconds, days, a counter: anything that orders a user's events) or an ISO
                        date such as 2024-05-01 or 2024-05-01T12:30:00; rating optional.
      items.csv         item,title[,description][,genres]   one row per item id."""
    p = Parsed([], [], [], [], {}, {})
    where, lines = raw.lines("interactions.csv", "utf-8-sig")
    rows = list(csv.reader([t for _, t in lines]))
    head = [h.strip().lower() for h in rows[0]] if rows else []
    if not {"user", "item", "timestamp"} <= set(head):
        raise DataError(f"{where} line 1: expected a header naming the columns user,item,timestamp (and "
                        f"optionally rating), comma-separated; found {lines[0][1] if lines else 'nothing'!r}.")
    cu, ci, ct = head.index("user"), head.index("item"), head.index("timestamp")
    cr = head.index("rating") if "rating" in head else None
    for (n, _), f in zip(lines[1:], rows[1:]):
        at = f"{where} line {n}"
        if len(f) != len(head):
            raise DataError(f"{at}: expected {len(head)} comma-separated fields as in the header, found {len(f)}.")
        if not f[cu].strip() or not f[ci].strip():
            raise DataError(f"{at}: the user or item id is empty.")
        p.user.append(f[cu].strip()), p.item.append(f[ci].strip())
        p.rating.append(_float(f[cr], at) if cr is not None and f[cr].strip() else float("nan"))
        p.ts.append(_timestamp(f[ct], at))
    where, lines = raw.lines("items.csv", "utf-8-sig")
    rows = list(csv.reader([t for _, t in lines]))
    head = [h.strip().lower() for h in rows[0]] if rows else []
    if not {"item", "title"} <= set(head):
        raise DataError(f"{where} line 1: expected a header naming the columns item,title (and optionally "
                        f"description, genres), comma-separated; found {lines[0][1] if lines else 'nothing'!r}.")
    ci, cti = head.index("item"), head.index("title")
    cg = head.index("genres") if "genres" in head else None
    for (n, _), f in zip(lines[1:], rows[1:]):
        if len(f) != len(head):
            raise DataError(f"{where} line {n}: expected {len(head)} comma-separated fields as in the header, "
                            f"found {len(f)}.")
        if f[cti].strip() and f[ci].strip() not in p.titles:
            p.titles[f[ci].strip()] = f[cti].strip()
            p.genres[f[ci].strip()] = f[cg].strip() if cg is not None else ""
    return p


def _timestamp(value, where):
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise DataError(f"{where}: timestamp {value!r} is neither a number nor an ISO date (2024-05-01).")


@dataclass
class RawFile:
    name: str
    """local file name"""
    url: str
    """official address"""
    sha256: str = ""
    """published or verified checksum ('' = none known)"""
    md5: str = ""
    """md5 where only that is published (GroupLens lists md5 sums)"""


SOURCES = {
    "ml-1m": dict(parse=parse_ml1m, files=[RawFile(
        "ml-1m.zip", "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20")]),
    "ml-100k": dict(parse=parse_ml100k, files=[RawFile(
        "ml-100k.zip", "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        md5="0e33842e24a9c977be4e0107933c0723")]),
    "ml-latest-small": dict(parse=parse_ml_latest_small, files=[RawFile(
        "ml-latest-small.zip", "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",
        sha256="696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436")]),
    # The zip's own checksum is not published; its two files' are (taken from the extracted copy).
    "lastfm": dict(parse=parse_lastfm, files=[RawFile(
        "hetrec2011-lastfm-2k.zip", "https://files.grouplens.org/datasets/hetrec2011/hetrec2011-lastfm-2k.zip")],
        member_sha256={
            "user_taggedartists.dat": "c4a9ffae9ab47a9f9b2f0678ab1f7e5c1db4ca818837d8cddd1f5699c5bbf048",
            "artists.dat": "c173881362c6b28551368fecb3c0be5a6a30a6cd859e1f5775413dfe46d48648"}),
    # No checksums are published for the Amazon files; the sha256 of what was read is kept in
    # processed.json, and --data-sha256 none is not needed.
    "instruments": dict(parse=parse_instruments, files=[
        RawFile("Musical_Instruments_5.json.gz", "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/"
                "categoryFilesSmall/Musical_Instruments_5.json.gz"),
        RawFile("meta_Musical_Instruments.json.gz", "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/"
                "metaFiles2/meta_Musical_Instruments.json.gz")]),
}
CUSTOM = dict(parse=parse_custom, files=[], members=["interactions.csv", "items.csv"])


def digest(path, algo="sha256"):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_of(path):
    return digest(path)


def fetch(url, dest: Path, sha256=None, log=print, md5=None):
    """Download url to dest unless it is there, then verify its sha256 (or md5; None = do not
    check). A download goes to dest.part first, so an interrupted one never looks complete."""
    def check(path, what):
        for algo, want, flag in (("sha256", sha256, f"--data-sha256 {{}}"), ("md5", md5, "--data-sha256 none")):
            if want:
                got = digest(path, algo)
                if got != want:
                    return (f"{what} has {algo} {got}, expected {want}: it is corrupt or not the official file "
                            f"(pass {flag.format(digest(path))} if you trust it)")
        return None

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
            raise DataError(f"could not download {url} ({getattr(e, 'reason', None) or e}): check the address "
                            f"(--data-url) or put the file at {dest} yourself.")
        bad = check(part, f"the file downloaded from {url}")
        if bad:
            part.unlink()
            raise DataError(bad + ".")
        os.replace(part, dest)
    else:
        bad = check(dest, str(dest))
        if bad:
            raise DataError(bad + "; or delete it to download it again.")


def _local_dir(url):
    """The local folder a --data-url names (a path or file:// address), or None."""
    if not url:
        return None
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)) if url.startswith("file:") else Path(url)
    return path if path.is_dir() else None


def _files_sha256(paths):
    """One fingerprint for several files: sha256 of their names and sha256s."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.name} {sha256_of(p)}\n".encode())
    return h.hexdigest()


def is_custom(name):
    """A --dataset value that is a folder path rather than a source name."""
    return name not in SOURCES and ("/" in name or os.sep in name or name.startswith(".") or Path(name).is_dir())


def locate(cfg, log=print):
    """Make the raw files available (download, or find them locally) and check them.
    Returns (source, Raw, cache folder, fingerprint of the raw data)."""
    if is_custom(cfg.dataset):
        folder = Path(cfg.dataset).expanduser()
        if not folder.is_dir():
            raise DataError(f"--dataset {cfg.dataset}: no such folder (a custom dataset is a folder with "
                            f"interactions.csv and items.csv; see the README).")
        files = [folder / m for m in CUSTOM["members"]]
        for f in files:
            if not f.is_file():
                raise DataError(f"{f} is missing: a custom dataset folder needs interactions.csv and items.csv "
                                f"(format in the README).")
        tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
        cache = Path(cfg.data_dir) / f"custom-{folder.resolve().name}-{tag}"
        _check_writable(cache)
        return CUSTOM, Raw(files), cache, _files_sha256(files)
    if cfg.dataset not in SOURCES:
        raise DataError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(sorted(SOURCES))}, or "
                        f"give the path of a folder in the custom format (see the README).")
    src = SOURCES[cfg.dataset]
    cache = Path(cfg.data_dir) / cfg.dataset
    _check_writable(cache)
    members = src.get("member_sha256", {})
    no_check = cfg.data_sha256.lower() == "none"
    if cfg.data_sha256 and not no_check and len(src["files"]) > 1:
        raise DataError(f"--data-sha256 takes one checksum, but {cfg.dataset} has {len(src['files'])} raw files: "
                        f"use '' or 'none'.")
    local = _local_dir(cfg.data_url)
    if local is not None:                                   # an extracted copy: read it in place
        raw = Raw([local], None if no_check else members)
        names = set(members) or None                       # only the checked files, if any are named
        log(f"reading {cfg.dataset} from the folder {local}")
        paths = sorted(p for p in local.rglob("*") if p.is_file() and (names is None or p.name in names))
        return src, raw, cache, _files_sha256(paths)
    paths = []
    for rf in src["files"]:
        url = cfg.data_url or rf.url
        if cfg.data_url and len(src["files"]) > 1:          # a base address holding all the files
            url = cfg.data_url.rstrip("/") + "/" + rf.name
        sha = None if no_check else (cfg.data_sha256 or rf.sha256 or None)
        md5 = None if no_check or cfg.data_sha256 else (rf.md5 or None)
        fetch(url, cache / rf.name, sha, log, md5=md5)
        paths.append(cache / rf.name)
    return src, Raw(paths, None if no_check else members), cache, _files_sha256(paths)


def probe_writable(folder: Path):
    """Create folder and write and remove a small file in it; raises OSError if that fails."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".write-test"
    probe.write_bytes(b"ok")
    probe.unlink()


def _check_writable(folder: Path):
    try:
        probe_writable(folder)
    except OSError as e:
        raise DataError(f"cannot write to the data folder {folder} ({e.strerror or e}): choose another --data-dir.")


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
    if cfg.candidates not in ("sasrec", "random"):
        raise DataError(f"--candidates must be 'sasrec' or 'random', not {cfg.candidates!r}.")
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
    parsed = src["parse"](raw)
    arrays, meta = build(parsed, cfg, log)
    meta.update(want)
    meta["dataset"] = cfg.dataset
    write_cache(folder, arrays, meta)
    return Data(arrays, meta)


def write_cache(folder: Path, arrays, meta):
    """Write the arrays, then the JSON that vouches for them: a crash or a full disk between the two
    leaves no JSON, and prepare() does not trust an NPZ without its JSON."""
    meta_path, npz_path, tmp = folder / "processed.json", folder / "processed.npz", folder / "processed.tmp.npz"
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
        raise DataError(f"cannot write the processed data to {folder} ({e.strerror or e}): free some space or "
                        f"choose another --data-dir.")


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
    items_raw, item = np.unique(np.asarray(parsed.item), return_inverse=True)
    rating, ts = np.asarray(parsed.rating, np.float64), np.asarray(parsed.ts, np.float64)
    order = np.lexsort((item, ts, user))                                  # user, then time, then item
    user, item, rating = user[order], item[order], rating[order]
    key = user.astype(np.int64) * len(items_raw) + item
    _, first = np.unique(key, return_index=True)                          # first (user, item) in time
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
    t0 = time.time()
    seqs, rates, users_raw, items_raw, n_dup = sequences(parsed, cfg.dataset, log)
    n_items, n_users = len(items_raw), len(users_raw)
    titles, genres = parsed.titles, parsed.genres
    n_untitled = sum(i.item() not in titles for i in items_raw)
    if n_untitled:
        log(f"{n_untitled} items have no title; they are called 'item <id>'")
    n_short = sum(len(s) < cfg.min_history + 1 for s in seqs)          # a test sample needs min_history + 1
    if n_short:
        log(f"{n_short} users have fewer than {cfg.min_history + 1} interactions and give no test sample "
            f"(their events still train SASRec)")
    if n_short == n_users:
        raise DataError(f"{cfg.dataset} is empty after filtering: no user has the {cfg.min_history + 1} "
                        f"interactions a test sample needs.")
    item = np.concatenate(seqs)
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
    rating = np.concatenate(rates)
    has_ratings = bool(np.isfinite(rating).all() and (rating != 0).any())
    arrays.update(
        seq_ptr=ptr, seq_items=np.concatenate(train_seqs).astype(np.int64),
        seq_rating=np.concatenate([r[:-2] if len(r) > 2 else r[:0] for r in rates]).astype(np.float32),
        peers=peers.astype(np.int64), peer_w=w.astype(np.float32),
        item_vec=full.item_vectors().detach().numpy().astype(np.float32),
        item_pop=np.bincount(np.concatenate(train_seqs).astype(np.int64), minlength=n_items),
        f1_user=np.array(f1_user, np.int64), f1_hist=np.array(f1_hist, np.int64).reshape(-1, H),
        f1_item=np.array(f1_item, np.int64), f1_label=np.array(f1_label, np.int64),
        titles=np.array([titles.get(i.item(), f"item {i.item()}") for i in items_raw]),
        genres=np.array([genres.get(i.item(), "") for i in items_raw]),
        item_raw=items_raw, user_raw=users_raw,
    )
    meta = dict(n_users=n_users, n_items=n_items, n_interactions=int(len(item)), n_duplicates=n_dup,
                n_untitled=n_untitled, n_users_without_test=n_short, has_ratings=has_ratings,
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
            masked = torch.from_numpy(np.where(excluded, -np.inf, scores))
            neg = torch.topk(masked, K - 1, dim=1, sorted=False).indices.numpy()   # the K-1 highest
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
    p.add_argument("--dataset", default=c.dataset, help=f"one of {', '.join(sorted(SOURCES))}, or the path of a "
                   f"folder with interactions.csv and items.csv (see the README)")
    p.add_argument("--data-dir", default=c.data_dir, help="folder for downloads and the processed cache")
    p.add_argument("--data-url", default=c.data_url, help="address of the raw file (file:// works), or a local folder of extracted files")
    p.add_argument("--data-sha256", default=c.data_sha256, help="expected sha256 of the raw file ('none' skips the check)")
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
