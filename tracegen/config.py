"""Typed configuration: one model per command, loaded from a recipe YAML and command-line flags.

Precedence, lowest first: the defaults below < the recipe file < environment variables and flags
(an environment variable such as ``TRACEGEN_TEACHER_BASE_URL`` is the same setting as its flag).
Every model forbids unknown keys, so a typo in a recipe is an error that names the key and its
line, never a silently ignored setting.

API keys are never configuration: a recipe names the environment variable that holds the key
(``api_key_env``), and the key itself is read from the environment at the moment a client is built.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tracegen.errors import RecipeError
from tracegen.runtime.docker.settings import DockerRuntimeConfig

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful problem solver with access to tools. Think step by step. When running code "
    "would help, call a tool and wait for its output before continuing. When you are done, reply "
    "with your final answer and no tool call."
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EndpointConfig(Strict):
    """An OpenAI-compatible chat-completions endpoint and how to talk to it."""

    base_url: str | None = Field(
        None, description="Base URL ending in /v1, e.g. http://127.0.0.1:8000/v1 (falls back to OPENAI_BASE_URL)."
    )
    model: str | None = Field(None, description="Model name sent in every request.")
    api_key_env: str | None = Field(
        "TRACEGEN_TEACHER_API_KEY",
        description="Environment variable holding the API key (falls back to OPENAI_API_KEY); null: send no "
        "key. Keys never go in recipe files.",
    )
    temperature: float | None = Field(
        0.6, ge=0, description="Sampling temperature (0.6 suits thinking models); null: not sent (server default)."
    )
    top_p: float | None = Field(0.95, gt=0, le=1, description="Nucleus sampling; null: not sent.")
    max_tokens: int | None = Field(
        4096, ge=1, description="Completion tokens per request (per turn); null: not sent (server default)."
    )
    seed: int | None = Field(None, description="Sampling seed, where the server supports one.")
    stream: bool = Field(True, description="Stream replies (SSE) so long thinking never hits a read timeout.")
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra request fields, e.g. {chat_template_kwargs: {enable_thinking: true}} for vLLM.",
    )
    timeout_s: float = Field(600.0, gt=0, description="Longest silence allowed while reading a reply.")
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect timeout.")
    request_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Longest one request may take in all, however steadily it streams; default 60 s + 0.1 s per "
        "completion token allowed (3600 s when no limit is sent).",
    )
    retry_after_max_s: float = Field(300.0, ge=0, description="Longest Retry-After honoured (a longer one is cut).")
    preflight: bool = Field(
        True,
        description="Check the endpoint with one cheap request (GET /models) before the first trajectory; turn off "
        "for servers that serve model names they do not list.",
    )
    max_attempts: int = Field(6, ge=1, description="Attempts per request, retries included.")
    backoff_base_s: float = Field(1.0, ge=0, description="First retry delay; doubles each attempt, with jitter.")
    backoff_max_s: float = Field(60.0, ge=0, description="Cap on one retry delay (Retry-After may exceed it).")
    requests_per_minute: float | None = Field(None, gt=0, description="Client-side request rate limit.")
    tokens_per_minute: float | None = Field(None, gt=0, description="Client-side token rate limit.")

    def api_key(self) -> str:
        """The key from the environment; servers that need none (vLLM, local) get a placeholder."""
        if self.api_key_env is None:
            return "EMPTY"
        return os.environ.get(self.api_key_env) or os.environ.get("OPENAI_API_KEY") or "EMPTY"

    def url(self) -> str | None:
        """The base URL: the setting, else ``OPENAI_BASE_URL`` (as the openai SDK reads it)."""
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or None

    def completion_limit(self) -> int | None:
        """The per-request completion-token limit actually sent (``max_completion_tokens`` wins)."""
        return self.max_tokens

    def request_deadline_s(self) -> float:
        if self.request_timeout_s is not None:
            return self.request_timeout_s
        limit = self.completion_limit()
        return 60.0 + limit / 10.0 if limit else 3600.0


ToolProtocolSetting = Literal[
    "auto", "native", "hermes", "function_tag", "deepseek", "llama3_json", "mistral_text", "harmony"
]


def _host(url: str | None) -> str:
    return urlsplit(url or "").netloc


class TeacherConfig(EndpointConfig):
    api: Literal["chat", "responses", "anthropic"] = Field(
        "chat",
        description="chat: /chat/completions; responses: the OpenAI Responses API (/responses: OpenAI reasoning "
        "summaries and encrypted reasoning, vLLM gpt-oss); anthropic: the Messages API (/messages: Claude, and "
        "the Anthropic-compatible endpoints of DeepSeek, Kimi, GLM, MiniMax). The simulator stays on chat.",
    )
    max_completion_tokens: int | None = Field(
        None,
        ge=1,
        description="Sent instead of max_tokens (OpenAI o-series and gpt-5 reasoning models refuse max_tokens); "
        "counts reasoning tokens too.",
    )
    reasoning_effort: str | None = Field(
        None, description="Sent as reasoning_effort (OpenAI reasoning models: minimal, low, medium, high)."
    )
    reasoning_field: Literal["auto", "reasoning_content", "reasoning"] = Field(
        "auto",
        description="Field that echoed reasoning goes back in: auto = the one the server sent (reasoning when "
        "it sent both: current vLLM reads reasoning on input).",
    )
    reasoning_echo: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Send earlier turns' reasoning back to the server: auto = on tool-call turns, in the "
        "field the server used (DeepSeek thinking mode requires it); always; never.",
    )
    tool_protocol: ToolProtocolSetting = Field(
        "auto",
        description="auto: native function calling when the server sends it, else the text forms "
        "<tool_call>{...}</tool_call> (hermes), <function=NAME>... (function_tag), and calls a server left "
        "unparsed: DeepSeek-V3 tokens (deepseek), Llama 3 JSON (llama3_json), Mistral [TOOL_CALLS] "
        "(mistral_text), gpt-oss harmony (harmony). Pin hermes or function_tag for servers without function "
        "calling (the tools are then described in the system prompt); the other pins keep sending tools.",
    )
    # Not in CollectConfig.fingerprint(): asking for log-probs does not change what is sampled.
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Store the teacher's top-k log-probs of every generated token (for KD): requests carry "
        "logprobs: true, top_logprobs: k (OpenAI allows k <= 20).",
    )

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @model_validator(mode="after")
    def _logprobs_offered(self) -> TeacherConfig:
        if self.api == "anthropic" and self.top_logprobs is not None:
            raise ValueError("top_logprobs: the Anthropic Messages API returns no log-probs; remove top_logprobs")
        return self


class Prices(Strict):
    input_per_mtok: float = Field(0.0, ge=0, description="Price per million prompt tokens.")
    output_per_mtok: float = Field(0.0, ge=0, description="Price per million completion tokens.")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


class TaskColumns(Strict):
    """Which task-file field (or dataset column) holds each part of a task."""

    id: str = "id"
    prompt: str = "prompt"
    reference: str = "reference"
    tests: str = "tests"
    metadata: list[str] = Field(default_factory=list, description="Extra columns kept in task.metadata.")


DEFAULT_CALLS_PER_REPLY = 32
DEFAULT_CALLS_PER_TRAJECTORY = 256


class AgentLoopConfig(Strict):
    """How episodes run: the tasks, the tools and where they execute. Shared by collect and eval."""

    tasks: str | None = Field(None, description="Tasks: a JSONL file or a local Hugging Face dataset directory.")
    task_columns: TaskColumns = Field(default_factory=TaskColumns)
    simulator: EndpointConfig | None = Field(
        None, description="Model that role-plays tools for runtime=simulated; defaults to the teacher."
    )
    runtime: Literal["simulated", "docker"] = Field("simulated", description="Where tool calls run.")
    docker: DockerRuntimeConfig = Field(
        default_factory=DockerRuntimeConfig, description="The Docker sandbox (image, engines, limits, hardening)."
    )
    tools: list[Literal["python", "bash"]] = Field(
        default_factory=lambda: ["python", "bash"],  # type: ignore[arg-type]  # mypy can't see the Literal
        description="Tools offered to the teacher.",
    )
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="System prompt of every trajectory.")
    concurrency: int = Field(32, ge=1, description="Trajectories in flight at once.")
    limit: int | None = Field(None, ge=1, description="Use only the first N tasks.")
    max_turns: int = Field(8, ge=1, description="Teacher requests per trajectory before stop_reason=max_turns.")
    trajectory_timeout_s: float | None = Field(
        None, gt=0, description="Wall-clock budget of one trajectory; over it, stop_reason=time_budget."
    )
    token_budget: int = Field(
        65536, ge=1, description="Completion tokens (reasoning included) per trajectory before stop_reason=budget."
    )
    observation_max_chars: int = Field(
        8000, ge=64, description="Longest tool output the teacher sees; longer ones are middle-truncated."
    )
    max_tool_calls_per_reply: int = Field(
        DEFAULT_CALLS_PER_REPLY, ge=1, description="Tool calls run from one reply; the rest get an error observation."
    )
    max_tool_calls_per_trajectory: int = Field(
        DEFAULT_CALLS_PER_TRAJECTORY, ge=1, description="Tool calls run per trajectory; later ones get an error."
    )
    fail_on_error: float = Field(
        0.5, ge=0, le=1, description="Exit 1 when more than this fraction of trajectories ended in error."
    )


class CollectConfig(AgentLoopConfig):
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    samples_per_task: int = Field(1, ge=1, description="Trajectories sampled per task (K, for rejection sampling).")
    prices: Prices | None = Field(None, description="Token prices, to show cost on the progress bar.")

    def simulator_endpoint(self) -> EndpointConfig:
        """The simulator's endpoint; an unset base URL or model is the teacher's."""
        if self.simulator is None:
            return EndpointConfig(**self.teacher.model_dump(include=set(EndpointConfig.model_fields)))
        base_url = self.simulator.url() or self.teacher.url()
        update: dict[str, Any] = {"base_url": base_url, "model": self.simulator.model or self.teacher.model}
        if "api_key_env" not in self.simulator.model_fields_set and _host(base_url) != _host(self.teacher.url()):
            update["api_key_env"] = None  # another host never gets the teacher's key unless the recipe says so
        return self.simulator.model_copy(update=update)

    def fingerprint(self) -> str:
        """Hash of every setting that changes what the teacher generates.

        Trajectory ids derive from it, so resuming with a changed sampling setup is caught instead of
        mixing two setups in one file. Throughput knobs (concurrency, limits, retries, base URL) and
        K are left out: changing them must not invalidate finished work.
        """
        generation: dict[str, Any] = {
            "teacher": self.teacher.model_dump(
                include={
                    "model",
                    "temperature",
                    "top_p",
                    "max_tokens",
                    "seed",
                    "extra_body",
                    "reasoning_echo",
                    "tool_protocol",
                }
            ),
            "simulator": self.simulator_endpoint().model if self.runtime == "simulated" else None,
            "runtime": self.runtime,
            "image": self.docker.image if self.runtime == "docker" else None,
            "tools": self.tools,
            "system_prompt": self.system_prompt,
            "max_turns": self.max_turns,
            "token_budget": self.token_budget,
            "observation_max_chars": self.observation_max_chars,
        }
        # Settings added later join only when set, so runs made before they existed keep their ids.
        for key, default in (
            ("max_completion_tokens", None),
            ("reasoning_effort", None),
            ("reasoning_field", "auto"),
            ("api", "chat"),
        ):
            if getattr(self.teacher, key) != default:
                generation["teacher"][key] = getattr(self.teacher, key)
        # The call caps change generation only when they bind; at their defaults they stay out, so
        # runs made before the caps existed keep their ids and resume.
        caps = (self.max_tool_calls_per_reply, self.max_tool_calls_per_trajectory)
        if caps != (DEFAULT_CALLS_PER_REPLY, DEFAULT_CALLS_PER_TRAJECTORY):
            generation["tool_call_caps"] = list(caps)
        blob = json.dumps(generation, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class LoraSettings(Strict):
    """The LoRA adapter (PEFT); defaults are the published recipes'."""

    r: int = Field(64, ge=1, description="Adapter rank.")
    alpha: int = Field(128, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "auto",
        description="auto: the per-architecture preset (dense: q/k/v/o/gate/up/down projections; hybrid "
        "linear-attention models: all-linear); or PEFT's all-linear; or explicit module names. The output "
        "layer and (tied) embeddings are never adapted.",
    )


class DiscrepancySettings(Strict):
    """DISC: discrepancy-weighted KD, DG-limit smoothing and gap energy (``tracegen.distill.discrepancy``)."""

    horizon: int = Field(1, ge=1, description="h of the discrete discrepancy D_t = (1/h) sum_j |f_{t+j} - f_t| / j.")
    jump_sigma: float = Field(
        2.0, ge=0, description="A token whose D_t exceeds its sequence's mean + jump_sigma * std is a jump."
    )
    jump_amplifier: float = Field(3.0, ge=0, description="KD weight of a jump token (1 elsewhere).")
    smoothing_window: int = Field(
        3, ge=0, description="Tokens averaged around a high-entropy position before KD; 0 or 1 = no smoothing."
    )
    smoothing_sigma: float = Field(
        1.0, ge=0, description="Smooth where the student's entropy exceeds its sequence's mean + smoothing_sigma * std."
    )
    gap_energy_weight: float = Field(
        0.02, ge=0, description="lambda: weight of the gap energy E_disc = 0.5 * mean(D_t^2) in the loss."
    )


class TopologySettings(Strict):
    """TKD: a pass over the teacher cache before training (jumps, gap-energy density, windows, curriculum)."""

    jump_sigma: float = Field(
        3.0, ge=0, description="Teacher-signal jumps: D_t above its sequence's mean + jump_sigma * std."
    )
    jump_kd_weight: float = Field(1.25, ge=0, description="KD weight of a jump token (1 elsewhere).")
    energy_window: int = Field(64, ge=1, description="Tokens of the moving average giving the gap-energy density.")
    window: int = Field(512, ge=2, description="Longer sequences are trained as windows of at most this many tokens.")
    min_overlap: int = Field(
        32, ge=1, description="Fewest tokens a window shares with the previous one (1 or more: a target needs context)."
    )
    max_overlap: int = Field(
        128, ge=0, validate_default=True, description="Most tokens a window shares with the previous one."
    )
    curriculum_phases: int = Field(4, ge=1, description="Difficulty phases of each epoch (1 = a plain shuffle).")
    easiest_fraction: float = Field(0.3, gt=0, lt=1, description="Share of the samples in the first (easiest) phase.")

    @field_validator("max_overlap")
    @classmethod
    def _overlap_fits(cls, value: int, info: Any) -> int:  # info: pydantic's ValidationInfo
        window, low = info.data.get("window"), info.data.get("min_overlap")
        if low is not None and value < low:
            raise ValueError(f"max_overlap {value} is below min_overlap {low}; raise max_overlap")
        if window is not None and value >= window:
            raise ValueError(f"max_overlap {value} must be below window {window} (windows must advance)")
        return value


class DistillConfig(Strict):
    """`tracegen distill`: LoRA training on a formatted dataset's trained tokens (weighted CE + KD)."""

    student: str | None = Field(None, description="Student model: local folder or Hub id.")
    teacher_cache: str | None = Field(
        None, description="Teacher top-k cache folder (from `tracegen distill cache-teacher`); none = CE only."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    proof_weight_start: float = Field(2.5, ge=0, description="Weight of proof tokens at the first optimizer step.")
    proof_weight_end: float = Field(1.5, ge=0, description="Weight of proof tokens at the last step (linear decay).")
    alpha_ce: float = Field(0.55, ge=0, description="Weight of the cross-entropy term when KD is on.")
    alpha_kd: float = Field(0.45, ge=0, description="Weight of the KD term (KL(teacher||student) * T^2).")
    temperature: float = Field(2.0, gt=0, description="KD temperature T.")
    top_k: int = Field(64, ge=1, description="Teacher log-probs cached per supervised token (cache-teacher).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    min_learning_rate: float = Field(2e-5, ge=0, description="Floor of the cosine schedule.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; overrides warmup_ratio when set.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Warmup as a fraction of the optimizer steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(4, ge=1, description="Micro-batches per optimizer step.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    max_length: int = Field(4096, ge=2, description="Longer sequences are cut to this many tokens.")
    seed: int = Field(42, description="Seed of the data order, adapter init and dropout.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on a GPU that supports it, fp32 otherwise (CPU)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    packing: bool = Field(
        False,
        description="Padding-free packing: each micro-batch's rows end to end in one sequence (restarting "
        "position_ids, no attention across rows). Dense models only: refused on linear-attention/recurrent ones.",
    )
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Held-out fraction (split with seed 42).")
    eval_every: int = Field(50, ge=1, description="Evaluate every N optimizer steps (and at the end).")
    save_every: int = Field(100, ge=1, description="Write a resumable checkpoint every N optimizer steps.")
    log_every: int = Field(1, ge=1, description="Progress line every N optimizer steps.")
    optimizer: Literal["adamw_torch", "paged_adamw_8bit"] = Field(
        "adamw_torch",
        description="adamw_torch, or paged_adamw_8bit (bitsandbytes' PagedAdamW8bit: a CUDA GPU and bitsandbytes).",
    )
    kd_alpha_ramp: tuple[float, float] | None = Field(
        None,
        description="[start, end] fractions of the optimizer steps: alpha_kd is 0 until start, rises linearly to "
        "alpha_kd at end, then stays; none = alpha_kd throughout. Needs a teacher cache.",
    )
    discrepancy: DiscrepancySettings | None = Field(
        None, description="DISC discrepancy operators on the KD term (needs a teacher cache); none = off."
    )
    topology: TopologySettings | None = Field(
        None, description="TKD topology pass: jump KD weights, adaptive windows, curriculum (needs a teacher cache)."
    )

    @field_validator("kd_alpha_ramp")
    @classmethod
    def _ramp_in_order(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] < value[1] <= 1:
            raise ValueError(f"{list(value)} must be [start, end] with 0 <= start < end <= 1, e.g. [0.15, 0.45]")
        return value


class ImportColumns(Strict):
    """Columns of a chain-of-thought dataset without tool calls (``format --import cot``)."""

    id: str | None = Field(None, description="Row id column (default: the row number).")
    question: str = Field("question", description="The problem / prompt column.")
    reasoning: str | None = Field(
        "CoT", description="The chain-of-thought column (becomes the derivation); null for instruction data."
    )
    answer: str = Field("response", description="The final answer column.")
    source: str | None = Field(None, description="Where the data came from (the card's provenance); default the path.")


class FormatConfig(Strict):
    """``tracegen format``: trajectories to a Hub-ready, tokenized dataset folder."""

    HOW_NOT_WHAT: ClassVar[set[str]] = {"workers", "batch_size"}
    """Settings of how the work runs, not of what it writes: left out of the card and of fingerprints."""

    template: Literal["proof", "dualmind", "chat", "instruct"] = Field(
        "chat",
        description="Training text layout: proof, dualmind, instruct (fixed texts) or chat (tokenizer's template).",
    )
    tokenizer: str | None = Field(
        None, description="Student tokenizer: qwen3, smollm2, or a local folder with tokenizer.json (no downloads)."
    )
    chat_template: str | None = Field(
        None, description="Jinja file to use for --template chat instead of the tokenizer's own chat template."
    )
    end_of_turn: str | None = Field(
        None, description="The chat template's end-of-turn token (default: the tokenizer's eos_token)."
    )
    train_observations: Literal["none", "executed", "all"] = Field(
        "none",
        description="Tool outputs to train on: none (default) or executed (sandbox output). Simulated observations "
        "can never be trained; 'all' is refused for that reason.",
    )
    max_length: int | None = Field(
        None,
        ge=8,
        description="Longest sample in tokens: cut outside tool calls; a sample whose answer would be cut is dropped.",
    )
    examine: Literal["none", "teacher", "judge"] = Field(
        "none",
        description="Where dualmind's critique comes from: teacher (ask it now, stored in Trajectory.critique), "
        "judge (the filter judge's rationale), none (only critiques already in the records).",
    )
    teacher: TeacherConfig = Field(
        default_factory=TeacherConfig, description="The teacher asked for critiques with examine=teacher."
    )
    examine_concurrency: int = Field(16, ge=1, description="Critique requests in flight with examine=teacher.")
    export: list[Literal["sharegpt"]] = Field(
        default_factory=list, description="Extra row formats: sharegpt (LLaMA-Factory / axolotl style, in sharegpt/)."
    )
    import_format: Literal["trajectories", "cot"] = Field(
        "trajectories", description="Input kind: tracegen trajectories JSONL, or a chain-of-thought dataset (cot)."
    )
    import_columns: ImportColumns = Field(default_factory=ImportColumns)
    license: str = Field("other", description="License in the dataset card's metadata.")
    batch_size: int = Field(256, ge=1, description="Samples tokenized per batched tokenizer call.")
    shard_rows: int = Field(50_000, ge=1, description="Rows per parquet shard.")
    workers: int = Field(
        0,
        ge=0,
        description="Processes that render and tokenize (0: one per two CPU cores). The output does not depend on it.",
    )

    @field_validator("train_observations")
    @classmethod
    def _never_simulated(cls, value: str) -> str:
        if value == "all":
            raise ValueError(
                "simulated observations can never be trained (a model would learn to invent tool output); "
                "use 'executed' to train on sandbox output only"
            )
        return value


class StructuralCheckConfig(Strict):
    """Check 1 (``structural``): did the trajectory converge cleanly, within bounds?"""

    max_turns: int | None = Field(None, ge=1, description="Reject trajectories with more assistant turns than this.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Reject trajectories whose completion tokens (reasoning included) exceed this."
    )
    allow_malformed_calls: bool = Field(
        False, description="Keep trajectories with a tool call whose arguments did not parse (or named no tool)."
    )
    answer_pattern: str | None = Field(
        None,
        description="Regex the final answer must match, for templates that need a recoverable answer region "
        r"(e.g. '\\boxed\{' for proof data).",
    )


class DuplicateCheckConfig(Strict):
    """Check 2 (``duplicate``): the same task's answers and reasoning, exact and near duplicates."""

    enabled: bool = Field(
        True, description="Reject later samples whose normalised answer + reasoning repeat an earlier one."
    )
    near_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Also reject samples whose estimated Jaccard similarity (word n-gram MinHash) "
        "to an earlier kept sample of the task is at least this; none = exact duplicates only.",
    )
    ngram: int = Field(5, ge=1, description="Words per shingle for the near-duplicate MinHash.")
    num_perm: int = Field(64, ge=8, description="MinHash permutations (more = a finer similarity estimate).")


class ReferenceCheckConfig(Strict):
    """Check 3 (``reference``): the final answer against the task's reference."""

    rel_tol: float = Field(1e-6, ge=0, description="Relative tolerance of numeric comparisons.")
    abs_tol: float = Field(1e-9, ge=0, description="Absolute tolerance of numeric comparisons.")
    symbolic: bool = Field(True, description="Try symbolic equivalence with sympy when both sides parse.")
    missing: Literal["skip", "reject"] = Field(
        "skip", description="Tasks without a reference: skip the check (no verdict), or reject the sample."
    )


class JudgeConfig(EndpointConfig):
    """Check 6 (``judge``): an LLM judge on any OpenAI-compatible endpoint, answering in a JSON verdict."""

    api_key_env: str = Field(
        "TRACEGEN_JUDGE_API_KEY",
        description="Environment variable holding the judge's API key (falls back to OPENAI_API_KEY).",
    )
    temperature: float | None = Field(
        0.0, ge=0, description="Judge sampling temperature (raise it for majority votes); null: not sent."
    )
    max_tokens: int | None = Field(1024, ge=1, description="Completion tokens per judge reply; null: not sent.")
    rubric: str = Field(
        "Pass only if the final answer is correct and fully answers the task, and the reasoning and tool use "
        "support it without invented results.",
        description="What the judge grades against (appended to the fixed JSON-verdict instructions).",
    )
    samples: int = Field(1, ge=1, description="Judge samples per trajectory; the verdict is their majority vote.")
    max_reasks: int = Field(2, ge=0, description="Re-asks when a reply is not a valid JSON verdict.")
    pass_score: float | None = Field(
        None, ge=0, le=1, description="Also require the (mean) score to be at least this to pass."
    )
    max_transcript_chars: int = Field(
        24000, ge=256, description="Longest transcript shown to the judge (middle-truncated)."
    )
    concurrency: int = Field(16, ge=1, description="Trajectories being judged at once.")
    prices: Prices | None = Field(None, description="Judge token prices, for the judge cost in the report.")


class ReplayCheckConfig(Strict):
    """Check 5 (``replay``): re-execute simulated tool calls in the real sandbox and compare."""

    reject: Literal["never", "material", "any"] = Field(
        "material",
        description="Reject when: never (measure only); material = a call's exit status or the numbers in its "
        "output differ; any = any call differs even after normalisation.",
    )


class FilterConfig(Strict):
    """``tracegen filter``: rejection sampling over collected trajectories."""

    verifiers: list[Literal["reference", "tests", "replay", "judge"]] = Field(
        default_factory=lambda: ["reference"],  # type: ignore[arg-type]  # mypy can't see the Literal
        description="Checks after structural and duplicate, run cheapest first: reference, tests, replay, judge.",
    )
    all_checks: bool = Field(
        False, description="Run every check on every sample instead of stopping at the first failure."
    )
    selection: Literal["all", "best", "k"] = Field(
        "all",
        description="Per task, keep: all passing samples, the best one, or the k best (judge score, then shortest).",
    )
    k: int = Field(1, ge=1, description="Samples kept per task with selection=k.")
    structural: StructuralCheckConfig = Field(default_factory=StructuralCheckConfig)
    duplicate: DuplicateCheckConfig = Field(default_factory=DuplicateCheckConfig)
    reference: ReferenceCheckConfig = Field(default_factory=ReferenceCheckConfig)
    tests_missing: Literal["skip", "reject"] = Field(
        "skip", description="Tasks without tests under --verifier tests: skip the check, or reject the sample."
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    replay: ReplayCheckConfig = Field(default_factory=ReplayCheckConfig)
    docker: DockerRuntimeConfig = Field(
        default_factory=DockerRuntimeConfig,
        description="The sandbox of the tests and replay checks (timeout_s is the tests' time limit).",
    )
    concurrency: int = Field(8, ge=1, description="Samples in the sandbox checks (tests, replay) at once.")


StageName = Literal[
    "collect", "filter", "format", "cache_teacher", "distill", "merge",
    "stage2_format", "stage2_distill", "stage2_merge", "eval",
]  # fmt: skip
STAGE_ORDER: tuple[str, ...] = StageName.__args__  # type: ignore[attr-defined]


class CacheTeacherConfig(Strict):
    """The ``cache_teacher`` stage: teacher top-k log-probs per supervised token of the formatted dataset."""

    source: Literal["model", "collect"] = Field(
        "model",
        description="model: one forward pass of `teacher`; collect: the top log-probs the API teacher returned "
        "during collect (collect.teacher.top_logprobs), for the trajectories format read.",
    )
    teacher: str | None = Field(
        None, description="Local teacher model (folder, Hub id, smollm2 or tiny:TOKENIZER[:SEED]); student's tokenizer."
    )
    batch_size: int = Field(4, ge=1, description="Sequences per teacher forward pass.")


class StageTwoConfig(Strict):
    """A second training stage on the merged stage-1 model (e.g. instruction SFT after distillation)."""

    data: str | None = Field(None, description="Dataset to import for stage 2: .jsonl, .parquet or a dataset folder.")
    format: FormatConfig = Field(default_factory=FormatConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


class RunConfig(Strict):
    """What `tracegen run` does with the recipe: which stages, in the fixed pipeline order."""

    stages: list[StageName] = Field(
        default_factory=lambda: list[StageName](["collect", "filter", "format", "distill"]),
        description="Stages to run; they always run in pipeline order: " + ", ".join(StageName.__args__) + ".",  # type: ignore[attr-defined]
    )
    data: str | None = Field(
        None, description="Input of the format stage when there is no collect stage (a chain-of-thought dataset)."
    )
    serve: str | None = Field(
        None,
        description="A local model (smollm2, tiny:TOKENIZER[:SEED] or a folder) served with `transformers serve` "
        "for every endpoint left without a base_url (teacher, simulator, judge, examine).",
    )
    probes: list[Literal["proof", "dualmind", "instruct"]] = Field(
        default_factory=list,
        description="Eval stage: generate from the final model with each template's prompt, offline, and check "
        "that it generates (the prompt formats still work after training).",
    )
    probe_max_new_tokens: int = Field(24, ge=1, description="Tokens generated per probe.")
    merge_best: bool = Field(
        False, description="Merge the adapter with the lowest eval loss (adapter/best) when there is one."
    )


class EvalEndpointConfig(TeacherConfig):
    """The model under test: thinking-on eval defaults (32768 tokens per turn), its own key variable."""

    api_key_env: str = Field(
        "TRACEGEN_EVAL_API_KEY",
        description="Environment variable holding the evaluated endpoint's key (falls back to OPENAI_API_KEY).",
    )
    max_tokens: int | None = Field(32768, ge=1, description="Completion tokens per request (per turn); null: not sent.")


class EvalConfig(AgentLoopConfig):
    """``tracegen eval``: a served model on a task set, through the collect loop and filter's verifiers."""

    endpoint: EvalEndpointConfig = Field(
        default_factory=EvalEndpointConfig,
        description="The model under test (OpenAI-compatible; temperature 0.6, top_p 0.95, max_tokens 32768).",
    )
    samples: int = Field(1, ge=1, description="Answers sampled per task (accuracy averages over them).")
    prompt_template: Literal["none", "proof", "dualmind", "instruct"] = Field(
        "none",
        description="Wrap each task prompt in a training template's prompt part (what a student trained on "
        "that template expects), or send it as is (none).",
    )
    tests: bool = Field(
        False,
        description="Also run the tasks' tests in the Docker sandbox (filter's tests check) where tasks have them.",
    )
    reference: ReferenceCheckConfig = Field(default_factory=ReferenceCheckConfig)
    concurrency: int = Field(8, ge=1, description="Questions in flight at once.")
    fail_on_error: float = Field(
        1.0, ge=0, le=1, description="Exit 1 when more than this fraction of answers ended in error."
    )

    def collect_config(self) -> CollectConfig:
        """The collect run that produces the answers: the model under test in the teacher's seat."""
        loop = self.model_dump(include=set(AgentLoopConfig.model_fields))
        teacher = self.endpoint.model_dump()
        return CollectConfig.model_validate({**loop, "teacher": teacher, "samples_per_task": self.samples})


class Recipe(Strict):
    """A reproducible pipeline: one section per stage."""

    name: str | None = None
    description: str | None = None
    collect: CollectConfig = Field(default_factory=CollectConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    format: FormatConfig = Field(default_factory=FormatConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    cache_teacher: CacheTeacherConfig = Field(default_factory=CacheTeacherConfig)
    stage2: StageTwoConfig | None = Field(None, description="A second training stage on the merged model.")
    eval: EvalConfig | None = Field(None, description="The final model measured on a task set (the eval stage).")
    run: RunConfig = Field(default_factory=RunConfig)
    smoke: dict[str, Any] | None = Field(
        None, description="Overrides applied by `tracegen run --scale smoke` (tiny offline models and data)."
    )


# Error messages name a flag's key as it would appear in a recipe (collect.teacher.model, ...).
SECTION_NAMES: dict[type, str] = {
    CollectConfig: "collect",
    FilterConfig: "filter",
    FormatConfig: "format",
    DistillConfig: "distill",
    EvalConfig: "eval",
}


def load_recipe(path: Path, scale: Literal["full", "smoke"] = "full") -> Recipe:
    """Parse and validate a recipe; relative paths inside it resolve against the recipe's folder.

    ``scale="smoke"`` deep-merges the recipe's ``smoke:`` block over it first. The smoke block is
    validated at either scale, so a broken one is caught when the recipe is loaded, not in CI.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe must be a mapping of stage names to settings")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _recipe_error(exc, str(path), root) from exc
    if recipe.smoke is not None:
        try:
            smoke = Recipe.model_validate(merge(data, recipe.smoke))
        except ValidationError as exc:
            raise _recipe_error(exc, str(path), root, smoke=True) from exc
        if scale == "smoke":
            recipe = smoke
    elif scale == "smoke":
        raise RecipeError(f"{path}: no smoke: block", hint="add one, or run at --scale full")
    _resolve_paths(recipe, path.parent)
    return recipe


def _resolve_paths(recipe: Recipe, base: Path) -> None:
    """File settings resolve against the recipe's folder; a model that is not a local folder stays as written."""

    def file(value: str | None) -> str | None:
        return str((base / value).resolve()) if value and not Path(value).is_absolute() else value

    def model(value: str | None) -> str | None:
        local = value and not Path(value).is_absolute() and (base / value).exists()
        return str((base / value).resolve()) if local and value else value

    def data(value: str | None) -> str | None:  # a file (resolved even when missing, for the error) or a Hub id
        is_file = value and Path(value).suffix in (".jsonl", ".json", ".parquet")
        return file(value) if is_file else model(value)

    recipe.collect.tasks = file(recipe.collect.tasks)
    recipe.run.data = data(recipe.run.data)
    recipe.run.serve = model(recipe.run.serve)
    recipe.cache_teacher.teacher = model(recipe.cache_teacher.teacher)
    stage2 = recipe.stage2
    for distill, fmt in [(recipe.distill, recipe.format), *([(stage2.distill, stage2.format)] if stage2 else [])]:
        distill.student = model(distill.student)
        distill.teacher_cache = model(distill.teacher_cache)
        fmt.tokenizer = model(fmt.tokenizer)
    if stage2 is not None:
        stage2.data = data(stage2.data)
    evaluation = recipe.eval
    if evaluation is not None and evaluation.tasks:
        evaluation.tasks = file(evaluation.tasks)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into ``base``; ``None`` in overrides means "not given"."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            out[key] = merge(out.get(key) or {}, value)
        else:
            out[key] = value
    return out


SectionT = TypeVar("SectionT", bound=Strict)


def apply_overrides(config: SectionT, overrides: dict[str, Any], source: str = "flags") -> SectionT:
    """Layer flag/environment values over a validated recipe section, re-validating the result."""
    merged = merge(config.model_dump(exclude_unset=True), overrides)
    try:
        return type(config).model_validate(merged)
    except ValidationError as exc:
        raise _recipe_error(exc, source, None, prefix=SECTION_NAMES.get(type(config), "")) from exc


def _recipe_error(
    exc: ValidationError, source: str, root: yaml.Node | None, prefix: str = "", smoke: bool = False
) -> RecipeError:
    """One line naming the key (and its line in the file) and the fix."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    if smoke:  # the error came from the smoke overlay, or from the recipe underneath it
        loc = ["smoke", *loc] if _line_of(root, ["smoke", *loc], exact=True) else loc
    dotted = ".".join(([prefix] if prefix else []) + loc)
    line = _line_of(root, loc) if root is not None else None
    where = f"{source}:{line}" if line else source
    if err["type"] == "extra_forbidden":
        return RecipeError(
            f"{where}: unknown key '{dotted}'", hint="check the spelling; `tracegen collect --help` lists the settings"
        )
    return RecipeError(f"{where}: {dotted}: {err['msg']}")


def _line_of(node: yaml.Node | None, loc: list[str], exact: bool = False) -> int | None:
    """1-based line of the deepest YAML node along ``loc`` (pydantic's error location).

    ``exact``: None unless the whole of ``loc`` is in the file.
    """
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
            key = next((k for k, _ in node.value if k.value == part), None)
            if match is None:
                return None if exact else line
            line = (key.start_mark.line if key is not None else match.start_mark.line) + 1
            node = match
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line
