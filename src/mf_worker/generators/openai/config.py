"""The `openai` generator's settings: the ``MF_LLM_*`` variables, declared once.

`OpenAISettings` is the spec the settings module parses with every other setting (it is
registered under the ``mf_worker.settings`` entry point ``openai``), so ``mf-worker config``
shows exactly the values the generator then uses, and a bad value stops the process at
start-up naming the variable. `LLMConfig` is what the client needs: the same values with the
base URL and the model required, and the API key resolved from its variable, a key file or the
systemd credential ``mf_llm_api_key``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final
from urllib.parse import urlsplit

from mf_worker.errors import ConfigError
from mf_worker.settings import (
    Secret,
    Settings,
    boolean,
    number,
    secret_text,
    setting,
    text,
    whole_number,
)

__all__ = ["CREDENTIAL_NAME", "LLMConfig", "OpenAISettings", "display_url"]

CREDENTIAL_NAME: Final = "mf_llm_api_key"
"""File name of the API key in systemd's ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``)."""


def display_url(url: str) -> str:
    """A URL with any user:password part hidden."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)


def _base_url(raw: str) -> str:
    url = raw.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return url.rstrip("/")


def _key_file(raw: str) -> Path:
    """The path of a readable file holding one word (the key); the key is read again by
    `LLMConfig`, so the settings hold a path, never the key itself."""
    path = Path(raw.strip()).expanduser()
    _read_key(path)
    return path


def _read_key(path: Path) -> str:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(f"cannot read the key file ({reason})") from None
    key = content.strip()
    if not key:
        raise ValueError("the key file is empty")
    if any(ch.isspace() for ch in key):
        raise ValueError("the key file holds more than one word")
    return key


@dataclass(frozen=True, slots=True)
class OpenAISettings:
    """The ``MF_LLM_*`` variables of the `openai` generator, parsed like every setting.

    Optional here (so `config` works without them); `LLMConfig.from_settings` requires the
    base URL and the model when the generator is actually used. ``ENV_PREFIX`` gives the
    fallback instance (``MF_FALLBACK_GENERATOR=openai``) the same variables as
    ``MF_LLM_FALLBACK_*`` (its key's credential: ``mf_llm_fallback_api_key``).
    """

    ENV_PREFIX: ClassVar[str] = "MF_LLM_"

    base_url: str | None = setting(
        "MF_LLM_BASE_URL", None, _base_url,
        "`openai` generator: base URL of the OpenAI-compatible API up to and including `/v1` "
        "(e.g. `http://127.0.0.1:8080/v1`). Required with `MF_GENERATOR=openai`.",
        show=display_url,
    )
    model: str | None = setting(
        "MF_LLM_MODEL", None, text,
        "`openai` generator: model name sent to the server; token usage is recorded and priced "
        "under it. Required with `MF_GENERATOR=openai`.",
    )
    api_key: Secret | None = setting(
        "MF_LLM_API_KEY", None, secret_text,
        "`openai` generator: API key sent as `Authorization: Bearer …` (local servers need "
        "none; also read: the systemd credential `mf_llm_api_key`, the file "
        "`$CREDENTIALS_DIRECTORY/mf_llm_api_key`). Never logged.",
        secret=True, credential=CREDENTIAL_NAME, excludes="MF_LLM_API_KEY_FILE",
    )
    api_key_file: Path | None = setting(
        "MF_LLM_API_KEY_FILE", None, _key_file,
        "`openai` generator: file holding the API key instead of `MF_LLM_API_KEY` (one word; "
        "read at start-up).",
    )
    max_tokens: int = setting(
        "MF_LLM_MAX_TOKENS", 1500, whole_number(1, 1_000_000),
        "`openai` generator: most tokens the model may write per call; with the one repair "
        "turn an episode can use twice this. A reply body is read up to 64 bytes per token "
        "plus 64 KiB; a larger one fails the attempt instead of filling memory.",
    )
    temperature: float = setting(
        "MF_LLM_TEMPERATURE", 0.7, number(0.0, maximum=2.0),
        "`openai` generator: sampling temperature, 0 to 2 (0: most deterministic).",
    )
    timeout: float = setting(
        "MF_LLM_TIMEOUT", 120.0, number(0.0, exclusive=True, maximum=3600.0),
        "`openai` generator: seconds one HTTP call to the model may take in all (at most "
        "3600); a slower call is a retryable failure.",
    )
    json_mode: bool = setting(
        "MF_LLM_JSON_MODE", True, boolean,
        "`openai` generator: ask for `response_format: json_object` (JSON mode). Turn off for "
        "servers that reject it; replies are parsed tolerantly either way.",
    )


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """What the client needs, validated; build it with `from_settings`.

    `base_url` has no trailing slash; `api_key` is a `Secret` (or None for servers without
    authentication) whose value shows in no repr and no message.
    """

    base_url: str
    model: str
    api_key: Secret | None = None
    max_tokens: int = 1500
    temperature: float = 0.7
    timeout: float = 120.0
    json_mode: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> LLMConfig:
        """The generator's configuration from its section of the one settings object.

        Raises `ConfigError` naming the variable and the problem; the key is never shown.
        """
        section = settings.plugin(OpenAISettings)

        def variable(name: str) -> str:  # MF_LLM_… or, for the fallback, MF_LLM_FALLBACK_…
            return settings.plugin_variable(OpenAISettings, name)

        if section.base_url is None:
            raise ConfigError(
                f"{variable('base_url')} is not set: give the OpenAI-compatible API's base "
                "URL, e.g. http://127.0.0.1:8080/v1"
            )
        if section.model is None:
            raise ConfigError(
                f"{variable('model')} is not set: give the model name the server expects")
        api_key = section.api_key
        if api_key is None and section.api_key_file is not None:
            try:
                api_key = Secret(_read_key(section.api_key_file))
            except ValueError as exc:  # changed since start-up
                raise ConfigError(
                    f"{variable('api_key_file')}={str(section.api_key_file)!r}: {exc}"
                ) from None
        return cls(
            base_url=section.base_url,
            model=section.model,
            api_key=api_key,
            max_tokens=section.max_tokens,
            temperature=section.temperature,
            timeout=section.timeout,
            json_mode=section.json_mode,
        )

    @property
    def server(self) -> str:
        """How messages name the server: scheme, host and port only (no path, no userinfo)."""
        parts = urlsplit(self.base_url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"
