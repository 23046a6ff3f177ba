"""`ponder pretrain RECIPE`: train a tiny character-level Llama on the synthetic corpus, from scratch.

The corpus (ponder.tasks.corpus) is written in memory, split into documents ended by EOS, packed into
one token stream, and read in random windows. The tokenizer is the built-in character one unless the
recipe names another (`tokenizer`: a directory, a Hub id or a built-in model name). Plain next-token loss, AdamW, warmup then cosine decay.
The result is a Hugging Face model directory with its tokenizer, a model card (README.md) and the
figures of a probe on the held-out hard arithmetic split under the R1-Zero template.
Determinism: one seed fixes the corpus, the initialisation and the windows read.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ponder import stopping
from ponder.errors import UserError
from ponder.files import blocked, blocking_file, replace_dir, writable_dir
from ponder.runtime import choose_precision, device_memory, set_threads
from ponder.tasks.corpus import CorpusConfig, corpus_text


@dataclass
class ProbeConfig:
    n: int = 200  # held-out problems; 0: no probe
    k: int = 4  # samples per problem
    temperatures: list[float] = field(default_factory=lambda: [1.0, 0.6])
    max_new_tokens: int = 256
    batch_size: int = 1024  # sequences generated at once
    tasks: list[str] = field(default_factory=lambda: ["arithmetic:hard", "countdown:medium"])


@dataclass
class PretrainConfig:
    output: str = "runs/pretrain-tiny"  # the model directory written
    seed: int = 0
    # "char": the built-in character tokenizer; else a tokenizer (or model) directory, a Hub id (owner/name[@rev],
    # loaded like model.path: Hugging Face cache, HF_HUB_OFFLINE) or a built-in model name, whose tokenizer is used
    tokenizer: str = "char"
    trust_remote_code: bool = False  # let a Hub tokenizer run its own code
    shape: str = "micro"  # ponder.models.tiny.TINY_SHAPES
    sizes: dict[str, Any] = field(default_factory=dict)  # LlamaConfig fields that override the shape's
    max_len: int = 1024  # positions the model supports
    block: int = 768  # training window (tokens)
    corpus_chars: int = 20_000_000
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    workers: int = 0  # processes writing the corpus; 0: one per CPU core
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "mixed", "bf16"] = "auto"  # as GRPO's train.precision (ponder.runtime)
    threads: int = 0  # torch CPU threads; 0: torch's default
    log_every: int = 100
    save_dtype: Literal["float32", "bfloat16"] = "float32"
    probe: ProbeConfig = field(default_factory=ProbeConfig)


# ---------------------------------------------------------------------------------------------
# data


def _shard(args) -> str:
    n_chars, seed, cfg = args
    return "\x00".join(corpus_text(n_chars, seed, cfg))


def corpus_tokens(cfg: PretrainConfig, tokenizer) -> np.ndarray:
    """The corpus as one stream of token ids, each document followed by EOS. The built-in character tokenizer
    goes through a byte table (seconds for 100M characters); any other tokenizer encodes each document."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = cfg.workers or min(cores, 16)
    shards = max(1, min(64, cfg.corpus_chars // 200_000))  # fixed by the size alone: the same corpus on any machine
    jobs = [(cfg.corpus_chars // shards, cfg.seed * 100_003 + i, cfg.corpus) for i in range(shards)]
    if workers > 1 and shards > 1:
        with ProcessPoolExecutor(workers) as pool:
            texts = list(pool.map(_shard, jobs))
    else:
        texts = [_shard(j) for j in jobs]
    if cfg.tokenizer != "char":  # shard by shard, so that only one shard's ids are ever Python lists
        eos = [tokenizer.eos_token_id]
        return np.concatenate([np.fromiter((i for ids in tokenizer(t.split("\x00"), add_special_tokens=False)["input_ids"]
                                            for i in ids + eos), dtype=np.int64) for t in texts])
    extra = [c for c in tokenizer.get_vocab() if len(c) == 1 and ord(c) > 127]
    if not extra:  # the ASCII corpus of tiny-base: one byte per character
        lut = char_table(tokenizer)
        return np.concatenate([lut[np.frombuffer(t.encode("ascii"), dtype=np.uint8)] for t in texts])
    lut = char_table(tokenizer, size=max(map(ord, extra)) + 1)
    parts = []
    for t in texts:
        points = np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32)
        if points.max(initial=0) >= len(lut):
            raise UserError(f"the corpus writes {chr(int(points.max()))!r}, which the tokenizer lacks; add it to "
                            "ponder.tasks.bilingual's word tables (ZH_CHARS is read off them)")
        parts.append(lut[points])
    tokens = np.concatenate(parts)
    if (tokens == tokenizer.unk_token_id).any():
        bad = next(c for t in texts for c in t if c != "\x00" and tokenizer.convert_tokens_to_ids(c) == tokenizer.unk_token_id)
        raise UserError(f"the corpus writes {bad!r}, which the tokenizer lacks; add it to ponder.tasks.bilingual's word tables")
    return tokens


def pretrain_tokenizer(cfg: PretrainConfig):
    """The tokenizer the recipe names, with an EOS token (it ends every document); `char`: the built-in
    character tokenizer the corpus needs."""
    from ponder.models import load_tokenizer

    if cfg.tokenizer == "char":
        return corpus_tokenizer(cfg.corpus)
    tokenizer = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UserError(f"config tokenizer: '{cfg.tokenizer}' has no EOS token, which ends every corpus document; "
                        f"choose a tokenizer that has one")
    return tokenizer


def char_table(tokenizer, size: int = 256) -> np.ndarray:
    """code point -> token id for a character tokenizer (below `size`); the separator 0 maps to EOS."""
    lut = np.full(size, tokenizer.unk_token_id, dtype=np.int64)
    for char, tid in tokenizer.get_vocab().items():
        if len(char) == 1 and 0 < ord(char) < size and tid != tokenizer.unk_token_id:
            lut[ord(char)] = tid
    lut[0] = tokenizer.eos_token_id
    return lut


def corpus_tokenizer(corpus: CorpusConfig):
    """The character tokenizer a corpus needs: ASCII (tiny-base's, unchanged), plus the Chinese characters
    when the recipe's corpus has bilingual kinds."""
    from ponder.models.tiny import char_tokenizer
    from ponder.tasks.bilingual import ZH_CHARS
    from ponder.tasks.corpus_bilingual import MAKERS as BILINGUAL_KINDS

    bilingual = any(share > 0 for kind, share in corpus.kinds.items() if kind in BILINGUAL_KINDS)
    return char_tokenizer(ZH_CHARS if bilingual else "")


# ---------------------------------------------------------------------------------------------
# model and training


def check_sizes(cfg: PretrainConfig) -> None:
    """The shape and its sizes: whole numbers, heads that divide the width into even head widths (rotary), query
    heads in whole groups of key/value heads. Found by transformers only after the corpus was written, or never
    (a width of 2**40 tried to allocate 444 TB)."""
    from ponder.config import need
    from ponder.models.tiny import TINY_SHAPES

    if cfg.shape not in TINY_SHAPES:
        raise UserError(f"config shape: unknown tiny shape '{cfg.shape}'; choose one of: {', '.join(TINY_SHAPES)}")
    dims = {**TINY_SHAPES[cfg.shape], **{k: v for k, v in cfg.sizes.items() if k in TINY_SHAPES[cfg.shape]}}
    for key, v in dims.items():
        need(type(v) is int and 1 <= v <= 65536, f"sizes.{key}", v, "a whole number from 1 to 65,536")
    width, heads, groups = dims["hidden_size"], dims["num_attention_heads"], dims["num_key_value_heads"]
    need(width % heads == 0 and width // heads % 2 == 0, "sizes.hidden_size", width,
         f"num_attention_heads ({heads}) times an even head width (rotary turns pairs of dimensions)")
    need(heads % groups == 0, "sizes.num_key_value_heads", groups, f"a divisor of num_attention_heads ({heads})")


def build_model(cfg: PretrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ponder.models.tiny import tiny_config

    base = tiny_config(cfg.shape, tokenizer, max_len=cfg.max_len).to_dict()
    unknown = [k for k in cfg.sizes if k not in base]
    if unknown:
        raise UserError(f"config sizes.{unknown[0]}: not a LlamaConfig field; use e.g. hidden_size, num_hidden_layers")
    base.update(cfg.sizes)
    base.pop("head_dim", None)  # recomputed from hidden_size / num_attention_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(LlamaConfig(**base))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("config device=cuda but no CUDA device is visible; use device=auto or cpu")
    return torch.device(name)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def train(model, tokens: np.ndarray, cfg: PretrainConfig, console) -> list[float]:
    """Run `cfg.steps` optimizer steps; returns the loss of every step."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ponder.models import to_dtype

    device = _device(cfg.device)
    if cfg.threads:
        set_threads(cfg.threads, "threads")
    n = sum(p.numel() for p in model.parameters())
    precision = choose_precision(cfg.precision, device.type, n, device_memory(device))
    if cfg.precision == "auto" and device.type != "cpu":
        console.print(f"ponder: {precision.line()}")
    if len(tokens) < cfg.block + 2:
        raise UserError(f"config corpus_chars={cfg.corpus_chars} is shorter than one training window; raise it")
    data = torch.from_numpy(tokens).to(device)  # tiny next to the device's memory; windows are cut there
    to_dtype(model, precision.dtype).to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if precision.name == "bf16":  # bf16 weights lose small updates to rounding without it (ponder.optim)
        from ponder.optim import KahanAdamW

        opt = KahanAdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.arange(cfg.block + 1)
    losses: list[float] = []
    columns = [TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    start = time.time()
    last = (0, start)
    with Progress(*columns, console=console, transient=False) as bar:
        job = bar.add_task("pretrain", total=cfg.steps, loss="-", rate="")
        for step in range(cfg.steps):
            starts = torch.randint(0, len(data) - cfg.block - 1, (cfg.batch_size,), generator=gen)
            batch = data[(starts[:, None] + offsets).to(device)]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.autocast):
                logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if step % 10 == 0 or step == cfg.steps - 1:
                value = loss.item()
                if not math.isfinite(value):
                    from ponder.errors import TrainingError

                    raise TrainingError(f"pretraining loss became {value} at step {step}; lower lr")
                now = time.time()
                rate = (step - last[0]) * cfg.batch_size * cfg.block / max(now - last[1], 1e-9)  # recent tokens/s
                last = (step, now)
                bar.update(job, completed=step + 1, loss=f"{value:.3f}", rate=f"{rate / 1e3:.0f}k tok/s")
                if not console.is_terminal and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                    console.print(f"step {step + 1}/{cfg.steps} loss {value:.4f} {rate / 1e3:.0f}k tok/s "
                                  f"{time.time() - start:.0f}s")
            losses.append(loss.detach())
    return [float(x) for x in losses]


# ---------------------------------------------------------------------------------------------
# probe: what the base model does under the R1-Zero template

# a written step: `a op b = c`, or the bilingual world's `a plus b is c` / 四十二加七十三得一百一十五
_ZH_NUM = "[零一二三四五六七八九十百千]+"
STEP_RE = re.compile(rf"\d+ [-+*/] \d+ = \d+|\d+ (?:plus|minus) \d+ is \d+|{_ZH_NUM}[加减]{_ZH_NUM}得{_ZH_NUM}")
REFLECTION_RE = re.compile(r"\b(wait|verify|check|mistake|however|recheck)\b", re.IGNORECASE)


def probe(model, tokenizer, cfg: ProbeConfig, seed: int = 0) -> dict:
    """pass@1 (mean over k), format rate, worked-step share, length and reflection rate per task and temperature."""
    from ponder.rewards import get_reward
    from ponder.rewards.extract import extract_answer
    from ponder.rollout import SamplingParams, decode_text, make_engine
    from ponder.templates import render

    engine = make_engine("hf", model, tokenizer, batch_size=cfg.batch_size)
    out: dict = {}
    for spec in cfg.tasks:
        task, examples = probe_examples(spec, cfg.n, seed)
        prompts = [tokenizer(render("r1_zero", ex["prompt"]))["input_ids"] for ex in examples]
        for temp in cfg.temperatures:
            params = SamplingParams(n=cfg.k, temperature=temp, max_tokens=cfg.max_new_tokens, stop=("</answer>",), seed=seed)
            groups = engine.generate(prompts, params)
            texts, scores = [], []
            for ex, group in zip(examples, groups):
                for c in group:
                    text = decode_text(tokenizer, c.token_ids)
                    answer = extract_answer(text)
                    texts.append(text)
                    scores.append(0.0 if answer is None else task.verify(answer, ex))
            formatted = get_reward("format")(texts, prompts=[])
            worked = [len(STEP_RE.findall(t)) >= 2 for t in texts]
            # accuracy of the mode RL should select: worked steps inside the tags
            selected = [s for s, f, w in zip(scores, formatted, worked) if f and w]
            out[f"{spec}@T{temp}"] = {
                "pass@1": float(np.mean(scores)),
                "format": float(np.mean(formatted)),
                "worked": float(np.mean(worked)),
                "worked_pass": float(np.mean(selected)) if selected else float("nan"),
                "length": float(np.mean([len(tokenizer(t)["input_ids"]) for t in texts])),
                "reflection": float(np.mean([bool(REFLECTION_RE.search(t)) for t in texts])),
                "n": len(examples), "k": cfg.k, "example": texts[0],
            }
    return out


def probe_examples(spec: str, n: int, seed: int) -> tuple[Any, list[dict]]:
    """The task a probe entry `name[:level]` names and its `n` held-out test problems."""
    from ponder.tasks import get_task

    name, _, level = spec.partition(":")
    task = get_task(name)
    return task, task.load("test", n=n, seed=seed, **({"difficulty": level} if level else {}))


def probe_table(figures: dict) -> str:
    lines = ["| task @ temperature | pass@1 | format | worked steps | pass@1 of worked+format | length (tokens) "
             "| reflection words | n x k |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, f in figures.items():
        lines.append(f"| {key} | {f['pass@1']:.3f} | {f['format']:.3f} | {f['worked']:.3f} | {f['worked_pass']:.3f} "
                     f"| {f['length']:.1f} | "
                     f"{f['reflection']:.3f} | {f['n']} x {f['k']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the command


def write_card(out: Path, cfg: PretrainConfig, info: dict, figures: dict | None, into: Path | None = None) -> None:
    """The model card of the model directory `out`, written into `into` (default `out`)."""
    from ponder.config import to_dict

    import yaml

    kind = "character-level " if cfg.tokenizer == "char" else ""
    text = [f"# {out.resolve().name}", "",
            f"A {kind}Llama-architecture base model of ponder's miniature world, pretrained from scratch "
            f"{info['tokenizer']}on the synthetic corpus of `ponder.tasks.corpus` (see docs/world.md). It has never seen a test "
            "item or an RL training prompt of the `arithmetic` and `countdown` tasks.", "",
            "## How it was made", "", "```", info["command"], "```", "",
            f"{info['params']:,} parameters; {cfg.steps} steps of {cfg.batch_size} x {cfg.block} tokens "
            f"({cfg.steps * cfg.batch_size * cfg.block / 1e6:.0f}M tokens) over a corpus of {info['corpus_tokens'] / 1e6:.1f}M "
            f"tokens; final loss {info['final_loss']:.3f}; {info['train_seconds']:.0f} s on {info['device']}.", ""]
    if figures:
        text += ["## What it scores", "",
                 "Held-out test splits under the R1-Zero template, k samples per problem, stop at `</answer>`, "
                 f"at most {cfg.probe.max_new_tokens} new tokens. pass@1 is the mean correctness over the k samples; "
                 "format is the strict think-then-answer check of the `format` reward; worked steps is the share "
                 "of completions with at least two written steps `a op b = c`; reflection words is the share with "
                 "wait/verify/check/mistake/however/recheck.", "", probe_table(figures), "",
                 "Measured by:", "", "```", f"ponder pretrain {info['recipe']} --probe-only output={out}", "```", ""]
    text += ["## Resolved config", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).strip(), "```", ""]
    ((into or out) / "README.md").write_text("\n".join(text))


def save_as(model, tokenizer, out: Path, save_dtype: str):
    """Save the model in `save_dtype`; returns it in float32 as saved, for the probe. The rotary frequencies stay
    float32 both ways (a cast to bf16 and back kept them rounded: the probe measured another model than the one saved,
    logits off by 2 at positions past 900)."""
    from ponder.models import save, to_dtype

    save(to_dtype(model, torch.bfloat16) if save_dtype == "bfloat16" else model, tokenizer, out)
    return to_dtype(model, torch.float32)


def check_output(out: Path) -> None:
    """Before a corpus is written or a step taken, that the model can be saved at `out` (a read-only directory, or a
    file in the path, was found by the save after all of training: a traceback, and the trained model lost)."""
    if blocking_file(out):
        raise blocked(out, "output")
    writable_dir(out.absolute().parent, "output")


@contextlib.contextmanager
def written_whole(out: Path):
    """A directory to write the model into, a temporary sibling (.tmp-NAME-PID) that takes `out`'s name only once the
    block ends: a Ctrl-C in the probe or a kill in the save left the new weights beside the old card, or half the old
    model, in a directory nothing marked unfinished. Interrupted, the old `out` stays as it was."""
    final = out.resolve()  # a link to the model directory keeps pointing at it
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:  # Ctrl-C and SIGTERM (ponder.stopping) included
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, final)


_replace_dir = stopping.whole()(replace_dir)  # a SIGTERM meanwhile waits for both renames


def pretrain(cfg: PretrainConfig, recipe: str = "RECIPE", console=None, overrides: list[str] = ()) -> Path:
    """Write the corpus, train, save the model with its tokenizer and card; return its directory."""
    from ponder.console import make_console

    console = console or make_console()
    check(cfg)
    out = Path(cfg.output)
    check_output(out)
    torch.manual_seed(cfg.seed)
    tokenizer = pretrain_tokenizer(cfg)  # before the corpus is written: a wrong name costs no time
    t0 = time.time()
    tokens = corpus_tokens(cfg, tokenizer)
    console.print(f"corpus: {len(tokens) / 1e6:.1f}M tokens in {time.time() - t0:.0f}s")
    model = build_model(cfg, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    console.print(f"model: {params:,} parameters ({cfg.shape} {cfg.sizes or ''})")
    t1 = time.time()
    losses = train(model, tokens, cfg, console)
    seconds = time.time() - t1
    model = model.float().eval()
    device = next(model.parameters()).device
    info = {
        "command": " ".join(["ponder pretrain", recipe, *(o for o in overrides if not o.startswith("output="))]), "recipe": recipe, "params": params, "corpus_tokens": len(tokens),
        "final_loss": float(np.mean(losses[-20:])), "train_seconds": seconds,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
        "tokenizer": _tokenizer_source(cfg.tokenizer),
    }
    failed = None
    with written_whole(out) as into:
        model = save_as(model, tokenizer, into, cfg.save_dtype)
        figures = None
        if cfg.probe.n:
            tokenizer.padding_side = "left"
            try:
                figures = probe(model, tokenizer, cfg.probe, seed=cfg.seed)
                console.print(probe_table(figures))
            except Exception as e:  # the trained model is kept all the same (it was lost with the probe); Ctrl-C is not
                failed = e
        write_card(out, cfg, info, figures, into)
    if failed:
        console.print(f"saved {out} without probe figures, as the probe failed; once fixed, measure it with "
                      f"`ponder pretrain {recipe} --probe-only output={out}`", soft_wrap=True)
        raise failed
    console.print(f"saved {out} (loss {info['final_loss']:.3f}, {seconds:.0f}s training)", soft_wrap=True)
    return out


def _tokenizer_source(name: str) -> str:
    """The card's words for where the tokenizer came from; a Hub id names the cached snapshot (its commit)."""
    from ponder.models import HubModel, hub_snapshot, resolve

    if name == "char":
        return ""
    where = resolve(name, kind="tokenizer")
    if isinstance(where, HubModel):
        snapshot = hub_snapshot(where, kind="tokenizer")
        return f"with the tokenizer of `{where}`" + (f" (snapshot {snapshot.name})" if snapshot else "") + " "
    return f"with the tokenizer of `{name}` "


def probe_only(cfg: PretrainConfig, recipe: str, console=None) -> dict:
    """Measure an existing model (cfg.output) and print the card's table."""
    from ponder.console import make_console

    from ponder.models import load

    console = console or make_console()
    model, tokenizer = load(cfg.output)
    device = _device(cfg.device)
    figures = probe(model.to(device).eval(), tokenizer, cfg.probe, seed=cfg.seed)
    console.print(probe_table(figures))
    return figures


DESCRIPTION = (
    "Write the synthetic corpus (ponder.tasks.corpus), pretrain a tiny character-level Llama on it from scratch, "
    "save it in Hugging Face format with its tokenizer and a model card, and probe it on the held-out test "
    "splits under the R1-Zero template."
)


def _arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("recipe", help="YAML recipe with PretrainConfig keys, e.g. recipes/pretrain-tiny.yaml")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="dotted overrides, e.g. steps=100 output=runs/base")
    p.add_argument("--probe-only", action="store_true", help="only measure the model already in `output`")
    p.add_argument("--overwrite", action="store_true", help="replace what `output` holds (refused otherwise)")
    p.set_defaults(func=run)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `pretrain` on the command line's subparsers."""
    return _arguments(subparsers.add_parser(
        "pretrain", help="pretrain a tiny base model on the synthetic corpus", description=DESCRIPTION))


def check(cfg: PretrainConfig) -> None:
    """The settings' ranges and the probe's tasks, before a corpus is written or a step is taken."""
    from ponder.config import LR_RANGE, MAX_LR, need, need_seed, need_threads

    for key in ("steps", "batch_size", "max_len", "corpus_chars", "log_every"):
        need(getattr(cfg, key) >= 1, key, getattr(cfg, key), "at least 1")
    need(cfg.block >= 2, "block", cfg.block, "at least 2 (a token and the next)")
    need(cfg.block <= cfg.max_len, "block", cfg.block, f"at most max_len ({cfg.max_len}), the positions the model has")
    for key in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "workers"):
        need(getattr(cfg, key) >= 0, key, getattr(cfg, key), "0 or more")
    need(cfg.lr <= MAX_LR, "lr", cfg.lr, LR_RANGE)
    need(cfg.min_lr <= cfg.lr, "min_lr", cfg.min_lr, f"at most lr ({cfg.lr:g}), where the cosine ends")
    need_threads(cfg.threads, "threads")
    need_seed(cfg.seed)
    check_sizes(cfg)
    p = cfg.probe
    need(p.n >= 0, "probe.n", p.n, "0 (no probe) or more")
    if p.n:  # found after all of training: the model was saved, then the probe failed
        need(p.k >= 1, "probe.k", p.k, "at least 1 (samples a problem)")
        need(p.batch_size >= 1, "probe.batch_size", p.batch_size, "at least 1")
        need(p.max_new_tokens >= 1, "probe.max_new_tokens", p.max_new_tokens, "at least 1")
        need(all(t >= 0 for t in p.temperatures), "probe.temperatures", p.temperatures, "0 (greedy) or more each")
    if cfg.probe.n:  # the probe's own loads: a misspelled task or level was found after all of training
        for spec in cfg.probe.tasks:
            probe_examples(spec, cfg.probe.n, cfg.seed)


def run(args) -> int:
    from ponder.config import load_config

    cfg = load_config(args.recipe, args.overrides, cls=PretrainConfig)
    if args.probe_only:
        probe_only(cfg, args.recipe)
        return 0
    out = Path(cfg.output)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:  # checked before hours of training, not after
        raise UserError(f"pretrain: output {out} already holds files (a model?); pass --overwrite to replace them, "
                        "or set output=DIR to a new directory")
    pretrain(cfg, recipe=args.recipe, overrides=args.overrides)
    return 0


if __name__ == "__main__":
    import sys

    ns = _arguments(argparse.ArgumentParser(prog="python -m ponder.pretrain", description=DESCRIPTION)).parse_intermixed_args()
    try:
        run(ns)
    except UserError as e:
        print(f"ponder: error: {e}", file=sys.stderr)
        sys.exit(2)
