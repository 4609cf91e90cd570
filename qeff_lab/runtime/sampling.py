"""Token choice after the logits: greedy, or sampling with HF's meanings, driven by explicit uniform random numbers.

`SamplingParams` holds one request's settings (validated on construction). `choose_tokens` is the reference:
per-row parameters, vectorized, applied in HF's order

    token bitmask (guided decoding; masked -> -inf)
    repetition_penalty  (HF RepetitionPenaltyLogitsProcessor: prompt and generated tokens; x<0: x*p, else x/p)
    presence_penalty    (not in HF: OpenAI/vLLM/QEfficient meaning, minus p once for each token generated so far)
    -> greedy scores
    temperature, top_k, top_p, min_p  (HF TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                                       MinPLogitsWarper, min_tokens_to_keep=1)
    -> sampling scores

and picks argmax of the greedy scores (do_sample=False or temperature 0) or samples by the Gumbel-max trick
among the top `K` candidates of the greedy scores (`sample_top_k_ids`: the warpers run on those K): candidate of
rank r (descending) gets `-log(-log(u[r]))` from the uniforms `random_numbers [B, K]` and the largest sum wins
(the same distribution as `torch.multinomial(softmax(scores))`, but reproducible from the numbers alone).
`K = vocab_size` on the host by default (exactly HF); the in-graph sampler (transforms.sampler, the same
functions exported) uses QEfficient's `max_top_k_ids`, and a host sampler given the same K picks the same tokens.

`TokenChooser.step` is what the generation loops call: it runs one runner step and returns the chosen ids, with
the host sampler over the logits, or, when the graph has the sampler (`runner.include_sampler`), by feeding it
`sampler_feeds` (QEfficient's input names) and reading `next_tokens`.

`HostSampler` keeps each request's state (its generator, seen and generated tokens) so a request draws the
same numbers however it is scheduled: its generator is seeded by `(seed, request index)`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from qeff_lab.contracts import LAST_ACCEPTED_OUTPUT_TOKENS, RANDOM_NUMBERS, TOKEN_BITMASKS

NEG_INF = float("-inf")
# Uniforms are drawn in [0, 1) and clipped into the open interval, so -log(-log(u)) is always finite.
U_MIN, U_MAX = np.float32(1e-7), np.float32(1.0 - 6e-8)


@dataclass(frozen=True)
class SamplingParams:
    """One request's token choice. Defaults are transformers' (`GenerationConfig`: temperature 1, top_k 50,
    top_p 1); `do_sample=False` or `temperature=0` is greedy (penalties and the mask still apply).
    `top_k=0` and `top_p=1` and `min_p=0` switch that filter off. `seed` makes sampling reproducible."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        def number(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"{name} must be a number, got {value!r}")
            return float(value)

        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if number("temperature", self.temperature) < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not 0 < number("top_p", self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 switches it off), got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 switches it off), got {self.top_k!r}")
        if not 0 <= number("min_p", self.min_p) <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 switches it off), got {self.min_p!r}")
        if number("repetition_penalty", self.repetition_penalty) <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 switches it off), got {self.repetition_penalty!r}")
        number("presence_penalty", self.presence_penalty)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the argmax: the loop may skip the sampler entirely."""
        return self.greedy and self.repetition_penalty == 1 and self.presence_penalty == 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        """HF-style keyword arguments; None means the default (as `generate(top_k=None)` does in HF)."""
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"Unknown sampling argument(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


def params_tensors(params: Sequence[SamplingParams]) -> dict[str, torch.Tensor]:
    """Per-row parameter columns ([B] each), the layout `process_logits` and the in-graph sampler take."""
    return {"temperatures": torch.tensor([0.0 if p.greedy else p.temperature for p in params], dtype=torch.float32),
            "top_ks": torch.tensor([p.top_k for p in params], dtype=torch.int64),
            "top_ps": torch.tensor([p.top_p for p in params], dtype=torch.float32),
            "min_ps": torch.tensor([p.min_p for p in params], dtype=torch.float32),
            "repetition_penalties": torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32),
            "presence_penalties": torch.tensor([p.presence_penalty for p in params], dtype=torch.float32)}


# ----------------------------------------------------------------------------- the reference
def penalize(logits: torch.Tensor, repetition_penalties: torch.Tensor, presence_penalties: torch.Tensor,
             seen: torch.Tensor | None, generated: torch.Tensor | None,
             token_bitmasks: torch.Tensor | None = None) -> torch.Tensor:
    """Bitmask, repetition penalty (tokens in `seen` [B,V]: prompt and generated), presence penalty (tokens in
    `generated` [B,V]). Returns the greedy scores [B,V]."""
    scores = logits.to(torch.float32)
    if token_bitmasks is not None:
        scores = torch.where(token_bitmasks.bool(), scores, torch.full((), NEG_INF))
    if seen is not None:
        p = repetition_penalties.to(torch.float32)[:, None]
        penalized = torch.where(scores < 0, scores * p, scores / p)
        scores = torch.where(seen.bool(), penalized, scores)
    if generated is not None:
        scores = scores - presence_penalties.to(torch.float32)[:, None] * generated.to(torch.float32)
    return scores


def warp(scores: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
         min_ps: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p with per-row values, each exactly as HF's warper of that name (rows with
    temperature 0 are greedy: scaled by 1 here, their token is the argmax anyway)."""
    B, V = scores.shape
    t = torch.where(temperatures > 0, temperatures, torch.ones_like(temperatures)).to(torch.float32)
    scores = scores / t[:, None]
    # top-k: remove every score below the k-th largest (0: off)
    k = torch.where(top_ks > 0, top_ks.clamp(max=V), torch.full_like(top_ks, V))
    kth = torch.sort(scores, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    scores = scores.masked_fill(scores < kth, NEG_INF)
    # top-p: ascending sort, remove while the cumulative probability stays <= 1 - p; the top token always stays
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_ps.to(torch.float32))[:, None]
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted) & (top_ps < 1)[:, None]
    scores = scores.masked_fill(remove, NEG_INF)
    # min-p: remove probabilities below min_p times the top probability; the top token always stays
    probs = scores.softmax(dim=-1)
    remove = probs < min_ps.to(torch.float32)[:, None] * probs.amax(dim=-1, keepdim=True)
    top = probs.argmax(dim=-1, keepdim=True)
    remove = remove.scatter(1, top, torch.zeros_like(top, dtype=torch.bool))
    return scores.masked_fill(remove, NEG_INF)


def gumbel_pick(values: torch.Tensor, indices: torch.Tensor, random_numbers: torch.Tensor) -> torch.Tensor:
    """Gumbel-max over candidates already in descending order (`values`, their token `indices` [B,K]):
    candidate of rank r gets `-log(-log(u[r]))`. Token ids [B]."""
    k = int(values.shape[1])
    u = random_numbers[:, :k].to(torch.float32).clamp(float(U_MIN), float(U_MAX))
    choice = (values - torch.log(-torch.log(u))).argmax(dim=-1, keepdim=True)
    return indices.gather(1, choice)[:, 0]


def gumbel_choice(scores: torch.Tensor, random_numbers: torch.Tensor) -> torch.Tensor:
    """Gumbel-max over the top K = random_numbers.shape[1] candidates of each row: token ids [B]."""
    k = min(int(random_numbers.shape[1]), int(scores.shape[1]))
    values, indices = torch.topk(scores, k, dim=-1)
    return gumbel_pick(values, indices, random_numbers)


def sample_top_k_ids(scores: torch.Tensor, params: dict[str, torch.Tensor], random_numbers: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampling half of the token choice, shared by the host and the in-graph sampler: the top
    K = random_numbers.shape[1] candidates (QEfficient's `max_top_k_ids`; K = vocab on the host by default),
    warped among themselves (temperature, top-k, top-p, min-p), then Gumbel-max. Returns (token ids [B],
    candidate ids [B,K], warped candidate scores [B,K]). With K = vocab it equals warping the whole row."""
    k = min(int(random_numbers.shape[1]), int(scores.shape[1]))
    values, indices = torch.topk(scores, k, dim=-1)
    warped = warp(values, params["temperatures"], params["top_ks"], params["top_ps"], params["min_ps"])
    return gumbel_pick(warped, indices, random_numbers), indices, warped


def choose_tokens(logits: torch.Tensor, params: dict[str, torch.Tensor], random_numbers: torch.Tensor | None,
                  seen: torch.Tensor | None = None, generated: torch.Tensor | None = None,
                  token_bitmasks: torch.Tensor | None = None) -> torch.Tensor:
    """The reference token choice for a batch of rows [B,V] with per-row `params` (see `params_tensors`):
    argmax for rows with temperature 0, Gumbel-max over `random_numbers [B,K]` otherwise."""
    scores = penalize(logits, params["repetition_penalties"], params["presence_penalties"], seen, generated,
                      token_bitmasks)
    greedy = scores.argmax(dim=-1)
    sampling = params["temperatures"] > 0
    if random_numbers is None or not bool(sampling.any()):
        return greedy
    return torch.where(sampling, sample_top_k_ids(scores, params, random_numbers)[0], greedy)


# ----------------------------------------------------------------------------- per-request state on the host
class RequestSampling:
    """One request's sampling state: params, its own generator, the tokens it has seen and generated."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Sequence[int], index: int,
                 token_bitmask: np.ndarray | None = None):
        self.params = params
        seed = params.seed
        self.rng = np.random.default_rng(None if seed is None else [seed, index])
        self.seen = np.zeros(vocab_size, bool)
        self.seen[[t for t in prompt_ids if 0 <= t < vocab_size]] = True
        self.generated = np.zeros(vocab_size, bool)
        self.token_bitmask = None if token_bitmask is None else np.asarray(token_bitmask, bool)
        if self.token_bitmask is not None and (self.token_bitmask.shape != (vocab_size,) or not self.token_bitmask.any()):
            raise ValueError(f"token_bitmask must be a bool array of shape ({vocab_size},) with at least one allowed "
                             f"token, got shape {self.token_bitmask.shape} with {int(self.token_bitmask.sum())} allowed.")

    def random_numbers(self, k: int) -> np.ndarray:
        return np.clip(self.rng.random(k, dtype=np.float32), U_MIN, U_MAX)

    def observe(self, token: int) -> None:
        if 0 <= token < self.seen.shape[0]:
            self.seen[token] = self.generated[token] = True


class HostSampler:
    """Chooses the next token of each row on the host from the logits, per request (see module doc)."""

    def __init__(self, vocab_size: int, max_top_k_ids: int | None = None):
        self.vocab_size = vocab_size
        self.k = min(max_top_k_ids or vocab_size, vocab_size)

    def choose(self, logits: np.ndarray, states: Sequence[RequestSampling]) -> np.ndarray:
        """logits [n, V] for n requests (in `states` order) -> token ids [n]; updates each state."""
        logits_t = torch.from_numpy(np.ascontiguousarray(logits, np.float32)).reshape(len(states), -1)
        params = params_tensors([s.params for s in states])
        rnd = None
        if any(not s.params.greedy for s in states):
            rnd = torch.from_numpy(_random_numbers(states, self.k))
        bitmask = None
        if any(s.token_bitmask is not None for s in states):
            bitmask = torch.from_numpy(_bitmasks(states, self.vocab_size))
        tokens = choose_tokens(logits_t, params, rnd, torch.from_numpy(np.stack([s.seen for s in states])),
                               torch.from_numpy(np.stack([s.generated for s in states])), bitmask).numpy()
        for s, t in zip(states, tokens):
            s.observe(int(t))
        return tokens


def resolve_sampling(n_prompts: int, sampling=None, **kwargs) -> list[SamplingParams]:
    """One SamplingParams per prompt from `sampling` (one for all, or a list) or HF-style keyword arguments."""
    given = {k: v for k, v in kwargs.items() if v is not None}
    if sampling is not None and given:
        raise TypeError(f"Pass either sampling=... or the keyword arguments {sorted(given)}, not both.")
    if sampling is None:
        return [SamplingParams.from_kwargs(**given)] * n_prompts
    if isinstance(sampling, SamplingParams):
        return [sampling] * n_prompts
    sampling = list(sampling)
    if len(sampling) != n_prompts or not all(isinstance(s, SamplingParams) for s in sampling):
        raise ValueError(f"sampling must be one SamplingParams or a list of {n_prompts} (one per prompt), got "
                         f"{len(sampling)} item(s).")
    return sampling


class TokenChooser:
    """What the generation loops call for each runner step: `step(runner, ids, pos, batch_index, requests, decode)`
    runs the step and returns the next token of each row that names a request. On the host: plain argmax when
    every request is plain greedy without a mask (the fast path), otherwise a HostSampler over per-request states.
    With an in-graph sampler (`runner.include_sampler`): the step gets the sampling inputs (each request's
    parameters, random numbers drawn from its own generator, its bitmask) and returns the ids directly."""

    def __init__(self, prompt_ids: Sequence[Sequence[int]], sampling: Sequence[SamplingParams] | None = None,
                 token_bitmasks=None, max_top_k_ids: int | None = None, in_graph: bool = False,
                 guided: bool = False):
        self.prompt_ids = prompt_ids
        self.sampling = list(sampling) if sampling is not None else [SamplingParams()] * len(prompt_ids)
        if len(self.sampling) != len(prompt_ids):
            raise ValueError(f"{len(self.sampling)} sampling settings for {len(prompt_ids)} prompts.")
        if token_bitmasks is not None:
            masks = np.asarray(token_bitmasks, bool)
            token_bitmasks = [masks] * len(prompt_ids) if masks.ndim == 1 else list(masks)
            if len(token_bitmasks) != len(prompt_ids):
                raise ValueError(f"token_bitmasks: one mask [vocab] for all prompts or one per prompt "
                                 f"[{len(prompt_ids)}, vocab], got {masks.shape}.")
            if in_graph and not guided:
                raise ValueError("token_bitmasks were given but this graph's sampler has no token_bitmasks input: "
                                 "load with qaic_config={'include_sampler': True, 'include_guided_decoding': True}.")
        self.token_bitmasks = token_bitmasks
        self.max_top_k_ids = max_top_k_ids
        self.in_graph, self.guided = in_graph, guided
        self.plain = not in_graph and token_bitmasks is None and all(p.plain_greedy for p in self.sampling)
        self.states: dict[int, RequestSampling] = {}
        self.sampler: HostSampler | None = None

    @classmethod
    def for_runner(cls, runner, prompt_ids, sampling=None, token_bitmasks=None) -> "TokenChooser":
        """The chooser for this runner: in the graph when it has the sampler, on the host otherwise."""
        if getattr(runner, "include_sampler", False):
            return cls(prompt_ids, sampling, token_bitmasks, runner.max_top_k_ids, in_graph=True,
                       guided=TOKEN_BITMASKS in runner.sampler_inputs)
        return cls(prompt_ids, sampling, token_bitmasks, getattr(runner, "max_top_k_ids", None))

    def _state(self, i: int, vocab_size: int) -> RequestSampling:
        if i not in self.states:
            mask = self.token_bitmasks[i] if self.token_bitmasks is not None else None
            self.states[i] = RequestSampling(self.sampling[i], vocab_size, self.prompt_ids[i], i, mask)
        return self.states[i]

    def choose(self, logits: np.ndarray, indices: Sequence[int]) -> np.ndarray:
        """Host choice: logits [n, V] of requests `indices` -> token ids [n]."""
        logits = np.asarray(logits, np.float32).reshape(len(indices), -1)
        if self.plain:
            return logits.argmax(-1)
        if self.sampler is None:
            self.sampler = HostSampler(logits.shape[-1], self.max_top_k_ids)
        return self.sampler.choose(logits, [self._state(i, logits.shape[-1]) for i in indices])

    def step(self, runner, input_ids: np.ndarray, position_ids: np.ndarray, batch_index: np.ndarray | None,
             requests: Sequence[int | None], decode: bool) -> np.ndarray:
        """One runner step over `input_ids [B,S]`; returns [B] ids, the next token of each row whose entry in
        `requests` names a request (-1 elsewhere: rows mid-prompt, free slots). `decode`: the rows feed their
        last generated token (the in-graph sampler counts it for the presence penalty)."""
        rows = [r for r, i in enumerate(requests) if i is not None]
        out = np.full(len(requests), -1, np.int64)
        if not self.in_graph:
            args = (input_ids, position_ids) if batch_index is None else (input_ids, position_ids, batch_index)
            logits = runner.step(*args)[:, -1]
            if rows:
                out[rows] = self.choose(logits[rows], [requests[r] for r in rows])
            return out
        feeds = sampler_feeds([self._state(i, runner.vocab_size) if i is not None else None for i in requests],
                              input_ids, position_ids, decode, self.max_top_k_ids, runner.vocab_size, self.guided)
        tokens = np.asarray(runner.step(input_ids, position_ids, batch_index, **feeds)).reshape(len(requests))
        for r in rows:
            self.states[requests[r]].observe(int(tokens[r]))
            out[r] = tokens[r]
        return out


def sampler_feeds(states: Sequence[RequestSampling | None], input_ids: np.ndarray, position_ids: np.ndarray,
                  decode: bool, max_top_k_ids: int, vocab_size: int, guided: bool) -> dict[str, np.ndarray]:
    """The in-graph sampler's inputs for one step (QEfficient's names and layout): each row's parameters, K random
    numbers from its request's generator (only rows that sample draw), its bitmask; rows without a request
    (None) are greedy and unmasked."""
    params = params_tensors([s.params if s is not None else SamplingParams() for s in states])
    feeds = {name: params[name].numpy().reshape(-1, 1) for name in params}
    feeds["top_ks"] = feeds["top_ks"].astype(np.int32)
    feeds[RANDOM_NUMBERS] = _random_numbers(states, max_top_k_ids)
    last = np.where(position_ids >= 0, input_ids, -1) if decode else np.full_like(input_ids, -1)
    feeds[LAST_ACCEPTED_OUTPUT_TOKENS] = np.ascontiguousarray(last, np.int64)
    if guided:
        feeds[TOKEN_BITMASKS] = _bitmasks(states, vocab_size)
    return feeds


def _random_numbers(states: Sequence[RequestSampling | None], k: int) -> np.ndarray:
    """[rows, k]: k numbers from each sampling request's generator; 0.5 for greedy rows and rows without a request
    (None), which draw nothing."""
    return np.stack([s.random_numbers(k) if s is not None and not s.params.greedy else np.full(k, 0.5, np.float32)
                     for s in states])


def _bitmasks(states: Sequence[RequestSampling | None], vocab_size: int) -> np.ndarray:
    """[rows, vocab] bool: each request's token bitmask; every token allowed where it has none (or no request)."""
    return np.stack([s.token_bitmask if s is not None and s.token_bitmask is not None else np.ones(vocab_size, bool)
                     for s in states])
