"""
The agents' messages in natural language, for Hugging Face chat models (support/hf.py). env.py holds
the built-in model's token-level format and the loop; its format functions hand over to this file's
ChatTokenizer when `tok.chat` is true. Same content, same rules (docs/method.md section 2), in
words:

  RecAgent   system: its role.  user: the history (titles, oldest first), the 20 candidates
             (numbered titles), in turn 1 the sequential recommender's suggestion, the conversation
             so far, [REFERENCE], and the answer form. It answers
                 Recommendation: <the exact title of one candidate>
                 Reason: <one sentence>
  UserAgent  system: its role (a user who does not know what it will pick).  user: its history,
             the conversation so far, the recommender's new message (the matched title and the
             reason), the peers' opinion, [REFERENCE], and the answer form. It answers
                 Action: click | star | skip | dislike
                 Score: <0.00 to 1.00, inside the action's interval>
                 Reason: <one sentence>
  REFERENCE  the hindsight reference d (teacher prompts only): the earlier trajectory's turns with
             "right" / "wrong" and the user's reaction, then the true next item's title.

Prompts are the model's own chat template applied to these two messages, followed by the answer's
first field name ("Recommendation:" / "Action:") as the start of the assistant's turn [ours]: the
message the agent writes is the rest. Why: a small chat model (SmolLM2-135M-Instruct, greedy)
without this primer repeated the prompt's history instead of answering
(docs/huggingface-and-gpus.md). The reference is spliced
in as token ids at one fixed point of the user message: the template is rendered once with a marker
line, split there, and both halves encoded, so a teacher prompt is exactly its student prompt with
the reference's tokens inserted (the test checks this against the template; other
self-distillation code has differed in more than the reference, e.g. through re-tokenised
boundaries or per-call system text).

Decoding under a grammar [ours] (--decoding grammar, the default; grammar.Grammar, as the built-in
format's): the RecAgent's message is one candidate's title as the tokenizer writes " <title>\n"
after "Recommendation:" (a trie over the episode's 20 candidates' title tokens; --decoding item
restricts only this part), then "Reason:" and free text of at most REASON_MAX tokens ended by an
end-of-turn token. The UserAgent's is " <action>\nScore: <d.dd>\n" with the score inside the
action's interval (a trie over the 101 scores, each with its action), then "Reason:" and the same
bounded free text. Every message decoded so is valid by construction (parse_rec / parse_user accept
it) and never cut off; sampling and every log-prob use the same restricted softmax. --decoding free
is unconstrained (the model may write anything, and invalid messages happen). The scripted messages
(warm-up, F1 judgements) are written in the same pieces, so they lie inside the grammar too.
Thinking is turned off where the template has a switch for it (enable_thinking=False, Qwen3's).

Title matching [ours]: the RecAgent's title is matched to the candidates first exactly, then after
dropping an echoed list number ("3. ") and normalising both sides (match_title): lower case; a
trailing "(1995)" year dropped; a trailing ", The" / ", A" / ", An" (MovieLens style) and a leading
"The" / "A" / "An" dropped; punctuation, quotes and markdown asterisks dropped; white space
collapsed. An answer that matches no candidate, or several, is invalid. A message must also end with
the end-of-turn token (not cut off at the length limit). The Reason lines are optional [ours]: the
RecAgent's message is valid when it names exactly one candidate, the UserAgent's when its action and
score agree. Why: a small chat model often names a real candidate and stops without a reason; the
item and the reaction are what the environment and the rewards use.

Titles are made distinct first [ours] (distinct_titles): a title several items share gets " [2]",
" [3]", ... on its second and later items (ml-latest-small has five such pairs, one film under two
ids). Without it two candidates with one title would give the grammar two equal paths, and the
message naming them would match both and be invalid.
"""

import re

import torch

from env import ACTION_RANGE, action_of_score, score_fits
from grammar import Grammar, Text, trie
from model import positions
from scoring import padded_supports, restricted_logprobs, token_logprobs_reference

REF_MARK = "@@REFERENCE@@"
# the assistant's turn starts with the first field (module docstring)
REC_PRIMER = "Recommendation:"
USER_PRIMER = "Action:"
REC_SYSTEM = ("You are a recommender agent. From the candidate list you recommend the one item "
              "the user will most likely choose next, and you say why in one sentence.")
USER_SYSTEM = ("You play a user of a recommender system, acting as the history shows. You do not "
               "know which item you will really choose next; you react to each recommendation "
               "with an action, a score and a reason.")
REC_FORM = ["Answer in exactly this form:", "Recommendation: <the exact title of one candidate>",
            "Reason: <one sentence>"]
USER_FORM = ["Answer in exactly this form:", "Action: <click, star, skip or dislike>",
             "Score: <a number from 0.00 to 1.00: dislike below 0.25, skip below 0.50, star below "
             "0.75, click from 0.75>", "Reason: <one sentence>"]
REASON_MAX = 48     # tokens of a message's free-text reason under the grammar [ours]: one sentence
_ARTICLES = ("the", "a", "an")
# end-of-turn tokens of common chat templates: any of them present in the vocabulary stops a message
_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


def distinct_titles(titles):
    """The titles with a title's second, third, ... item marked " [2]", " [3]", ... (module
    docstring)."""
    seen, out = {}, []
    for t in titles:
        seen[t] = seen.get(t, 0) + 1
        out.append(t if seen[t] == 1 else f"{t} [{seen[t]}]")
    return out


def normalise_title(t):
    """The documented normalised form of a title (see the module docstring)."""
    t = t.strip().lower()
    t = re.sub(r"\(\s*\d{4}\s*\)\s*$", "", t).strip()               # "(1995)"
    t = re.sub(r",\s*(the|a|an)\s*$", "", t)                          # "Usual Suspects, The"
    t = re.sub(r"[^\w\s]", " ", t)  # punctuation, quotes, asterisks
    words = t.split()
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words)


def match_title(text, cands, titles):
    """The candidate item whose title `text` names, or None (no candidate, or several)."""
    text = text.strip().strip("*\"'`").strip()
    exact = [i for i in cands if titles[i].strip() == text]
    if len(set(exact)) == 1:
        return exact[0]
    if exact:
        return None
    text = re.sub(r"^\d{1,2}[.)]\s+", "", text)  # "3. Heat (1995)": the list's numbering echoed
    n = normalise_title(text)
    near = {i for i in cands if normalise_title(titles[i]) == n} if n else set()
    return near.pop() if len(near) == 1 else None


def _field(text, name):
    """The value of the first line 'Name: value' (markdown bold around the name allowed), or
    None."""
    m = re.search(rf"(?im)^[\s*#-]*{name}[\s*]*:[\s*]*(.+?)\s*$", text)
    return m.group(1).strip() if m else None


class ChatTokenizer:
    """A Hugging Face tokenizer with the agents' natural-language message format (the counterpart of
    env.Tokenizer's format methods). Every method returns or takes token ids."""

    chat = True
    # a title and a one-sentence reason (unconstrained decoding; a grammar may allow more)
    rec_max_new = 64
    user_max_new = 64
    reason_max = REASON_MAX
    # long prompts: 256 SmolLM2-135M prompts of ~760 tokens hold ~9 GB of float32 KV cache
    eval_batch = 16

    def __init__(self, hf_tokenizer, titles, item_word="item"):
        self.hf = hf_tokenizer
        self.titles = distinct_titles(titles)    # every prompt, message and match uses these
        self.item_word = item_word
        self.end_id = hf_tokenizer.eos_token_id
        vocab = hf_tokenizer.get_vocab()
        self.stop_ids = tuple(sorted({self.end_id} | {vocab[t] for t in _END_TOKENS if t in vocab}))
        pad = hf_tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.end_id
        self.vocab_size = len(hf_tokenizer)
        self._titles = {}                        # item -> its answer's title tokens (title_ids)
        self._reason = self.text("Reason:")
        self._scores = None  # the trie of the 101 (action, score) heads, built once

    # ---- text <-> ids ----
    def text(self, s):
        return self.hf.encode(s, add_special_tokens=False)

    def decode(self, ids):
        return self.hf.decode([int(t) for t in ids], skip_special_tokens=True)

    def chat_ids(self, system, user_lines, primer, reference=()):
        """The chat template applied to (system, user) with the generation prompt, then the primer;
        the reference ids go where the REF_MARK line is (see the module docstring)."""
        user = "\n".join(user_lines)
        # enable_thinking=False: templates with a thinking mode (Qwen3's) then open the assistant's
        # turn with an empty thought; the others ignore the variable
        kw = dict(tokenize=False, add_generation_prompt=True, enable_thinking=False)
        try:
            text = self.hf.apply_chat_template([{"role": "system", "content": system},
                                                {"role": "user", "content": user}],
                                               **kw)
        except Exception:  # noqa: BLE001 - templates without a system role (e.g. Gemma's)
            # raise their own errors
            merged = [{"role": "user", "content": system + "\n\n" + user}]
            text = self.hf.apply_chat_template(merged, **kw)
        pre, post = text.split(REF_MARK + "\n")
        return self.text(pre) + list(reference) + self.text(post + primer)

    def rec_text(self, out):
        """A RecAgent message as text, its primer included."""
        return REC_PRIMER + self.decode(out)

    def user_text(self, out):
        return USER_PRIMER + self.decode(out)

    # ---- pieces ----
    def _rec_fields(self, tr):
        return self.titles[tr.item], _field(self.rec_text(tr.rec_out), "Reason") or ""

    def _user_fields(self, tr):
        return _field(self.user_text(tr.user_out), "Reason") or ""

    def memory(self, turns, for_user):
        """M_{t-1} as lines, one per earlier turn."""
        lines = []
        for k, tr in enumerate(turns, 1):
            who = "The recommender" if for_user else "You"
            if not tr.rec_valid:
                line = f"Turn {k}: {who} gave an invalid recommendation."
            else:
                title, why = self._rec_fields(tr)
                line = f"Turn {k}: {who} recommended \"{title}\"" + (f" ({why})." if why else ".")
            if tr.user_out is not None:
                user = "You" if for_user else "The user"
                why = self._user_fields(tr)
                line += (f" {user} answered: {tr.action}, score {tr.score:.2f}"
                         + (f" ({why})." if why else ".") if tr.user_valid
                         else f" {user} gave an invalid answer.")
            lines.append(line)
        return lines

    def _history(self, traj):
        return [f"- {self.titles[i]}" for i in traj.hist]

    # ---- the format (env.py hands over to these) ----
    def render_rec(self, traj, t, reference=()):
        lines = ["The user's history, oldest first:"] + self._history(traj)
        lines += ["", f"Candidates ({len(traj.cands)}):"]
        lines += [f"{k + 1}. {self.titles[i]}" for k, i in enumerate(traj.cands)]
        if t == 0 and traj.prior is not None:
            lines += ["", f"A sequential recommender suggests: {self.titles[traj.prior]}"]
        mem = self.memory(traj.turns[:t], for_user=False)
        if mem:
            lines += ["", "Conversation so far:"] + mem
        return self.chat_ids(REC_SYSTEM, lines + ["", REF_MARK] + REC_FORM, REC_PRIMER, reference)

    def render_user(self, traj, t, reference=()):
        tr = traj.turns[t]
        lines = ["Your history, oldest first:"] + self._history(traj)
        mem = self.memory(traj.turns[:t], for_user=True)
        if mem:
            lines += ["", "Conversation so far:"] + mem
        title, why = self._rec_fields(tr)
        lines += ["", "The recommender now says:",
                  f"Recommendation: {title}"] + ([f"Reason: {why}"] if why else [])
        lines += ["", self.peer_line(tr.peer_text)]
        return self.chat_ids(USER_SYSTEM, lines + ["", REF_MARK] + USER_FORM, USER_PRIMER,
                             reference)

    @staticmethod
    def peer_line(peer_text):
        """env.peer_opinion's "k/n [mean rating]" in words."""
        parts = peer_text.split()
        k, n = parts[0].split("/")
        line = f"Peers: {k} of your {n} most similar users chose it"
        return line + (f" (their mean rating {parts[1]})." if len(parts) > 1 else ".")

    def parse_rec(self, out, cands):
        if not out or out[-1] not in self.stop_ids:
            return None
        title = _field(self.rec_text(out), "Recommendation")
        if not title:
            return None
        return match_title(title, cands, self.titles)

    def parse_user(self, out):
        if not out or out[-1] not in self.stop_ids:
            return None
        text = self.user_text(out)
        action, score = _field(text, "Action"), _field(text, "Score")
        if not action or not score:
            return None
        action = action.strip("*.\"' ").lower()
        m = re.fullmatch(r"(0(\.\d+)?|1(\.0+)?|\.\d+)", score.strip("*. "))
        if action not in ACTION_RANGE or not m:
            return None
        s = round(float(m.group(1)), 2)
        return (action, s) if score_fits(action, s) else None

    # ---- grammars (module docstring) and the scripted messages, in the same pieces ----
    def title_ids(self, item):
        """The tokens of a RecAgent answer naming `item` (after the primer): " <title>\n"."""
        if item not in self._titles:
            self._titles[item] = self.text(f" {self.titles[item]}\n")
        return self._titles[item]

    def _head_ids(self, action, score):
        return self.text(f" {action}\nScore: {score:.2f}\n")

    def _reason_ids(self, sentence):
        """ "Reason:" and the sentence's tokens, cut to the grammar's limit, and the end token."""
        return self._reason + self.text(sentence)[:self.reason_max] + [self.end_id]

    def rec_grammar(self, traj, items=None):
        """A candidate's title (among `items`, default the candidates), "Reason:", a bounded
        reason."""
        items = traj.cands if items is None else items
        return Grammar([[self.title_ids(i) for i in items], [self._reason],
                        Text(self.reason_max, self.stop_ids)])

    def user_grammar(self, traj):
        """An action and a score d.dd inside its interval, "Reason:", a bounded reason."""
        if self._scores is None:
            self._scores = trie([self._head_ids(action_of_score(k / 100), k / 100)
                                 for k in range(101)])
        return Grammar([self._scores, [self._reason], Text(self.reason_max, self.stop_ids)])

    def rec_message(self, item, rationale):
        """A scripted RecAgent message (warm-up dialogues, F1 judgements): what follows the
        primer."""
        return self.title_ids(item) + self._reason_ids(f" it is close to {self.titles[rationale]}, "
                                                       "which the user chose before.")

    def user_message(self, action, score, justification):
        return self._head_ids(action,
                              score) + self._reason_ids(" it reminds me of "
                                                        f"{self.titles[justification]}.")

    def hindsight_reference(self, ref):
        """The hindsight reference d built from trajectory `ref` (template [ours]), as token ids."""
        lines = ["Hindsight (known only after the conversation; the other side never sees it):"]
        for k, tr in enumerate(ref.turns, 1):
            if not tr.rec_valid:
                line = f"Turn {k}: an invalid recommendation."
            else:
                line = f"Turn {k}: \"{self.titles[tr.item]}\" was {'right' if tr.hit else 'wrong'}."
            if tr.user_out is not None:
                line += (f" The user answered {tr.action}." if tr.user_valid
                         else " The user's answer was invalid.")
            lines.append(line)
        lines.append(f"The user's true next {self.item_word}: \"{self.titles[ref.target]}\".")
        return self.text("\n".join(lines) + "\n\n")

    def answer_ids(self, item):
        """The start of a RecAgent answer naming `item`, for ranking candidates by log-prob
        (eval.py)."""
        return self.title_ids(item)


# --------------------------------------------------------------------------------------------------
# Scoring the 20 candidates' titles (eval.rank_metrics for a chat model)


def title_grammar(tok, traj):
    """The title part of a chat RecAgent's grammar alone: the tokens of one of traj's candidates'
    titles (grammar.Grammar; its softmax restricted per position to the titles' next tokens)."""
    return Grammar([tok.rec_grammar(traj).parts[0]])


def chat_candidate_scores(model, tok, trajs, prompts, device):
    """(sums, means), each (B,20): the log-prob of the answer naming each candidate's title under
    title_grammar, the restricted softmax the RecAgent decodes its title from (tokens that no other
    candidate's title shares cost nothing, and the 20 probabilities sum to 1), summed over the
    title's tokens and its per-token mean. Fast path: each prompt runs once, then its 20 answers
    run packed in one row after it, each attending to the prompt and to its own earlier tokens (a
    block-diagonal causal mask) at the positions it would have alone, so the prompt's keys and
    values are neither copied per answer nor repeated per attention head (the plain reference,
    chat_candidate_scores_reference, scores each whole sequence; the tests compare them)."""
    sums, means = [], []
    for p, tr in zip(prompts, trajs):
        comps = [tok.answer_ids(i) for i in tr.cands]
        g = title_grammar(tok, tr)
        lens = [len(c) for c in comps]
        P, S = len(p), sum(lens)
        cache = model.new_cache(1, P + S, device)
        ids = torch.tensor([p], device=device)
        ones = torch.ones_like(ids, dtype=torch.bool)
        h0 = model(ids, positions(ones), None, cache, 0)[0, -1:]     # (1,C) predicts y_0; causal
        y = torch.tensor([t for c in comps for t in c], device=device)           # (S,) the answers
        block = torch.repeat_interleave(torch.arange(len(comps)), torch.tensor(lens)).to(device)
        off = torch.cat([torch.arange(n) for n in lens]).to(device)   # (S,) place in its answer
        mask = torch.ones(1, 1, S, P + S, dtype=torch.bool, device=device)   # the prompt: all seen
        mask[0, 0, :, P:] = (block[:, None] == block[None, :]) & (off[:, None] >= off[None, :])
        h = model(y[None], (P + off)[None], mask, cache, P)[0]                # (S,C)
        # token k of an answer is predicted by its token k-1's state (the first by the prompt's)
        starts = [sum(lens[:k]) for k in range(len(lens))]
        hs = torch.cat([torch.cat([h0, h[s:s + n - 1]]) for s, n in zip(starts, lens)])  # (S,C)
        support = [g.allowed(c[:k]) for c in comps for k in range(len(c))]  # in y's order
        allowed, keep = padded_supports(support, device)
        lp = restricted_logprobs(hs, model.head_weight, allowed, y, keep)   # (S,)
        per = lp.split(lens)
        sums.append(torch.stack([x.sum() for x in per]))
        means.append(torch.stack([x.mean() for x in per]))
    return torch.stack(sums).float(), torch.stack(means).float()


def chat_candidate_scores_reference(model, tok, trajs, prompts, device):
    """Plain reference of chat_candidate_scores: token_logprobs_reference (float64, one pair at a
    time) of each whole prompt + answer under title_grammar."""
    pairs = [(p, tok.answer_ids(i), title_grammar(tok, tr)) for p, tr in zip(prompts, trajs)
             for i in tr.cands]
    prompts_, comps, grammars = zip(*pairs)
    lp = token_logprobs_reference(model, prompts_, comps, tok.pad_id, device,
                                  grammar=list(grammars))
    view = lambda xs: torch.stack(xs).view(len(trajs), -1).float()  # noqa: E731
    return view([x.sum() for x in lp]), view([x.mean() for x in lp])
