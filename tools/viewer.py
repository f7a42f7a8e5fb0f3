"""
Looking at a trained run's conversations (a tool beside the method, not part of it):

    python tools/viewer.py --run out/ml-latest-small --show 3         # 3 whole greedy conversations
    python tools/viewer.py --run out/ml-latest-small --show 3 --html credit.html   # and a page of them
    python tools/viewer.py --run out/ml-latest-small --interactive    # play the user yourself

--show prints the history, the candidates (target and SASRec prior marked), every message as text,
each turn's rewards (reward.py), each message's mean token credit and the credit of each of its
tokens by kind (distill.py, with the finished conversation itself as the hindsight reference).
--html writes the same conversations as one self-contained page in which every token's background
is its credit A_{t,n} (green positive, red negative), the turn's reward R_t and the hindsight
reference beside it. --interactive lets a person answer the trained RecAgent turn by turn.
"""

import argparse
import html as html_mod
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
from scoring import token_logprobs  # noqa: E402
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


def pieces(tok, data, ids):
    """Each token of a message as the text it adds (a piece's text is what the message reads
    with it minus without it, so a chat model's multi-byte characters come out whole)."""
    if not tok.chat:
        out = []
        for t in map(int, ids):
            if t < 256:
                out.append(bytes([t]).decode("utf-8", "replace"))
            elif tok.is_item(t):
                out.append(f"\u00ab{data.titles[tok.item_of(t)]}\u00bb")
            else:
                out.append("" if t == tok.pad_id else tok.enc.decode([t]))
        return out
    ids, out, prev = [int(t) for t in ids], [], ""
    for n in range(len(ids)):
        now = tok.decode(ids[:n + 1])
        out.append(now[len(prev):] if now.startswith(prev) else tok.decode(ids[n:n + 1]))
        prev = now
    return out


def conversations(run_dir, n, split="test", device="auto", temperature=0.0, trained=True, loaded=None):
    """n whole conversations of a run (greedy at temperature 0, else sampled as in training, one
    key per sample), each a dict of what show and write_html print: history, candidates, the
    hindsight reference, and per turn every message with, for each of its tokens, (text, kind,
    credit A_{t,n}) (the teacher sees the finished conversation itself as its hindsight reference,
    the student and the teacher score at the same temperature as in training's losses), the turn's
    rewards R_t, the peers' opinion. trained=False: the untrained pair (no adapter) plays and is
    its own teacher, as at CoARS's first step. loaded: load_run's (cfg, model, tok, data)."""
    cfg, model, tok, data = loaded or load_run(Path(run_dir), device)
    device = device_of(device)
    rows = np.random.default_rng(cfg.seed).permutation(len(getattr(data, f"{split}_user")))[:n]
    trajs = [new_trajectory(data, split, int(r)) for r in rows]
    ad = {"rec": "rec" if trained else None, "user": "user" if trained else None}
    rollout(model, tok, data, trajs, t_max=cfg.t_max, temperature=temperature, device=device,
            decoding=cfg.decoding, rec_adapter=ad["rec"], user_adapter=ad["user"])
    scale = temperature if temperature > 0 else 1.0
    rcfg, convs = cfg.reward_options(), []
    for tr in trajs:
        ref = hindsight_reference(tok, tr)
        conv = dict(traj=tr, split=split, user=data.user_raw[tr.user],
                    history=[data.titles[i] for i in tr.hist],
                    candidates=[(data.titles[c], c == tr.target, c == tr.prior) for c in tr.cands],
                    reference=tok.decode(ref) if tok.chat else readable(tok, data, ref), turns=[],
                    final=data.titles[tr.final_item] if tr.final_item is not None else None)
        for t, (turn, (r_rec, r_user)) in enumerate(zip(tr.turns, turn_rewards(tr, **rcfg))):
            msgs = {}
            for agent, prompt, ans, render in (("rec", turn.rec_prompt, turn.rec_out, tok.render_rec),
                                               ("user", turn.user_prompt, turn.user_out, tok.render_user)):
                if prompt is None or not ans:
                    continue
                model.set_adapter(ad[agent])
                g = [message_grammar(tok, tr, agent, cfg.decoding)]     # the support the message was decoded from
                with torch.no_grad():
                    s_lp = token_logprobs(model, [prompt], [ans], tok.pad_id, device, grammar=g,
                                          temperature=scale)[0]
                    t_lp = token_logprobs(model, [render(tr, t, ref)], [ans], tok.pad_id, device, grammar=g,
                                          temperature=scale)[0]
                a = token_credit(t_lp, s_lp, cfg.credit_clip)
                msgs[agent] = dict(text=readable(tok, data, ans, tr.cands, agent), mean=float(a.mean()),
                                   tokens=list(zip(pieces(tok, data, ans), token_kinds(tok, ans, g[0]),
                                                   map(float, a))))
            model.set_adapter(None)
            conv["turns"].append(dict(msgs=msgs, hit=turn.hit, rec_valid=turn.rec_valid,
                                      user_valid=turn.user_valid, has_user=turn.user_out is not None,
                                      peers=turn.peer_text, q=turn.q, rewards=dict(rec=r_rec, user=r_user)))
        convs.append(conv)
    return convs


def show(run_dir, n, split="test", device="auto", out=print, html=None):
    """Print n whole greedy conversations of a trained run (conversations()): history,
    candidates, every message, the rewards of each turn and the token credit of each message;
    html: also write them as one page (write_html). Returns the trajectories."""
    convs = conversations(run_dir, n, split, device)
    fmt = lambda x: "left out" if x is None else f"{x:+.3f}"  # noqa: E731
    for k, c in enumerate(convs):
        tr = c["traj"]
        out(f"\n=== conversation {k + 1}: {split} sample {tr.row}, user {c['user']} ===")
        out("history: " + "; ".join(c["history"]))
        out("candidates: " + "; ".join(f"{j}:{title}" + (" (TARGET)" if tgt else "") + (" (prior)" if pri else "")
                                      for j, (title, tgt, pri) in enumerate(c["candidates"])))
        for t, turn in enumerate(c["turns"]):
            m = turn["msgs"]
            out(f" turn {t + 1}  RecAgent: {m['rec']['text'] if 'rec' in m else ''}"
                + ("  -> HIT" if turn["hit"] else "") + ("" if turn["rec_valid"] else "  (invalid)"))
            if turn["has_user"]:
                out(f"         UserAgent: {m['user']['text'] if 'user' in m else ''}   peers: {turn['peers']}"
                    f" (q={turn['q']:+.2f})" + ("" if turn["user_valid"] else "  (invalid)"))
            out(f"         rewards: Rec {fmt(turn['rewards']['rec'])}  User {fmt(turn['rewards']['user'])}"
                "   mean token credit: " + "  ".join(f"{a} {v['mean']:+.3f}" for a, v in m.items()))
            out("         credit by token (forced tokens, always 0, left out): "
                + "  ".join(f"{a}: " + " ".join(f"{kind} {x:+.3f}" for _, kind, x in v["tokens"] if kind != "forced")
                            for a, v in m.items()))
        out(f" final item: {c['final'] or '-'}; hit: {bool(tr.hit)}; turns: {len(tr.turns)}")
    if html:
        write_html(convs, html, title=f"{Path(run_dir).name}: {split} conversations")
        out(f"\nwrote {html}")
    return [c["traj"] for c in convs]


def credit_colour(a, scale):
    """A token's background: green for a positive credit, red for a negative one, its opacity
    |a| / scale (scale: the largest |A_{t,n}| on the page), white at 0."""
    alpha = min(1.0, abs(a) / scale) if scale > 0 else 0.0
    rgb = "0,160,60" if a > 0 else "220,40,40"
    return f"rgba({rgb},{alpha:.3f})"


def write_html(convs, path, title="conversations"):
    """One self-contained page (no script, no outside file): each conversation's history,
    candidates and hindsight reference, then every message with each token's background
    coloured by its credit A_{t,n} (credit_colour; the exact value on hover and in data-credit),
    the turn's rewards R_t beside it. The page is written whole or not at all."""
    esc = html_mod.escape
    scale = max([abs(x) for c in convs for tu in c["turns"] for m in tu["msgs"].values()
                 for _, _, x in m["tokens"]] + [0.0])
    fmt = lambda x: "left out" if x is None else f"{x:+.3f}"  # noqa: E731
    body = [f"<h1>{esc(title)}</h1>",
            f"<p class=legend>Each token's background is its credit A<sub>t,n</sub> (Eq. 10): "
            f"<span style='background:{credit_colour(scale, scale)}'>&nbsp;+{scale:.3f}&nbsp;</span> "
            f"<span style='background:{credit_colour(-scale, scale)}'>&nbsp;-{scale:.3f}&nbsp;</span> "
            "(the largest |A| on this page), white at 0; tokens the grammar forces have credit 0 and "
            "are outlined. Hover a token for its kind and value.</p>"]
    for k, c in enumerate(convs):
        tr = c["traj"]
        body.append(f"<section><h2>Conversation {k + 1}: {esc(c['split'])} sample {tr.row}, "
                    f"user {esc(str(c['user']))}</h2>")
        body.append("<p><b>History:</b> " + esc("; ".join(c["history"])) + "</p>")
        body.append("<p><b>Candidates:</b> " + "; ".join(
            (f"<u>{esc(ti)}</u> (target)" if tgt else esc(ti)) + (" (prior)" if pri else "")
            for ti, tgt, pri in c["candidates"]) + "</p>")
        body.append(f"<p class=ref><b>Hindsight reference</b> (what the teacher sees): {esc(c['reference'])}</p>")
        body.append("<table><tr><th>turn</th><th>agent</th><th>message, coloured by credit</th>"
                    "<th>R<sub>t</sub></th><th>mean A</th></tr>")
        for t, turn in enumerate(c["turns"]):
            for agent, m in turn["msgs"].items():
                spans = "".join(
                    f"<span class='tok{' forced' if kind == 'forced' else ''}' data-credit='{x:.6f}' "
                    f"data-kind='{kind}' title='{kind} {x:+.4f}' style='background:{credit_colour(x, scale)}'>"
                    f"{esc(text)}</span>" for text, kind, x in m["tokens"])
                note = ("  HIT" if agent == "rec" and turn["hit"] else "") + (
                    f"  (peers: {esc(turn['peers'])}, q={turn['q']:+.2f})" if agent == "user" else "")
                body.append(f"<tr><td>{t + 1}</td><td>{'RecAgent' if agent == 'rec' else 'UserAgent'}</td>"
                            f"<td class=msg>{spans}<span class=note>{note}</span></td>"
                            f"<td>{fmt(turn['rewards'][agent])}</td><td>{m['mean']:+.3f}</td></tr>")
        body.append(f"</table><p>Final item: {esc(c['final'] or '-')}; hit: {bool(tr.hit)}; "
                    f"turns: {len(tr.turns)}</p></section>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + esc(title) + "</title><style>"
            "body{font-family:sans-serif;max-width:70em;margin:1em auto;line-height:1.5}"
            "table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.3em;"
            "text-align:left;vertical-align:top}.tok{white-space:pre-wrap;border-radius:2px}"
            ".forced{outline:1px dotted #999}.note{color:#666;font-size:.9em}.ref{color:#333;"
            "background:#f4f4f4;padding:.4em}.legend{font-size:.9em}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)


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
    p.add_argument("--html", default="", metavar="FILE",
                   help="--show: also write them as one HTML page, every token coloured by its credit")
    p.add_argument("--interactive", action="store_true", help="play the user against the trained RecAgent")
    a = p.parse_args(argv)
    if not a.show and not a.interactive:
        p.error("give --show N or --interactive")
    if a.html and not a.show:
        p.error("--html needs --show N (the conversations it draws)")
    if a.html and not Path(a.html).resolve().parent.is_dir():
        p.error(f"--html {a.html}: its folder does not exist; create it first")
    try:
        if a.show:
            show(a.run, a.show, a.split, a.device, html=a.html or None)
        else:
            interactive(a.run, a.device, split=a.split, sample=a.sample)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
