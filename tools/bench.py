"""
Benchmarks of the two places where RL for language models spends its time: sampling rollouts and
per-token log-probs (teacher and student passes). A file of its own because it is not part of the
method: it measures the fast paths of model.py, scoring.py and sampling.py against what people
would use instead, in one process, and prints ratios.

    python tools/bench.py                    # everything (about 45 min on 2 CPU cores)
    python tools/bench.py --only gen         # one part: gen, logprob, iter, step
    python tools/bench.py --only step --model smollm2-135m --data-url file:///path/ml-latest-small.zip
    python tools/bench.py --quick            # small sizes, for a smoke test
    python tools/bench.py --table f.json     # docs/benchmarks.md's tables from a run saved with --out f.json

1. Generation: sampling.generate (static KV cache, left padding, head on the last position only),
   eager and with its decode steps through torch.compile (compile=True), against Hugging Face
   `generate` on the same weights, eager and with a static cache and its forward compiled (the
   library's own fast path). Each case is also run with 1 new token, which is the prefill
   (the prompt's forward pass), so the time of one decode step is printed beside the matrix
   products' time alone. The built-in GPT is exactly a GPT-NeoX
   (sequential residual, full rotary, exact GELU, biases) whose output head is the normalised token
   embedding, so `to_gpt_neox` copies its weights into transformers' GPTNeoXForCausalLM; the test
   suite checks that both give the same logits. Greedy outputs must be identical.
2. Per-token log-probs of given tokens, forward and backward: scoring.logprobs_of (head only on the
   scored rows, chunked log-sum-exp, hand-written backward) against the plain
   `(h @ W.T).float().log_softmax(-1).gather(...)`, each in a fresh subprocess. Peak memory is
   what one forward + backward needs beyond its inputs: the rise of the resident set's high-water
   mark (VmHWM, reset just before) on CPU, the allocator's peak on GPU. The maximum absolute error
   of both is taken against a float64 reference on the same (bf16) inputs.
3. One CoARS iteration on the built-in model and synthetic data, split into rollout, teacher pass,
   student pass (forward and backward) and update.
4. One CoARS step of a chat model (--model, SmolLM2-135M by default; '' = the built-in GPT) on a
   real dataset: the plain per-message path (every prompt run whole, every message scored under its
   own prompt) against the one that does each piece of work once (caches kept across turns, shared
   prompt prefixes, adapters folded where no gradient flows), the same samples and keys, each phase
   in seconds, tokens and against its floor.

Every number is printed with the machine it came from.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent          # the repository: `python tools/bench.py` works from anywhere
sys.path.insert(0, str(ROOT))

from model import GPT, GPTConfig  # noqa: E402
from scoring import logprobs_of  # noqa: E402
from sampling import generate  # noqa: E402


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def timeit(fn, device, repeat=3, warmup=1):
    """Best wall time of `repeat` calls after `warmup` calls (seconds)."""
    return race({"fn": fn}, device, repeat, warmup=warmup)["fn"]


def race(fns, device, repeat=3, warmup=1, budget_s=0.0, max_rounds=20):
    """Best wall time (seconds) of each function in fns (name -> function), called in turn round
    after round, so a slow spell of a shared machine hits them all alike: at least `repeat` rounds
    after `warmup`, more while the rounds so far took less than budget_s (up to max_rounds)."""
    def once(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best, spent, n = dict.fromkeys(fns, float("inf")), 0.0, 0
    while n < repeat or (spent < budget_s and n < max_rounds):
        for k, fn in fns.items():
            t = once(fn)
            best[k] = min(best[k], t)
            spent += t
        n += 1
    return best


# --------------------------------------------------------------------------------------------------
# 1. Generation


def to_gpt_neox(model: GPT):
    """A transformers GPTNeoXForCausalLM computing exactly what the built-in GPT computes."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    c = model.cfg
    hc = GPTNeoXConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                       num_attention_heads=c.n_head, intermediate_size=4 * c.n_embd, hidden_act="gelu",
                       max_position_embeddings=c.block_size, layer_norm_eps=1e-5, use_parallel_residual=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
                       attention_bias=True, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                       pad_token_id=0)
    hf = GPTNeoXForCausalLM(hc)
    H, C = c.n_head, c.n_embd
    D = C // H
    sd = {"gpt_neox.embed_in.weight": model.wte.weight, "lm_head.weight": model.head_weight,
          "gpt_neox.final_layer_norm.weight": model.ln_f.weight, "gpt_neox.final_layer_norm.bias": model.ln_f.bias}
    for i, b in enumerate(model.blocks):
        p = f"gpt_neox.layers.{i}."
        # ours: [q of all heads | k | v]; GPT-NeoX: per head [q_h | k_h | v_h]
        w = b.qkv.weight.view(3, H, D, C).transpose(0, 1).reshape(3 * C, C)
        bias = b.qkv.bias.view(3, H, D).transpose(0, 1).reshape(3 * C)
        sd.update({p + "input_layernorm.weight": b.ln1.weight, p + "input_layernorm.bias": b.ln1.bias,
                   p + "post_attention_layernorm.weight": b.ln2.weight, p + "post_attention_layernorm.bias": b.ln2.bias,
                   p + "attention.query_key_value.weight": w, p + "attention.query_key_value.bias": bias,
                   p + "attention.dense.weight": b.proj.weight, p + "attention.dense.bias": b.proj.bias,
                   p + "mlp.dense_h_to_4h.weight": b.fc.weight, p + "mlp.dense_h_to_4h.bias": b.fc.bias,
                   p + "mlp.dense_4h_to_h.weight": b.fc2.weight, p + "mlp.dense_4h_to_h.bias": b.fc2.bias})
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in k or "inv_freq" in k for k in missing), (missing, unexpected)
    return hf.to(model.wte.weight.device, model.wte.weight.dtype).eval()


def bench_generation(sizes, batches, prompt_lens, news=(32,), device="cpu", dtype=torch.float32, repeat=2):
    """Whole generate() calls, ours eager and with compiled decode steps, Hugging Face's eager and
    compiled, on the same weights; then the eager calls with 1 new token (the prefill), so that one
    decode step is (whole - prefill) / (new - 1)."""
    rows = []
    for name, (L, H, C) in sizes.items():
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=4096, n_layer=L, n_head=H, n_embd=C, block_size=1024)).to(device, dtype).eval()
        hf = to_gpt_neox(model)
        hf_compiled = torch.compile(hf.forward)
        for P in prompt_lens:
            for B in batches:
                for new in news:
                    g = torch.Generator().manual_seed(B * 1000 + P)
                    prompts = torch.randint(10, 4096, (B, P), generator=g)

                    def ours(n=new, compile=False):
                        return generate(model, prompts.tolist(), n, pad_id=0, temperature=0.0, device=device,
                                        compile=compile)

                    def theirs(n=new, static=False):
                        return hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                           max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                           cache_implementation="static" if static else None)

                    def theirs_compiled(n=new):          # the library's own fast path
                        hf.forward = hf_compiled             # a static cache and its forward compiled
                        try:
                            return theirs(n, static=True)
                        finally:
                            del hf.forward                   # back to the class's (eager) forward
                    r = dict(model=name, batch=B, prompt=P, new=new)
                    torch._dynamo.reset()   # each case compiles afresh (no recompile limit, no dynamic shapes)
                    fns = dict(ours=ours, hf=theirs, ours_prefill=lambda: ours(1), hf_prefill=lambda: theirs(1),
                               compiled=lambda: ours(compile=True), hf_compiled=theirs_compiled)
                    with torch.no_grad():
                        out = ours()
                        r["greedy_identical"] = out == theirs()[:, P:].tolist()
                        r["compiled_identical"] = ours(compile=True) == out          # these two calls also compile
                        r["hf_compiled_identical"] = theirs_compiled()[:, P:].tolist() == out
                        r.update({f"{k}_s": v for k, v in race(fns, device, repeat, budget_s=12.0).items()})
                        r["matmul_ms"] = 1e3 * matmul_floor(model, B, device, dtype)
                    for k in ("ours", "hf", "compiled"):
                        prefill = r["hf_prefill_s" if k == "hf" else "ours_prefill_s"]
                        r[f"{k}_tok_s"] = B * new / r[f"{k}_s"]
                        r[f"{k}_step_ms"] = 1e3 * max(r[f"{k}_s"] - prefill, 0.0) / (new - 1)
                    r["speedup"] = r["hf_s"] / r["ours_s"]
                    r["compiled_speedup"] = r["hf_s"] / r["compiled_s"]
                    r["hf_compiled_tok_s"] = B * new / r["hf_compiled_s"]
                    r["compiled_vs_hf_compiled"] = r["hf_compiled_s"] / r["compiled_s"]
                    rows.append(r)
                    print(fmt_gen(r), flush=True)
    return rows


@torch.no_grad()
def matmul_floor(model, B, device, dtype):
    """Time of one decode step's matrix products alone (every linear layer and the head at batch B):
    what a step costs when nothing else (attention over the cache, launches, Python) does."""
    x = torch.randn(B, model.cfg.n_embd, device=device, dtype=dtype)
    ws = [m.weight for b in model.blocks for m in (b.qkv, b.proj, b.fc)] + [model.head_weight]
    w2 = [b.fc2.weight for b in model.blocks]
    xf = torch.randn(B, 4 * model.cfg.n_embd, device=device, dtype=dtype)

    def step():
        for w in ws:
            x @ w.t()
        for w in w2:
            xf @ w.t()
    return timeit(step, device, repeat=5)


def fmt_gen(r):
    c = (f" | compiled {r['compiled_tok_s']:7.0f} tok/s x{r['compiled_speedup']:.2f}, step "
         f"{r['compiled_step_ms']:.2f} ms, same tokens: {r['compiled_identical']} | HF static cache + compiled "
         f"forward {r['hf_compiled_tok_s']:7.0f} tok/s (ours compiled x{r['compiled_vs_hf_compiled']:.2f}), same "
         f"tokens: {r['hf_compiled_identical']}")
    return (f"  gen {r['model']:<10} B={r['batch']:<3} P={r['prompt']:<4} new={r['new']:<4} prefill ours "
            f"{1e3 * r['ours_prefill_s']:.1f} / HF {1e3 * r['hf_prefill_s']:.1f} ms | ours {r['ours_tok_s']:7.0f} "
            f"tok/s x{r['speedup']:.2f}, step {r['ours_step_ms']:.2f} ms | HF {r['hf_tok_s']:7.0f} tok/s, step "
            f"{r['hf_step_ms']:.2f} ms{c} | matmuls {r['matmul_ms']:.2f} ms/step | greedy = HF: "
            f"{r['greedy_identical']}")


# --------------------------------------------------------------------------------------------------
# 2. Per-token log-probs


def plain_logprobs(h, w, y):
    """What most RL code does: full logits, float32 log-softmax, gather."""
    return (h @ w.t()).float().log_softmax(-1).gather(-1, y[:, None])[:, 0]


@torch.no_grad()
def reference_logprobs(h, w, y, rows=256):
    """float64, a few rows at a time (only to bound memory; every value is exact float64)."""
    out = []
    for s in range(0, len(h), rows):
        z = h[s:s + rows].double() @ w.double().t()
        out.append(z.gather(-1, y[s:s + rows, None])[:, 0] - z.logsumexp(-1))
    return torch.cat(out)


def logprob_case(impl, V, T, B, C, device, dtype, seed=0):
    """Run one case (forward + backward) and return time, peak memory and max abs error."""
    g = torch.Generator().manual_seed(seed)
    N = B * T
    h0 = (torch.randn(N, C, generator=g) * 0.5).to(device, dtype)
    w0 = (torch.randn(V, C, generator=g) / C ** 0.5 * 4).to(device, dtype)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    ref = reference_logprobs(h0, w0, y)
    fn = plain_logprobs if impl == "plain" else logprobs_of

    def run():
        h, w = h0.detach().requires_grad_(), w0.detach().requires_grad_()
        lp = fn(h, w, y)
        lp.sum().backward()
        return lp
    if device == "cuda":
        lp = run()                                  # warm-up, outside the memory count
        del lp
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak()
        base = rss_kib("VmRSS") * 1024
    lp = run()          # its extra memory: everything beyond the inputs and the reference
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss_kib("VmHWM") * 1024) - base
    err = float((lp.detach().double() - ref).abs().max())
    del lp
    t = timeit(run, device, repeat=3 if device == "cuda" else 1, warmup=0)   # the run above warmed up
    return dict(seconds=t, peak_bytes=peak, max_abs_err=err)


def rss_kib(field):
    """VmRSS or VmHWM (peak) of this process in KiB, from /proc (Linux). Not getrusage's ru_maxrss:
    Linux carries that across fork and exec, so a child of a big process starts with its peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:      # "5" resets VmHWM to the current VmRSS
        f.write("5")


def logprob_subprocess(impl, V, T, B, C, device, dtype):
    """logprob_case in a fresh Python process; on CPU its peak memory is the rise of VmHWM over
    the resident size just before the case (after the imports)."""
    code = (f"from tools import bench;import json,torch;torch.manual_seed(0);"
            f"r=bench.logprob_case({impl!r},{V},{T},{B},{C},{device!r},torch.{str(dtype).split('.')[1]});"
            f"print(json.dumps(r))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        return dict(error=(p.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1][:200])
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_logprobs(vocabs, seqs, B=8, C=896, device="cpu", dtype=torch.bfloat16, mem_limit_gb=12.0):
    rows = []
    for V in vocabs:
        for T in seqs:
            # plain needs logits (bf16) + float32 log-softmax + their gradients: ~14 bytes per entry
            plain_gb = B * T * V * 14 / 2 ** 30
            ours = logprob_subprocess("ours", V, T, B, C, device, dtype)
            plain = (logprob_subprocess("plain", V, T, B, C, device, dtype) if device == "cuda" or plain_gb < mem_limit_gb
                     else dict(error=f"skipped: needs ~{plain_gb:.0f} GiB, more than this machine's budget"))
            r = dict(vocab=V, seq=T, batch=B, hidden=C, dtype=str(dtype), ours=ours, plain=plain)
            if "error" not in ours and "error" not in plain:
                r["speedup"] = plain["seconds"] / ours["seconds"]
                r["memory_ratio"] = ours["peak_bytes"] / max(plain["peak_bytes"], 1)
            rows.append(r)
            print(fmt_lp(r), flush=True)
    return rows


def fmt_lp(r):
    def one(x):
        if "error" in x:
            return x["error"]
        return f"{1e3 * x['seconds']:8.1f} ms {x['peak_bytes'] / 2 ** 30:6.2f} GiB err {x['max_abs_err']:.1e}"
    tail = f"  x{r['speedup']:.2f} time, memory {r['memory_ratio']:.3f} of plain" if "speedup" in r else ""
    return f"  logprob V={r['vocab']:<6} T={r['seq']:<5} ours {one(r['ours'])} | plain {one(r['plain'])}{tail}"


# --------------------------------------------------------------------------------------------------
# 3. One CoARS iteration, split


def bench_iteration(batch=48, steps=3, device="cpu"):
    import tempfile

    from data.prepare import DataConfig, prepare
    from data.sasrec import SASRecConfig
    from data.synthetic import make_ml1m_zip
    from config import Config, loss_group
    from distill import ReferenceBuffer
    from train import LossOptions, agent_loss
    from env import new_trajectory, rollout
    from env import Tokenizer
    from model import build_model, freeze
    from pretrain import autocast

    tmp = Path(tempfile.mkdtemp())
    sha = make_ml1m_zip(tmp / "ml-1m.zip", users=300, items=1000, ratings=20000, seed=0)
    data = prepare(DataConfig(dataset="ml-1m", data_dir=str(tmp), data_url=(tmp / "ml-1m.zip").as_uri(),
                              data_sha256=sha, sasrec=SASRecConfig(epochs=2)), log=lambda *a: None)
    cfg = Config()
    tok = Tokenizer(data.n_items)
    model = build_model(cfg, tok.vocab_size, device)              # the default built-in size, untrained
    freeze(model)
    model.add_lora(("rec", "user"), r=cfg.lora_r, alpha=cfg.lora_alpha)
    params = [p for a in ("rec", "user") for p in model.adapter_parameters(a)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    rng = np.random.default_rng(0)
    # the sampler: keyed inverse CDF (train.py) against torch.multinomial, same episodes' prompts
    times = {"multinomial": [], "keyed": [], "keyed, compiled": []}
    for rep in range(steps + 1):
        rows_ = rng.integers(0, len(data.train_user), batch)
        for name in times:
            trajs = [new_trajectory(data, "train", r) for r in rows_]
            for i, tr in enumerate(trajs):
                tr.key = 1000 * rep + i
            t0 = time.perf_counter()
            rollout(model, tok, data, trajs, t_max=cfg.t_max, temperature=1.0, device=device,
                    generator=torch.Generator(device).manual_seed(rep) if name == "multinomial" else None,
                    compile=name.endswith("compiled"))
            if rep:                                     # the first repeat warms up
                times[name].append(time.perf_counter() - t0)
    ratio = np.mean(times["multinomial"]) / np.mean(times["keyed"])
    ratio_c = np.mean(times["keyed"]) / np.mean(times["keyed, compiled"])
    print(f"  rollout of {batch} episodes: multinomial {np.mean(times['multinomial']):.2f} s, keyed "
          f"{np.mean(times['keyed']):.2f} s, keyed {ratio:.2f}x faster; keyed with compiled decode steps "
          f"{np.mean(times['keyed, compiled']):.2f} s, {ratio_c:.2f}x faster than eager", flush=True)
    buffer = ReferenceBuffer()
    reward_cfg = dict(mode="interaction", alpha=cfg.alpha, use_filter=True, stage_gamma=None)
    rows = [dict(sampling={k: float(np.mean(v)) for k, v in times.items()}, sampling_ratio=float(ratio),
                 compiled_ratio=float(ratio_c))]
    for step in range(steps):
        t0 = time.perf_counter()
        trajs = [new_trajectory(data, "train", r) for r in rng.integers(0, len(data.train_user), batch)]
        for tr in trajs:
            tr.key = int(rng.integers(1 << 31))          # keyed sampling, as train.py
        rollout(model, tok, data, trajs, t_max=cfg.t_max, temperature=1.0, device=device)
        split = dict(rollout=time.perf_counter() - t0, teacher=0.0, student=0.0)
        for agent in ("rec", "user"):
            model.set_adapter(agent)
            timing = {}
            with autocast(device, cfg.precision):   # as train.py: groups of loss_batch messages
                agent_loss(model, tok, trajs, buffer, agent,
                           LossOptions(reward_cfg, cfg.lam, micro=loss_group(cfg)), device,
                           timing=timing, backward=True)
            split["teacher"] += timing.get("teacher_s", 0.0)
            split["student"] += timing.get("student_s", 0.0)          # forward and backward
        model.set_adapter(None)
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        split["update"] = time.perf_counter() - t
        buffer.add(trajs)
        split["total"] = time.perf_counter() - t0
        rows.append(split)
        print("  iteration " + "  ".join(f"{k} {v:.2f} s" for k, v in split.items())
              + f"  (rollout {split['rollout'] / split['total']:.0%})", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# 4. One CoARS step of a chat model (or the built-in one): the plain per-message path against the
#    one that does each piece of work once, in one process, the same samples and keys


def matmul_rate(device, dtype=torch.float32, M=512, K=576, N=1536):
    """FLOP/s of a (M,K) @ (K,N) product, best of several (a LLaMA-MLP-sized layer on a prompt)."""
    a, b = torch.randn(M, K, device=device, dtype=dtype), torch.randn(K, N, device=device, dtype=dtype)
    return 2 * M * K * N / timeit(lambda: a @ b, device, repeat=20, warmup=3)


def read_bandwidth(device, mb=512):
    """Bytes/s of reading a large tensor once (a sum): what a memory-bound decode step is held to."""
    x = torch.ones(mb << 18, device=device)        # mb MB of float32
    return x.numel() * 4 / timeit(lambda: x.sum(), device, repeat=5, warmup=1)


class TokenCount:
    """Counts the token positions (padding included) the model runs, split into forwards without
    gradient, forwards with gradient, and one-token decode steps (with their rows)."""

    def __init__(self, model):
        self.reset()
        forward = model.forward

        def counted(idx, *args, **kw):
            T = idx.shape[1]
            if T == 1:
                self.steps += 1
                self.step_rows += idx.shape[0]
            key = "grad" if torch.is_grad_enabled() else "nograd"
            setattr(self, key, getattr(self, key) + idx.numel())
            return forward(idx, *args, **kw)
        model.forward = counted

    def reset(self):
        self.grad = self.nograd = self.steps = self.step_rows = 0


def bench_step(model_name="smollm2-135m", dataset="ml-latest-small", data_url="", batch=8, seed=0,
               device="cpu", adapters=""):
    """One CoARS step (rollout, then per agent the teacher and student passes with backward) twice in
    one process on the same samples and keys: 'per-message' (every prompt run whole in the rollout,
    each message scored under its whole prompt, adapters applied as separate products) and 'shared'
    (kept caches across turns, shared prefixes, folded adapters where no gradient flows). Returns
    per path the seconds and tokens of each phase and each phase's floor: its FLOPs (2 x the body's
    parameters per token forward, twice that with the backward, plus the head on decode rows; the
    attention left out) at the measured matrix-product rate, and for the rollout also its decode
    steps' weight reads at the measured read bandwidth. adapters: a checkpoint (ckpt.pt or coars.pt
    of a run of the same model) whose adapters the agents take, e.g. a UserAgent that turns
    everything down, whose episodes run to the turn limit ('' = fresh adapters)."""
    from config import Config, loss_group
    from data.prepare import prepare
    from distill import ReferenceBuffer
    from env import Tokenizer, new_trajectory, rollout
    from model import LoRALinear, build_model, freeze
    from pretrain import autocast
    from support.runs import chat_backbone
    from train import LossOptions, add_agents, agent_loss, stage2_draws

    cfg = Config(model=model_name, dataset=dataset, data_url=data_url, batch=batch, seed=seed)
    data = prepare(cfg.data_config(), log=print)
    if model_name:
        model, tok = chat_backbone(cfg, data, device, print)
    else:                    # the built-in GPT at its default size, untrained: the same shapes
        tok = Tokenizer(data.n_items, cfg.prior_tilt())
        model = freeze(build_model(cfg, tok.vocab_size, device))
    agents, params = add_agents(cfg, model)
    if adapters:
        from support.checkpoint import load_checkpoint
        path = Path(adapters)
        ck = (load_checkpoint(path.parent, lambda *a: None) if path.name.startswith("ckpt")
              else torch.load(path, map_location=device, weights_only=True))
        model.load_state_dict(ck["adapters"], strict=False)
    rows, keys = stage2_draws(cfg, data)[0]
    count = TokenCount(model)
    body = sum(p.numel() for n, p in model.named_parameters()
               if ".adapters." not in n and "embed" not in n and "wte" not in n)
    head = model.head_weight.numel()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if ".adapters." not in n and "embed" not in n)
    rate, bw = matmul_rate(device), read_bandwidth(device)
    print(f"  {model_name or 'built-in'}: body {body / 1e6:.1f}M parameters, head {head / 1e6:.1f}M; "
          f"matmul {rate / 1e9:.1f} GFLOP/s, read {bw / 1e9:.1f} GB/s")
    out, msgs = {}, {}
    # the built-in model also without shared prefixes in the loss (its default, config.shared_prefix)
    paths = ("per-message", "shared") if model_name else ("per-message", "kept caches", "shared")
    for path in paths:
        fast = path == "shared"
        LoRALinear.fold = path != "per-message"
        trajs = [new_trajectory(data, "train", r) for r in rows]
        for tr, k in zip(trajs, keys):
            tr.key = int(k)
        count.reset()
        t0 = time.perf_counter()
        rollout(model, tok, data, trajs, t_max=cfg.t_max, temperature=cfg.temperature, device=device,
                keep_cache=path != "per-message")
        r = dict(rollout_s=time.perf_counter() - t0, rollout_tokens=count.nograd,
                 decode_steps=count.steps)
        r["rollout_floor_s"] = (2 * body * count.nograd + 2 * head * count.step_rows) / rate
        r["decode_read_floor_s"] = count.steps * weight_bytes / bw
        timing, losses = {}, {}
        count.reset()
        for agent in agents:
            model.set_adapter(agent)
            opts = LossOptions(dict(cfg.reward_options(), user_balance=cfg.user_balance), cfg.lam,
                               decoding=cfg.decoding, temperature=cfg.temperature,
                               micro=loss_group(cfg), clip=cfg.credit_clip, shared=fast)
            with autocast(device, cfg.precision):
                loss, _ = agent_loss(model, tok, trajs, ReferenceBuffer(), agent, opts, device,
                                     backward=True, n_episodes=len(trajs), timing=timing)
            losses[agent] = float(loss)
        model.set_adapter(None)
        for p in params:
            p.grad = None
        r.update(teacher_s=timing["teacher_s"], student_s=timing["student_s"],
                 teacher_tokens=count.nograd, student_tokens=count.grad,
                 teacher_floor_s=2 * body * count.nograd / rate,
                 student_floor_s=4 * body * count.grad / rate, losses=losses,
                 turns=float(np.mean([len(tr.turns) for tr in trajs])))
        r["step_s"] = r["rollout_s"] + r["teacher_s"] + r["student_s"]
        out[path] = r
        msgs[path] = [[(t.rec_out, t.user_out) for t in tr.turns] for tr in trajs]
        print(f"  {path}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in r.items() if k != "losses")
              + f", losses {losses}", flush=True)
    LoRALinear.fold = True
    out["same_messages"] = all(msgs[p] == msgs["per-message"] for p in paths)
    out["model"], out["batch"], out["rate_gflops"] = model_name or "built-in", batch, rate / 1e9
    out["adapters"] = adapters
    out["read_gbs"] = bw / 1e9
    print(f"  same messages: {out['same_messages']}; step {out['per-message']['step_s']:.1f} s -> "
          f"{out['shared']['step_s']:.1f} s ({out['per-message']['step_s'] / out['shared']['step_s']:.2f}x)")
    return out


# --------------------------------------------------------------------------------------------------


def markdown(res):
    """docs/benchmarks.md's tables from a saved --out file (so a run on another machine can be pasted in)."""
    out = [f"Machine: {res['machine']}; device {res['device']}.", ""]
    if res.get("generation"):
        out += ["| model | batch | prompt | new | prefill ours / HF ms | step ms: ours | compiled | HF | matmuls "
                "| whole call vs HF: ours | compiled | compiled vs HF compiled | same tokens |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["generation"]:
            same = r["greedy_identical"] and r["compiled_identical"] and r["hf_compiled_identical"]
            out.append(f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['new']} | {1e3 * r['ours_prefill_s']:.1f} / "
                       f"{1e3 * r['hf_prefill_s']:.1f} | {r['ours_step_ms']:.2f} | {r['compiled_step_ms']:.2f} "
                       f"| {r['hf_step_ms']:.2f} | {r['matmul_ms']:.2f} | {r['speedup']:.2f}x | "
                       f"{r['compiled_speedup']:.2f}x | {r['compiled_vs_hf_compiled']:.2f}x | {same} |")
        out.append("")
    if res.get("logprobs"):
        out += ["| vocab | seq | ours ms | ours extra GiB | ours max err | plain ms | plain extra GiB | plain max err "
                "| ours / plain time | ours / plain memory |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["logprobs"]:
            def cells(x):
                if "error" in x:
                    return f"{x['error']} | | "
                return f"{1e3 * x['seconds']:.0f} | {x['peak_bytes'] / 2 ** 30:.2f} | {x['max_abs_err']:.1e}"
            ratio = f"{1 / r['speedup']:.2f} | {r['memory_ratio']:.3f}" if "speedup" in r else " | "
            out.append(f"| {r['vocab']} | {r['seq']} | {cells(r['ours'])} | {cells(r['plain'])} | {ratio} |")
        out.append("")
    if res.get("iteration"):
        it = res["iteration"]
        out.append(f"Rollout sampling (s): {it[0]['sampling']}")
        steps = it[1:]
        if steps:
            mean = {k: float(np.mean([s[k] for s in steps])) for k in steps[0]}
            out += ["", "| part | seconds (mean of %d) | share |" % len(steps), "|---|---|---|"]
            out += [f"| {k} | {v:.2f} | {v / mean['total']:.0%} |" for k, v in mean.items() if k != "total"]
            out.append(f"| whole step | {mean['total']:.2f} | |")
    for st in res.get("step", []):
        out += ["", f"One CoARS step of {st['model']}, batch {st['batch']}"
                + (f", adapters of {st['adapters']}" if st.get("adapters") else "")
                + f", {st['shared']['turns']:.1f} turns an episode (matmul {st['rate_gflops']:.1f} "
                f"GFLOP/s, read {st['read_gbs']:.1f} GB/s; same messages on both paths: {st['same_messages']}):",
                "", "| phase | per-message s | tokens | shared s | tokens | speed-up | shared / its floor |",
                "|---|---|---|---|---|---|---|"]
        a, b = st["per-message"], st["shared"]
        for ph in ("rollout", "teacher", "student"):
            floor = b[f"{ph}_floor_s"] + (b["decode_read_floor_s"] if ph == "rollout" else 0.0)
            out.append(f"| {ph} | {a[ph + '_s']:.1f} | {a[ph + '_tokens']} | {b[ph + '_s']:.1f} | "
                       f"{b[ph + '_tokens']} | {a[ph + '_s'] / b[ph + '_s']:.2f}x | {b[ph + '_s'] / floor:.1f}x |")
        out.append(f"| step | {a['step_s']:.1f} | | {b['step_s']:.1f} | | {a['step_s'] / b['step_s']:.2f}x | |")
        if "kept caches" in st:
            k = st["kept caches"]
            out.append(f"| step with kept caches, per-message loss | | | {k['step_s']:.1f} | | "
                       f"{a['step_s'] / k['step_s']:.2f}x | |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmarks of generation, log-probs and one CoARS iteration.")
    p.add_argument("--only", choices=["gen", "logprob", "iter", "step"], action="append",
                   help="run only these parts (repeatable)")
    p.add_argument("--model", default="smollm2-135m",
                   help="the backbone of part 4, the CoARS step ('' = the built-in GPT; default: "
                        "%(default)s)")
    p.add_argument("--dataset", default="ml-latest-small", help="part 4's dataset (default: %(default)s)")
    p.add_argument("--data-url", default="", help="part 4's raw dataset file ('' = official)")
    p.add_argument("--batch", type=int, default=8, help="part 4's episodes per step (default: %(default)s)")
    p.add_argument("--adapters", default="", help="part 4: the agents' adapters from this ckpt.pt or coars.pt of "
                   "a run of the same model ('' = fresh adapters)")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="the device to benchmark on (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--out", default="", help="also write every number to this JSON file")
    p.add_argument("--table", default="", help="print docs/benchmarks.md's tables from a saved --out file, run nothing")
    a = p.parse_args(argv)
    if a.table:
        try:
            print(markdown(json.loads(Path(a.table).read_text())))
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"error: {a.table} is not a file written by tools/bench.py --out ({type(e).__name__}: {e}).")
        return
    parts = a.only or ["gen", "logprob", "iter", "step"]
    dev = a.device
    print(f"machine: {machine()}; device {dev}")
    res = dict(machine=machine(), device=dev)
    if "gen" in parts:
        print("1. generation: ours (static KV cache) vs Hugging Face generate, greedy, same weights")
        if a.quick:
            res["generation"] = bench_generation({"tiny": (2, 2, 64)}, [1, 4], [16], news=[8], device=dev, repeat=1)
        else:   # bf16 on GPU; on CPU float32 (both implementations alike)
            dtype = torch.bfloat16 if dev == "cuda" else torch.float32
            sizes = {"built-in": (4, 4, 128), "gpt2-6x384": (6, 6, 384)}
            res["generation"] = (bench_generation(sizes, [1, 16, 64], [64, 512], device=dev, dtype=dtype)
                                 # the reference configuration: 64-token prompts, 128 new tokens
                                 + bench_generation(sizes, [16, 64], [64], news=[128], device=dev, dtype=dtype))
    if "logprob" in parts:
        print("2. per-token log-probs, forward + backward, bf16 inputs: ours (chunked) vs plain float32 "
              "log_softmax + gather")
        if a.quick:
            res["logprobs"] = bench_logprobs([4096], [64], B=2, C=64, device=dev)
        elif dev == "cuda":
            res["logprobs"] = bench_logprobs([4096, 50257, 151936], [512, 2048], device=dev)
        else:  # on 2 CPU cores a 152k x 16k-row case takes minutes per pass
            res["logprobs"] = bench_logprobs([4096], [512, 2048], device=dev) + \
                bench_logprobs([50257, 151936], [512], device=dev) + \
                bench_logprobs([151936], [2048], device=dev)          # ours alone: plain needs ~28 GiB
    if "iter" in parts:
        print("3. one CoARS iteration on the built-in model (default size, batch 48, T_max 5)")
        res["iteration"] = bench_iteration(batch=8 if a.quick else 48, steps=1 if a.quick else 3, device=dev)
    if "step" in parts:
        print(f"4. one CoARS step of {a.model or 'the built-in GPT'}, per-message path vs shared prefixes "
              "and kept caches")
        from config import UserError
        from data.prepare import DataError
        try:
            res["step"] = [bench_step(a.model, a.dataset, a.data_url, 2 if a.quick else a.batch,
                                      device=dev, adapters=a.adapters)]
        except (UserError, DataError) as e:
            sys.exit(f"error: {e}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
