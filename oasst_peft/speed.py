"""Batching, decided per run: packing or length-grouped batches, and the length-grouped sampler.

Chat data wastes compute on padding when a short conversation is batched with a long one. Two cures:

- **packing** (TRL's best-fit-decreasing ``packing_strategy="bfd"``, padding-free): conversations are laid
  end to end into rows of ``max_length`` tokens, each restarting its ``position_ids`` at 0. That is only
  correct when the attention keeps every conversation to itself: flash attention's varlen kernels do (they
  read the boundaries from ``position_ids``), and so do sdpa/eager on the architectures whose mask builder
  turns restarting ``position_ids`` into a block-diagonal mask (transformers' ``create_causal_mask``, with
  no KV cache). ``keeps_packed_apart`` proves the latter on a tiny random copy of the model's architecture
  instead of assuming it. sdpa/eager still compute the whole packed row's attention, masked, so packing
  pays off automatically only with flash attention (on CPU with sdpa, ``benchmarks/train_throughput.py``'s
  model trains 0.4x as many tokens/s packed as length-grouped, with twice the memory);
- **length grouping** (``train_sampling_strategy="group_by_length"``): batches of conversations of similar
  length, so each is padded to a near neighbour instead of to the longest of a random batch. Every
  conversation is still seen exactly once per epoch; only the order changes.

``packing: auto`` packs with flash attention and groups by length otherwise; ``packing: true`` packs or
stops with one line when the attention would let packed conversations see each other.

The attention this is decided for, the kernel checks and the gradient-checkpointing default are the run's
settings (``oasst_peft.settings``), decided once before anything loads.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from oasst_peft.errors import OasstError

# Attention implementations whose kernels take the packed sequences' boundaries from position_ids.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
PROBE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Batching:
    """How conversations become batches in this run."""

    packing: bool
    group_by_length: bool
    reason: str

    @property
    def name(self) -> str:
        return "packing" if self.packing else "length-grouped" if self.group_by_length else "random"

    def line(self) -> str:
        """The one line ``train`` prints."""
        return f"batching: {self.name} ({self.reason})"

    def sft_kwargs(self) -> dict:
        """TRL ``SFTConfig`` arguments for this batching."""
        if self.packing:
            # bfd implies padding-free: the batch is one row; position_ids restart at every conversation.
            return {
                "packing": True,
                "packing_strategy": "bfd",
                "padding_free": True,
                "train_sampling_strategy": "random",
            }
        return {
            "packing": False,
            "padding_free": False,
            "train_sampling_strategy": "group_by_length" if self.group_by_length else "random",
        }


def _probe_config(config):
    """A one-layer, narrow copy of ``config``: same architecture and attention code, tiny sizes."""
    small = copy.deepcopy(config)
    heads = 4
    sizes = {
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "intermediate_size": 128,
        "vocab_size": 128,
    }
    for key, value in sizes.items():
        setattr(small, key, value)
    if getattr(small, "num_key_value_heads", None):
        small.num_key_value_heads = 2
    if getattr(small, "head_dim", None):
        small.head_dim = 64 // heads
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(small, key, None) is not None:
            setattr(small, key, 0)
    return small


def keeps_packed_apart(config, attn_implementation: str) -> bool:
    """True when ``attn_implementation`` on ``config``'s architecture keeps packed sequences from seeing each other.

    Flash attention's varlen kernels do by construction. For sdpa/eager this runs a random one-layer copy of
    the architecture on two sequences packed in one row (``position_ids`` restarting at 0, no attention mask,
    no cache, as the padding-free collator feeds it) and on each alone: the outputs must agree.
    """
    if attn_implementation in VARLEN_ATTENTION:
        return True
    from transformers import AutoModelForCausalLM

    try:
        small = _probe_config(config)
        small._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(
                small, dtype=torch.float32, attn_implementation=attn_implementation
            ).eval()
            a = torch.randint(1, 128, (1, 9))
            b = torch.randint(1, 128, (1, 6))
        with torch.no_grad():
            alone = torch.cat([model(a, use_cache=False).logits, model(b, use_cache=False).logits], dim=1)
            position_ids = torch.cat([torch.arange(9), torch.arange(6)])[None]
            packed = model(torch.cat([a, b], dim=1), position_ids=position_ids, use_cache=False).logits
    except Exception:  # an architecture the probe cannot build or run: not proven, so not packed
        return False
    return bool((packed - alone).abs().max() < PROBE_TOLERANCE)


def choose_batching(recipe, attn_implementation: str | None, config=None) -> Batching:
    """Packing, length grouping or random batches, from the recipe's ``packing``/``sort_by_length`` and the attention.

    ``attn_implementation`` is the loaded model's (``model.config._attn_implementation``); ``config`` its config,
    used to probe sdpa/eager when the recipe asks for ``packing: true``. Without them nothing is packed.
    """
    packing = recipe.packing
    group = recipe.sort_by_length is not False
    attn = attn_implementation or "unknown"
    if packing is False:
        return Batching(False, group, "packing: false" + ("" if group else "; sort_by_length: false"))
    if attn in VARLEN_ATTENTION:
        return Batching(
            True, False, f"packing: {str(packing).lower()}; {attn} keeps packed conversations apart"
        )
    if packing == "auto":
        why = f"packing: auto packs with flash attention only, attention here is {attn}"
        return Batching(False, group, why + ("" if group else "; sort_by_length: false"))
    if config is not None and attn_implementation and keeps_packed_apart(config, attn_implementation):
        return Batching(
            True, False, f"packing: true; {attn} masks each packed conversation on this architecture"
        )
    raise OasstError(
        f"packing: true, but {attn} attention on this model would let packed conversations attend to each other; "
        "use flash attention (use_flash_attention: true, flash-attn on a CUDA GPU) or set packing: auto"
    )


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Every example once per epoch, in batches of similar length, in random order.

    Like transformers' ``LengthGroupedSampler``: a random permutation is cut into mega-batches, each sorted by
    length and cut into batches; here the batches of a mega-batch are then shuffled (no long-to-short ramp)
    and a mega-batch holds up to ``MEGABATCH`` batches whatever the dataset size (transformers shrinks it to
    a quarter of a small dataset, which leaves much of the padding in). The batch with the longest example
    comes first, so an out-of-memory shows at once. A short last batch stays last, keeping batches aligned.

    ``batch_size`` is the global batch (per device x processes): each process takes its share of every
    batch, so one process with batch 8 sees the same batches as two with 4. The order depends only on
    ``seed`` and the epoch (``set_epoch``, called by the Trainer), so every rank draws the same one and a
    resumed run replays it.
    """

    MEGABATCH = 64

    def __init__(self, lengths, batch_size: int, seed: int = 0):
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in order."""
        n, size = len(self.lengths), self.batch_size
        if n == 0:
            return []
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=generator).tolist()
        step = size * self.MEGABATCH
        batches: list[list[int]] = []
        for start in range(0, n, step):
            mega = sorted(perm[start : start + step], key=self.lengths.__getitem__, reverse=True)
            cut = [mega[i : i + size] for i in range(0, len(mega), size)]
            short = cut.pop() if len(cut[-1]) < size else None
            order = torch.randperm(len(cut), generator=generator).tolist()
            batches += [cut[i] for i in order] + ([short] if short else [])
        longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
        if len(batches[longest]) == size:  # a short batch must stay last
            batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def __iter__(self):
        return iter([i for batch in self.batches() for i in batch])


class SeededRandomSampler(torch.utils.data.Sampler):
    """Every example once per epoch in a random order that depends only on ``seed`` and the epoch.

    The random-order path's sampler (packed rows, or ``sort_by_length: false``): like ``LengthGroupedSampler``
    it is the project's own, so ``SamplerEpoch`` can set its epoch where accelerate's wrappers do not.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = int(size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


PROJECT_SAMPLERS = (LengthGroupedSampler, SeededRandomSampler)


def train_sampler(args, dataset):
    """The project's sampler for the Trainer's training set, or None (an unsized dataset: the Trainer decides).

    Length-grouped batches cut by the global batch (per device x processes), or a seeded random order.
    """
    if dataset is None or not hasattr(dataset, "__len__"):
        return None
    if args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "with_format"):
        size = args.train_batch_size * args.world_size  # the global batch
        return LengthGroupedSampler(example_lengths(dataset), size, seed=args.seed)
    if args.train_sampling_strategy in ("random", "group_by_length"):
        return SeededRandomSampler(len(dataset), seed=args.seed)
    return None


def project_samplers(loader) -> list:
    """The project's samplers inside ``loader``, however deeply accelerate and the Trainer wrapped them.

    On resume the chain is SkipBatchSampler -> BatchSamplerShard -> BatchSampler -> sampler; neither
    accelerate's ``set_epoch`` nor the Trainer's reaches that deep with more than one process.
    """
    found, seen, stack = [], set(), [loader]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, PROJECT_SAMPLERS):
            found.append(obj)
            continue
        for name in ("batch_sampler", "sampler", "base_dataloader", "dataloader", "_loader"):
            try:
                stack.append(getattr(obj, name, None))
            except Exception:  # a property that cannot answer for this loader
                continue
    return found


def epoch_of(state) -> int:
    """The epoch index a Trainer state is in (``state.epoch`` is fractional inside an epoch)."""
    return int(math.floor((state.epoch or 0.0) + 1e-6))


class SamplerEpoch(TrainerCallback):
    """At each epoch's start, set the epoch on every project sampler of the training loader.

    So a resumed run draws the resumed epoch's order on every rank (not epoch 0's, as it would with two
    processes), and so does every later epoch.
    """

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        epoch = epoch_of(state)
        for sampler in project_samplers(train_dataloader):
            sampler.set_epoch(epoch)
        return control


def example_lengths(dataset, column: str = "input_ids") -> list[int]:
    """Token counts of a ``datasets.Dataset`` column, read from Arrow without decoding the rows."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")[column]).to_pylist()


def planned_batching(recipe, settings, config=None) -> Batching:
    """The batching a run of ``recipe`` uses with ``settings`` (``RunSettings``), decided before weights load.

    ``config`` is the base model's config (read with ``model_info.load_model_config`` when not given; a
    model whose config cannot be read here is not packed).
    """
    from oasst_peft.model_info import default_attention, load_model_config

    if config is None:
        try:
            config = load_model_config(recipe.model_name, recipe.recipe_dir, recipe.trust_remote_code)
        except OasstError:
            return choose_batching(recipe, settings.attention or "sdpa", None)
    return choose_batching(recipe, settings.attention or default_attention(config), config)
