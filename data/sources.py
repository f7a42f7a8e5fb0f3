"""
Raw dataset files for data/prepare.py: where they come from and how each source is read. Its own
file because reading many formats (and the ways they break) is a concern apart from building the
protocol's splits and candidates, which prepare.py does the same way for every source.

  - Raw: one reader for a zip (with or without a top folder), a .gz file, or an extracted folder;
    a parser asks for a file by its name and gets its lines; errors name the file and the line.
  - One parser per source (parse_ml1m, parse_ml_latest_small, parse_ml100k, parse_lastfm,
    parse_instruments, parse_custom) -> Parsed: (user, item, time[, rating]) rows and titles.
  - SOURCES: each source's official files and checksums (data/fetch.py downloads and checks them).
"""

import ast
import csv
import datetime
import gzip
import hashlib
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path


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
                    raise DataError(f"{p} is not a readable zip ({e}): it may be truncated; "
                                    f"delete it and run again.")
        raise DataError(f"{name} was not found in {', '.join(map(str, self.paths))}: is "
                        f"this the right file "
                        f"or folder for the dataset?")

    def has(self, name):
        """Whether one of the paths is or holds a file called name."""
        try:
            self._find(name)
            return True
        except DataError:
            return False

    def data(self, name):
        """(bytes, where) of the file called name, unpacked if it is gzip, checked if its sha256 is
        known."""
        raw, where = self._find(name)
        want = self.member_sha256.get(name)
        if want and hashlib.sha256(raw).hexdigest() != want:
            raise DataError(f"{where} has sha256 {hashlib.sha256(raw).hexdigest()}, "
                            f"expected {want}: it is not "
                            f"the official file (pass --data-sha256 none if you trust it).")
        if name.endswith(".gz"):
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{where} is not a readable gzip file ({e}): it may be "
                                f"truncated; delete it and "
                                f"run again.")
        return raw, where

    def lines(self, name, encoding):
        """[(line number, text)] of the file called name, blank lines left out."""
        raw, where = self.data(name)
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise DataError(f"{where} is not valid {encoding} text ({e.reason} on "
                            f"line {line}): is it the "
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
        raise DataError(f"{where}: expected {'at least ' if at_least else ''}{n} "
                        f"fields separated by "
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
    roles: dict = None
    """custom format with users.csv: {user id: 'train' | 'valid' | 'test'} (None: leave-one-out)"""
    cand_lists: list = None
    """custom format with candidates.csv: [(user id, split, [item ids], where)]"""


# --------------------------------------------------------------------------------------------------
# One parser per source. Each reads the files in their official format, nothing else.


def _rating_rows(raw, name, sep):
    """`user<sep>item<sep>rating<sep>timestamp` lines (latin-1, no header) of the GroupLens .dat
    files."""
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


ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


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
            raise DataError(f"{where} line {n}: expected a JSON object, found "
                            f"{type(rec).__name__}.")
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
      items.csv         item,title[,description][,genres]   one row per item id.
    Optional, for published benchmark splits (data/prepare.py applies them):
      users.csv         user,role        role train, valid or test; every user listed.
      candidates.csv    user,split,candidates   split valid or test; 20 item ids separated by
                        spaces."""
    p = Parsed([], [], [], [], {}, {})
    where, rows = _csv_table(raw, "interactions.csv", ["user", "item", "timestamp"], ["rating"])
    first_line = {}
    for n, r in rows:
        at = f"{where} line {n}"
        if not r["user"] or not r["item"]:
            raise DataError(f"{at}: the user or item id is empty.")
        p.user.append(r["user"]), p.item.append(r["item"])
        first_line.setdefault(r["user"], at)
        p.rating.append(_float(r["rating"], at) if r.get("rating") else float("nan"))
        p.ts.append(_timestamp(r["timestamp"], at))
    _, rows = _csv_table(raw, "items.csv", ["item", "title"], ["description", "genres"])
    for _, r in rows:
        if r["title"] and r["item"] not in p.titles:
            p.titles[r["item"]] = r["title"]
            p.genres[r["item"]] = r.get("genres", "")
    if raw.has("users.csv"):
        p.roles = _custom_roles(raw, first_line)
    if raw.has("candidates.csv"):
        p.cand_lists = _custom_candidates(raw)
    return p


def _csv_table(raw, name, columns, optional=()):
    """(where, [(line number, {column: value})]) of a custom-format CSV file whose header names at
    least `columns` (and any of `optional`, which are then in the dicts too); values are
    stripped."""
    where, lines = raw.lines(name, "utf-8-sig")
    rows = list(csv.reader([t for _, t in lines]))
    head = [h.strip().lower() for h in rows[0]] if rows else []
    if not set(columns) <= set(head):
        also = f" (and optionally {', '.join(optional)})" if optional else ""
        raise DataError(f"{where} line 1: expected a header naming the columns "
                        f"{','.join(columns)}{also}, "
                        f"comma-separated; found {lines[0][1] if lines else 'nothing'!r}.")
    cols = list(columns) + [c for c in optional if c in head]
    out = []
    for (n, _), f in zip(lines[1:], rows[1:]):
        if len(f) != len(head):
            raise DataError(f"{where} line {n}: expected {len(head)} comma-separated "
                            f"fields as in the header, "
                            f"found {len(f)}.")
        out.append((n, {c: f[head.index(c)].strip() for c in cols}))
    return where, out


def _custom_roles(raw, first_line):
    """users.csv (`user,role`, role = train, valid or test): the published split of the users. Every
    user of interactions.csv must be listed; first_line {user: where its first event is}."""
    where, rows = _csv_table(raw, "users.csv", ["user", "role"])
    roles = {}
    for n, r in rows:
        if r["role"] not in ("train", "valid", "test"):
            raise DataError(f"{where} line {n}: role {r['role']!r} must be train, valid or test.")
        if r["user"] in roles:
            raise DataError(f"{where} line {n}: user {r['user']!r} is listed twice.")
        roles[r["user"]] = r["role"]
    for u, at in first_line.items():
        if u not in roles:
            raise DataError(f"{at}: user {u!r} is not in {where}: with users.csv "
                            f"every user needs a role "
                            f"(train, valid or test).")
    return roles


def _custom_candidates(raw):
    """candidates.csv (`user,split,candidates`, split = valid or test, candidates = the published
    item ids separated by spaces, in their order). Checked against the samples in prepare.build."""
    where, rows = _csv_table(raw, "candidates.csv", ["user", "split", "candidates"])
    out, seen = [], set()
    for n, r in rows:
        at = f"{where} line {n}"
        if r["split"] not in ("valid", "test"):
            raise DataError(f"{at}: split {r['split']!r} must be valid or test (a "
                            f"training user gives many "
                            f"samples; their candidates follow --candidates).")
        if (r["user"], r["split"]) in seen:
            raise DataError(f"{at}: user {r['user']!r} has a second {r['split']} row.")
        seen.add((r["user"], r["split"]))
        out.append((r["user"], r["split"], r["candidates"].split(), at))
    return out


def _timestamp(value, where):
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise DataError(f"{where}: timestamp {value!r} is neither a number nor an "
                        f"ISO date (2024-05-01).")


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
        "hetrec2011-lastfm-2k.zip",
        "https://files.grouplens.org/datasets/hetrec2011/hetrec2011-lastfm-2k.zip")],
        member_sha256={
            "user_taggedartists.dat":
                "c4a9ffae9ab47a9f9b2f0678ab1f7e5c1db4ca818837d8cddd1f5699c5bbf048",
            "artists.dat": "c173881362c6b28551368fecb3c0be5a6a30a6cd859e1f5775413dfe46d48648"}),
    # No checksums are published for the Amazon files; the sha256 of what was read is kept in
    # processed.json, and --data-sha256 none is not needed.
    "instruments": dict(parse=parse_instruments, files=[
        RawFile("Musical_Instruments_5.json.gz",
                "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/"
                "categoryFilesSmall/Musical_Instruments_5.json.gz"),
        RawFile("meta_Musical_Instruments.json.gz",
                "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/"
                "metaFiles2/meta_Musical_Instruments.json.gz")]),
}
CUSTOM = dict(parse=parse_custom, files=[], members=["interactions.csv", "items.csv"],
              optional=["users.csv", "candidates.csv"])  # their contents are part of the cache key
