"""Per-request sampling inside transformers' continuous-batching engine: one logits processor.

The engine (transformers `ContinuousBatchingManager`) batches every running request into one
forward pass per step, but its own sampling is one setting for the whole engine (`do_sample`,
one generator seeded once). Requests need their own: greedy or sampled, temperature, top_p, a
seed that reproduces the same text whatever else is in the batch, log probabilities with the
top alternatives, and a profile's generation rules. The engine's extension point for per-request
behaviour is a `ContinuousBatchingLogitsProcessor` (it gets one int32 argument per row, built
from each request's `logit_processor_kwargs`): `RequestSampler` is one, and it does all of it.

- Each request registers a `RowSampling` under a slot number and passes `slot=<n>` as its
  logits-processor argument; at each step the processor looks the rows' slots up.
- It picks every row's token itself: greedy rows take the argmax; sampled rows take the
  Gumbel-max of their temperature-scaled, top-p-filtered logits, with noise from the request's
  own `torch.Generator` (seeded from the request's `seed`, else at random). One draw per
  generated token from the request's own generator: the same seed gives the same choices
  whichever requests share the batch.
- It returns logits that are -inf everywhere but the chosen token, and the engine runs with
  `do_sample=False`: the engine's argmax then takes exactly that token.
- Log probabilities are the model's own (raw logits, before rules and temperature), as the
  OpenAI API reports them: the chosen token's and the `top_logprobs` best, kept per step on the
  request's `RowSampling.logprobs`, in generation order.

The processor runs on the engine's thread; slots are added and removed from the server's event
loop, hence the lock.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from dataclasses import dataclass, field

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from libs.common.profile_logits import ProfileLogits

# The request kwarg that names a request's slot (an int, as the engine's argument tensor holds int32).
SLOT_KWARG = "slot"
NO_SLOT = -1


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability and the most likely alternatives at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RowSampling:
    """How one request's tokens are chosen, and what the choosing recorded."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    # None: no log probabilities; 0: the chosen token's only; k: and the k most likely.
    top_logprobs: int | None = None
    rules: ProfileLogits | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    generator: torch.Generator | None = None
    # The engine's list of this request's generated tokens (the rules read it), set at each step.
    generated: list[int] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def noise(self, vocab: int, device: torch.device) -> torch.Tensor:
        """Standard Gumbel noise for one step, from this request's own generator."""
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        uniform = torch.rand(vocab, generator=self.generator, device=device)
        return -torch.log(-torch.log(uniform.clamp_(min=1e-20)))


class SamplingTable:
    """The slots of the requests in flight (thread-safe)."""

    def __init__(self) -> None:
        self._rows: dict[int, RowSampling] = {}
        self._numbers = itertools.count()
        self._lock = threading.Lock()

    def add(self, row: RowSampling) -> int:
        with self._lock:
            slot = next(self._numbers) % (2**31 - 1)
            self._rows[slot] = row
            return slot

    def remove(self, slot: int) -> None:
        with self._lock:
            self._rows.pop(slot, None)

    def get(self, slot: int) -> RowSampling | None:
        with self._lock:
            return self._rows.get(slot)

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)


class RequestSampler(ContinuousBatchingLogitsProcessor):
    """The engine's logits processor: every row's token chosen by its request's `RowSampling`."""

    supported_kwargs: dict[str, type] = {SLOT_KWARG: int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, table: SamplingTable) -> None:
        self.table = table

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(NO_SLOT)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        slots = []
        for request in requests_with_new_token:
            slot = request.state.logit_processor_kwargs.get(SLOT_KWARG, NO_SLOT)
            row = self.table.get(slot)
            if row is not None:
                row.generated = request.state.generated_tokens
            slots.append(slot)
        return torch.tensor(slots, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = [self.table.get(slot) for slot in tensor_arg[: scores.size(0)].tolist()]
        return choose(scores, rows)


def choose(scores: torch.Tensor, rows: list[RowSampling | None]) -> torch.Tensor:
    """Logits [B, V] -> logits that are 0 at each row's chosen token and -inf elsewhere.

    A row without sampling settings (None: a request that registered none) is greedy. When every
    row is plainly greedy the logits go back untouched: the engine's own argmax picks the same.
    """
    if all(r is None or (r.greedy and r.rules is None and r.top_logprobs is None) for r in rows):
        return scores
    raw = scores.float()
    logprobs = torch.log_softmax(raw, dim=-1) if any(r is not None and r.top_logprobs is not None for r in rows) else None
    adjusted = raw
    if any(r is not None and r.rules is not None for r in rows):
        adjusted = raw.clone()
        for i, row in enumerate(rows):
            if row is not None and row.rules is not None:
                row.rules.adjust(adjusted[i], row.generated)
    chosen = adjusted.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if r is not None and not r.greedy]
    if sampled:
        index = torch.tensor(sampled, device=raw.device)
        picked = adjusted.index_select(0, index)
        temperature = torch.tensor([rows[i].temperature for i in sampled], device=raw.device, dtype=raw.dtype)
        picked = picked / temperature.unsqueeze(-1)
        top_p = torch.tensor([rows[i].top_p for i in sampled], device=raw.device, dtype=raw.dtype)
        if bool((top_p < 1.0).any()):
            picked = nucleus(picked, top_p)
        noise = torch.stack([rows[i].noise(raw.size(-1), raw.device) for i in sampled])
        chosen = chosen.index_copy(0, index, (picked + noise).argmax(dim=-1))
    if logprobs is not None:
        _record_logprobs(logprobs, chosen, rows)
    out = torch.full_like(scores, float("-inf"))
    return out.scatter_(1, chosen.unsqueeze(-1), 0.0)


def nucleus(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the most likely tokens whose probabilities first add up to at least top_p."""
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the ones before it already reach top_p (the most likely always stays).
    drop = (cumulative - ordered.softmax(dim=-1)) >= top_p.unsqueeze(-1)
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def _record_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, rows: list[RowSampling | None]) -> None:
    wanted = [(i, r) for i, r in enumerate(rows) if r is not None and r.top_logprobs is not None]
    k = max(r.top_logprobs for _, r in wanted)
    index = torch.tensor([i for i, _ in wanted])
    picked = logprobs.index_select(0, index.to(logprobs.device))
    chosen_lp = picked.gather(1, chosen.index_select(0, index.to(chosen.device)).unsqueeze(-1)).squeeze(-1).tolist()
    top_values, top_ids = (picked.topk(k, dim=-1) if k else (None, None))
    top_values = top_values.tolist() if k else None
    top_ids = top_ids.tolist() if k else None
    tokens = chosen.tolist()
    for n, (i, row) in enumerate(wanted):
        top = tuple(zip(top_ids[n][: row.top_logprobs], top_values[n][: row.top_logprobs], strict=True)) if k else ()
        row.logprobs.append(TokenLogprob(tokens[i], chosen_lp[n], top))
