"""Load and save models and tokenizers: a built-in tiny model by name, any local Hugging Face directory,
or a model on the Hugging Face Hub by id.

Built-in names:
  tiny-random[-SHAPE]  a randomly initialised character-level Llama (SHAPE: nano, micro, small, base)
  tiny-base            the shipped pretrained base model of the miniature world (ponder/assets/tiny-base)
  tiny-bilingual-base  the same in English and Chinese, for the language-mixing experiment (docs/bilingual.md)
Hub ids (`owner/name`, optionally `owner/name@revision`) load through transformers' `from_pretrained`:
downloaded once into the Hugging Face cache (HF_HOME, HF_HUB_CACHE), read from it alone with
HF_HUB_OFFLINE=1. Built-in names and local directories are looked up first. A model's own code from
the Hub runs only with `trust_remote_code` (recipes: model.trust_remote_code: true).
`load_tokenizer` takes the same names for a tokenizer alone (ponder pretrain's `tokenizer`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from ponder.errors import UserError
from ponder.models.tiny import TINY_SHAPES, tiny_random

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def builtin_names() -> list[str]:
    shipped = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file()) if ASSETS.is_dir() else []
    return ["tiny-random"] + [f"tiny-random-{s}" for s in TINY_SHAPES] + shipped


# the file whose presence makes a directory (or a Hub repo, in the cache) a model or a tokenizer: a tokenizer of
# its own (no model) has no config.json; AutoTokenizer reads tokenizer_config.json first
_MARKER = {"model": "config.json", "tokenizer": "tokenizer_config.json"}
# a tokenizer's own files: fast, its config, sentencepiece, byte-level BPE, WordPiece
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def resolve(path: str, kind: str = "model") -> Path | str | HubModel:
    """A local directory, a shipped model's directory, a tiny-random name (returned as is), or a Hub id
    (`owner/name[@revision]`, as a HubModel; whether it exists is found out when it loads).
    `kind` "tokenizer": a local directory needs a tokenizer's files rather than a model's config.json."""
    if path.startswith("tiny-random"):
        shape = path[len("tiny-random-"):] if path != "tiny-random" else "nano"
        if shape not in TINY_SHAPES:
            raise UserError(f"unknown built-in model '{path}'; choose one of: {', '.join(builtin_names())}")
        return path
    p = Path(path).expanduser()
    if p.is_dir():
        if kind == "tokenizer" and not any((p / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
            raise UserError(f"tokenizer directory '{p}' has no tokenizer_config.json or tokenizer.json; "
                            f"give a Hugging Face tokenizer or model directory")
        if kind == "model" and not (p / "config.json").is_file():
            from ponder.checkpoint import latest

            newest = latest(p / "checkpoints")  # a run's directory: its checkpoints are the models
            hint = f" (a run's directory: its newest checkpoint is {newest})" if newest is not None else ""
            raise UserError(f"model directory '{p}' has no config.json{hint}; give a Hugging Face model directory")
        return p
    if (ASSETS / path / "config.json").is_file():
        return ASSETS / path
    hub = hub_id(path)
    if hub is not None:
        return hub
    raise UserError(
        f"{kind} '{path}' not found: give a local Hugging Face {kind} directory, a Hub id (owner/name) or a "
        f"built-in name ({', '.join(builtin_names())})"
    )


@dataclass(frozen=True)
class HubModel:
    """A model on the Hugging Face Hub: `repo_id` at `revision` (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[\w./-]+))?$")


def hub_id(text: str) -> HubModel | None:
    """`owner/name` or `owner/name@revision` as a HubModel; None for anything else (paths, names)."""
    m = _HUB_ID.match(text)
    if m is None or ".." in m["repo"] or "--" in m["repo"] or m["repo"].endswith((".", "-")):
        return None
    return HubModel(m["repo"], m["rev"])


def hub_cache() -> Path:
    """The Hub cache directory huggingface_hub uses, read from the environment now (not at import)."""
    env = os.environ
    path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not path:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
        path = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(path)))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub read it at import."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def hub_snapshot(hub: HubModel, kind: str = "model") -> Path | None:
    """The cached snapshot folder of a Hub model or tokenizer (its name is the commit), or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    # a tokenizer is cached with its config, or only its tokenizer.json (as resolve takes a local directory)
    for marker in (_MARKER[kind], "tokenizer.json") if kind == "tokenizer" else (_MARKER[kind],):
        found = try_to_load_from_cache(hub.repo_id, marker, cache_dir=hub_cache(), revision=hub.revision)
        if isinstance(found, str):
            return Path(found).parent
    return None


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hub endpoint answers at all (any HTTP status), with one request and no retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # DNS, connection, proxy, TLS, timeout: all mean "not reachable from here"
        return False
    return True


_REMOTE_CODE_SETTING = {"model": "model.trust_remote_code=true in the recipe (ponder eval/sample: --trust-remote-code)",
                        "tokenizer": "trust_remote_code=true in the recipe"}


def check_loadable(path: str) -> None:
    """What `load` would refuse at once for `path`, raised now: a pipeline (ponder distill) checks its later stages'
    models before its first stage runs for minutes. A missing `runs/x` reads as a Hub id; when its first part is a
    local folder and no cache holds it, it is a path that does not exist yet."""
    where = resolve(path)
    if not isinstance(where, HubModel) or hub_snapshot(where) is not None:
        return
    parent = Path(where.repo_id).parent
    if parent.is_dir():
        raise UserError(f"model '{path}': there is no directory {where.repo_id} (and {parent}/ is a local folder, so it "
                        "is not taken for a Hub id); create it first (ponder pretrain, ponder train) or fix the path")
    if hub_offline() or not _hub_reachable():
        raise UserError(f"model '{where}' is neither a local directory (there is no {Path(where.repo_id).absolute()}) nor in "
                        f"the Hugging Face cache at {hub_cache()}, and the Hub cannot be reached (HF_HUB_OFFLINE=1 or no "
                        "network); a path: create it first (ponder pretrain, ponder train) or fix it; a Hub id: download "
                        "it once, or set HF_HOME to a cache that holds it")


def _load_from_hub(hub: HubModel, dtype, trust_remote_code: bool, kind: str = "model", tokenizer=None):
    """(model, tokenizer) through transformers' own loading and the Hub cache; one clear line when it cannot.
    `kind` "tokenizer": the tokenizer alone, as (None, tokenizer). `tokenizer`: one loaded already, kept."""
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    cache, offline = hub_cache(), hub_offline()
    snapshot = hub_snapshot(hub, kind)
    cached = snapshot is not None
    # `runs/x` that does not exist (yet) reads as a Hub id: both readings are named, with the fix of each
    path_fix = "a path: create it first (ponder pretrain, ponder train) or fix it; a Hub id: "
    fixes = {
        True: f"{path_fix}unset HF_HUB_OFFLINE to download it once (or run `hf download {hub.repo_id}`), or set HF_HOME to a "
              "cache that holds it",
        False: f"{path_fix}connect to the network (or set HTTPS_PROXY) and run again, or set HF_HOME to a cache that holds it",
    }
    local = f" (nor a local directory: there is no {Path(hub.repo_id).absolute()})"
    if offline and not cached:
        raise UserError(f"{kind} '{hub}' is not in the Hugging Face cache at {cache}{local} and HF_HUB_OFFLINE=1 is set; {fixes[True]}")
    if not offline and not _hub_reachable():
        # huggingface_hub would retry every file for minutes; one quick probe decides instead
        if not cached:
            raise UserError(f"{kind} '{hub}' is not in the Hugging Face cache at {cache}{local} and the Hugging Face Hub cannot be "
                            f"reached (network unreachable); {fixes[False]}")
        print(f"ponder: warning: the Hugging Face Hub cannot be reached; loading '{hub}' from the cache at {cache}", file=sys.stderr)
        offline = True
    kwargs = dict(revision=hub.revision, cache_dir=str(cache), local_files_only=offline, trust_remote_code=trust_remote_code)
    downloading = not offline and not cached
    if downloading:  # the first time: show the download (ponder hides transformers' bars otherwise)
        from transformers.utils import logging as hf_logging

        print(f"ponder: downloading '{hub}' into the Hugging Face cache at {cache} (once)", file=sys.stderr)
        hf_logging.enable_progress_bar()
    model = None
    try:
        # offline, a cached snapshot reads as the directory it is (by id, transformers asks the cache for a
        # tokenizer_config.json that a repo with only tokenizer.json lacks)
        source = str(snapshot) if offline and snapshot is not None else hub.repo_id
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(source, **kwargs)
        if tokenizer is None and len(tok) <= 1:  # a repo of weights only: transformers built an empty tokenizer
            raise UserError(f"{kind} '{hub}' has no tokenizer files on the Hugging Face Hub ({', '.join(TOKENIZER_FILES[:2])}): "
                            "every text would encode to nothing; use a repository that has them, or save the model with "
                            "its tokenizer into a directory and give that")
        if kind == "model":
            # transformers looks for a peft adapter without the cache and offline settings unless given them here
            adapter_kwargs = {k: kwargs[k] for k in ("cache_dir", "local_files_only")}
            model = AutoModelForCausalLM.from_pretrained(hub.repo_id, dtype=dtype, adapter_kwargs=adapter_kwargs, **kwargs)
    except (OSError, ValueError) as e:
        causes, c = [], e
        while c is not None and len(causes) < 16:  # the chain transformers builds on huggingface_hub's errors
            causes.append(c)
            c = c.__cause__ or c.__context__
        cause = next((type(c) for c in causes if isinstance(c, (GatedRepoError, RevisionNotFoundError, RepositoryNotFoundError,
                                                                 LocalEntryNotFoundError))), None)
        if cause is not None and issubclass(cause, GatedRepoError):
            raise UserError(f"{kind} '{hub}' is gated on the Hugging Face Hub: accept its terms at "
                            f"https://huggingface.co/{hub.repo_id} and log in (`hf auth login` or HF_TOKEN)") from None
        if cause is not None and issubclass(cause, RevisionNotFoundError):
            raise UserError(f"{kind} '{hub.repo_id}' has no revision '{hub.revision}' on the Hugging Face Hub; "
                            f"give a branch, tag or commit that exists") from None
        if cause is not None and issubclass(cause, RepositoryNotFoundError):
            raise UserError(f"{kind} '{hub}' is neither a local directory nor a {kind} on the Hugging Face Hub; check the "
                            f"spelling (a private model needs `hf auth login` or HF_TOKEN)") from None
        if cause is not None and issubclass(cause, LocalEntryNotFoundError):
            why = "HF_HUB_OFFLINE=1 is set" if hub_offline() else "the Hugging Face Hub cannot be reached (network unreachable)"
            raise UserError(f"{kind} '{hub}' is not (all) in the Hugging Face cache at {cache} and {why}; {fixes[hub_offline()]}") from None
        if "trust_remote_code" in str(e):
            raise UserError(f"{kind} '{hub}' runs its own code from the Hub; if you trust it, set "
                            f"{_REMOTE_CODE_SETTING[kind]}") from None
        raise UserError(f"could not load {kind} '{hub}': {str(e).splitlines()[0]}") from None
    finally:
        if downloading:
            hf_logging.disable_progress_bar()
    return model, tok


def load(path: str, seed: int = 0, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, tokenizer=None):
    """Return (model, tokenizer) for a built-in name, a directory or a Hub id. Tokenizers pad on the left for
    generation. `trust_remote_code` lets a model run its own code (from the Hub or its directory). `tokenizer`: the
    one load_tokenizer gave for the same path (the data's checks load it first), used instead of loading it again."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ponder's own progress display is the one the user watches
    where = resolve(path)
    if isinstance(where, str):
        shape = where[len("tiny-random-"):] if where != "tiny-random" else "nano"
        model, tok = tiny_random(shape, seed)
        return to_dtype(model, dtype), tok
    if isinstance(where, HubModel):
        model, tok = _load_from_hub(where, dtype, trust_remote_code, tokenizer=tokenizer)
    else:
        check_not_pointers(where, "model")
        if not any((where / name).is_file() for name in TOKENIZER_FILES):
            # transformers would build an empty tokenizer for some model types (Qwen2: every text encodes to [])
            raise UserError(f"model directory '{where}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); "
                            "save the tokenizer there too (tokenizer.save_pretrained)")
        try:
            tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=trust_remote_code)
        except SafetensorError as e:  # a copy cut short: transformers passes the library's own error on
            bad = damaged_safetensors(where)
            raise DamagedWeights(f"model directory '{where}': {bad[0] if bad else 'a weights file'} is damaged or cut short ({e}); "
                                 "copy or download it again", str(e)) from None
        except (OSError, ValueError) as e:
            if "trust_remote_code" in str(e):
                raise UserError(f"model '{where}' runs its own code; if you trust it, set model.trust_remote_code=true "
                                f"in the recipe (ponder eval/sample: --trust-remote-code)") from None
            raise UserError(f"could not load model '{where}': {str(e).splitlines()[0]}") from None
    if tok.eos_token is None:  # no answer could end: rollouts all run to the limit, and padding has no token
        raise UserError(f"the tokenizer of '{where}' names no end-of-sequence token; set one (tokenizer.eos_token = ..., "
                        "then save_pretrained, or \"eos_token\" in its tokenizer_config.json)")
    check_vocabulary(model, tok, where)
    complete_ends(model, tok)
    return model, tok if tokenizer is not None else _for_generation(tok)  # load_tokenizer's is ready already


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


class DamagedWeights(UserError):
    """A weights file safetensors cannot read; `reason`, its own words (a checkpoint's reading names the checkpoint to
    resume from instead)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def check_not_pointers(where: Path, kind: str) -> None:
    """A directory cloned without git-lfs holds 130-byte pointer files where its weights and tokenizer should be:
    transformers then fails deep in safetensors' header ("header too large") or in a JSON parse, in a traceback."""
    if not where.is_dir():
        return
    for f in sorted(where.iterdir()):
        if f.is_file() and f.stat().st_size < 1024:
            with open(f, "rb") as fh:
                if fh.read(len(LFS_POINTER)) == LFS_POINTER:
                    raise UserError(f"{kind} directory '{where}': {f.name} is a Git LFS pointer, not the file itself (cloned "
                                    "without git-lfs?); fetch the files (`git lfs pull` in that directory, or `hf download`)")


def damaged_safetensors(where: Path) -> tuple[str, str] | None:
    """(name, safetensors' own first line) of the first .safetensors file in `where` whose header it cannot read."""
    from safetensors import safe_open

    for f in sorted(where.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):  # opening checks that the header's tensors cover the file exactly
                pass
        except Exception as e:  # the library's own error types vary by version; each means the file is unreadable
            return f.name, str(e).splitlines()[0]
    return None


def check_vocabulary(model, tok, where) -> None:
    """A tokenizer with ids past the model's embedding (tokens added, a pad or think tags, without
    resize_token_embeddings) failed at the first such id inside torch.embedding, in a traceback. The ids counted are
    those a run feeds: BOS, EOS, padding, tokens added as text, and the think/answer tags' encoding; a special token
    no text encodes to may lie past it (Gemma 3's <image_soft_token> is id 262,144 of 262,144 rows)."""
    from ponder.rollout import TAGS

    try:
        rows = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return
    used = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    used |= {i for i, t in (getattr(tok, "added_tokens_decoder", {}) or {}).items() if not getattr(t, "special", False)}
    used |= set(tok.encode(" ".join(TAGS), add_special_tokens=False))
    past = sorted(i for i in used if isinstance(i, int) and i >= rows)
    if past:
        raise UserError(f"the tokenizer of '{where}' has ids up to {max(past)} ({tok.convert_ids_to_tokens(max(past))!r}) "
                        f"and the model's embedding {rows} rows: tokens were added without resizing it; call "
                        "model.resize_token_embeddings(len(tokenizer)) and save_pretrained both, or use the tokenizer "
                        "the model was trained with")


def complete_ends(model, tok) -> None:
    """The tokens generation stops at, completed in the model's generation_config: its EOS ids, plus the tokenizer's
    EOS (a fine-tune that changed one and not the other: ponder sft ends its rows with the tokenizer's) and the special
    token the chat template closes a turn with (a base model's ChatML template ends turns with <|im_end|>, which a
    cold start on chat messages teaches, where its EOS is <|endoftext|>). Without them a model that had learnt to
    stop ran on to the token limit. Saved checkpoints keep the list."""
    from ponder.templates import end_of_turn

    config = getattr(model, "generation_config", None)
    if config is None:
        return
    eos = config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    known = len(ids)
    for token in (tok.eos_token, end_of_turn(tok)):
        one = tok.convert_tokens_to_ids(token) if token else None
        if isinstance(one, int) and one != tok.unk_token_id and one not in ids:
            ids.append(one)
    if len(ids) > known:
        config.eos_token_id = ids if len(ids) > 1 else ids[0]


def to_dtype(model, dtype: torch.dtype):
    """The model's parameters in `dtype`, its floating buffers as they were: transformers keeps the rotary
    frequencies (inv_freq) in float32 when it loads in bf16, and bf16 ones move every angle (by up to 0.4%: logits
    off by 1.4 at positions 900-1000 of tiny-base, beside the same weights loaded in bf16)."""
    kept = [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]
    model = model.to(dtype)
    for name, b in kept:
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = b
    return model


def _for_generation(tok):
    tok.ponder_as_loaded = (tok.padding_side, tok.pad_token)  # what save() writes back
    tok.padding_side = "left"
    if tok.pad_token is None:  # many base models ship without one; generation and batching need it
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def _as_loaded(tok):
    """The tokenizer's padding as its files had it, for saving: a pad token ponder set to EOS, written out, would
    make a standard collator (DataCollatorForLanguageModeling) mask every real EOS label of the exported model."""
    side, pad = getattr(tok, "ponder_as_loaded", (tok.padding_side, tok.pad_token))
    now = tok.padding_side, tok.pad_token
    tok.padding_side, tok.pad_token = side, pad
    try:
        yield
    finally:
        tok.padding_side, tok.pad_token = now


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer alone of a built-in name, a local tokenizer or model directory, or a Hub id (through the
    same cache, offline rules and errors as `load`); padded on the left like `load`'s."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    where = resolve(path, kind="tokenizer")
    if isinstance(where, str):  # tiny-random: the built-in character tokenizer
        from ponder.models.tiny import char_tokenizer

        return char_tokenizer()
    if isinstance(where, HubModel):
        return _for_generation(_load_from_hub(where, None, trust_remote_code, kind="tokenizer")[1])
    check_not_pointers(where, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"tokenizer '{where}' runs its own code; if you trust it, set "
                            f"{_REMOTE_CODE_SETTING['tokenizer']}") from None
        raise UserError(f"could not load tokenizer '{where}': {str(e).splitlines()[0]}") from None
    return _for_generation(tok)


def save(model, tokenizer, directory: str | Path, state_dict: dict | None = None) -> None:
    """Save in Hugging Face format (safetensors), merging LoRA adapters so the result loads anywhere.
    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):  # peft: write a plain model; adapters are kept by the trainer state
        import copy

        if state_dict is not None:  # sharded: an FSDP module cannot be copied; a plain one holding the gathered state
            model, state_dict = _unsharded_peft(model, state_dict), None
        else:
            model = copy.deepcopy(model)
            from ponder.rollout import shadow_dtype

            if shadow_dtype(model) is not None:  # a narrowed base (narrow_frozen_matrices): merged and written in float32
                model = model.float()
        model = model.merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    with _as_loaded(tokenizer):
        tokenizer.save_pretrained(directory)


def load_weights_into(model, directory: str | Path) -> None:
    """The weights of a Hugging Face model directory (save's), copied into `model` in place, one tensor at a time, in
    the model's own dtype and device: no second model (a guardrail's rollback of a bf16 7B model read the whole
    checkpoint into a float32 copy on the CPU first, 30 GB of host memory). Every saved tensor must have its
    parameter; a parameter the files lack must share its storage with one they hold (a tied output head)."""
    from safetensors import safe_open

    own = model.state_dict()
    done = set()
    with torch.no_grad():
        for path in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key not in own:
                        raise UserError(f"{directory}: weight '{key}' has no place in the model ({type(model).__name__})")
                    own[key].copy_(f.get_tensor(key))
                    done.add(key)
    ptrs = {own[k].data_ptr() for k in done}
    missing = [k for k in own if k not in done and own[k].data_ptr() not in ptrs]
    if missing:
        raise UserError(f"{directory}: no weights for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")


def _unsharded_peft(model, state_dict: dict):
    """A plain peft model of `model`'s class and LoRA configuration holding the full `state_dict` (its tensors, not
    copies): built on the meta device, so it costs nothing until the state is assigned to it (ponder.sharding's
    Hugging Face export of a sharded LoRA policy, on rank 0's CPU). Non-persistent buffers (rotary frequencies) stay
    on the meta device: enough to merge and save, not to run."""
    import copy

    from peft import get_peft_model

    inner, name = model.get_base_model(), model.active_adapter
    with torch.device("meta"):
        plain = get_peft_model(type(inner)(copy.deepcopy(inner.config)), copy.deepcopy(model.peft_config[name]), adapter_name=name)
    plain.load_state_dict(state_dict, assign=True)
    if getattr(inner.config, "tie_word_embeddings", False):  # assign untied the head from the embedding
        plain.get_base_model().tie_weights()
    return plain


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer (transformers 5 renamed the method; the old name warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def checkpointing_on(model) -> bool:
    """Whether any layer of the model is checkpointed (by the recipe, or by the memory plan)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


DROPOUT_RATES = ("attention_dropout", "residual_dropout", "hidden_dropout", "dropout", "jitter_noise")


def disable_dropout(model) -> int:
    """Turn off the model's own dropout: nn.Dropout modules, and the float rates some attention and MLP modules
    read at each call (Seed-OSS: attention_dropout, residual_dropout, 0.1 each; Mixtral's router: jitter_noise,
    a uniform factor on its input). RL compares the policy's
    log-probs with the rollout's, which ran in eval mode: dropout in the update would make their ratio noise.
    LoRA's adapter dropout (model.lora.dropout) stays as the recipe set it. Returns how many were turned off."""
    sites = list(dropout_sites(model))
    for m, attr in sites:
        setattr(m, attr, 0.0)
    return len(sites)


def dropout_sites(model):
    """(module, attribute) of each dropout rate above 0 in the model's own layers (not LoRA's adapters): an
    nn.Dropout's `p`, or a float rate a module reads at each call (DROPOUT_RATES)."""
    for name, m in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            yield m, "p"
        for rate in DROPOUT_RATES:
            value = getattr(m, rate, None)
            if isinstance(value, float) and value > 0:
                yield m, rate


def load_trainable(model_cfg, last=None, state: dict | None = None, seed: int = 0, device="cpu", precision=None,
                   narrow_frozen: bool = True, tokenizer=None):
    """The model a trainer updates, in train mode on `device`: the checkpoint `last` with its full
    weights, or (LoRA) the base model plus fresh adapters, loaded from `state["adapter"]` on resume.
    `precision` (ponder.runtime.PrecisionChooser) picks the weights' dtype once the model is loaded and
    before it moves to the device; None: float32. LoRA adapters stay float32 over a bf16 base (peft's way).
    LoRA under mixed precision (`narrow_frozen`; the sharded trainer says no, FSDP2 casts for itself): the
    frozen base's matrices are stored in bf16 (narrow_frozen_matrices). `tokenizer`: load_tokenizer's for the
    same source, if the data's checks loaded it (see load)."""
    from ponder.checkpoint import reading

    from_checkpoint = last is not None and model_cfg.lora is None
    source = str(last) if from_checkpoint else model_cfg.path
    first = precision.load_dtype if precision is not None else torch.float32
    with reading(last) if from_checkpoint else contextlib.nullcontext():
        model, tok = load(source, seed=seed, dtype=first, trust_remote_code=getattr(model_cfg, "trust_remote_code", False),
                          tokenizer=tokenizer)
    from ponder.templates import with_chat_options

    with_chat_options(tok, getattr(model_cfg, "chat_template_kwargs", None))
    if precision is not None:
        model = to_dtype(model, precision(model))  # auto: decided by the model's size, before it takes device memory
    if model_cfg.gradient_checkpointing is True:  # "auto" is the GRPO memory plan's to decide (ponder.rl.memory_plan)
        enable_checkpointing(model)
    if model_cfg.lora is not None:
        lc = model_cfg.lora
        targets = check_lora_targets(model, lc)
        from peft import LoraConfig, get_peft_model
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecates: nothing a user can change
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                     target_modules=targets))
        if state is not None:
            model.load_state_dict(state["adapter"], strict=False)
        if narrow_frozen and precision is not None and precision.chosen.autocast:
            narrow_frozen_matrices(model)
    return model.to(device).train(), tok


def position_limit(model) -> int | None:
    """The positions a model cannot go past: those of a learned position table (GPT-2's `wpe`, OPT's
    `embed_positions`), whose lookup fails beyond it with an IndexError deep in the model. None where positions are
    computed (rotary, ALiBi): past max_position_embeddings such a model runs on, outside what it was trained on."""
    inputs = model.get_input_embeddings()
    # Only the text model's, the module holding the input embeddings: a multimodal checkpoint (Gemma 3) also has a vision
    # tower, whose table of patch positions (4096 in Gemma-3-4B, whose text is rotary to 131072) bounds no prompt.
    text = next((m for m in model.modules() if any(c is inputs for c in m.children())), model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name, module in text.named_modules():
        last = name.rpartition(".")[2]
        if isinstance(module, torch.nn.Embedding) and module is not inputs and ("pos" in last or last == "wpe"):
            limit = getattr(config, "max_position_embeddings", None)  # GPT-2's n_positions under this name too
            return limit if isinstance(limit, int) else module.num_embeddings
    return None


def computed_limit(model) -> int | None:
    """For a model whose positions are computed (position_limit None): the positions it was made for, its
    max_position_embeddings times its rope scaling's factor (YaRN stretches Qwen2.5's 32,768 four times); None where
    the config names none. Past it the model runs on, on positions it never saw."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    factor = scaling.get("factor", 1.0) if isinstance(scaling, dict) else 1.0
    return int(limit * max(float(factor), 1.0)) if isinstance(factor, (int, float)) else limit


def require_peft() -> None:
    import importlib

    try:
        importlib.import_module("peft")
    except ImportError:
        raise UserError("model.lora needs peft: pip install 'ponder[lora]'") from None


def check_lora_targets(model, lc) -> list[str]:
    """model.lora's target layers on `model` (its modules, weights or not), refused in one line where adapters would
    tie (refuse_tied_adapters) or a name matches no layer, or peft is not installed; returns the names peft is given."""
    require_peft()
    refuse_tied_adapters(model, lc.target_modules)
    targets = lora_targets(model, lc.target_modules)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    # peft stops in its own traceback where no name matches (GPT-2 names its layers c_attn, c_fc, ...), and leaves
    # a typo among good names unseen ([q_proj, v_prj] adapted q_proj alone); the defaults may miss a layer a
    # family lacks (OPT has out_proj, no o_proj)
    missing = [t for t in targets if t not in present]
    chosen = lc.target_modules != type(lc)().target_modules
    if missing and (chosen or len(missing) == len(targets)):
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"} - {"lm_head"})
        what = f"{targets} name no layer" if len(missing) == len(targets) else f"{missing} of {targets} name no layer"
        raise UserError(f"model.lora.target_modules {what} of this {model.config.model_type} model; "
                        f"its linear layers are {', '.join(linear)}: set model.lora.target_modules to some of them")
    return targets


def refuse_tied_adapters(model, names: list[str]) -> None:
    """LoRA on an embedding that the output head shares (tie_word_embeddings): training adapts one use of the matrix,
    but the merge that exports the model (and the rollout copy's) folds the adapter into the one matrix both use."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    shared = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    tied = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if id(m) in shared}
    for name in names:
        if name in tied:
            raise UserError(f"model.lora.target_modules: '{name}' shares its matrix with the "
                            f"{'output head' if name == 'embed_tokens' else 'input embedding'} in this model "
                            "(tie_word_embeddings); leave it out of target_modules")


FUSED_LAYERS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                "up_proj": "gate_up_proj"}


def lora_targets(model, names: list[str]) -> list[str]:
    """model.lora.target_modules for this model: a name it lacks whose fused layer it has (Phi-3 makes q, k, v
    with one qkv_proj and gate, up with one gate_up_proj) becomes that layer's name, so the default targets
    adapt the same projections in every family."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    out: list[str] = []
    for name in names:
        if name not in present and FUSED_LAYERS.get(name) in present:
            name = FUSED_LAYERS[name]
        if name not in out:
            out.append(name)
    return out


def narrow_frozen_matrices(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """The frozen linear layers' weights and biases (LoRA's base) stored in `dtype`; embeddings, norms and
    adapters stay float32. Under autocast this computes what the float32 base did bit for bit (autocast casts
    each matrix to bf16 at every product, rounding as this does once, and keeps each cast for backward: 14 GiB
    at 7B), at half the base's memory. A head tied to the embedding stays: narrowing it would narrow the
    embedding, and with it the float32 residual stream. Returns the parameters narrowed."""
    tied = model.get_output_embeddings()
    tied = tied.weight if tied is not None and tied.weight is model.get_input_embeddings().weight else None
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear and not any(p.requires_grad for p in m.parameters()) and m.weight is not tied:
            for p in m.parameters():
                p.data = p.data.to(dtype)
                n += p.numel()
    return n
