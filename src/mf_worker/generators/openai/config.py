"""The `openai` generator's settings: the ``MF_LLM_*`` variables, validated.

Which server to talk to (base URL, model), how to authenticate (a key, a key file or the
systemd credential ``mf_llm_api_key``), and the limits of one call (``max_tokens``,
temperature, timeout, JSON mode).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from mf_worker.errors import ConfigError
from mf_worker.settings import Secret

__all__ = ["CREDENTIAL_NAME", "ENV_VARIABLES", "LLMConfig", "display_url"]

CREDENTIAL_NAME: Final = "mf_llm_api_key"
"""File name of the API key in systemd's ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``)."""

ENV_VARIABLES: Final[tuple[tuple[str, str, str], ...]] = (
    ("MF_LLM_BASE_URL", "",
     "Base URL of the OpenAI-compatible API, up to and including `/v1` "
     "(e.g. `http://127.0.0.1:8080/v1`). Required by the `openai` generator."),
    ("MF_LLM_MODEL", "",
     "Model name sent to the server and used for pricing and token usage rows. Required by "
     "the `openai` generator."),
    ("MF_LLM_API_KEY", "",
     "API key sent as `Authorization: Bearer …` (optional: local servers need none). "
     "Never logged."),
    ("MF_LLM_API_KEY_FILE", "",
     "File holding the API key instead of `MF_LLM_API_KEY` (also read: "
     "`$CREDENTIALS_DIRECTORY/mf_llm_api_key`, systemd's `LoadCredential=`)."),
    ("MF_LLM_MAX_TOKENS", "1500",
     "Most tokens the model may write per call (`max_tokens`); with the one repair turn an "
     "episode can use twice this. A reply body is read up to 64 bytes per token plus 64 KiB "
     "(about 160 KiB at 1500); a larger one fails the attempt instead of filling memory."),
    ("MF_LLM_TEMPERATURE", "0.7", "Sampling temperature, 0 to 2 (0: most deterministic)."),
    ("MF_LLM_JSON_MODE", "on",
     "Ask for `response_format: json_object` (JSON mode; a JSON grammar on llama.cpp). Turn "
     "off for servers that reject it; the reply is then parsed tolerantly all the same."),
    ("MF_LLM_TIMEOUT", "120",
     "Seconds one HTTP call to the model may take in all; a slower call is a retryable "
     "failure."),
)
"""(variable, default, documentation) of every setting the `openai` generator reads."""

_DEFAULT_MAX_TOKENS: Final = 1500
_DEFAULT_TEMPERATURE: Final = 0.7
_DEFAULT_TIMEOUT: Final = 120.0


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """The `openai` generator's settings, validated; build it with `from_env`.

    `base_url` has no trailing slash; `api_key` is a `Secret` (or None for servers without
    authentication) whose value shows in no repr and no message.
    """

    base_url: str
    model: str
    api_key: Secret | None = None
    max_tokens: int = _DEFAULT_MAX_TOKENS
    temperature: float = _DEFAULT_TEMPERATURE
    timeout: float = _DEFAULT_TIMEOUT
    json_mode: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LLMConfig:
        """Read and check the ``MF_LLM_*`` variables (and the key file or systemd credential).

        Raises `ConfigError` naming the variable and the problem; the key is never shown.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(name, "").strip()

        base_url = get("MF_LLM_BASE_URL")
        if not base_url:
            raise ConfigError(
                "MF_LLM_BASE_URL is not set: give the OpenAI-compatible API's base URL, "
                "e.g. http://127.0.0.1:8080/v1"
            )
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"MF_LLM_BASE_URL={display_url(base_url)!r}: must be an http:// or https:// "
                "URL with a host"
            )
        model = get("MF_LLM_MODEL")
        if not model:
            raise ConfigError(
                "MF_LLM_MODEL is not set: give the model name the server expects"
            )
        return cls(
            base_url=base_url.rstrip("/"),
            model=model,
            api_key=_api_key(env),
            max_tokens=_parse_int(env, "MF_LLM_MAX_TOKENS", _DEFAULT_MAX_TOKENS, 1, 1_000_000),
            temperature=_parse_float(env, "MF_LLM_TEMPERATURE", _DEFAULT_TEMPERATURE, 0.0, 2.0),
            timeout=_parse_float(env, "MF_LLM_TIMEOUT", _DEFAULT_TIMEOUT, 0.001, 3_600.0,
                                 exclusive_min=True),
            json_mode=_parse_bool(env, "MF_LLM_JSON_MODE", True),
        )

    @property
    def server(self) -> str:
        """How messages name the server: scheme, host and port only (no path, no userinfo)."""
        parts = urlsplit(self.base_url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"


def _api_key(env: Mapping[str, str]) -> Secret | None:
    direct = env.get("MF_LLM_API_KEY", "").strip()
    key_file = env.get("MF_LLM_API_KEY_FILE", "").strip()
    if direct and key_file:
        raise ConfigError("MF_LLM_API_KEY and MF_LLM_API_KEY_FILE are both set; set only one")
    if direct:
        return Secret(direct)
    if key_file:
        return Secret(_read_key(Path(key_file).expanduser(), "MF_LLM_API_KEY_FILE"))
    credentials = env.get("CREDENTIALS_DIRECTORY", "").strip()
    if credentials:
        path = Path(credentials) / CREDENTIAL_NAME
        if path.is_file():
            return Secret(_read_key(path, f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME}"))
    return None


def _read_key(path: Path, source: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{source}={str(path)!r}: cannot read the key file ({reason})") from None
    key = text.strip()
    if not key:
        raise ConfigError(f"{source}={str(path)!r}: the key file is empty")
    if any(ch.isspace() for ch in key):
        raise ConfigError(f"{source}={str(path)!r}: the key file holds more than one word")
    return key


def _parse_int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: must be a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r}: must be between {low} and {high:,}")
    return value


def _parse_float(
    env: Mapping[str, str], name: str, default: float, low: float, high: float,
    *, exclusive_min: bool = False,
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: must be a number") from None
    if not math.isfinite(value) or value > high or value < low or (exclusive_min and value == 0):
        bound = "greater than 0" if exclusive_min else f"at least {low:g}"
        raise ConfigError(f"{name}={raw!r}: must be {bound} and at most {high:g}")
    return value


def _parse_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: must be one of on/off, true/false, yes/no, 1/0")


def display_url(url: str) -> str:
    """A URL with any user:password part hidden."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)
