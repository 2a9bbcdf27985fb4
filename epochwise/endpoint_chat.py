"""Evaluation traffic to a Together endpoint: greedy chat completions, bounded concurrency, and the
endpoint price estimate shown before anything is deployed (the endpoint adapter's evaluation half).

The SDK retries 429 and 5xx itself (``together.max_retries`` with backoff, honouring ``retry-after``);
``concurrency`` bounds the requests in flight so a run stays under the account's rate limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from together import APIConnectionError, APIStatusError, Together

from epochwise.endpoints_api import EndpointFailure, _hw_key
from epochwise.together_api import api_message


def chat_reply(client: Together, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The greedy reply (temperature 0) of ``model`` (an endpoint name) to ``messages``."""
    try:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    except APIStatusError as exc:
        raise EndpointFailure(f"chat completion on {model} failed ({exc.status_code}): {api_message(exc)}") from None
    except APIConnectionError as exc:
        raise EndpointFailure(f"chat completion on {model} failed: {exc}") from None
    return (reply.choices[0].message.content or "") if reply.choices else ""


def chat_replies(
    client: Together, model: str, conversations: Sequence[list[dict[str, str]]], max_tokens: int, concurrency: int
) -> list[str]:
    """Replies in input order, at most ``concurrency`` requests in flight; the first failure is raised."""
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(conversations)))) as pool:
        return list(pool.map(lambda c: chat_reply(client, model, c, max_tokens), conversations))


def hourly_price_usd(client: Together, hardware: str) -> float | None:
    """Together's listed price per hour of ``hardware`` (``endpoints.hardware.list``), None when unlisted."""
    for item in client.endpoints.hardware.list().data or []:
        data = item.model_dump(by_alias=True, warnings=False)
        if _hw_key(str(data.get("id", ""))) == _hw_key(hardware):
            cents = data.get("priceCentsPerHour", data.get("price_cents_per_hour"))
            return None if cents is None else float(cents) / 100
    return None


@dataclass(frozen=True)
class PriceEstimate:
    """What one epoch's evaluation is expected to cost on its endpoint."""

    tokens: int
    hours: float
    hourly_usd: float | None
    usd: float | None

    def describe(self) -> str:
        price = "price unknown (hardware not listed)" if self.usd is None else f"about ${self.usd:.2f}"
        hourly = "" if self.hourly_usd is None else f" at ${self.hourly_usd:.2f}/h"
        return f"~{self.tokens:,} tokens, ~{self.hours * 60:.0f} min of endpoint time{hourly}: {price}"


def estimate(
    tokens: int, hourly_usd: float | None, tokens_per_s: float, startup_min: float, starts: bool
) -> PriceEstimate:
    """Endpoint time = tokens / throughput (+ start-up when a deployment has to start) x hourly price."""
    hours = tokens / tokens_per_s / 3600 + (startup_min / 60 if starts else 0.0)
    return PriceEstimate(tokens, hours, hourly_usd, None if hourly_usd is None else hours * hourly_usd)
