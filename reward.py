"""
Interaction reward of CoARS (docs/method.md section 3, Eq. 7 and 8): one task-level reward per turn
for each agent, taken from the same turn of the same conversation, each agent's behaviour scaling or
signing the other's.

    hit_t   = 1 if i_t == i* else 0,      sigma_t = 2 hit_t - 1
    Eq. 7   R_rec_t  = sigma_t * (0.5 + 0.5 s_t) * D_t
    Eq. 8   R_user_t = sigma_t * (2 s_t - 1) * (1 - alpha * q_t * (2 s_t - 1))

  - D_t, the stage-sensitivity factor, has no form in the paper: [ours] D_t = 1, or gamma^(t-1)
    with --stage-gamma.
  - Filter: a wrong item (hit 0) that the user met positively (click or star) is left out of both
    agents' losses: the logs may simply not know that the user likes it.
  - Invalid messages [ours]: the agent that wrote it gets -1 for that turn. After an invalid
    RecAgent message there is no user message. After an invalid UserAgent message the RecAgent's
    reward uses s_t = 0 (nothing was accepted).
  - The outcome-only reward (the "outcome-reward RL" baseline and the "w/o interaction reward"
    ablation): every message of the episode gets 2 * hit(final item) - 1, with no filter (the
    filter is part of the interaction reward, docs/method.md section 6).
A turn's reward applies to every token of that turn's message (distill.py does that).
"""

INVALID = -1.0


def rec_reward(hit, s, t, stage_gamma=None):
    """Eq. 7. hit in {0,1}, s in [0,1] the user's acceptance score, t the 1-based turn."""
    sigma = 2 * hit - 1
    d = 1.0 if stage_gamma is None else stage_gamma ** (t - 1)   # D_t [ours]
    return sigma * (0.5 + 0.5 * s) * d


def user_reward(hit, s, q, alpha=0.1):
    """Eq. 8. q in [-1,1] the peers' signal; alpha the peer weight (0.1 in the paper)."""
    sigma = 2 * hit - 1
    c = 2 * s - 1
    return sigma * c * (1 - alpha * q * c)


def filtered(hit, action):
    """The filter of section 3: wrong item, positive reaction -> the turn trains neither agent."""
    return hit == 0 and action in ("click", "star")


def turn_rewards(traj, mode="interaction", alpha=0.1, stage_gamma=None, use_filter=True,
                 user_filter=True):
    """Per turn of a finished trajectory: (R_rec, R_user). None = no message, or left out by the
    filter. mode: "interaction" (Eq. 7, 8) or "outcome" (final hit only, never filtered).
    user_filter=False [ours, extension, off by default]: the filter leaves out only the RecAgent's
    message, and the UserAgent is still trained on a wrong item it accepted (Eq. 8 is then
    negative). Why: with the filter on both losses nothing ever penalises the user for accepting a
    wrong item, so stage 2 can drive it to accept everything. With this option it can overshoot
    and turn down nearly everything instead (docs/results.md): it is no fix."""
    out = []
    final = 2 * traj.hit - 1
    for t, tr in enumerate(traj.turns, 1):
        if not tr.rec_valid:
            out.append((INVALID, None))
            continue
        if mode == "outcome":     # no filter: the filter belongs to the interaction reward
            out.append((float(final), float(final) if tr.user_valid else INVALID))
            continue
        if tr.user_valid and use_filter and filtered(tr.hit, tr.action):
            out.append((None, None if user_filter else user_reward(tr.hit, tr.score, tr.q, alpha)))
            continue
        s = tr.score if tr.user_valid else 0.0
        r_rec = rec_reward(tr.hit, s, t, stage_gamma)
        r_user = user_reward(tr.hit, tr.score, tr.q, alpha) if tr.user_valid else INVALID
        out.append((r_rec, r_user))
    return out
