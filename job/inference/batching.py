"""Answering many prompts at once: continuous batching over a slot cache, or static batches as a fallback.

:func:`generate_many` is the one entry point. It returns, per prompt, the new tokens up to and including the
first stop token (or ``max_new_tokens`` of them) and whether a stop token ended it.

**The continuous engine** (Llama and Qwen2 families: every DeepSeek-R1-Distill model, SmolLM2) keeps a key/value
cache of ``slots`` rows, each as long as the longest prompt plus ``max_new_tokens``. Every step decodes one
token for every busy slot; a slot whose answer ends is refilled at once with the next prompt (its prompt runs
through the model alone, writing the slot's cache), so the GPU never waits for the longest answer of a batch.
Each slot keeps its own position, so no prompt is padded. The decoder layers run from the model's own modules
(norms, projections, MLP, so LoRA layers of an unmerged adapter, 4-bit layers or unsloth's kernels apply as
they are); only attention and the rotary embedding are computed here, attention as transformers' eager path
computes it (scores in the model's dtype, softmax in float32). The number of slots is sized from the free
GPU memory and logged with the reason; ``max_in_flight`` is only an upper bound.

**The static engine** (any other architecture, and ``engine="static"``) is transformers' ``generate`` on
batches of prompts sorted by length and left-padded, the engine ``medft eval`` had before; a row that ends
waits for its batch. It stays for other architectures and as the baseline arm of ``benchmarks/eval.py``.

Both engines pick tokens through :func:`job.inference.sampling.choose`: greedy is the first maximum, as in
``generate``; sampling is per-row seeded (``seeds[i]``), so a prompt's sample does not depend on what else
shares its batch. Greedy answers equal one-prompt-at-a-time ``generate``'s token for token up to floating-point
differences between batch shapes (exactly, on the CPU in float32: ``tests/unit/test_batching.py``).

``lengths`` (benchmarks and tests only) forces prompt i's answer to end with a stop token after exactly
``lengths[i]`` tokens: stop tokens are masked before that, forced then.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from job.inference.generate import Sampling, stop_ids
from job.inference.loading import Loaded, _device
from job.inference.sampling import choose
from registry.errors import ConfigError
from registry.logs import get_logger

log = get_logger(__name__)

#: ``progress(done, total)``: called as answers finish.
Progress = Callable[[int, int], None]
DEFAULT_MAX_IN_FLIGHT = 256
#: Static batches are not sized from memory: a fallback architecture runs at most this many rows at once.
STATIC_BATCH = 16
#: Share of the free GPU memory the slot cache may take; the rest is for logits, sampling and activations.
CACHE_SHARE = 0.85
#: Memory kept free for activations, beyond the logits of every slot (bytes).
RESERVE_BYTES = 2 << 30
_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_ATTN_BUCKET = 128  # attention reads the cache in multiples of this many positions: fewer distinct shapes


@dataclass(frozen=True)
class Completion:
    """One prompt's answer: ``ids`` up to and including its first stop token; ``stopped`` False when
    ``max_new_tokens`` ended it."""

    ids: list[int]
    stopped: bool


@dataclass(frozen=True)
class EnginePlan:
    """Which engine runs and with how many answers in flight, and why (logged as ``eval.engine``)."""

    engine: str
    slots: int
    cache_tokens: int
    reason: str


def _decoder(model: Any) -> Any:
    """The causal-LM module under any peft wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def unsupported(model: Any) -> str | None:
    """Why the continuous engine cannot run ``model`` (None when it can)."""
    inner = _decoder(model)
    name = type(inner).__name__
    if name not in _ARCHITECTURES:
        return f"{name} is not a Llama or Qwen2 model"
    config = inner.config
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return "sliding-window attention"
    attn = inner.model.layers[0].self_attn
    if getattr(attn, "q_norm", None) is not None:
        return "per-head query/key norms"
    return None


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _slot_bytes(config: Any, dtype_bytes: int, length: int) -> int:
    """One slot's keys and values over ``length`` positions, every layer."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * _head_dim(config) * dtype_bytes * length


def plan_engine(model: Any, prompts: Sequence[list[int]], max_new_tokens: int, max_in_flight: int | None,
                engine: str = "auto") -> EnginePlan:
    """How to run ``prompts``: the engine, the slots (answers in flight) and the reason for both."""
    upper = max_in_flight or DEFAULT_MAX_IN_FLIGHT
    if engine == "static":
        return EnginePlan("static", min(upper, len(prompts)), 0, "asked for the static engine")
    why_not = unsupported(model)
    if why_not is not None:
        if engine == "continuous":
            raise ConfigError(f"the continuous engine cannot run this model: {why_not}")
        rows = min(upper, STATIC_BATCH, len(prompts))
        return EnginePlan("static", rows, 0, f"static batches of {rows} (not sized from memory): {why_not}")
    import torch

    inner = _decoder(model)
    length = max(len(p) for p in prompts) + max_new_tokens
    want = min(upper, len(prompts))
    device = _device(model)
    if device.type != "cuda":
        return EnginePlan("continuous", want, length, f"{want} slots: min(upper bound {upper}, {len(prompts)} prompts)")
    torch.cuda.empty_cache()  # blocks an earlier generation or stage left cached count as free
    free, _ = torch.cuda.mem_get_info(device)
    per_slot = _slot_bytes(inner.config, inner.model.embed_tokens.weight.element_size(), length)
    logits = 8 * inner.config.vocab_size * 4  # float32 logits, probabilities and sort buffers per slot
    fits = int((free * CACHE_SHARE - RESERVE_BYTES) // (per_slot + logits))
    if fits < 1:
        raise ConfigError(f"{free / 2**30:.1f} GiB of GPU memory is free: not enough for one answer of {length} "
                          "tokens; lower --max-new-tokens")
    slots = min(want, fits)
    limit = "upper bound" if slots == upper else ("prompts" if slots == len(prompts) else "free GPU memory")
    return EnginePlan("continuous", slots, length,
                      f"{slots} slots of {length} tokens ({per_slot / 2**20:.0f} MiB each), limited by the {limit}: "
                      f"{free / 2**30:.1f} GiB free, upper bound {upper}, {len(prompts)} prompts")


def generate_many(loaded: Loaded, prompts: Sequence[list[int]], sampling: Sampling, *,
                  seeds: Sequence[int] | None = None, max_in_flight: int | None = None,
                  progress: Progress | None = None, engine: str = "auto",
                  lengths: Sequence[int] | None = None) -> list[Completion]:
    """Answer every prompt (token ids) with ``loaded``; see the module docstring.

    ``seeds[i]`` seeds prompt i's sample (default: ``sampling.seed`` or 0, plus i). ``engine``: ``auto``
    (continuous where the architecture allows), ``continuous`` or ``static``. Raises ConfigError when the
    tokenizer has no EOS token, the lists differ in length, or no answer fits the GPU's free memory.
    """
    if not prompts:
        return []
    stops = stop_ids(loaded)
    if not stops:
        raise ConfigError(f"{loaded.label}: its tokenizer defines no eos_token, so generation could not stop")
    if seeds is None:
        base = sampling.seed or 0
        seeds = [base + i for i in range(len(prompts))]
    if len(seeds) != len(prompts) or (lengths is not None and len(lengths) != len(prompts)):
        raise ConfigError("generate_many: one seed (and one forced length) per prompt")
    plan = plan_engine(loaded.model, prompts, sampling.max_new_tokens, max_in_flight, engine)
    log.info("eval.engine", ref=loaded.label, engine=plan.engine, slots=plan.slots, reason=plan.reason)
    run = _continuous if plan.engine == "continuous" else _static
    was_training = getattr(loaded.model, "training", False)
    loaded.model.eval()  # the job scores the model it is training: no dropout while answering
    started = time.perf_counter()
    try:
        out = run(loaded, list(prompts), sampling, list(seeds), plan, stops, progress, lengths)
    finally:
        loaded.model.train(was_training)
    seconds = time.perf_counter() - started
    tokens = sum(len(c.ids) for c in out)
    log.info("eval.generated", ref=loaded.label, engine=plan.engine, prompts=len(prompts), tokens=tokens,
             seconds=round(seconds, 2), tokens_per_s=round(tokens / seconds, 1) if seconds > 0 else None)
    return out


def _forced(logits: Any, stops: list[int], produced: Any, target: Any) -> Any:
    """``logits`` with stop tokens masked where ``produced + 1 < target`` and forced where it equals it."""
    import torch

    nxt = produced + 1
    early = (nxt < target)[:, None]
    logits[:, stops] = torch.where(early, torch.full_like(logits[:, stops], -math.inf), logits[:, stops])
    due = nxt == target
    if bool(due.any()):
        forced = torch.full_like(logits, -math.inf)
        forced[:, stops[0]] = 0.0
        logits = torch.where(due[:, None], forced, logits)
    return logits


# --- the continuous engine -------------------------------------------------------------------------------


class _SlotModel:
    """The decoder run over a slot cache: ``prefill`` one prompt into a slot, ``decode`` one token per slot."""

    def __init__(self, model: Any, slots: int, length: int) -> None:
        import torch

        self.inner = _decoder(model)
        config = self.inner.config
        self.layers = self.inner.model.layers
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.dim = _head_dim(config)
        weight = self.inner.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        shape = (slots, self.kv_heads, length, self.dim)
        self.keys = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.values = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.cos, self.sin = self._rotary(config, length)
        self.slots, self.length = slots, length

    def _rotary(self, config: Any, length: int) -> tuple[Any, Any]:
        """cos/sin tables for positions 0..length-1, as transformers' rotary embedding computes them."""
        import torch
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = getattr(config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        freqs = torch.arange(length, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * scaling).to(self.device, self.dtype), (emb.sin() * scaling).to(self.device, self.dtype))

    @staticmethod
    def _rotate(x: Any, cos: Any, sin: Any) -> Any:
        import torch

        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _layers(self, hidden: Any, attend: Callable[[int, Any, Any, Any], Any], positions: Any) -> Any:
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [rows, 1, tokens, dim]
        rows, tokens = hidden.shape[:2]
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(rows, tokens, self.heads, self.dim).transpose(1, 2)
            k = attn.k_proj(x).view(rows, tokens, self.kv_heads, self.dim).transpose(1, 2)
            v = attn.v_proj(x).view(rows, tokens, self.kv_heads, self.dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            out = attend(index, q, k, v)  # [rows, tokens, heads * dim]
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.inner.model.norm(hidden)

    def prefill(self, slot: int, prompt: list[int]) -> Any:
        """Run ``prompt`` alone, writing its keys and values into ``slot``; the last position's logits."""
        import torch
        import torch.nn.functional as F

        ids = torch.tensor([prompt], device=self.device)
        positions = torch.arange(len(prompt), device=self.device)[None]
        groups = self.heads // self.kv_heads

        def attend(index: int, q: Any, k: Any, v: Any) -> Any:
            self.keys[index][slot, :, :len(prompt)] = k[0]
            self.values[index][slot, :, :len(prompt)] = v[0]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.dim ** -0.5)
            return out.transpose(1, 2).reshape(1, len(prompt), self.heads * self.dim)

        hidden = self._layers(self.inner.model.embed_tokens(ids), attend, positions)
        return self.inner.lm_head(hidden[:, -1]).float()

    def decode(self, tokens: Any, positions: Any, span: int) -> Any:
        """One new token per slot (``tokens``/``positions``: ``[slots]``), attending to the first ``span``
        cache positions (the rest are masked per slot anyway); logits ``[slots, vocab]``."""
        import torch

        rows = torch.arange(self.slots, device=self.device)
        visible = torch.arange(span, device=self.device)[None, :] <= positions[:, None]
        hide = ~visible[:, None, None, :]
        groups = self.heads // self.kv_heads
        scale = self.dim ** -0.5

        def attend(index: int, q: Any, k: Any, v: Any) -> Any:
            self.keys[index][rows, :, positions] = k[:, :, 0]
            self.values[index][rows, :, positions] = v[:, :, 0]
            keys, values = self.keys[index][:, :, :span], self.values[index][:, :, :span]
            q = q.view(self.slots, self.kv_heads, groups, self.dim)
            scores = torch.matmul(q, keys.transpose(-1, -2)) * scale  # [slots, kv_heads, groups, span]
            scores = scores.masked_fill(hide, -math.inf)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
            return torch.matmul(probs, values).reshape(self.slots, 1, self.heads * self.dim)

        hidden = self._layers(self.inner.model.embed_tokens(tokens[:, None]), attend, positions[:, None])
        return self.inner.lm_head(hidden[:, 0]).float()


def _continuous(loaded: Loaded, prompts: list[list[int]], sampling: Sampling, seeds: list[int], plan: EnginePlan,
                stops: list[int], progress: Progress | None, lengths: Sequence[int] | None) -> list[Completion]:
    import torch

    runner = _SlotModel(loaded.model, plan.slots, plan.cache_tokens)
    device = runner.device
    stop_set = set(stops)
    limit = sampling.max_new_tokens
    queue = list(range(len(prompts)))
    queue.reverse()  # pop() takes prompts in order
    owner: list[int | None] = [None] * plan.slots
    produced: list[list[int]] = [[] for _ in prompts]
    done: dict[int, Completion] = {}
    tokens = torch.zeros(plan.slots, dtype=torch.long, device=device)
    positions = torch.zeros(plan.slots, dtype=torch.long, device=device)
    slot_seeds = torch.zeros(plan.slots, dtype=torch.long, device=device)
    steps = torch.zeros(plan.slots, dtype=torch.long, device=device)
    target = torch.full((plan.slots,), -1, dtype=torch.long, device=device)

    def pick(logits: Any, rows: Any) -> Any:
        if lengths is not None:
            logits = _forced(logits, stops, steps[rows], target[rows])
        return choose(logits, temperature=sampling.temperature, top_p=sampling.top_p,
                      seeds=slot_seeds[rows], steps=steps[rows])

    def accept(slot: int, token: int) -> bool:
        """Record ``token`` for the slot's prompt; True when its answer is complete (the slot is free)."""
        index = owner[slot]
        assert index is not None
        produced[index].append(token)
        stopped = token in stop_set
        if stopped or len(produced[index]) >= limit:
            done[index] = Completion(ids=produced[index], stopped=stopped)
            owner[slot] = None
            if progress is not None:
                progress(len(done), len(prompts))
            return True
        return False

    with torch.inference_mode():
        while queue or any(o is not None for o in owner):
            for slot in range(plan.slots):
                while owner[slot] is None and queue:
                    index = queue.pop()
                    owner[slot] = index
                    slot_seeds[slot], steps[slot] = seeds[index], 0
                    target[slot] = lengths[index] if lengths is not None else -1
                    logits = runner.prefill(slot, prompts[index])
                    first = int(pick(logits, torch.tensor([slot], device=device))[0])
                    positions[slot] = len(prompts[index])
                    tokens[slot], steps[slot] = first, 1
                    if accept(slot, first):
                        positions[slot] = 0
            busy = [s for s in range(plan.slots) if owner[s] is not None]
            if not busy:
                continue
            top = max(int(len(prompts[owner[s]]) + len(produced[owner[s]])) for s in busy)  # type: ignore[index]
            span = min(runner.length, -(-top // _ATTN_BUCKET) * _ATTN_BUCKET)
            logits = runner.decode(tokens, positions, span)
            chosen = pick(logits, torch.arange(plan.slots, device=device))
            tokens.copy_(chosen)
            positions += 1
            steps += 1
            picked = chosen.tolist()  # the step's one host synchronisation
            freed = [slot for slot in busy if accept(slot, int(picked[slot]))]
            if freed:  # an idle slot decodes in place at position 0 until a prompt takes it
                positions[freed] = 0
    return [done[i] for i in range(len(prompts))]


# --- the static engine -----------------------------------------------------------------------------------


class _Chooser:
    """A logits processor that makes ``generate`` take :func:`choose`'s token for every row (and honour forced
    lengths): every other token's score becomes -inf, so ``generate``'s greedy pick is the chosen one."""

    def __init__(self, sampling: Sampling, seeds: list[int], lengths: list[int] | None, width: int,
                 stops: list[int]) -> None:
        self.sampling, self.seeds, self.lengths, self.width, self.stops = sampling, seeds, lengths, width, stops

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        rows = input_ids.shape[0]
        step = input_ids.shape[1] - self.width
        steps = torch.full((rows,), step, dtype=torch.long, device=scores.device)
        logits = scores.float()
        if self.lengths is not None:
            target = torch.tensor(self.lengths, dtype=torch.long, device=scores.device)
            logits = _forced(logits, self.stops, steps, target)
        seeds = torch.tensor(self.seeds, dtype=torch.long, device=scores.device)
        picked = choose(logits, temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                        seeds=seeds, steps=steps)
        out = torch.full_like(scores, -math.inf)
        return out.scatter(-1, picked[:, None], 0.0)


def _static(loaded: Loaded, prompts: list[list[int]], sampling: Sampling, seeds: list[int], plan: EnginePlan,
            stops: list[int], progress: Progress | None, lengths: Sequence[int] | None) -> list[Completion]:
    import torch
    from transformers import LogitsProcessorList

    from job.inference.generate import generation_config

    greedy = Sampling(max_new_tokens=sampling.max_new_tokens, temperature=0.0)
    config = generation_config(loaded, greedy, stops)  # the chooser picks; generate only takes its pick
    pad_id = int(config.pad_token_id)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    stop_set = set(stops)
    done: dict[int, Completion] = {}
    device = getattr(loaded.model, "device", None) or _device(loaded.model)
    for start in range(0, len(order), plan.slots):
        batch = order[start:start + plan.slots]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
            mask[row, width - len(prompts[i]):] = 1
        chooser = _Chooser(sampling, [seeds[i] for i in batch], None if lengths is None else [lengths[i] for i in batch],
                           width, stops)
        with torch.inference_mode():
            out = loaded.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                        logits_processor=LogitsProcessorList([chooser]))
        for i, new in zip(batch, out[:, width:].tolist()):
            end = next((n for n, t in enumerate(new) if t in stop_set), None)
            done[i] = Completion(ids=new[:end + 1] if end is not None else new, stopped=end is not None)
        if progress is not None:
            progress(len(done), len(prompts))
    return [done[i] for i in range(len(prompts))]
