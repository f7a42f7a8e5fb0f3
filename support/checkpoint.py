"""
Surviving long runs (train.py): checkpoints, stops, non-finite steps and the run folder's metrics
log. Its own file because none of it is the method: it is what lets a run of hours be killed,
resumed and end with exactly the numbers of an uninterrupted run (the test checks that).

A checkpoint holds everything a run needs to continue bit for bit: the trained weights (the whole
base in stage 1, the adapters in stage 2, whose base is base.pt), the optimiser, the step, every
random generator, the hindsight-reference buffer, the config, the data fingerprint (refused on
resume where it differs), the prepared arrays' digests (a warning where they differ: the data
prepared again on another machine) and how many lines of metrics.jsonl belong to it. It is
written to a temporary file and renamed; the one before it is kept as ckpt.prev.pt, used when
ckpt.pt is damaged.

An evaluation of hours (a chat model on a CPU) continues where it stopped the same way: each of
its parts (kept_parts: an agent pair's episodes, its two rankings, a UserAgent's judgements;
one user's returns) is written when done, under a key naming all its numbers depend on, and read
again while the key matches; processes started on the same evaluation share its parts.
"""

import dataclasses
import hashlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from env import Trajectory, Turn

CKPT_NAMES = ("ckpt.pt", "ckpt.prev.pt")
CKPT_FORMAT = 2  # 2: sampling is keyed per episode (sampling.sample_next); no torch generator state


class Stopped(Exception):
    """A stop was asked for (SIGTERM, Ctrl-C) and a checkpoint was written."""


class StopFlag:
    """SIGTERM and Ctrl-C set a flag; the training loops check it after each step, write a
    checkpoint and stop. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = None

    def install(self):
        def handler(signum, frame):
            self.signum = signum
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
        return self

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else ""


STOP = StopFlag()


def save_checkpoint(run_dir: Path, state: dict):
    tmp = run_dir / "ckpt.tmp"
    torch.save(dict(state, format=CKPT_FORMAT), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    cur = run_dir / "ckpt.pt"
    if cur.exists():
        os.replace(cur, run_dir / "ckpt.prev.pt")
    os.replace(tmp, cur)


def load_checkpoint(run_dir: Path, log=print):
    """The newest readable checkpoint, or None. A damaged one is reported and skipped."""
    return newest_checkpoint(run_dir, log)[1]


def newest_checkpoint(run_dir: Path, log=print):
    """(path, checkpoint) of the newest readable checkpoint (ckpt.pt, else ckpt.prev.pt), or
    (None, None). A damaged one is reported and skipped."""
    for name in CKPT_NAMES:
        path = run_dir / name
        if not path.exists():
            continue
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
                raise ValueError("not a checkpoint of this version")
            return path, ck
        except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
            why = (str(e).splitlines() or [type(e).__name__])[0][:120]
            log(f"warning: {path} is damaged or incomplete ({why}); "
                f"trying the previous checkpoint")
    return None, None


def data_fingerprint(data):
    return dict(raw_sha256=data.meta["raw_sha256"], options=data.meta["options"])


def prepared_digest(data):
    """{array name: sha1 (16 hex digits)} of the prepared dataset's arrays. data_fingerprint names
    the raw files and the options; this names what was computed from them where the data was
    prepared: SASRec's candidates and prior, trained again on each machine, where another CPU's
    float round-off can change a suggestion (docs/long-runs.md, "Moving a run to another
    machine")."""
    return {k: hashlib.sha1(np.ascontiguousarray(getattr(data, k)).tobytes()).hexdigest()[:16]
            for k in data.array_names}


def prepared_warning(ck, data, whose, then):
    """A warning naming the arrays of the prepared data that differ from those `ck` (a checkpoint
    or coars.pt, as `whose` says) was written with, ending with `then` (what goes on); "" where
    none differs or ck predates the digests."""
    old = ck.get("data_arrays") or {}
    changed = sorted(k for k, v in prepared_digest(data).items() if k in old and old[k] != v)
    if not changed:
        return ""
    return (f"warning: the prepared data differs from the data {whose} ({', '.join(changed)}): "
            "SASRec was trained again here, and this CPU's round-off can change its candidates "
            f"and suggestions; {then}")


def rng_state(rng):
    return json.dumps(rng.bit_generator.state)


def set_rng_state(rng, text):
    rng.bit_generator.state = json.loads(text)


def buffer_state(buffer):
    return json.dumps([[list(k), dataclasses.asdict(tr)] for k, tr in buffer.last.items()],
                      default=_plain)


def set_buffer_state(buffer, text):
    for k, tr in json.loads(text):
        turns = [Turn(**t) for t in tr.pop("turns")]
        buffer.last[tuple(k)] = Trajectory(**tr, turns=turns)


def _plain(x):
    return x.item() if hasattr(x, "item") else str(x)


def metrics_lines(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def truncate_metrics(run_dir, n):
    """Keep the first n lines of metrics.jsonl: the steps after the checkpoint are redone."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)[:n]
        path.write_text("".join(lines))


def finite(*xs):
    return all(bool(torch.isfinite(torch.as_tensor(x)).all()) for x in xs)


# Where each metrics record goes besides metrics.jsonl: the run's live trackers (support/watch.py,
# --tensorboard / --wandb), registered by train.py on rank 0 for the length of the run.
SINKS = []


def log_jsonl(path, rec):
    """Append one record to a run's metrics.jsonl, and hand it to the registered SINKS."""
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    for sink in SINKS:
        sink.log(rec)


class BadSteps(Exception):
    """Too many non-finite steps in a row; the message says where the last good state is."""


def check_bad_streak(cfg, streak, stage, step, run_dir, log, checkpoint):
    if streak >= cfg.max_bad_steps:
        checkpoint()
        raise BadSteps(f"stage {stage} step {step}: {streak} non-finite losses or gradients in a "
                       f"row, so the run stopped; the last good state is checkpointed in {run_dir} "
                       "(lower --lr or --pretrain-lr, then --resume).")


def plain_progress(log, name, done, total, t0, start=0, extra=""):
    """Where stdout is not a terminal (nohup, a cluster job's log) tqdm shows nothing: log one plain
    line about every 5% of a stage instead, with steps done, rate and time left."""
    every = max(1, total // 20)
    if sys.stdout.isatty() or not (done % every == 0 or done == total) or done <= start:
        return
    rate = (time.time() - t0) / (done - start)
    log(f"{name}: step {done}/{total}, {rate:.2f} s/step, about {rate * (total - done) / 60:.1f} "
        "min left" + extra)


# --------------------------------------------------------------------------------------------------
# Evaluations that continue where they stopped (eval.evaluate, eval.user_returns)

ROOT = Path(__file__).resolve().parent.parent
# the files whose code decides what an evaluation part computes: prompts, decoding, scoring, rewards
PART_CODE = ("env.py", "grammar.py", "sampling.py", "scoring.py", "model.py", "reward.py",
             "eval.py", "support/chat.py", "support/hf.py")


def code_digest():
    """sha1 of the code an evaluation part depends on (PART_CODE): any change to it is a new key."""
    h = hashlib.sha1()
    for name in PART_CODE:
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def weights_digest(model, adapters):
    """sha1 of the model's frozen weights and of the named adapters' (None entries: no adapter):
    what a part computed with these agents depends on, whatever run folder they came from."""
    h = hashlib.sha1()
    names = {a for a in adapters if a}
    for name, p in model.named_parameters():
        if ".adapters." in name and name.split(".adapters.")[1].split(".")[0] not in names:
            continue
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def kept_parts(folder, parts, log=lambda *a: None, poll_s=5.0):
    """[(key, compute)] -> their values, in order. compute() gives a JSON-ready value, kept as
    folder/<sha1 of key>.json: a part whose key (a dict naming everything its numbers depend on;
    key["part"] names it in the log) matches a kept one is read instead of computed, so that a
    stopped evaluation continues at the next part, and a part two runs share (the untrained pair
    of one base) is computed once; folder None: always compute. Processes given
    the same parts (`eval.py --run RUN` started twice, one per core) share them: each computes the
    next part no live process has claimed (a file <part>.claim, created exclusively, naming the
    claimer's host, pid and start time), then waits for the parts the others hold. A claim whose
    process has ended on this host is taken over; one from another host waits for its file."""
    if folder is None:
        return [compute() for _, compute in parts]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
                       + ".json") for key, _ in parts]
    values, todo, held, waiting = {}, list(range(len(parts))), set(), None
    while todo:
        for i in todo:
            key, compute = parts[i]
            ok, value = _read_kept(paths[i], key)
            if ok:
                log(f"{key['part']}: " + ("computed by another process" if i in held else
                                          "kept from an earlier evaluation") + f" ({paths[i]})")
                break
            claim = _claim(paths[i])
            if claim is None:
                held.add(i)
                continue
            try:
                value = compute()
                tmp = paths[i].with_suffix(f".{os.getpid()}.tmp")   # two may write the same part
                tmp.write_text(json.dumps(dict(key=key, value=value)))
                tmp.replace(paths[i])
            finally:
                claim.unlink(missing_ok=True)
            break
        else:                                   # every part left is another process's: wait
            if todo != waiting:
                log(f"waiting for {len(todo)} part(s) other processes are computing: "
                    + "; ".join(parts[i][0]["part"] for i in todo))
                waiting = list(todo)
            time.sleep(poll_s)
            continue
        values[i] = value
        todo.remove(i)
    return [values[i] for i in range(len(parts))]


def _read_kept(path, key):
    """(True, value) when path holds the part with this key, else (False, None)."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):              # absent, or damaged: computed again
        return False, None
    return (True, kept["value"]) if kept.get("key") == key else (False, None)


def _started(pid):
    """A process's start time (Linux /proc; '' elsewhere): with the pid it names one process, not
    a later one that reuses the number."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _claim(path):
    """The claim file of the part kept at path, created for this process, or None where a live
    process holds it."""
    claim = path.with_suffix(".claim")
    me = f"{socket.gethostname()} {os.getpid()} {_started(os.getpid())}"
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not _claim_is_stale(claim):
                return None
            claim.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return claim
    return None


def _claim_is_stale(claim):
    """Whether a claim's process has ended: on this host, its pid gone or started at another time
    (a reused number); an unreadable or empty claim older than a minute (its writer died)."""
    try:
        host, pid, *start = claim.read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        try:
            return time.time() - claim.stat().st_mtime > 60
        except OSError:
            return True                          # gone meanwhile
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return bool(start) and _started(pid) != start[0]
