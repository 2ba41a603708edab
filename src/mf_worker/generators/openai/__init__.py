"""The `openai` generator: episodes from any server speaking the OpenAI chat-completions API.

Hosted providers, vLLM, llama.cpp's server, Ollama — anything that answers
``POST {MF_LLM_BASE_URL}/chat/completions`` the OpenAI way. The generator builds a prompt
(`prompt`), asks for one JSON object (title, sections with markdown / reasoning / confidence,
the ids of the planning notes used, new memories), in JSON mode unless
``MF_LLM_JSON_MODE=off``, over HTTP (`client`), and parses the reply tolerantly (`reply`). A
reply it still cannot use gets exactly ONE repair turn; if that fails too, the complete part of
a reply that was cut off or broke part-way is kept when it still holds a title and a section
(``llm_reply_salvaged``); otherwise the attempt ends with a `PermanentGenerationError` naming
the reason. Token usage is the server's own counts summed over the calls (the repair turn
included). Each HTTP call goes through the request's `CallLedger` with its own worst case (the
prompt's upper bound plus ``max_tokens``), so flow control admits the draft and the repair each,
and the worker books each by what the provider did with it. Its settings are the ``MF_LLM_*``
variables (`config`).

The modules: `config` (settings), `client` (HTTP and what an answer means), `prompt` (the
messages, with ``prompts/*.txt``), `reply` (the pure reply parser and the salvage).
"""

from __future__ import annotations

from typing import Any, Final

from mf_worker.errors import ConfigError
from mf_worker.generation.api import (
    GenerationRequest,
    GenerationResult,
    PermanentGenerationError,
    TokenUsage,
)
from mf_worker.logs import get_logger
from mf_worker.settings import Settings

from .client import ChatClient
from .config import LLMConfig, OpenAISettings, display_url
from .prompt import MESSAGE_OVERHEAD_TOKENS, build_messages, repair_prompt, upper_bound_tokens
from .reply import ReplyError, interpret, parse_reply, salvaged

__all__ = ["LLMConfig", "OpenAICompatibleGenerator", "OpenAISettings"]

_BAD_REPLY_CHARS: Final = 8_000  # of a broken reply echoed back in the repair turn


def _logger() -> Any:
    # Looked up per use: a logger bound at import would keep the logging set-up of that moment.
    return get_logger("mf_worker.generation.openai")


class OpenAICompatibleGenerator:
    """Writes episodes with a model behind an OpenAI-compatible chat-completions endpoint.

    The plugin loader calls the class with ``settings=`` (the one `Settings` object), and the
    configuration is the ``MF_LLM_*`` section of it (`OpenAISettings`) unless a `LLMConfig` is
    given. Construction fails with `ConfigError` (a missing or bad variable) or
    `PluginLoadError` (httpx missing), so a misconfigured worker stops at start-up. One
    `httpx.AsyncClient` is shared by every call of the instance; it is created on first use
    (and again if the event loop changes) and closed by `aclose`.
    """

    def __init__(
        self, config: LLMConfig | None = None, *, settings: Settings | None = None
    ) -> None:
        if config is None:
            if settings is None:
                raise ConfigError(
                    "the 'openai' generator is configured by the settings: load it with "
                    "load_generator('openai', settings) or give an LLMConfig"
                )
            config = LLMConfig.from_settings(settings)
        self.config = config
        self._chat = ChatClient(self.config)

    def __repr__(self) -> str:
        config = self.config
        return f"OpenAICompatibleGenerator(model={config.model!r}, server={config.server!r})"

    @property
    def limit_key(self) -> str:
        """The provider limit these calls count against: the API's base URL and the model
        (providers limit per account and model; the key itself is never part of it)."""
        return f"openai:{display_url(self.config.base_url)}#{self.config.model}"

    # -- the plugin API ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Write the episode: one call, plus one repair call if the first reply is unusable."""
        messages = build_messages(request)
        draft_bound, repair_bound = self._call_bounds(messages)
        async with request.calls.call("draft", max_usage=draft_bound) as record:
            first = await self._chat.complete(messages, request.idempotency_key, call="draft",
                                              record=record)
        usages = [first.usage]
        try:
            parsed = interpret(parse_reply(first.content, first.finish_reason), request)
        except ReplyError as exc:
            _logger().warning("llm_reply_unusable", call="draft", reason=exc.reason,
                              finish_reason=first.finish_reason)
            repair = [*messages,
                      {"role": "assistant", "content": first.content[:_BAD_REPLY_CHARS]},
                      {"role": "user", "content": repair_prompt(exc.reason)}]
            # A key of its own: a provider that deduplicates would replay the broken reply.
            # A call of its own too: flow control admits it, and the worker books the draft
            # whatever becomes of it (the ledger holds both).
            async with request.calls.call("repair", max_usage=repair_bound) as record:
                second = await self._chat.complete(
                    repair, f"{request.idempotency_key}:repair", call="repair", record=record)
            usages.append(second.usage)
            try:
                parsed = interpret(parse_reply(second.content, second.finish_reason), request)
            except ReplyError as again:
                _logger().warning("llm_reply_unusable", call="repair", reason=again.reason,
                                  finish_reason=second.finish_reason)
                # Last resort: the complete part of a reply that was cut off or broke part-way.
                rescued = (salvaged(second.content, second.finish_reason, "repair", request)
                           or salvaged(first.content, first.finish_reason, "draft", request))
                if rescued is None:
                    raise PermanentGenerationError(
                        "the model's reply is not the requested JSON, even after one repair "
                        f"attempt: {again.reason}", usages=usages,
                    ) from None
                parsed = rescued
        usage = TokenUsage(
            model=self.config.model,
            prompt_tokens=sum(u.prompt_tokens for u in usages),
            completion_tokens=sum(u.completion_tokens for u in usages),
        )
        return GenerationResult(
            title=parsed.title,
            blocks=parsed.blocks,
            usage=usage,
            incorporated_note_ids=parsed.note_ids,
            new_memories=parsed.memories,
        )

    def estimate_max_usage(self, request: GenerationRequest) -> TokenUsage:
        """The most `generate(request)` can consume, for the cost reservation.

        A true upper bound rather than an estimate: a byte-level tokenizer never makes more
        tokens than the text has UTF-8 bytes, so the prompt side counts bytes (plus the chat
        template's overhead per message), and the model writes at most ``MF_LLM_MAX_TOKENS``.
        Because a broken first reply gets one repair call, which re-sends the prompt with the
        broken reply (at most ``MF_LLM_MAX_TOKENS``) and the repair instructions, the bound
        covers both calls: prompt ×2 + max_tokens + repair text, completion = 2 × max_tokens.
        """
        draft, repair = self._call_bounds(build_messages(request))
        return TokenUsage(
            model=self.config.model,
            prompt_tokens=draft.prompt_tokens + repair.prompt_tokens,
            completion_tokens=draft.completion_tokens + repair.completion_tokens,
        )

    def _call_bounds(self, messages: list[dict[str, str]]) -> tuple[TokenUsage, TokenUsage]:
        """Each call's worst case: the draft (the prompt, ``max_tokens`` out) and the repair
        (the prompt again, the broken reply of at most ``max_tokens``, the repair text,
        ``max_tokens`` out). An unknown call is booked at its own bound; both together are
        the attempt's reservation (`estimate_max_usage`)."""
        prompt = upper_bound_tokens(messages)
        repair_text = upper_bound_tokens(
            [{"role": "user", "content": repair_prompt("x" * 200)}]
        )
        max_tokens, model = self.config.max_tokens, self.config.model
        return (TokenUsage(model, prompt, max_tokens),
                TokenUsage(model, prompt + max_tokens + MESSAGE_OVERHEAD_TOKENS + repair_text,
                           max_tokens))

    async def aclose(self) -> None:
        """Close the HTTP client (the next call opens a new one)."""
        await self._chat.aclose()

    @property
    def max_reply_bytes(self) -> int:
        """The largest reply body read (see `ChatClient.max_reply_bytes`)."""
        return self._chat.max_reply_bytes
