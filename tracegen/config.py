"""Typed settings: one model per command; :mod:`tracegen.recipe` loads them from YAML and flags.

Precedence, lowest first: the defaults below < the recipe file < environment variables and flags
(an environment variable such as ``TRACEGEN_TEACHER_BASE_URL`` is the same setting as its flag).
Every model forbids unknown keys, so a typo in a recipe is an error that names the key and its
line, never a silently ignored setting.

API keys are never configuration: a recipe names the environment variable that holds the key
(``api_key_env``), and the key itself is read from the environment at the moment a client is built.
"""

from __future__ import annotations

import os
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tracegen.fingerprint import ADDED, HOW, deciding, fingerprint
from tracegen.records import ExampleTurn
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
        None,
        description="Base URL ending in /v1, e.g. http://127.0.0.1:8000/v1 (falls back to OPENAI_BASE_URL).",
        json_schema_extra=HOW,
    )
    model: str | None = Field(None, description="Model name sent in every request.")
    api_key_env: str | None = Field(
        "TRACEGEN_TEACHER_API_KEY",
        description="Environment variable holding the API key (falls back to OPENAI_API_KEY); null: send no "
        "key. Keys never go in recipe files.",
        json_schema_extra=HOW,
    )
    temperature: float | None = Field(
        0.6, ge=0, description="Sampling temperature (0.6 suits thinking models); null: not sent (server default)."
    )
    top_p: float | None = Field(0.95, gt=0, le=1, description="Nucleus sampling; null: not sent.")
    max_tokens: int | None = Field(
        4096, ge=1, description="Completion tokens per request (per turn); null: not sent (server default)."
    )
    seed: int | None = Field(None, description="Sampling seed, where the server supports one.")
    stream: bool = Field(
        True,
        description="Stream replies (SSE) so long thinking never hits a read timeout.",
        json_schema_extra=HOW,
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra request fields, e.g. {chat_template_kwargs: {enable_thinking: true}} for vLLM.",
    )
    timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest silence allowed while reading a reply.",
        json_schema_extra=HOW,
    )
    connect_timeout_s: float = Field(
        10.0,
        gt=0,
        description="TCP connect timeout.",
        json_schema_extra=HOW,
    )
    request_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Longest one request may take in all, however steadily it streams; default timeout_s (the "
        "silence a reply may start with, e.g. queued on a busy server) + 0.1 s per completion token allowed "
        "(at least 3600 s when no limit is sent).",
        json_schema_extra=HOW,
    )
    retry_after_max_s: float = Field(
        300.0,
        ge=0,
        description="Longest Retry-After honoured (a longer one is cut).",
        json_schema_extra=HOW,
    )
    preflight: bool = Field(
        True,
        description="Check the endpoint with one cheap request (GET /models) before the first trajectory; turn off "
        "for servers that serve model names they do not list.",
        json_schema_extra=HOW,
    )
    max_attempts: int = Field(
        6,
        ge=1,
        description="Attempts per request, retries included.",
        json_schema_extra=HOW,
    )
    backoff_base_s: float = Field(
        1.0,
        ge=0,
        description="First retry delay; doubles each attempt, with jitter.",
        json_schema_extra=HOW,
    )
    backoff_max_s: float = Field(
        60.0,
        ge=0,
        description="Cap on one retry delay (Retry-After may exceed it).",
        json_schema_extra=HOW,
    )
    requests_per_minute: float | None = Field(
        None,
        gt=0,
        description="Client-side request rate limit.",
        json_schema_extra=HOW,
    )
    tokens_per_minute: float | None = Field(
        None,
        gt=0,
        description="Client-side token rate limit.",
        json_schema_extra=HOW,
    )

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
        # Never shorter than the silence timeout_s allows before the first token: a request queued on a
        # busy local server must not be cut by the total deadline while its reads are still within limits.
        limit = self.completion_limit()
        return self.timeout_s + limit / 10.0 if limit else max(3600.0, self.timeout_s)


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
    # HOW: asking for log-probs does not change what is sampled.
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Store the teacher's top-k log-probs of every generated token (for KD): requests carry "
        "logprobs: true, top_logprobs: k (OpenAI allows k <= 20).",
        json_schema_extra=HOW,
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
    language: str = Field(
        "language",
        description="The tests' language: python (default when absent), javascript (node) or bash.",
        json_schema_extra=ADDED,
    )
    metadata: list[str] = Field(default_factory=list, description="Extra columns kept in task.metadata.")
    choices: str | None = Field(
        None,
        description="Multiple choice (GPQA / MMLU style): the column with the list of options. The prompt gets "
        "them lettered A, B, ...; the reference column holds the right letter or its 0-based index.",
    )
    shots: int = Field(
        0, ge=0, description="Multiple choice, k-shot: the set's first k rows become worked examples (not asked)."
    )


DEFAULT_CALLS_PER_REPLY = 32
DEFAULT_CALLS_PER_TRAJECTORY = 256


class AgentLoopConfig(Strict):
    """How episodes run: the tasks, the tools and where they execute. Shared by collect and eval."""

    tasks: str | None = Field(
        None,
        description="Tasks: a JSONL file or a local Hugging Face dataset directory.",
        json_schema_extra=HOW,
    )
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
    few_shot: list[ExampleTurn] = Field(
        default_factory=list,
        description="Worked example turns ({role: user|assistant, content}) sent verbatim after the system prompt "
        "and before each task, e.g. a tool call in the model's text protocol and its <tool_response>, for a "
        "model that does not call tools from the description alone. Recorded as the trajectory's few_shot "
        "(prompt, like the system prompt): never trained.",
        json_schema_extra=ADDED,
    )
    concurrency: int = Field(
        32,
        ge=1,
        description="Trajectories in flight at once.",
        json_schema_extra=HOW,
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Use only the first N tasks.",
        json_schema_extra=HOW,
    )
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
        0.5,
        ge=0,
        le=1,
        description="Exit 1 when more than this fraction of trajectories ended in error.",
        json_schema_extra=HOW,
    )


class CollectConfig(AgentLoopConfig):
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    samples_per_task: int = Field(
        1,
        ge=1,
        description="Trajectories sampled per task (K, for rejection sampling).",
        json_schema_extra=HOW,
    )
    prices: Prices | None = Field(
        None,
        description="Token prices, to show cost on the progress bar.",
        json_schema_extra=HOW,
    )

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
        """Hash of every setting that changes what the teacher generates (see :mod:`tracegen.fingerprint`).

        Trajectory ids derive from it, so resuming with a changed sampling setup is caught instead of
        mixing two setups in one file. Settings marked ``HOW`` (concurrency, limits, retries, base URL,
        K) are left out: changing them must not invalidate finished work. The simulator counts only
        with ``runtime: simulated`` and the sandbox only with ``runtime: docker``.
        """
        return fingerprint(self.generation_settings())

    def generation_settings(self) -> dict[str, Any]:
        """The settings :meth:`fingerprint` hashes (kept in the manifest, to name what changed)."""
        generation = deciding(self, exclude={"simulator", "docker"})
        generation["simulator"] = deciding(self.simulator_endpoint()) if self.runtime == "simulated" else None
        generation["docker"] = deciding(self.docker) if self.runtime == "docker" else None
        return {"fingerprint_version": 2, **generation}


SplitMethod = Literal["torch", "hf"]
"""How distill draws its eval rows (``tracegen.distill.data.split_indices``)."""


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
    jump_weight: float = Field(1.25, ge=0, description="Loss weight multiplier of a jump token (1 elsewhere).")
    jump_target: Literal["loss", "kd"] = Field(
        "loss",
        description="What jump_weight amplifies: loss (the card: the token's CE and KD weights, so it works while "
        "kd_alpha_ramp holds alpha_kd at 0) or kd (the KD weight only).",
    )
    drift_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the drift channel 0.5 * sum_t C_t^2: the student's entropy drift from the teacher's "
        "accumulated off the jumps (tracegen/distill/discrepancy.py); 0 = off.",
    )
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
    """`tracegen distill`: LoRA or full training on a formatted dataset's trained tokens (weighted CE + KD)."""

    student: str | None = Field(None, description="Student model: local folder or Hub id.")
    teacher_cache: str | None = Field(
        None, description="Teacher top-k cache folder (from `tracegen distill cache-teacher`); none = CE only."
    )
    method: Literal["lora", "full"] = Field(
        "lora",
        description="lora: train a LoRA adapter on the frozen student; full: train every weight of the student (the "
        "output is the model itself: merge only links it). Same losses, resume and launchers either way.",
    )
    model_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="dtype the student (and cache-teacher's teacher) is loaded in; auto: the checkpoint's own. LoRA "
        "weights and all optimizer state stay fp32; full training keeps fp32 weights (bf16 compute by precision) "
        "and writes the model in this dtype; merge writes the base's.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    proof_weighting: bool = Field(
        True,
        description="Weigh proof_mask tokens proof_weight_start -> proof_weight_end (the STEM/TKD cards); false = "
        "plain SFT, every trained token weight 1 (the agentic card, stage 2 of the legal card).",
    )
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
    loss_chunk_tokens: int = Field(
        2048,
        ge=0,
        description="Output layer, CE and KD on this many supervised tokens at a time (recomputed in backward): "
        "the loss's peak memory stays a few [chunk, vocabulary] copies however long the batch. 0: never chunk.",
    )
    packing: bool = Field(
        False,
        description="Padding-free packing: each micro-batch's rows end to end in one sequence (restarting "
        "position_ids, no attention across rows). Dense models only: refused on linear-attention/recurrent ones.",
    )
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Held-out fraction of the rows.")
    split_method: SplitMethod = Field(
        "torch",
        description="How the eval rows are drawn: torch (floor(n * eval_fraction) rows, torch.randperm), or hf: "
        "exactly datasets' train_test_split(test_size=eval_fraction, seed=split_seed), for cards citing a Hub split.",
    )
    split_seed: int = Field(42, description="Seed of the train/eval split.")
    eval_every: int = Field(50, ge=1, description="Evaluate every N optimizer steps (and at the end).")
    save_every: int = Field(
        100,
        ge=1,
        description="Write a resumable checkpoint every N optimizer steps.",
        json_schema_extra=HOW,
    )
    log_every: int = Field(
        1,
        ge=1,
        description="Progress line every N optimizer steps.",
        json_schema_extra=HOW,
    )
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers that also get metrics.jsonl's scalars and these settings as the run "
        "config: tensorboard, wandb (offline unless WANDB_MODE is set), trackio, mlflow (a store in OUT/runs "
        "unless MLFLOW_TRACKING_URI is set); a name or a list; none or [] = metrics.jsonl only.",
        json_schema_extra=HOW,
    )
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw_torch",
        description="adamw_torch; adamw_torch_fused (torch's fused kernel, where torch has one for the device); "
        "adamw_8bit / paged_adamw_8bit (bitsandbytes' AdamW8bit / PagedAdamW8bit: a CUDA GPU and bitsandbytes).",
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

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers_as_list(cls, value: Any) -> Any:
        """``report_to: tensorboard`` and ``report_to: none`` as users write them (transformers' spelling)."""
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list):
            return value
        if "none" in names:
            if len(names) > 1:
                raise ValueError(f"{names}: 'none' turns every tracker off and cannot be listed with others")
            return []
        return list(dict.fromkeys(names))


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
    allow_dropped: list[Literal["reasoning", "tool_calls"]] = Field(
        default_factory=list,
        description="Trajectory content the chat template may leave out of the text (reasoning, tool_calls); "
        "without it, a template that drops either is refused.",
    )
    max_length: int | None = Field(
        None,
        ge=8,
        description="Longest sample in tokens: cut outside tool calls (see overflow).",
    )
    overflow: Literal["drop", "truncate"] = Field(
        "drop",
        description="A sample past max_length whose answer the cut would lose: drop it, or truncate it (it trains "
        "on its beginning; its row says truncated). Both are counted.",
    )
    examine: Literal["none", "teacher", "judge"] = Field(
        "none",
        description="Where dualmind's critique comes from: teacher (ask it now, stored in Trajectory.critique), "
        "judge (the filter judge's rationale), none (only critiques already in the records).",
    )
    teacher: TeacherConfig = Field(
        default_factory=TeacherConfig, description="The teacher asked for critiques with examine=teacher."
    )
    examine_concurrency: int = Field(
        16,
        ge=1,
        description="Critique requests in flight with examine=teacher.",
        json_schema_extra=HOW,
    )
    export: list[Literal["sharegpt"]] = Field(
        default_factory=list, description="Extra row formats: sharegpt (LLaMA-Factory / axolotl style, in sharegpt/)."
    )
    import_format: Literal["trajectories", "cot"] = Field(
        "trajectories", description="Input kind: tracegen trajectories JSONL, or a chain-of-thought dataset (cot)."
    )
    import_columns: ImportColumns = Field(default_factory=ImportColumns)
    license: str = Field("other", description="License in the dataset card's metadata (a Hub license id, or other).")
    license_name: str | None = Field(
        None,
        description="With license: other, an id for the license (e.g. my-license-1.0); push requires it.",
        json_schema_extra=ADDED,
    )
    license_link: str | None = Field(
        None,
        description="With license: other, a URL (or LICENSE file in the repo) for its text; push requires it.",
        json_schema_extra=ADDED,
    )
    batch_size: int = Field(
        256,
        ge=1,
        description="Samples tokenized per batched tokenizer call.",
        json_schema_extra=HOW,
    )
    shard_rows: int = Field(50_000, ge=1, description="Rows per parquet shard.")
    workers: int = Field(
        0,
        ge=0,
        description="Processes that render and tokenize (0: one per two CPU cores). The output does not depend on it.",
        json_schema_extra=HOW,
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
    symbolic: bool = Field(
        True, description="When the fast rules do not decide, ask math-verify (the list and symbolic rules)."
    )
    timeout_s: int = Field(5, ge=1, description="math-verify's limit for each parse and comparison, in seconds.")
    missing: Literal["skip", "reject"] = Field(
        "skip", description="Tasks without a reference: skip the check (no verdict), or reject the sample."
    )


class JudgeConfig(EndpointConfig):
    """Check 6 (``judge``): an LLM judge on any OpenAI-compatible endpoint, answering in a JSON verdict."""

    api_key_env: str = Field(
        "TRACEGEN_JUDGE_API_KEY",
        description="Environment variable holding the judge's API key (falls back to OPENAI_API_KEY).",
        json_schema_extra=HOW,
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
    concurrency: int = Field(
        16,
        ge=1,
        description="Trajectories being judged at once.",
        json_schema_extra=HOW,
    )
    prices: Prices | None = Field(
        None,
        description="Judge token prices, for the judge cost in the report.",
        json_schema_extra=HOW,
    )


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
    concurrency: int = Field(
        8,
        ge=1,
        description="Samples in the sandbox checks (tests, replay) at once.",
        json_schema_extra=HOW,
    )


StageName = Literal[
    "collect", "filter", "format", "cache_teacher", "distill", "merge",
    "stage2_format", "stage2_distill", "stage2_merge", "eval",
]  # fmt: skip


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
    batch_size: int = Field(
        4,
        ge=1,
        description="Sequences per teacher forward pass.",
        json_schema_extra=HOW,
    )


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
        json_schema_extra=HOW,
    )
    max_tokens: int | None = Field(32768, ge=1, description="Completion tokens per request (per turn); null: not sent.")


HELD_OUT = "held_out"
"""``eval.tasks: held_out`` in a recipe: the rows the distill stage held out of the formatted dataset."""


class EvalConfig(AgentLoopConfig):
    """``tracegen eval``: a served model on a task set, through the collect loop and filter's verifiers."""

    endpoint: EvalEndpointConfig = Field(
        default_factory=EvalEndpointConfig,
        description="The model under test (OpenAI-compatible; temperature 0.6, top_p 0.95, max_tokens 32768).",
    )
    samples: int = Field(1, ge=1, description="Answers sampled per task (accuracy averages over them).")
    require_markers: list[str] = Field(
        default_factory=list,
        description="Strings every answer's text must contain, counted per answer (with_markers): e.g. "
        "'Final Answer:' (proof cards), '</explore>', '<examine>', '<response>' (DualMind; <explore> is prompt).",
    )
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
    concurrency: int = Field(
        8,
        ge=1,
        description="Questions in flight at once.",
        json_schema_extra=HOW,
    )
    fail_on_error: float = Field(
        1.0, ge=0, le=1, description="Exit 1 when more than this fraction of answers ended in error."
    )

    def collect_config(self) -> CollectConfig:
        """The collect run that produces the answers: the model under test in the teacher's seat."""
        loop = self.model_dump(include=set(AgentLoopConfig.model_fields))
        teacher = self.endpoint.model_dump()
        return CollectConfig.model_validate({**loop, "teacher": teacher, "samples_per_task": self.samples})


class DataSource(Strict):
    """One source of the training table (``data.sources``)."""

    path: str = Field(description="A Hub dataset id, a local dataset folder, or a .jsonl / .parquet file.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Table column -> this source's column, where the names differ (others are read by the same name).",
    )
    rows: int | None = Field(None, ge=0, description="Rows the card states for this source (checked, reported).")


class DataConfig(Strict):
    """The training table built from the card's sources, before format (``tracegen.data.sources``)."""

    sources: list[DataSource] = Field(
        default_factory=list, description="Sources merged in order into one table; empty = use run.data."
    )
    columns: list[str] = Field(
        default_factory=lambda: ["question", "CoT", "response"],
        description="The table's columns (format.import_columns names them); every source must provide each.",
    )
    dedup_on: list[str] = Field(
        default_factory=lambda: ["question"],
        description="Rows whose values here repeat (whitespace-normalised), within or across sources, are kept "
        "once, the first; [] = no dedup.",
    )
    rows: int | None = Field(None, ge=0, description="Rows the card states for the merged table (checked, reported).")


class Recipe(Strict):
    """A reproducible pipeline: one section per stage."""

    name: str | None = None
    description: str | None = None
    collect: CollectConfig = Field(default_factory=CollectConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    format: FormatConfig = Field(default_factory=FormatConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    cache_teacher: CacheTeacherConfig = Field(default_factory=CacheTeacherConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    stage2: StageTwoConfig | None = Field(None, description="A second training stage on the merged model.")
    eval: EvalConfig | None = Field(None, description="The final model measured on a task set (the eval stage).")
    run: RunConfig = Field(default_factory=RunConfig)
    smoke: dict[str, Any] | None = Field(
        None, description="Overrides applied by `tracegen run --scale smoke` (tiny offline models and data)."
    )
