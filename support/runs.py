"""
Loading what train.py built, for everything that works on a finished run (eval.py's re-evaluation,
tools/viewer.py, tools/suite.py): the frozen backbone of a run and a run folder's adapters.
A file of its own so that those tools need not import train.py (which imports them).

  - chat_backbone(): a Hugging Face chat model and its natural-language format (support/hf.py,
    support/chat.py), the backbone train.py uses when --model is given.
  - load_run(): (config, model with both adapters, tokenizer, data) of a run folder.
  - add_run_args(): the --run, --split and --device flags of every script that reads a run.
"""

from pathlib import Path

import torch

from config import Config, UserError, lora_targets, saved_options
from data.prepare import DataError, prepare
from support import hf
from support.chat import ChatTokenizer
from support.checkpoint import newest_checkpoint, prepared_warning
from support.distributed import device_of
from env import Tokenizer
from model import build_model, freeze


def add_run_args(p, split="test", split_help="the split used"):
    """--run (a folder train.py wrote), --split (valid / test, default `split`) and --device."""
    p.add_argument("--run", required=True,
                   help="the run folder written by train.py (holds coars.pt)")
    p.add_argument("--split", default=split, choices=["valid", "test"],
                   help=f"{split_help} (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default: %(default)s)")


def chat_backbone(cfg, data, device, log):
    """(frozen Hugging Face model, ChatTokenizer) for cfg.model; a model that will not load is a
    UserError (one sentence)."""
    try:
        model, hf_tok = hf.load(cfg.model, device, grad_checkpointing=cfg.grad_checkpointing)
    except hf.ModelLoadError as e:
        raise UserError(str(e))
    log(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        "frozen; stage 1 skipped")
    return model, ChatTokenizer(hf_tok, data.titles)


def load_run(run_dir: Path, device="auto", checkpoint=False, log=lambda *a: None):
    """(cfg, model with both adapters, tokenizer, data) of a finished run (its coars.pt and, for the
    built-in model, its base.pt). checkpoint=True: the adapters of a run still in progress, from its
    newest stage-2 checkpoint (support/checkpoint.newest_checkpoint); log says which file and
    step."""
    if checkpoint:
        path, ck = newest_checkpoint(Path(run_dir), log=lambda *a: None)
        if ck is None or ck.get("stage") != 2:
            raise UserError(f"{run_dir} has no stage-2 checkpoint yet (ckpt.pt): train it with "
                            "--ckpt-every, or drop --checkpoint for a finished run.")
        log(f"adapters of {path} (the newest checkpoint): stage 2, step {ck['step']}")
    else:
        path = Path(run_dir) / "coars.pt"
        if not path.exists():
            raise UserError(f"{path} does not exist: point --run at a folder written by train.py.")
        ck = torch.load(path, map_location="cpu", weights_only=True)
    cfg = Config(**saved_options(ck["config"]))
    device = device_of(device)
    try:
        data = prepare(cfg.data_config(), log=lambda *a: None)
    except DataError as e:
        raise UserError(str(e))
    if cfg.model:
        model, tok = chat_backbone(cfg, data, device, lambda *a: None)
    else:
        tok = Tokenizer(data.n_items, cfg.prior_tilt())
        model = build_model(cfg, tok.vocab_size, device)
        model.load_state_dict(torch.load(Path(run_dir) / "base.pt", map_location=device,
                                         weights_only=True)["model"])
    model.add_lora(("rec", "user"), r=cfg.lora_r, alpha=cfg.lora_alpha, targets=lora_targets(cfg))
    # the SFT reference (train.sft_reference)
    if any(".adapters.sft." in k for k in ck["adapters"]):
        model.add_lora(("sft",), r=cfg.lora_r, alpha=cfg.lora_alpha, targets=lora_targets(cfg))
    # every adapter the model has must come from the file and every tensor of the file must land:
    # a run whose adapters did not load would otherwise evaluate as the untrained pair
    got = model.load_state_dict(ck["adapters"], strict=False)
    missing = [k for k in got.missing_keys if ".adapters." in k]
    if missing or got.unexpected_keys:
        bad = (missing or got.unexpected_keys)[0]
        raise UserError(f"{path} does not fit the model it describes ({len(missing)} adapter "
                        f"tensors missing, {len(got.unexpected_keys)} unexpected, e.g. {bad}): it "
                        "was written by another version of this code or is damaged; train the run "
                        "again.")
    warning = prepared_warning(ck, data, f"{path.name} was trained on",
                               "the evaluation uses this data")
    if warning:
        log(warning)
    return cfg, freeze(model), tok, data
