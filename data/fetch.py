"""
Getting a dataset's raw files for data/prepare.py: download, checksums, local copies, the cache
folder. Its own file because where the bytes come from (an official address, a mirror, a file://
URL, an extracted folder, a custom dataset's folder) is a concern apart from reading them
(data/sources.py) and from building the protocol's splits (data/prepare.py).

  - fetch(): downloads to a .part file and checks sha256 (or GroupLens's md5), so an interrupted or
    corrupt download never looks complete; every failure is one DataError sentence with the fix.
  - locate(): finds or downloads a dataset's raw files (data/sources.SOURCES, or a custom folder)
    and returns its reader, cache folder and a fingerprint of the raw data.
  - probe_writable(): the cache folder must take a file before hours of work start.
"""

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from data.sources import CUSTOM, SOURCES, DataError, Raw


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
    check). A download goes to dest.part first, so an interrupted one never looks complete. The
    address a file came from is kept beside it (dest.source): a cached file from another address
    is fetched again, never silently read in place of the one asked for."""
    def check(path, what):
        for algo, want, flag in (("sha256", sha256, "--data-sha256 {}"),
                                 ("md5", md5, "--data-sha256 none")):
            if want:
                got = digest(path, algo)
                if got != want:
                    return (f"{what} has {algo} {got}, expected {want}: it is corrupt or not the "
                            f"official file (pass {flag.format(digest(path))} if you trust it)")
        return None

    source = dest.with_name(dest.name + ".source")
    came_from = source.read_text().strip() if source.is_file() else None
    if dest.exists() and came_from not in (None, url):
        log(f"{dest} came from {came_from}, not {url}: fetching it again")
        dest.unlink()
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
            raise DataError(f"could not download {url} ({getattr(e, 'reason', None) or e}): check "
                            f"the address (--data-url) or put the file at {dest} yourself.")
        bad = check(part, f"the file downloaded from {url}")
        if bad:
            part.unlink()
            raise DataError(bad + ".")
        os.replace(part, dest)
        source.write_text(url + "\n")
    else:
        bad = check(dest, str(dest))
        if bad:
            raise DataError(bad + "; or delete it to download it again.")


def _local_dir(url):
    """The local folder a --data-url names (a path or file:// address), or None."""
    if not url:
        return None
    if url.startswith("file:"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    else:
        path = Path(url)
    return path if path.is_dir() else None


def _files_sha256(paths):
    """One fingerprint for several files: sha256 of their names and sha256s."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.name} {sha256_of(p)}\n".encode())
    return h.hexdigest()


def is_custom(name):
    """A --dataset value that is a folder path rather than a source name."""
    return name not in SOURCES and ("/" in name or os.sep in name or name.startswith(".")
                                    or Path(name).is_dir())


def locate(cfg, log=print):
    """Make the raw files available (download, or find them locally) and check them.
    Returns (source, Raw, cache folder, fingerprint of the raw data)."""
    if is_custom(cfg.dataset):
        folder = Path(cfg.dataset).expanduser()
        if not folder.is_dir():
            raise DataError(f"--dataset {cfg.dataset}: no such folder (a custom dataset is a "
                            "folder with interactions.csv and items.csv; see docs/datasets.md).")
        files = [folder / m for m in CUSTOM["members"]]
        for f in files:
            if not f.is_file():
                raise DataError(f"{f} is missing: a custom dataset folder needs interactions.csv "
                                "and items.csv (format in docs/datasets.md).")
        files += [folder / m for m in CUSTOM["optional"] if (folder / m).is_file()]
        tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
        cache = Path(cfg.data_dir) / f"custom-{folder.resolve().name}-{tag}"
        _check_writable(cache)
        return CUSTOM, Raw(files), cache, _files_sha256(files)
    if cfg.dataset not in SOURCES:
        raise DataError(f"unknown dataset {cfg.dataset!r}: choose one of "
                        f"{', '.join(sorted(SOURCES))}, or give the path of a folder in the custom "
                        "format (see docs/datasets.md).")
    src = SOURCES[cfg.dataset]
    cache = Path(cfg.data_dir) / cfg.dataset
    _check_writable(cache)
    members = src.get("member_sha256", {})
    no_check = cfg.data_sha256.lower() == "none"
    if cfg.data_sha256 and not no_check and len(src["files"]) > 1:
        raise DataError(f"--data-sha256 takes one checksum, but {cfg.dataset} has "
                        f"{len(src['files'])} raw files: use '' or 'none'.")
    local = _local_dir(cfg.data_url)
    if local is not None:                                   # an extracted copy: read it in place
        raw = Raw([local], None if no_check else members)
        names = set(members) or None  # only the checked files, if any are named
        log(f"reading {cfg.dataset} from the folder {local}")
        paths = sorted(p for p in local.rglob("*") if p.is_file()
                       and (names is None or p.name in names))
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
    """Create folder and write and remove a small file in it; raises OSError if that fails. The
    file is this process's own: runs started together on one data folder probe it at once."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test.{os.getpid()}"
    probe.write_bytes(b"ok")
    probe.unlink()


def _check_writable(folder: Path):
    try:
        probe_writable(folder)
    except OSError as e:
        raise DataError(f"cannot write to the data folder {folder} ({e.strerror or e}): choose "
                        "another --data-dir.")
