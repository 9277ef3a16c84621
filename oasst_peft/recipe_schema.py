"""The recipe's keys: ``Recipe`` and its ``peft`` section, each key with its type, default, range and meaning.

Reading a file, ``extends:``, ``--set`` and the one-line errors are in ``oasst_peft.config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from oasst_peft.bounds import PEFT_RANGES, QUANT_STORAGE, RANGES, SCHEDULERS, STEPS, check_range
from oasst_peft.errors import did_you_mean
from oasst_peft.shipped import DEEPSPEED_NAMES as SHIPPED_DEEPSPEED
from oasst_peft.tracking import check_report_to

DTYPES = ("fp16", "bf16", "fp32")


class PeftSection(BaseModel):
    """How weights are trained: all of them, or LoRA adapters on a full-precision or 4-bit base."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["full", "lora", "qlora"] = Field("lora", description="full | lora | qlora (4-bit NF4 base)")
    r: int = Field(16, description="LoRA rank (> 0)")
    alpha: float = Field(32, description="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.05, description="dropout on the LoRA input, 0 <= p < 1")
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' or a list of module names"
    )
    rslora: bool = Field(False, description="rank-stabilised LoRA scaling")
    dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    train_new_tokens: bool = Field(
        True,
        description="train the embedding rows of the added special tokens (needed to learn <|prompter|>)",
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (qlora)")
    bnb_4bit_use_double_quant: bool = Field(True, description="quantize the quantization constants (qlora)")
    bnb_4bit_quant_storage: str | None = Field(
        None, description="storage dtype of 4-bit weights; set to the model dtype automatically under ZeRO-3"
    )

    @field_validator("r")
    @classmethod
    def _r_positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be > 0 (typical: 8, 16, 64)")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0 (typical: twice r)")
        return v

    @field_validator(*PEFT_RANGES)
    @classmethod
    def _peft_in_range(cls, v, info):
        return check_range(info.field_name, v, PEFT_RANGES)

    @field_validator("bnb_4bit_quant_storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is not None and v not in QUANT_STORAGE:
            raise ValueError(f"must be one of {', '.join(QUANT_STORAGE)} (or absent)")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError("must be in [0, 1)")
        return v


class Recipe(BaseModel):
    """One training run. Defaults are the Open-Assistant trainer's own defaults unless noted."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(
        description="hub id (online only), local HF dir, .gguf file, or package:<pkg>/<file> for a file a "
        "Python package ships"
    )
    tokenizer_name: str | None = Field(None, description="tokenizer source when it differs from model_name")
    trust_remote_code: bool = Field(False, description="run code shipped with the model (off unless set)")
    dtype: Literal["fp16", "bf16", "fp32"] = Field("bf16", description="training precision; fp32 on CPU")
    max_length: int = Field(512, description="max tokens per conversation (>= 16)")
    learning_rate: float = Field(1e-5, description="peak learning rate (0 < lr < 1)")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    adam_beta1: float = Field(0.9, description="AdamW beta1")
    adam_beta2: float = Field(0.95, description="AdamW beta2 (OA used 0.95)")
    adam_epsilon: float = Field(1e-12, description="AdamW epsilon (OA used 1e-12)")
    max_grad_norm: float = Field(2.0, description="gradient clipping norm")
    lr_scheduler_type: str = Field(
        "linear", description="HF scheduler name, under DeepSpeed too (linear = OA's WarmupDecayLR)"
    )
    warmup_steps: int = Field(600, description="linear warmup steps")
    num_train_epochs: float = Field(3, description="epochs over the training mix")
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: use epochs)")
    per_device_train_batch_size: int = Field(2, description="micro-batch per device")
    per_device_eval_batch_size: int = Field(2, description="eval micro-batch per device")
    gradient_accumulation_steps: int = Field(32, description="micro-batches per optimizer step")
    gradient_checkpointing: bool | None = Field(
        None,
        description="recompute activations to save memory (unset: on for 7B-class models and larger, off below)",
    )
    eval_steps: int = Field(200, description="evaluate every N steps (when a validation split exists)")
    sample_on_eval: bool = Field(
        False, description="at each eval, log greedy replies to the cards' widget prompts"
    )
    save_steps: int = Field(1000, description="checkpoint every N steps")
    save_strategy: Literal["steps", "epoch", "no"] = Field("steps", description="when to checkpoint")
    save_total_limit: int | None = Field(4, description="keep at most N checkpoints")
    logging_steps: int = Field(10, description="log loss every N steps")
    residual_dropout: float = Field(0.0, description="dropout on residual/hidden states (SFT-4 used 0.2)")
    use_flash_attention: bool = Field(
        False, description="flash_attention_2 when installed on CUDA, else sdpa"
    )
    output_dir: str = Field("saved_model", description="where the run writes (relative to the current dir)")
    log_dir: str | None = Field(None, description="tensorboard log dir (default: <output_dir>/runs)")
    report_to: list[str] | str | None = Field(
        None,
        description="trackers: tensorboard, wandb, mlflow or none, e.g. [tensorboard, mlflow] (default: "
        "tensorboard when installed); wandb runs offline and mlflow writes inside output_dir unless told otherwise",
    )
    deepspeed_config: str | None = Field(
        None, description="zero2 | zero3 | zero2-offload | zero3-offload | JSON path"
    )
    datasets: list[Any] = Field(description="the data mix: names or {name: {options}}")
    sort_by_length: bool | None = Field(
        None, description="batch conversations of similar length together (unset: on unless packing)"
    )
    packing: Literal["auto"] | bool = Field(
        "auto",
        description="pack conversations into max_length rows without padding: auto = with flash attention "
        "(length grouping otherwise), true = always (one-line error if the attention cannot keep them apart), "
        "false = never",
    )
    fused_loss: bool = Field(
        True, description="TRL's chunked LM-head loss (never builds the full logits); false = plain HF loss"
    )
    use_liger_kernel: bool = Field(
        False, description="Liger's Triton kernels (RMSNorm, RoPE, SwiGLU); needs liger-kernel and a CUDA GPU"
    )
    use_kernels: bool = Field(
        False, description="Hugging Face Hub kernels for the model's layers; needs the kernels package"
    )
    use_custom_sampler: bool = Field(
        False, description="accepted for OA recipes; fraction/max_train_set apply without it here"
    )
    peft: PeftSection | None = Field(None, description="absent or mode: full -> full-weight training")
    chat_template: str = Field("oasst", description="oasst (default) or a path to a Jinja file")
    eos_token: str | None = Field(None, description="end-of-turn token (default <|endoftext|>, else the eos)")
    pad_vocab_multiple: int = Field(16, description="resize the embedding to a multiple of this")
    excess_length: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="over-long conversations: cut at a turn boundary, drop, or fail"
    )
    seed: int = Field(2703368087, description="seed for data splits, sampling and init (OA's rng_seed)")
    cache_dir: str | None = Field(None, description="tokenized-data cache (default ~/.cache/oasst-peft)")

    _recipe_path: Path | None = PrivateAttr(None)

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, v: int) -> int:
        if v < 16:
            raise ValueError("must be >= 16 tokens (the seeds used 2048-5120)")
        return v

    @field_validator("learning_rate")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError("must be > 0 and < 1 (the seeds used 6e-6 to 1e-5; LoRA typically 1e-4 to 2e-4)")
        return v

    @field_validator(
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
    )
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be >= 1")
        return v

    @field_validator("eval_steps", "save_steps", "warmup_steps")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v):
        return check_report_to(v)

    @field_validator("residual_dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError("must be in [0, 1)")
        return v

    @field_validator("num_train_epochs")
    @classmethod
    def _epochs(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator(*RANGES)
    @classmethod
    def _in_range(cls, v, info):
        return check_range(info.field_name, v)

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, v: int) -> int:
        if v != -1 and not 1 <= v <= STEPS:
            raise ValueError(f"must be -1 (train by epochs) or between 1 and {STEPS}")
        return v

    @field_validator("lr_scheduler_type")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            raise ValueError(f"must be one of {', '.join(SCHEDULERS)}" + did_you_mean(v, SCHEDULERS))
        return v

    @field_validator("datasets")
    @classmethod
    def _datasets_non_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("the mix is empty: list at least one dataset")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        ds = self.deepspeed_config
        if ds and ds not in SHIPPED_DEEPSPEED and not ds.endswith(".json"):
            raise ValueError(
                f"deepspeed_config: '{ds}' is neither a shipped config ({', '.join(SHIPPED_DEEPSPEED)}) nor a "
                ".json path" + did_you_mean(ds, SHIPPED_DEEPSPEED)
            )
        return self

    @property
    def mode(self) -> str:
        """full | lora | qlora."""
        return self.peft.mode if self.peft else "full"

    @property
    def recipe_dir(self) -> Path:
        """The folder relative paths in the recipe are resolved against."""
        return self._recipe_path.parent if self._recipe_path else Path.cwd()

    @property
    def recipe_path(self) -> Path | None:
        return self._recipe_path

    def output_path(self, override: str | Path | None = None) -> Path:
        """The run's folder: ``override`` (``--output-dir``) or ``output_dir``, relative to the current dir,
        ``~`` expanded (as transformers expands it for checkpoints, so a run is never split in two)."""
        return Path(override or self.output_dir).expanduser()

    def resolve_path(self, value: str) -> Path:
        """A path from the recipe, relative to the recipe file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.recipe_dir / p)

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what gets saved beside every output)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


RECIPE_KEYS = tuple(Recipe.model_fields)
PEFT_KEYS = tuple(PeftSection.model_fields)
