"""Rate limits at the provider, seen by the `openai` generator: 429s become `RateLimitedError`
with a clamped delay, an exhausted quota becomes `QuotaExhaustedError`, and the generator names
its limit key. Against `tests.provider.ProviderServer`, a real HTTP server on loopback that
enforces requests and tokens per minute the way hosted providers do.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from mf_worker.generation import (
    GenerationRequest,
    QuotaExhaustedError,
    RateLimitedError,
    RetryableGenerationError,
    limit_key_of,
)
from mf_worker.generation.api import (
    QUOTA_PAUSE_SECONDS,
    RATE_LIMIT_DEFAULT_SECONDS,
    RATE_LIMIT_MAX_SECONDS,
    RATE_LIMIT_MIN_SECONDS,
)
from mf_worker.generators.openai import LLMConfig, OpenAICompatibleGenerator
from mf_worker.generators.openai.client import parse_reset, rate_limit_delay

from .provider import ProviderServer, format_reset
from .test_openai_generator import make_request

MODEL = "gpt-4o-mini"


def post(server: ProviderServer, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        f"{server.base_url}/chat/completions", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, \
                json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read())


def small_call(max_tokens: int = 10) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    # 6 requests a minute, holding at most one: the second call in a row is always refused.
    with ProviderServer(requests_per_minute=6, tokens_per_minute=60_000, lifetime=60) as server:
        yield server


def test_the_test_provider_refuses_over_its_limit_with_real_providers_headers(
    provider: ProviderServer,
) -> None:
    status, headers, body = post(provider, small_call())
    assert status == 200 and body["usage"]["completion_tokens"] == 60
    assert headers["x-ratelimit-limit-requests"] == "6"
    status, headers, body = post(provider, small_call())
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert parse_reset(headers["x-ratelimit-reset-requests"]) is not None
    assert provider.counts() == {"accepted": 1, "rate_limited": 1, "unavailable": 0,
                                 "quota_rejected": 0}


def test_the_test_provider_counts_tokens_as_prompt_plus_max_tokens() -> None:
    # 600 tokens a minute hold 30 (3 s): a call asking for 1000 tokens is admitted only into a
    # full bucket, the next one of any size is refused.
    with ProviderServer(tokens_per_minute=600, lifetime=60) as server:
        assert post(server, small_call(max_tokens=1000))[0] == 200
        status, headers, _ = post(server, small_call(max_tokens=1))
        assert status == 429 and headers["x-ratelimit-remaining-tokens"] == "0"


def test_the_test_provider_answers_503_during_an_outage_and_insufficient_quota_on_demand(
    provider: ProviderServer,
) -> None:
    provider.outage(60)
    assert post(provider, small_call())[0] == 503
    provider.outage(0)
    provider.exhaust_quota()
    status, _, body = post(provider, small_call())
    assert status == 429 and body["error"]["code"] == "insufficient_quota"
    assert provider.counts()["quota_rejected"] == 1 and provider.counts()["unavailable"] == 1


def test_reset_durations_are_written_and_read_the_providers_way() -> None:
    assert [format_reset(s) for s in (0.25, 1, 59.2, 360, 3723)] == [
        "250ms", "1s", "1m0s", "6m0s", "1h2m3s"]
    assert parse_reset("1s") == 1.0 and parse_reset("6m0s") == 360.0
    assert parse_reset("250ms") == 0.25 and parse_reset("1h2m3.5s") == 3723.5
    assert parse_reset("17") == 17.0
    assert parse_reset("soon") is None and parse_reset("-3") is None and parse_reset("") is None
    assert parse_reset("1s and more") is None


def test_rate_limit_delay_prefers_retry_after_then_the_exhausted_limits_reset() -> None:
    assert rate_limit_delay({"retry-after": "7"}) == 7.0
    headers = {"retry-after": "soon", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-tokens": "900",
               "x-ratelimit-reset-tokens": "6m0s"}
    assert rate_limit_delay(headers) == 2.0  # the tokens limit is not what refused the call
    assert rate_limit_delay({"x-ratelimit-reset-tokens": "1m30s"}) == 90.0
    assert rate_limit_delay({"retry-after": "garbage"}) is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, RATE_LIMIT_DEFAULT_SECONDS), (float("nan"), RATE_LIMIT_DEFAULT_SECONDS),
     (-5.0, RATE_LIMIT_DEFAULT_SECONDS), (0.0, RATE_LIMIT_MIN_SECONDS),
     (12.0, 12.0), (1e12, RATE_LIMIT_MAX_SECONDS), (float("inf"), RATE_LIMIT_DEFAULT_SECONDS)],
)
def test_a_rate_limit_delay_is_clamped_to_the_documented_range(
    given: float | None, expected: float
) -> None:
    error = RateLimitedError("429", retry_after=given)
    assert isinstance(error, RetryableGenerationError)
    assert error.retry_after == expected


def generate_with(server: ProviderServer, request: GenerationRequest | None = None
                  ) -> BaseException:
    async def main() -> BaseException:
        generator = OpenAICompatibleGenerator(LLMConfig(base_url=server.base_url, model=MODEL,
                                                        timeout=10))
        try:
            await generator.generate(request or make_request())
        except Exception as exc:
            return exc
        finally:
            await generator.aclose()
        raise AssertionError("the call was not refused")

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [("17", 17.0), ("99999999999", RATE_LIMIT_MAX_SECONDS), ("0", RATE_LIMIT_MIN_SECONDS),
     # No usable Retry-After: the exhausted limit's x-ratelimit-reset-requests (1m0s) wins.
     ("soon", 60.0)],
)
def test_the_openai_generator_raises_a_clamped_rate_limit_on_429(
    retry_after: str, expected: float
) -> None:
    # One request a minute, holding one, and that one already spent: every call is refused.
    with ProviderServer(requests_per_minute=1, burst_seconds=60, lifetime=60,
                        retry_after=lambda _wait: retry_after) as server:
        assert server.requests is not None
        server.requests.level = 0.0
        error = generate_with(server)
        assert server.counts()["rate_limited"] == 1
    assert type(error) is RateLimitedError
    assert error.retry_after == pytest.approx(expected)
    assert str(error).startswith("LLM server rate limit (HTTP 429: Rate limit reached")
    # The limit the provider states travels with the error (and survives pickling).
    assert (error.requests_per_minute, error.tokens_per_minute) == (1.0, None)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.retry_after, copy.requests_per_minute) == (
        RateLimitedError, error.retry_after, 1.0)


def test_the_openai_generator_raises_quota_exhausted_on_insufficient_quota() -> None:
    with ProviderServer(lifetime=60) as server:
        server.exhaust_quota()
        error = generate_with(server)
    assert type(error) is QuotaExhaustedError
    assert error.retry_after == QUOTA_PAUSE_SECONDS
    assert "quota exhausted" in str(error) and "insufficient" not in str(error).split("(")[0]


def test_the_openai_generator_names_its_limit_key_from_the_base_url_and_model() -> None:
    generator = OpenAICompatibleGenerator(LLMConfig(
        base_url="https://user:secret@llm.example/v1", model=MODEL))
    assert limit_key_of(generator) == f"openai:https://***@llm.example/v1#{MODEL}"

    class NoKey:
        async def generate(self, request: GenerationRequest) -> None: ...

    class BadKey:
        limit_key = 42

    assert limit_key_of(NoKey()) is None and limit_key_of(BadKey()) is None
