"""
Looking at a trained run's conversations (a tool beside the method, not part of it):

    python tools/viewer.py --run out/ml-latest-small --show 3         # 3 whole greedy conversations
    python tools/viewer.py --run out/ml-latest-small --interactive    # play the user yourself

--show prints the history, the candidates (target and SASRec prior marked), every message as text,
each turn's rewards (reward.py), each message's mean token credit and the credit of each of its
tokens by kind (distill.py, with the finished conversation itself as the hindsight reference).
--interactive lets a person answer the trained RecAgent turn by turn.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # `python tools/viewer.py` from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from config import UserError  # noqa: E402
from distill import hindsight_reference, token_credit, token_kinds  # noqa: E402
from env import (ACTION_RANGE, Turn, finish_turn, message_grammar, new_trajectory, record_user, rollout,  # noqa: E402
                 score_fits, write_messages)
from support.distributed import device_of  # noqa: E402
from support.runs import add_run_args, load_run  # noqa: E402
from model import token_logprobs  # noqa: E402
from reward import turn_rewards  # noqa: E402


def readable(tok, data, ids, cands=None, agent="rec"):
    """Token ids as text: item tokens as their titles, other control
    tokens by name, bytes decoded. A Hugging Face model's messages are text already (shown with the
    field name its prompt ended with)."""
    if tok.chat:
        return (tok.rec_text(ids) if agent == "rec" else tok.user_text(ids)).strip().replace("\n", " | ")
    out, buf = [], []
    for t in map(int, ids):
        if t < 256:
            buf.append(t)
            continue
        if buf:
            out.append(bytes(buf).decode("utf-8", "replace"))
            buf = []
        if tok.is_item(t):
            out.append(f"\u00ab{data.titles[tok.item_of(t)]}\u00bb")
        elif t != tok.pad_id:
            out.append(tok.enc.decode([t]))
    if buf:
        out.append(bytes(buf).decode("utf-8", "replace"))
    return " ".join(out)


def show(run_dir, n, split="test", device="auto", out=print):
    """Print n whole greedy conversations of a trained run: history, candidates, every message,
    the rewards of each turn and the mean token credit of each message (the teacher sees the
    finished conversation itself as its hindsight reference)."""
    cfg, model, tok, data = load_run(Path(run_dir), device)
    device = device_of(device)
    rows = np.random.default_rng(cfg.seed).permutation(len(getattr(data, f"{split}_user")))[:n]
    trajs = [new_trajectory(data, split, int(r)) for r in rows]
    rollout(model, tok, data, trajs, t_max=cfg.t_max, temperature=0.0, device=device, decoding=cfg.decoding)
    rcfg = cfg.reward_options()
    for k, tr in enumerate(trajs):
        out(f"\n=== conversation {k + 1}: {split} sample {tr.row}, user {data.user_raw[tr.user]} ===")
        out("history: " + "; ".join(data.titles[i] for i in tr.hist))
        out("candidates: " + "; ".join(f"{j}:{data.titles[c]}" + (" (TARGET)" if c == tr.target else "")
                                      + (" (prior)" if c == tr.prior else "") for j, c in enumerate(tr.cands)))
        ref = hindsight_reference(tok, tr)
        rewards = turn_rewards(tr, **rcfg)
        for t, (turn, (r_rec, r_user)) in enumerate(zip(tr.turns, rewards)):
            credit, by_token = {}, {}
            for agent, prompt, ans, render in (("rec", turn.rec_prompt, turn.rec_out, tok.render_rec),
                                               ("user", turn.user_prompt, turn.user_out, tok.render_user)):
                if prompt is None or not ans:
                    continue
                model.set_adapter(agent)
                g = [message_grammar(tok, tr, agent, cfg.decoding)]     # the support the message was decoded from
                with torch.no_grad():
                    s_lp = token_logprobs(model, [prompt], [ans], tok.pad_id, device, grammar=g)[0]
                    t_lp = token_logprobs(model, [render(tr, t, ref)], [ans], tok.pad_id, device, grammar=g)[0]
                a = token_credit(t_lp, s_lp)
                credit[agent] = float(a.mean())
                by_token[agent] = [(k, float(x)) for k, x in zip(token_kinds(tok, ans, g[0]), a)
                                   if k != "forced"]
            model.set_adapter(None)
            out(f" turn {t + 1}  RecAgent: {readable(tok, data, turn.rec_out, tr.cands)}"
                + ("  -> HIT" if turn.hit else "") + ("" if turn.rec_valid else "  (invalid)"))
            if turn.user_out is not None:
                out(f"         UserAgent: {readable(tok, data, turn.user_out, agent='user')}   peers: {turn.peer_text} (q={turn.q:+.2f})"
                    + ("" if turn.user_valid else "  (invalid)"))
            fmt = lambda x: "left out" if x is None else f"{x:+.3f}"  # noqa: E731
            out(f"         rewards: Rec {fmt(r_rec)}  User {fmt(r_user)}   mean token credit: "
                + "  ".join(f"{a} {c:+.3f}" for a, c in credit.items()))
            out("         credit by token (forced tokens, always 0, left out): "
                + "  ".join(f"{a}: " + " ".join(f"{k} {x:+.3f}" for k, x in ks)
                            for a, ks in by_token.items()))
        out(f" final item: {data.titles[tr.final_item] if tr.final_item is not None else '-'}; "
            f"hit: {bool(tr.hit)}; turns: {len(tr.turns)}")
    return trajs


def ask_until(ask, out, question, parse, complaint):
    """Ask until parse(answer) is not None; None when the input ends (Ctrl-D, a script run dry)."""
    while True:
        try:
            got = parse(ask(question).strip())
        except (EOFError, KeyboardInterrupt):
            return None
        if got is not None:
            return got
        out(complaint)


def parse_score(text, action):
    """A typed score, rounded to the message's two decimals FIRST and then checked against the
    action's interval (0.749 rounds to 0.75, which is a click's, not a star's), or None."""
    try:
        score = round(float(text), 2)
    except ValueError:
        return None
    return score if score_fits(action, score) else None


def interactive(run_dir, device="auto", ask=input, out=print, seed=None, split="test", sample=None):
    """A person plays the user against the trained RecAgent: each turn, type an action, a score and
    a reason (the built-in model's reasons are history items, so the reason is a history number).
    sample: the split's sample to play (default: a random one drawn with seed). A bad answer is
    asked again; the end of the input stops the conversation where it is."""
    cfg, model, tok, data = load_run(Path(run_dir), device)
    device = device_of(device)
    n = len(getattr(data, f"{split}_user"))
    if sample is None:
        sample = int(np.random.default_rng(seed).integers(n))
    elif not 0 <= sample < n:
        raise UserError(f"--sample {sample}: the {split} split has samples 0-{n - 1}.")
    tr = new_trajectory(data, split, sample)
    out(f"You are the user of {split} sample {sample}. Your history:")
    out("You are the user. Your history:")
    for j, i in enumerate(tr.hist):
        out(f"  {j}: {data.titles[i]}")
    out(f"(The item you will really pick next, hidden from the RecAgent: {data.titles[tr.target]})")
    while not tr.done:
        prompt = tok.render_rec(tr, len(tr.turns))
        o = write_messages(model, tok, [tr], "rec", "rec", [prompt], 0.0, None, device, decoding=cfg.decoding)[0]
        item = tok.parse_rec(o, tr.cands)
        turn = Turn(rec_out=o, item=item, rec_valid=item is not None, rec_prompt=prompt)
        tr.turns.append(turn)
        out(f"\nRecAgent (turn {len(tr.turns)}): {readable(tok, data, o, tr.cands)}")
        if item is None:
            out("(an invalid message: no answer is asked for)")
            finish_turn(tr, turn, cfg.t_max)
            continue
        record_user(data, tr, turn)
        out(f"peers: {turn.peer_text}")
        action = ask_until(ask, out, f"action ({'/'.join(ACTION_RANGE)}): ",
                           lambda a: a.lower() if a.lower() in ACTION_RANGE else None,
                           "please type one of " + ", ".join(ACTION_RANGE))
        lo, hi = ACTION_RANGE.get(action, (0, 1))
        score = action and ask_until(
            ask, out, f"score in [{lo:.2f}, {hi:.2f}{']' if action == 'click' else ')'}: ",
            lambda s: parse_score(s, action), "a number in the action's interval, please")
        last = len(tr.hist) - 1
        reason = score is not None and ask_until(
            ask, out, f"reason: a history number 0-{last} (Enter = 0): ",
            lambda r: 0 if r == "" else int(r) if r.isdigit() and int(r) <= last else None,
            f"a history number from 0 to {last}, please")
        if action is None or score is None or reason is None:
            out("\ninput ended: the conversation stops here.")
            return tr
        turn.user_out = tok.user_message(action, score, tr.hist[reason])
        turn.action, turn.score = tok.parse_user(turn.user_out)
        turn.user_valid = True
        finish_turn(tr, turn, cfg.t_max)
    out(f"\nconversation over after {len(tr.turns)} turn(s); the RecAgent's final pick "
        f"{'was' if tr.hit else 'was not'} the item you picked next.")
    return tr


def main(argv=None):
    p = argparse.ArgumentParser(description="Look at a trained run's conversations (see the module docstring).")
    add_run_args(p, "test", "the split whose samples are shown or played")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="--interactive: the split's sample to play (default: a random one)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N whole conversations")
    p.add_argument("--interactive", action="store_true", help="play the user against the trained RecAgent")
    a = p.parse_args(argv)
    if not a.show and not a.interactive:
        p.error("give --show N or --interactive")
    try:
        if a.show:
            show(a.run, a.show, a.split, a.device)
        else:
            interactive(a.run, a.device, split=a.split, sample=a.sample)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
