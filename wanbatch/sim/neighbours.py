"""Other users of the caller's account: tasks the simulated service makes beside ours.

The task list is account-wide (spec §3.5): every key of the main account
sees every task, whoever made it. A colleague running the same prompts, or
the same script with other settings, is the case a reconciler must not
mistake for its own lost create. So, with probability ``neighbour_rate``,
each of our creates gets a neighbour: a task with the same prompt made within
``neighbour_window_s`` before or after ours, either through our own key (and
then a request that differs observably: another size or more images, and
another seed) or through a hidden key of the account (anything may differ).
Beside those, a background stream (``neighbour_background_rps``) sends
unrelated prompts on the models we use. Neighbour tasks take the account's
concurrency, are listed, queryable and billed, and carry ``neighbour``.
Their choices draw from streams of their own.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from wanbatch import catalog
from wanbatch.sim import validate, wire
from wanbatch.sim.accounts import ApiKey
from wanbatch.sim.tasks import Endpoint, GenerationRequest, Task

if TYPE_CHECKING:
    from wanbatch.sim.state import SimState

__all__ = ["Neighbours"]

#: Sizes a neighbour may ask for; each model keeps those its rule allows.
SIZES = ("1024*1024", "1280*1280", "1440*1440", "1104*1472", "1472*1104", "960*1696", "1696*960", "768*1344")
_SUBJECTS = ("harbour at dawn", "glass teapot", "fox in snow", "neon market", "old lighthouse", "rice terraces")
_STYLES = ("watercolour", "ink wash", "studio photo", "oil painting", "pixel art", "pencil sketch")


class Neighbours:
    """Makes the neighbours' tasks of every account our caller uses."""

    def __init__(self, state: SimState) -> None:
        self._state = state
        self.rate, self.background_rps = state.config.neighbours()
        self._rng = random.Random(f"{state.config.seed}/neighbours")
        self._background = random.Random(f"{state.config.seed}/neighbours/background")
        #: per account, the models we created on: model name -> (offer, the key we used last)
        self._used: dict[str, dict[str, tuple[catalog.Offer, ApiKey]]] = {}

    def beside(self, task: Task, caller: ApiKey) -> None:
        """Called when one of our tasks is made: maybe a neighbour with its prompt; the background stream starts."""
        if task.request is None:
            return
        self._note(task.offer, caller, task.submit_s)
        if not self.rate or self._rng.random() >= self.rate:
            return
        window_s = self._state.config.neighbour_window_s
        offset_s = self._rng.uniform(-window_s, window_s)
        same_key = self._rng.random() < self._state.config.neighbour_same_key_share
        key = caller if same_key else self._state.accounts.neighbour_key(caller)
        request = self._alike(task.request, task.offer.model, same_key)
        if offset_s <= 0:
            self._make(key, task.offer, request, task.submit_s, backdate_s=-offset_s)
        else:
            self._state.call_at(task.submit_s + offset_s, lambda at_s: self._make(key, task.offer, request, at_s))

    def _alike(self, ours: GenerationRequest, model: catalog.Model, same_key: bool) -> GenerationRequest:
        """Our prompt with other settings: through our key they differ observably, through another anything goes."""
        rng, sizes = self._rng, self._sizes(model)
        seed = (ours.seed + rng.randrange(1, model.seed_max // 2)) % (model.seed_max + 1 - model.n_max)
        if not same_key:
            width, height = catalog.parse_size(rng.choice(sizes)) or (ours.width, ours.height)
            n, extend = rng.randint(1, model.n_max), rng.random() < 0.5
            return replace(ours, width=width, height=height, n=n, seed=seed, prompt_extend=extend)
        others = [size for size in sizes if size != ours.size]
        if ours.n < model.n_max and (not others or rng.random() < 0.5):
            return replace(ours, n=rng.randint(ours.n + 1, model.n_max), seed=seed)
        width, height = catalog.parse_size(rng.choice(others)) or (ours.width, ours.height)
        return replace(ours, width=width, height=height, seed=seed)

    def _sizes(self, model: catalog.Model) -> list[str]:
        rule = validate.size_rule(model, self._state.config)
        return [size for size in SIZES if rule.violation(*(catalog.parse_size(size) or (0, 0))) is None]

    def _note(self, offer: catalog.Offer, caller: ApiKey, now_s: float) -> None:
        """Remember the model we use; the account's background stream starts with its first create."""
        used = self._used.setdefault(caller.account, {})
        if not used and self.background_rps:
            self._state.call_at(now_s + self._background.expovariate(self.background_rps), self._arrival(caller))
        used[offer.model.name] = (offer, caller)

    def _arrival(self, caller: ApiKey) -> Callable[[float], None]:
        """The background stream's next create on ``caller``'s account, which then plans the one after."""

        def arrive(at_s: float) -> None:
            rng, used = self._background, self._used[caller.account]
            offer, ours = used[rng.choice(sorted(used))]
            model = offer.model
            key = ours if rng.random() < self._state.config.neighbour_background_same_key_share else None
            width, height = catalog.parse_size(rng.choice(self._sizes(model))) or (1024, 1024)
            request = GenerationRequest(
                prompt=f"{rng.choice(_SUBJECTS)}, {rng.choice(_STYLES)}, study {rng.randrange(10**6)}",
                negative_prompt="",
                width=width,
                height=height,
                n=rng.randint(1, model.n_max),
                seed=rng.randrange(model.seed_max + 1 - model.n_max),
                prompt_extend=rng.random() < 0.5,
                watermark=False,
            )
            self._make(key or self._state.accounts.neighbour_key(ours), offer, request, at_s)
            self._state.call_at(at_s + rng.expovariate(self.background_rps), arrive)

        return arrive

    def _make(
        self, key: ApiKey, offer: catalog.Offer, request: GenerationRequest, at_s: float, backdate_s: float = 0.0
    ) -> None:
        multimodal = offer.model.protocol is catalog.Protocol.MULTIMODAL
        self._state.submit(
            caller=key,
            offer=offer,
            endpoint=Endpoint.ASYNC if multimodal else Endpoint.LEGACY,
            fingerprint=validate.fingerprint(_body(offer, request)),
            request_id=wire.new_request_id(),
            request=request,
            at_s=at_s,
            backdate_s=backdate_s,
            neighbour=True,
        )


def _body(offer: catalog.Offer, request: GenerationRequest) -> dict[str, Any]:
    """The create body a neighbour would have sent (its fingerprint is the billing log's)."""
    parameters = {
        "size": request.size,
        "n": request.n,
        "seed": request.seed,
        "prompt_extend": request.prompt_extend,
        "watermark": request.watermark,
    }
    if offer.model.protocol is catalog.Protocol.MULTIMODAL:
        messages = [{"role": "user", "content": [{"text": request.prompt}]}]
        return {"model": offer.api_name, "input": {"messages": messages}, "parameters": parameters}
    return {"model": offer.api_name, "input": {"prompt": request.prompt}, "parameters": parameters}
