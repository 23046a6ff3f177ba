"""Typed configuration: dataclasses, YAML recipes, dotted overrides, strict validation.

A recipe is a YAML file whose keys mirror the dataclasses below. Unknown keys and wrong types are
user errors (one line, with the closest valid key suggested). Every knob has a default, so a recipe
only states what it changes; the resolved config is written to the run directory.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ponder.errors import UserError
from ponder.files import blocked, blocking_file, read_user_text


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    path: str = "tiny-random"  # built-in model name, local Hugging Face directory, or Hub id owner/name[@revision] (ponder.models)
    lora: Optional[LoraConfig] = None  # LoRA adapters through peft; None trains all weights
    # activation checkpointing of the policy's layers (recomputed in backward: about a third more compute for the
    # activations of one layer instead of all). auto: off, except where the GRPO trainer's memory plan finds that
    # one full-length sample's activations would not fit (CUDA; printed with the token budget)
    gradient_checkpointing: Union[bool, Literal["auto"]] = "auto"
    trust_remote_code: bool = False  # let the model run its own code (Hub models with custom architectures)
    # passed to the tokenizer's chat template wherever it renders (data.template: chat), e.g. Qwen3's {enable_thinking: false}
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskSpec:
    name: str = "first_digit"  # a registered task (ponder.tasks) or "jsonl"
    path: Optional[str] = None  # for file-based tasks
    n: Optional[int] = None  # how many examples to take (None: all / task default)
    split: str = "train"
    weight: float = 1.0  # weight x n of the task's n examples in the mix: repeated, and a seeded share (below 1: a subset)
    options: dict[str, Any] = field(default_factory=dict)  # task-specific (difficulty, digit, ...)


@dataclass
class DataConfig:
    tasks: list[TaskSpec] = field(default_factory=lambda: [TaskSpec()])
    template: str = "r1_zero"  # ponder.templates: r1_zero | plain | chat
    # leave out training prompts longer than this many tokens under the template (verl's filter_overlong_prompts: a
    # long question leaves its answers no room); told at start. None: keep every prompt
    max_prompt_tokens: Optional[int] = None


@dataclass
class RolloutConfig:
    engine: str = "fast"  # ponder.rollout: fast (in-process engine; hf for architectures it does not support) | hf
    group_size: int = 8  # G: samples per prompt
    prompts_per_step: int = 16  # groups per optimizer batch (after dynamic sampling)
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off; else drop tokens below min_p x the top token's probability (TRL's and vLLM's min_p)
    stop: list[str] = field(default_factory=list)  # stop strings, kept in the completion
    generation_batch: int = 256  # sequences generated at once
    # passed to the engine as keyword arguments; fast: dtype (auto: bf16 copy of float32 weights on CUDA),
    # kv_dtype (auto, or fp8: an e4m3 KV cache), weight_dtype (auto, or fp8: the layers' products from e4m3 matrices),
    # keep_cache, attention, cuda_graphs, prefill_tokens, sync_every, look_ahead, length_bucket, min_bucket
    # (ponder.rollout.fast)
    engine_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AlgoConfig:
    # Advantage baseline and scaling. group_std: GRPO (r - mean) / std over the group;
    # batch_std: (r - group mean) / std over the batch; none: Dr. GRPO (r - mean); rloo: leave-one-out mean.
    advantage: Literal["group_std", "batch_std", "none", "rloo"] = "group_std"
    # Loss aggregation. grpo: token mean per sequence, then sequence mean (DeepSeekMath);
    # dr_grpo: token sum / (N * max_new_tokens), N the batch's sequences, prompts x G (Dr. GRPO: each group's
    # token sum / (G * max_new_tokens), averaged over the groups); dapo: token mean over the whole batch (DAPO);
    # bnpo: token mean over each micro-batch, averaged over micro-batches.
    loss_agg: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "grpo"
    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.2  # clip-higher (DAPO: 0.28)
    # dual-clip: a negative advantage's token loss bounded at dual_clip x |A|, so that a token the policy has come to
    # favour far more than the sampler did (ratio past dual_clip) cannot dominate the update; such tokens carry no
    # gradient. Off-policy only, as the clip (Ye et al. 2020; verl's clip_ratio_c, 3; TRL's delta). None: off
    dual_clip: Optional[float] = None
    # Importance ratio. token: one a token (PPO, GRPO); sequence: one a sequence, the geometric mean of its tokens'
    # ratios, clipped as a whole (GSPO, arXiv 2507.18071, which clips at eps_low 3e-4, eps_high 4e-4). The two
    # differ only off-policy: mu > 1 or minibatches > 1 (at mu = 1 every ratio is 1).
    ratio: Literal["token", "sequence"] = "token"
    beta: float = 0.0  # KL coefficient; 0 builds no reference model
    # the KL term's per-token estimate, in the loss: k3 exp(d) - d - 1 (DeepSeekMath, R1), k2 d^2 / 2 (its gradient is
    # the KL's own on-policy), k1 -d (as a loss its expected gradient is 0 on-policy: it logs the KL, it hardly pulls
    # toward the reference); d = ref - logp (ponder.rl.losses.kl_estimate)
    kl_estimator: Literal["k3", "k2", "k1"] = "k3"
    ref_reset_every: int = 0  # replace the reference by the current policy every N steps (R1: 400); 0: never
    # at each reset the reference becomes ref_mix x policy + (1 - ref_mix) x reference (TR-DPO; TRL's
    # ref_model_mixup_alpha, 0.6); 1: replaced by the policy (R1)
    ref_mix: float = 1.0
    # an entropy bonus: the loss less entropy_coef x each token's entropy, aggregated as the tokens' loss (verl's
    # entropy_coeff); it reaches samples of zero advantage, which train.skip_zero_advantage then no longer skips
    entropy_coef: float = 0.0
    # the 80/20 rule (Wang et al. 2025, arXiv 2506.01939): only this share of each micro-batch's tokens (a process's
    # own), those of highest entropy (the forks where the chain could go either way), carry policy gradient; the paper
    # keeps 0.2. The KL and entropy terms still cover every token. 1: every token (TRL's top_entropy_quantile, whose
    # cut is over every process's micro-batch at once)
    top_entropy_quantile: float = 1.0
    mu: int = 1  # passes over each batch of rollouts (old log-probs kept when > 1)
    minibatches: int = 1  # optimizer steps per pass (the batch split into this many mini-batches)
    dynamic_sampling: bool = False  # DAPO: drop groups answered all right or all wrong, draw more prompts
    # the reward whose values must differ within a kept group. None: accuracy (or code) where the run has it, as DAPO
    # drops the prompts answered all right or all wrong; else the weighted total
    dynamic_sampling_by: Optional[str] = None
    max_resample_rounds: int = 4  # bound on extra generation rounds per step for dynamic sampling
    mask_truncated: bool = False  # DAPO overlong filtering: truncated completions carry no loss
    # truncated importance sampling (TIS): the engine samples from its own probabilities (on CUDA a bf16 copy and other
    # kernels than the update's), so each token's policy-gradient term is weighed by min(pi_old / pi_engine, cap), the
    # engine's probability as it sampled the token (after temperature, top-k and top-p). None: off (verl and TRL: 2)
    rollout_is_cap: Optional[float] = None


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr: float = 0.0  # where cosine and linear end (open-r1's cosine_with_min_lr: a tenth of lr)
    grad_clip: float = 1.0  # max grad norm; 0: off
    # adamw: torch's; adamw_kahan: float32 moments and Kahan-compensated updates, for bf16 weights (ponder.optim);
    # auto: adamw_kahan when the weights are below float32 (train.precision=bf16), else adamw
    optimizer: Literal["auto", "adamw", "adamw_kahan"] = "auto"
    # adamw_kahan's two moments: fp32 (14 bytes a parameter in all) or bf16, stochastically rounded (10 bytes;
    # the moments carry bf16's 3 significant digits: the trade-off is in ponder.optim's docstring). auto: fp32,
    # but bf16 where train.precision auto chose bf16 weights and 14 bytes a parameter would not fit either
    moment_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # tokens per micro-batch (padded length x sequences, or the packed stream); gradients accumulate. None:
    # chosen from free device memory at the first update on CUDA (printed; ponder.rl.memory_plan), 16384 on CPU
    token_budget: Optional[int] = None


@dataclass
class TrainConfig:
    steps: int = 100
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present, else CPU
    # fp32: float32 weights and compute; mixed: float32 master weights, bf16 autocast compute; bf16: bf16 weights,
    # KahanAdamW; auto: fp32 on CPU, on CUDA mixed when its 16 bytes a parameter fit in 70% of the device memory,
    # else bf16 (printed). ponder.runtime
    precision: Literal["auto", "fp32", "mixed", "bf16"] = "auto"
    # the policy pass: packed (ponder.rl.packed: no padding, each prompt once per micro-batch; Llama family)
    # or padded (the model's own forward on right-padded rows); auto: packed where supported (CUDA and CPU)
    forward: Literal["auto", "packed", "padded"] = "auto"
    # several processes (torchrun) or CPU offload (ponder.sharding, FSDP2): fsdp shards weights, gradients and
    # optimizer state and gathers each layer's weights for its forward and again for its backward (least
    # memory); fsdp_noreshard keeps the weights gathered from an update's first forward to its last backward
    # (DDP's traffic, optimizer state still sharded: for models that fit); none: one process, no wrapping.
    # auto: none on one process, fsdp_noreshard on several. The names are fully_shard's reshard_after_forward.
    # Sharded, the packed pass gathers each layer's weights through the layer's own FSDP hooks (ponder.rl.packed).
    sharding: Literal["auto", "none", "fsdp", "fsdp_noreshard"] = "auto"
    # with sharding: the sharded weights, gradients and optimizer state in CPU memory (FSDP2's
    # CPUOffloadPolicy; the optimizer steps on the CPU); with fsdp on one process, how one GPU trains a model
    # whose optimizer state does not fit it (auto sharding is fsdp then)
    offload: bool = False
    # minutes a rank waits in one collective before the run ends in an error (torch's defaults: 10 with NCCL, 30
    # with gloo): a rank that runs ahead waits for the others, e.g. while rank 0 writes a checkpoint or a report
    collective_timeout: float = 180.0
    # a sample whose advantage is exactly 0 (its group's rewards all equal) adds nothing to the loss or its gradient
    # when beta is 0 and the loss normalisers already counted it (every loss_agg but bnpo): no backward pass for it;
    # its logged entropy is the fast engine's, computed as it sampled (a forward without gradient where the engine
    # gives none, or after an optimizer step moved the weights: mu > 1, minibatches > 1). The gradient is the same
    # up to float rounding, except under algorithm.top_entropy_quantile < 1: its cut is then taken among the samples
    # with a gradient (as the 80/20 paper's DAPO runs, whose dynamic sampling drops such groups), not all of them
    skip_zero_advantage: bool = True
    save_every: int = 50
    keep_last: int = 2
    log_samples: int = 4  # completions per step written to samples.jsonl (each prompt's first, then its second, ...)
    threads: int = 0  # CPU threads for torch (0: torch's default; under torchrun, the cores divided among this machine's processes)
    # where metrics and samples go besides metrics.jsonl / samples.jsonl: tensorboard, wandb, mlflow (ponder.metrics)
    log_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    reflection_words: list[str] = field(
        default_factory=lambda: ["wait", "verify", "check", "mistake", "however", "recheck"]
    )


# ---------------------------------------------------------------------------------------------
# Guardrails (ponder.rl.guardrails, docs/guardrails.md): each a detector over figures the trainer already
# logs, with an action. Each guardrail has its own class so that a recipe that sets one option keeps that
# guardrail's other defaults. Relative thresholds compare with the run's own early median (the first
# guardrails.baseline_steps steps) or its recent median (the last guardrails.window steps).

Action = Literal["off", "warn", "lower_lr", "rollback", "stop"]


@dataclass
class EntropyCollapseGuard:
    action: Action = "warn"
    fraction: float = 0.1  # fires when the policy's entropy falls below this share of its early median


@dataclass
class KLSpikeGuard:
    action: Action = "rollback"
    factor: float = 10.0  # fires when the KL exceeds this multiple of its recent median ...
    floor: float = 0.01  # ... and this value (no reference model: the KL is 0 and this never fires)


@dataclass
class ClipSpikeGuard:
    action: Action = "rollback"
    factor: float = 5.0  # fires when the clipped token share (low + high) exceeds this multiple of its recent median ...
    floor: float = 0.05  # ... and this share (one update per batch clips nothing: never fires)


@dataclass
class LengthRunawayGuard:
    action: Action = "warn"
    share: float = 0.5  # fires when more than this share of completions is cut at rollout.max_new_tokens ...
    factor: float = 2.0  # ... and more than this multiple of the early share (a run truncated from the start has not run away)


@dataclass
class RewardHackingGuard:
    action: Action = "warn"
    rise: float = 0.3  # fires when a reward other than accuracy has risen this much above its early median (window mean) ...
    accuracy_ratio: float = 0.5  # ... while accuracy's window mean is at most this share of its early median


@dataclass
class RepetitionGuard:
    action: Action = "warn"
    min_repeats: int = 4  # a completion repeats itself when one non-blank line occurs this many times
    share: float = 0.25  # fires when more than this share of completions repeat themselves ...
    factor: float = 2.0  # ... and more than this multiple of the early share


@dataclass
class EmptyReasoningGuard:
    action: Action = "warn"
    min_chars: int = 8  # a think block with fewer non-blank characters than this holds no work
    share: float = 0.3  # fires when more than this share of completions is paid by accuracy without work ...
    factor: float = 2.0  # ... and more than this multiple of the early share


@dataclass
class NonFiniteGuard:
    action: Action = "stop"  # the update of a non-finite loss or gradient is always skipped; this acts on a streak
    max_nan_steps: int = 5  # this many skipped updates in a row


@dataclass
class GuardrailsConfig:
    baseline_steps: int = 5  # the first steps, whose medians the relative detectors compare with (none fires before)
    window: int = 10  # recent steps: the spike detectors' median, the reward-hacking means
    lr_factor: float = 0.5  # lower_lr and rollback multiply the learning rate by this
    max_rollbacks: int = 3  # a rollback past this many in one run stops the run instead
    entropy_collapse: EntropyCollapseGuard = field(default_factory=EntropyCollapseGuard)
    kl_spike: KLSpikeGuard = field(default_factory=KLSpikeGuard)
    clip_spike: ClipSpikeGuard = field(default_factory=ClipSpikeGuard)
    length_runaway: LengthRunawayGuard = field(default_factory=LengthRunawayGuard)
    reward_hacking: RewardHackingGuard = field(default_factory=RewardHackingGuard)
    repetition: RepetitionGuard = field(default_factory=RepetitionGuard)
    empty_reasoning: EmptyReasoningGuard = field(default_factory=EmptyReasoningGuard)
    non_finite: NonFiniteGuard = field(default_factory=NonFiniteGuard)

    def guards(self) -> dict:
        """name -> that guardrail's settings, in the order they are checked."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if hasattr(getattr(self, f.name), "action")}


@dataclass
class EvalConfig:
    tasks: list[TaskSpec] = field(default_factory=list)  # held-out tasks evaluated during training
    every: int = 0  # steps between evaluations; 0: before and after training only (when tasks are given)
    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0  # 0: off (Qwen3's model cards evaluate at top_k 20)
    min_p: float = 0.0  # 0: off
    max_new_tokens: Optional[int] = None  # None: rollout.max_new_tokens (ponder train); 256 (ponder sft)


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # Reward name -> weight, or -> {weight: w, <option>: value} for configurable rewards.
    rewards: dict[str, Any] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    algorithm: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guardrails: GuardrailsConfig = field(default_factory=GuardrailsConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with strict checks


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class WrittenInt(int):
    """A YAML number whose text is not its value's (`010`, octal 8 to YAML 1.1; `1_000`): the text kept for a setting
    that is a string (a run named 010). Only between reading and `_convert`, which hands on plain numbers."""

    text: str


class WrittenFloat(float):
    """WrittenInt's twin for floats (`2024.10`, the number 2024.1)."""

    text: str


class DuplicateKey(yaml.YAMLError):
    """A mapping that names one key twice: YAML keeps the last silently (`optim: {lr: 1e-3, lr: 2e-3}` trained at
    2e-3 without a word), where one of the two is a mistake."""

    def __init__(self, key, lines: tuple[int, int]):
        super().__init__(f"'{key}' twice")
        self.key, self.lines = key, lines


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: the keys beside it override its keys
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):  # refused by SafeLoader's own construct_mapping, below
                continue
            if key in seen:
                raise DuplicateKey(key, (seen[key] + 1, key_node.start_mark.line + 1))
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _written(number_type, written_type):
    construct = yaml.SafeLoader.yaml_constructors[f"tag:yaml.org,2002:{number_type}"]

    def read(loader, node):
        value = construct(loader, node)
        if str(value) == node.value or (isinstance(value, float) and not math.isfinite(value)):
            return value
        out = written_type(value)
        out.text = node.value
        return out

    _Loader.add_constructor(f"tag:yaml.org,2002:{number_type}", read)


_written("int", WrittenInt)
_written("float", WrittenFloat)


MAX_BASES = 50  # recipes in a chain of `base:`, at most
MAX_VALUES = 100_000  # values a recipe holds, aliases counted each time they are used


def load_yaml(text: str, what: str = "the YAML"):
    """yaml.safe_load, but a number remembers its text where that differs from its value (see WrittenInt). Refuses
    YAML nested past Python's recursion limit, and aliases that multiply out past MAX_VALUES (nine nested ones of ten
    each, "a billion laughs", held ponder for minutes as it copied them out)."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise _too_deep(what) from None
    _count_values(data, [0], what)
    return data


def _too_deep(what: str) -> UserError:
    return UserError(f"{what} nests too deep (lists or mappings inside one another hundreds of times); write it flat")


def _count_values(value, count: list[int], what: str, depth: int = 0) -> None:
    count[0] += 1
    if count[0] > MAX_VALUES:
        raise UserError(f"{what} holds more than {MAX_VALUES:,} values (aliases count each time they are used); a "
                        "recipe needs far fewer: write out what is meant")
    if depth > 200:  # (the copies ponder makes of what PyYAML read recurse as deep)
        raise _too_deep(what)
    for v in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        _count_values(v, count, what, depth + 1)


def _plain(value):
    """Values with WrittenInt / WrittenFloat made plain numbers, through lists and mappings."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (WrittenInt, WrittenFloat)):
        return int(value) if isinstance(value, int) else float(value)
    return value


def number_text(value):
    """A number YAML 1.1 reads as a string (`1e-3`, without a dot; `inf` as a word, for the caller's finite check) as
    the float it writes; any other value as it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (coercing ints to floats and the like)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _plain(value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise UserError(f"config {where}: {value!r} is not one of {choices}")
        return _plain(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config {where}: expected a mapping of {tp.__name__} options, got {value!r}")
        return build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config {where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"config {where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config {where}: expected a mapping, got {value!r}")
        return _plain(dict(value))
    if tp is float:
        value = number_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config {where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan and .inf: no setting means them (a NaN reward weight ran to a guardrail)
            raise UserError(f"config {where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config {where}: expected an integer, got {value!r}")
        if re.fullmatch(r"[-+]?0[0-9_]+", getattr(value, "text", "")):
            raise UserError(f"config {where}: {value.text} has a leading zero, which YAML reads as an octal number "
                            f"({int(value)}); write it without the zero")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config {where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"config {where}: expected a string, got {value!r}")
        return getattr(value, "text", str(value))  # as written: a name 010 is no octal 8
    return value


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        keys.append(name)
        tp = _field_types(cls)[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, name + ".")
        elif inner:
            keys += _all_keys(inner[0], name + ".")
    return keys


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_root: contextvars.ContextVar = contextvars.ContextVar("config_root", default=None)  # the class a top-level build makes


def build(cls, data: dict, where: str = ""):
    """Make a `cls` from a dict, refusing unknown keys with a suggestion."""
    if not where:
        token = _root.set(cls)
        try:
            return _build(cls, data, where)
        except UserError as e:
            other = _other_command(cls, data) if str(e).startswith("unknown config key") else ""
            if other:  # the suggestion of a key would mislead: the whole recipe is another command's
                raise UserError(f"{str(e).split(';')[0]}{other}") from None
            raise
        finally:
            _root.reset(token)
    return _build(cls, data, where)


RECIPE_CLASSES = {"train": ("ponder.config", "RunConfig"), "sft": ("ponder.sft.config", "SFTConfig"),
                  "sample": ("ponder.sample", "SampleConfig"), "distill": ("ponder.distill", "DistillConfig"),
                  "pretrain": ("ponder.pretrain", "PretrainConfig")}


def _other_command(cls, data: dict) -> str:
    """'; ... `ponder X` ...' when every top-level key of `data` is one of another command's and not all are
    `cls`'s: the recipe was given to the wrong command."""
    import importlib

    keys = set(data)
    if keys <= {f.name for f in dataclasses.fields(cls)}:  # its own kind of recipe, with a wrong key inside
        return ""
    for command, (module, name) in RECIPE_CLASSES.items():
        other = getattr(importlib.import_module(module), name)
        if other is not cls and keys <= {f.name for f in dataclasses.fields(other)}:
            return f"; this recipe is one for `ponder {command}` (its keys are that command's): run it with `ponder {command}`"
    return ""


def _build(cls, data: dict, where: str):
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            # the right key in the wrong section of a run recipe (other configs, e.g. pretrain's, have their own)
            everywhere = _all_keys(_root.get() or cls)
            elsewhere = [k for k in everywhere if k.rsplit(".", 1)[-1] == key and k != path]
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            if elsewhere:
                hint = f"; did you mean '{elsewhere[0]}'?"
            elif close:
                hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?"
            else:
                close = difflib.get_close_matches(path, everywhere, n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(names)}"
            raise UserError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    def clean(v):
        if isinstance(v, tuple):
            return [clean(x) for x in v]
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return clean(dataclasses.asdict(cfg))


def apply_override(data: dict, dotted: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict."""
    if "=" not in dotted:
        raise UserError(f"override '{dotted}' is not of the form key.sub=value")
    key, raw = dotted.split("=", 1)
    try:
        value = load_yaml(raw, f"override '{key}'") if raw != "" else ""
    except DuplicateKey as e:
        raise UserError(f"override '{dotted}' sets '{e.key}' twice: keep one") from None
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    if parts[0] == "rewards" and ":" in key:  # rewards.my_pkg.mod:fn=1.0 names a reward of one's own, whose name holds
        ref = key.strip().split(".", 1)[1]  # dots: it ends at the first dot after the function's name
        fn_dot = ref.find(".", ref.index(":"))
        parts = ["rewards", ref] if fn_dot < 0 else ["rewards", ref[:fn_dot], *ref[fn_dot + 1:].split(".")]
    listed = next((p for p in parts if "[" in p and p.endswith("]")), None)
    if listed is not None and parts[0] != "rewards":
        at = parts.index(listed)
        name, tail = listed[: listed.index("[")], ".".join(parts[at + 1:]) or "name"
        raise UserError(f"override '{key}': the items of a list ({name}) cannot be set one by one; give the whole "
                        f"list, e.g. '{'.'.join(parts[:at] + [name])}=[{{{tail}: {raw}, ...}}]'")
    for depth, part in enumerate(parts[:-1]):
        if depth == 1 and parts[0] == "rewards" and isinstance(node.get(part), (int, float)):
            node[part] = {"weight": node[part]}  # rewards.overlong.max_len=300 where the recipe gives overlong a weight
        if not isinstance(node.get(part, {}), dict):
            raise UserError(f"override '{key}': '{part}' is not a section")
        node = node.setdefault(part, {})
    weight_alone = isinstance(value, (int, float, str)) and not isinstance(value, bool)
    if len(parts) == 2 and parts[0] == "rewards" and isinstance(node.get(parts[1]), dict) and weight_alone:
        node[parts[1]]["weight"] = value  # rewards.brevity=0.5 where the recipe gives brevity options: its weight alone
        return
    node[parts[-1]] = value


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A recipe's options as a mapping. `base: other.yaml` (a path beside the recipe) starts from that
    recipe: this one's mappings are merged into it key by key, its other values replace the base's."""
    path = Path(path)
    if path.is_dir():  # (it was "not found": a directory that is there)
        raise UserError(f"recipe '{path}' is a directory; give the path of a YAML recipe (see recipes/)"
                        + (f", such as the run's own {path / 'config.yaml'}" if (path / "config.yaml").is_file() else ""))
    if path.exists() and not path.is_file():  # a fifo or a device: reading it could wait forever, or never end
        raise UserError(f"recipe '{path}' is not a regular file; give the path of a YAML recipe (see recipes/)")
    if not path.is_file():
        raise UserError(f"recipe '{path}' not found; give the path of a YAML recipe (see recipes/)")
    try:
        data = load_yaml(read_user_text(path), f"recipe '{path}'")
    except DuplicateKey as e:
        raise UserError(f"recipe '{path}' sets '{e.key}' twice in one mapping (lines {e.lines[0]} and {e.lines[1]}): "
                        "keep one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"recipe '{path}' is not valid YAML{at}: fix the syntax") from None
    if data is None:  # every default (a tiny random model, run name `run`) would train without a word
        raise UserError(f"recipe '{path}' holds no settings (it is empty, or comments only); write them there (see "
                        "recipes/), or `{}` for every default")
    if not isinstance(data, dict):
        raise UserError(f"recipe '{path}' must be a mapping of options at its top level")
    data.pop("changes", None)  # a run's config.yaml lists the changes made on resume (ponder.resume): history, not a setting
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / str(base)).resolve()
    if not base_path.is_file():
        raise UserError(f"recipe '{path}': its base '{base}' ({base_path}) not found; a base is read from the "
                        "recipe's own folder: fix the path, or remove base")
    if base_path in _seen or base_path == path.resolve():
        raise UserError(f"recipe '{path}': base '{base}' leads back to itself; remove the loop")
    if len(_seen) >= MAX_BASES:  # (1,200 of them ran out of Python's recursion: a traceback)
        raise UserError(f"recipe '{path}' is a base past the {MAX_BASES} a chain of bases may have; join some of them")
    return _merge(read_recipe(base_path, _seen + (path.resolve(),)), data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolved(path: str | Path | None, overrides: list[str] = (), cls=RunConfig):
    """The recipe at `path` (or the defaults) with the overrides applied, as a `cls`, types checked; ranges not."""
    data: dict = read_recipe(path) if path is not None else {}
    for ov in overrides:
        apply_override(data, ov)
    return build(cls, data)


def load_config(path: str | Path | None, overrides: list[str] = (), cls=RunConfig):
    cfg = resolved(path, overrides, cls)
    validate(cfg)
    if hasattr(cfg, "run_dir") and hasattr(cfg, "name"):
        check_run_dir(cfg)
    return cfg


def check_run_dir(cfg) -> None:
    """name and output_dir make a directory of the run's own, checked before any model loads: an empty name or '.'
    wrote the run's files among the other runs in output_dir; a file in the way stopped it in a traceback."""
    if str(cfg.name).strip() in ("", ".", "..") or ".." in Path(str(cfg.name)).parts or Path(str(cfg.name)).is_absolute():
        # (a/../.. put the run's files among the other runs, or above output_dir)
        raise UserError(f"config name must name the run's own directory under output_dir; got {cfg.name!r} (e.g. name=my-run)")
    if blocking_file(cfg.run_dir) is not None:
        raise blocked(cfg.run_dir, "output_dir/name")


MAX_WEIGHT = 1000  # a task's weight in the mix, at most (open-r1's mixtures weigh tasks 0.1-10)
MAX_LR = 1.0  # AdamW moves each weight by about lr a step; 1e39 overflowed float32 in the optimizer, a traceback
LR_RANGE = "between 0 (weights frozen) and 1 (AdamW moves each weight by about lr a step; R1's RL: 3e-6)"
MAX_COEF = 1000  # the KL and entropy terms' coefficients, at most (R1's beta: 0.001)
MAX_ROLLOUTS = 1_000_000  # prompts_per_step x group_size, at most
MAX_EXAMPLES = 10_000_000  # a task's n, at most: its examples are held in memory (R1's RL data: ~150,000 prompts)


def need(ok: bool, key: str, value, allowed: str) -> None:
    """One line for a setting out of its range: the key, what was given, what is allowed."""
    if not ok:
        raise UserError(f"config {key} must be {allowed}; got {shown(value)}")


def need_threads(value: int, key: str) -> None:
    """torch's CPU threads: 0 (its default) or more; more than the machine's cores are cut to them where set
    (ponder.runtime.set_threads)."""
    need(value >= 0, key, value, "0 (torch's default) or more")


def need_seed(value: int, key: str = "seed") -> None:
    """A seed torch takes (torch.manual_seed overflows past 64 bits)."""
    need(-(2**63) <= value < 2**63, key, value, "an integer of at most 63 bits (e.g. 0)")


def shown(value) -> str:
    """A setting's value as a user wrote it: 2 for a float field given 2, not 2.0."""
    return f"{value:g}" if isinstance(value, float) else repr(value)


def check_sampling(prefix: str, temperature: float, top_p: float, max_new_tokens: int | None, k: int | None = None,
                   stop=(), top_k: int = 0, min_p: float = 0.0) -> None:
    """The sampling settings every command shares (temperature 0 is greedy decoding)."""
    need(temperature >= 0, f"{prefix}temperature", temperature, "0 (greedy) or more")
    # an empty stop string occurs in every text: every completion ended after its first token
    need(all(isinstance(s, str) and s for s in stop), f"{prefix}stop", list(stop), "non-empty strings")
    need(0 < top_p <= 1, f"{prefix}top_p", top_p, "in (0, 1]")
    need(top_k >= 0, f"{prefix}top_k", top_k, "0 (off) or more")
    need(0 <= min_p < 1, f"{prefix}min_p", min_p, "in [0, 1) (0: off; a share of the most likely token's probability)")
    if max_new_tokens is not None:
        need(max_new_tokens >= 1, f"{prefix}max_new_tokens", max_new_tokens, "at least 1")
    if k is not None:
        need(k >= 1, f"{prefix}k", k, "at least 1")


def check_tasks(key: str, specs: list[TaskSpec], unique: bool = False) -> None:
    """Each task's count and weight: n=0 or a negative n would otherwise take a task's default or a tail of its
    examples, and a weight of 0 would still count once. `unique`: no name/split twice (evaluations keep
    their figures under it: a second entry of one overwrote the first's)."""
    for i, spec in enumerate(specs):
        need(spec.n is None or spec.n >= 1, f"{key}[{i}].n", spec.n, "at least 1 (or unset: the task's default)")
        # (n=2**40 of a built-in task drew problems for hours, growing in memory, without a word)
        need(spec.n is None or spec.n <= MAX_EXAMPLES, f"{key}[{i}].n", spec.n,
             f"at most {MAX_EXAMPLES:,} (a task's examples are held in memory), or unset (all of a file's rows)")
        # (1e12 copies of a task's examples ended in a MemoryError)
        need(0 < spec.weight <= MAX_WEIGHT, f"{key}[{i}].weight", spec.weight,
             f"above 0 and at most {MAX_WEIGHT:,} (weight x n of the task's n examples are drawn)")
    seen = [f"{s.name}/{s.split}" for s in specs]
    twice = next((x for i, x in enumerate(seen) if x in seen[:i]), None)
    if unique and twice:
        raise UserError(f"config {key} holds {twice} twice (its figures are kept under that name); evaluate "
                        "one of them on another split, or in a run of its own")


def check_lora(m: "ModelConfig", prefix: str = "model.lora.") -> None:
    """Ranges peft would refuse only after the model has loaded, in a traceback."""
    if m.lora is None:
        return
    need(m.lora.r >= 1, f"{prefix}r", m.lora.r, "at least 1")
    need(m.lora.alpha > 0, f"{prefix}alpha", m.lora.alpha, "more than 0")
    need(0 <= m.lora.dropout < 1, f"{prefix}dropout", m.lora.dropout, "in [0, 1)")
    need(bool(m.lora.target_modules), f"{prefix}target_modules", m.lora.target_modules, "at least one module name")


def check_optim(o: OptimConfig, prefix: str = "optim.") -> None:
    need(0 <= o.lr <= MAX_LR, f"{prefix}lr", o.lr, LR_RANGE)
    need(o.weight_decay >= 0, f"{prefix}weight_decay", o.weight_decay, "0 or more")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"{prefix}betas", list(o.betas), "two numbers in [0, 1)")
    need(o.warmup_steps >= 0, f"{prefix}warmup_steps", o.warmup_steps, "0 or more")
    need(0 <= o.min_lr <= o.lr, f"{prefix}min_lr", o.min_lr, f"between 0 and {prefix}lr ({shown(o.lr)})")
    need(o.grad_clip >= 0, f"{prefix}grad_clip", o.grad_clip, "0 (off) or more")
    need(o.token_budget is None or o.token_budget >= 1, f"{prefix}token_budget", o.token_budget, "at least 1 (or unset)")


def validate(cfg) -> None:
    if not isinstance(cfg, RunConfig):
        return
    a, r, t = cfg.algorithm, cfg.rollout, cfg.train
    need_seed(cfg.seed)
    need(1 <= r.group_size <= MAX_ROLLOUTS, "rollout.group_size", r.group_size,
         f"at least 1 and at most {MAX_ROLLOUTS:,} (rollouts a step; R1: 16)")
    need(r.prompts_per_step >= 1, "rollout.prompts_per_step", r.prompts_per_step, "at least 1")
    # (1e8 prompts a step prepared 8e8 rollouts for minutes, growing in memory, without a word)
    need(r.prompts_per_step * r.group_size <= MAX_ROLLOUTS, "rollout.prompts_per_step", r.prompts_per_step,
         f"at most {MAX_ROLLOUTS // max(r.group_size, 1):,} with rollout.group_size={r.group_size} "
         f"({MAX_ROLLOUTS:,} rollouts a step; DAPO's steps hold 8,192)")
    need(r.generation_batch >= 1, "rollout.generation_batch", r.generation_batch, "at least 1")
    check_sampling("rollout.", r.temperature, r.top_p, r.max_new_tokens, stop=r.stop, top_k=r.top_k, min_p=r.min_p)
    need(0 <= a.eps_low < 1, "algorithm.eps_low", a.eps_low, "in [0, 1) (the ratio is clipped below at 1 - eps_low)")
    need(a.eps_high >= 0, "algorithm.eps_high", a.eps_high, "0 or more")
    need(a.dual_clip is None or a.dual_clip > 1 + a.eps_high, "algorithm.dual_clip", a.dual_clip,
         f"above 1 + algorithm.eps_high = {1 + a.eps_high:g} (where the clip leaves off; 3 is usual), or null (off)")
    # (1e30: a KL term past float32 in the first update after the reference's, every update skipped as non-finite and
    # the guardrail blaming the learning rate)
    need(0 <= a.beta <= MAX_COEF, "algorithm.beta", a.beta, f"between 0 (no KL term) and {MAX_COEF:,} (R1: 0.001)")
    need(a.ref_reset_every >= 0, "algorithm.ref_reset_every", a.ref_reset_every, "0 (never) or more")
    need(0 < a.ref_mix <= 1, "algorithm.ref_mix", a.ref_mix, "in (0, 1] (the policy's share at each reset)")
    need(0 < a.top_entropy_quantile <= 1, "algorithm.top_entropy_quantile", a.top_entropy_quantile,
         "in (0, 1]: the share of tokens, those of highest entropy, that carry policy gradient (1: all; the paper: 0.2)")
    need(0 <= a.entropy_coef <= MAX_COEF, "algorithm.entropy_coef", a.entropy_coef,
         f"between 0 (no entropy bonus) and {MAX_COEF:,} (0.001 is usual)")
    if a.ref_mix < 1 and not (a.beta and a.ref_reset_every):
        raise UserError("config algorithm.ref_mix applies at each reference reset: set algorithm.beta above 0 and "
                        "algorithm.ref_reset_every too, or leave ref_mix at 1")
    if a.ref_mix < 1 and cfg.model.lora is not None:
        raise UserError("config algorithm.ref_mix below 1 needs full-parameter training: LoRA's two adapter matrices do "
                        "not mix into the mix of their products; leave it at 1 (the reference replaced)")
    need(a.max_resample_rounds >= 0, "algorithm.max_resample_rounds", a.max_resample_rounds, "0 or more")
    need(a.rollout_is_cap is None or a.rollout_is_cap > 0, "algorithm.rollout_is_cap", a.rollout_is_cap,
         "above 0 (the most a token's weight may be; 2 is usual), or null (off)")
    need(t.steps >= 1, "train.steps", t.steps, "at least 1")
    need(t.save_every >= 0, "train.save_every", t.save_every, "0 (only at the end) or more")
    need(t.keep_last >= 0, "train.keep_last", t.keep_last, "0 (keep every checkpoint) or more")
    need(t.log_samples >= 0, "train.log_samples", t.log_samples, "0 or more")
    need_threads(t.threads, "train.threads")
    need(t.collective_timeout > 0, "train.collective_timeout", t.collective_timeout, "minutes, more than 0")
    e = cfg.eval
    need(e.every >= 0, "eval.every", e.every, "0 (at the end only) or more")
    check_sampling("eval.", e.temperature, e.top_p, e.max_new_tokens, e.k, top_k=e.top_k, min_p=e.min_p)
    check_optim(cfg.optim)
    if r.group_size < 2:  # every mode subtracts the group's mean (advantage none too: Dr. GRPO's r - mean)
        raise UserError("config rollout.group_size must be at least 2 for group-relative advantages")
    if a.mu < 1 or a.minibatches < 1:
        raise UserError("config algorithm.mu and algorithm.minibatches must be at least 1")
    if cfg.model.lora is not None and cfg.model.lora.dropout > 0:  # (disable_dropout turns off the model's own)
        raise UserError(f"config model.lora.dropout must be 0 for ponder train; got {shown(cfg.model.lora.dropout)}: the "
                        "update compares the policy's log-probs with the rollout's, and dropout makes their ratio noise "
                        "(clipped tokens at unchanged weights); it is for ponder sft")
    if r.prompts_per_step % a.minibatches:
        raise UserError("config rollout.prompts_per_step must be divisible by algorithm.minibatches")
    if not cfg.data.tasks:
        raise UserError("config data.tasks is empty; name at least one task")
    check_tasks("data.tasks", cfg.data.tasks)
    need(cfg.data.max_prompt_tokens is None or cfg.data.max_prompt_tokens >= 1, "data.max_prompt_tokens",
         cfg.data.max_prompt_tokens, "at least 1, or null (every prompt)")
    check_tasks("eval.tasks", e.tasks, unique=True)
    check_lora(cfg.model)
    if not cfg.rewards:
        raise UserError("config rewards is empty; name at least one reward, e.g. rewards: {accuracy: 1.0}")
    if a.dynamic_sampling_by is not None and a.dynamic_sampling_by not in cfg.rewards:
        raise UserError(f"config algorithm.dynamic_sampling_by names '{a.dynamic_sampling_by}', which is not one of the "
                        f"run's rewards ({', '.join(cfg.rewards)}); name one of them, or leave it unset")
    _validate_guardrails(cfg.guardrails)
    from ponder.metrics import check_log_to

    check_log_to(cfg.train.log_to)


def _validate_guardrails(g: GuardrailsConfig) -> None:
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise UserError(f"config guardrails.{key} must be {what}")

    need(g.baseline_steps >= 1, "baseline_steps", "at least 1")
    need(g.window >= 1, "window", "at least 1")
    need(0 < g.lr_factor < 1, "lr_factor", "between 0 and 1 (the learning rate is multiplied by it)")
    need(g.max_rollbacks >= 0, "max_rollbacks", "0 or more")
    need(0 < g.entropy_collapse.fraction < 1, "entropy_collapse.fraction", "between 0 and 1")
    need(g.kl_spike.factor > 1, "kl_spike.factor", "above 1")
    need(g.clip_spike.factor > 1, "clip_spike.factor", "above 1")
    need(0 < g.length_runaway.share <= 1, "length_runaway.share", "in (0, 1]")
    need(g.reward_hacking.rise > 0, "reward_hacking.rise", "positive")
    need(0 <= g.reward_hacking.accuracy_ratio < 1, "reward_hacking.accuracy_ratio", "in [0, 1)")
    need(g.repetition.min_repeats >= 2, "repetition.min_repeats", "at least 2")
    need(0 < g.repetition.share <= 1, "repetition.share", "in (0, 1]")
    need(g.non_finite.max_nan_steps >= 1, "non_finite.max_nan_steps", "at least 1")
