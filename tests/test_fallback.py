"""The fallback generator (issue #26): its settings, when it takes over, what it costs and how
it shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mf_worker.generation import load_fallback_generator
from mf_worker.generators.openai import OpenAICompatibleGenerator
from mf_worker.settings import load_settings

_BOTH = {
    "MF_LLM_BASE_URL": "http://127.0.0.1:9/v1", "MF_LLM_MODEL": "primary-model",
    "MF_FALLBACK_GENERATOR": "openai",
    "MF_LLM_FALLBACK_BASE_URL": "http://127.0.0.1:10/v1", "MF_LLM_FALLBACK_MODEL": "backup-model",
    "MF_LLM_FALLBACK_MAX_TOKENS": "700", "MF_LLM_FALLBACK_TIMEOUT": "9",
}


def _cli(args: list[str], extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    env.update(extra)
    return subprocess.run([sys.executable, "-m", "mf_worker", *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


def test_the_openai_fallback_instance_reads_the_MF_LLM_FALLBACK_variables() -> None:
    settings, warnings = load_settings(environ=_BOTH)
    assert warnings == []
    fallback = load_fallback_generator(settings)
    assert isinstance(fallback, OpenAICompatibleGenerator)
    assert (fallback.config.model, fallback.config.base_url) == (
        "backup-model", "http://127.0.0.1:10/v1")
    assert (fallback.config.max_tokens, fallback.config.timeout) == (700, 9.0)
    assert fallback.limit_key.endswith("#backup-model")
    assert load_fallback_generator(load_settings(environ={})[0]) is None


def test_the_fallback_key_comes_from_its_own_credential(tmp_path: object) -> None:
    from pathlib import Path
    creds = Path(str(tmp_path))
    (creds / "mf_llm_api_key").write_text("primary-key\n")
    (creds / "mf_llm_fallback_api_key").write_text("backup-key\n")
    settings, _ = load_settings(environ={**_BOTH, "CREDENTIALS_DIRECTORY": str(creds)})
    fallback = load_fallback_generator(settings)
    assert isinstance(fallback, OpenAICompatibleGenerator)
    assert fallback.config.api_key is not None
    assert fallback.config.api_key.reveal() == "backup-key"


def test_config_shows_both_instances_with_secrets_masked() -> None:
    result = _cli(["config", "--json"], {**_BOTH, "MF_LLM_FALLBACK_API_KEY": "sk-backup"})
    assert result.returncode == 0, result.stderr
    rows = {row["variable"]: row["value"] for row in json.loads(result.stdout)}
    assert rows["MF_LLM_MODEL"] == "primary-model"
    assert rows["MF_LLM_FALLBACK_MODEL"] == "backup-model"
    assert rows["MF_FALLBACK_GENERATOR"] == "openai"
    assert rows["MF_LLM_FALLBACK_API_KEY"] == "***"
    assert "sk-backup" not in result.stdout


def test_a_bad_fallback_setting_stops_start_up_with_exit_2_naming_it() -> None:
    result = _cli(["run"], {**_BOTH, "MF_LLM_FALLBACK_TIMEOUT": "soon",
                            "MF_DATABASE_URL": "postgresql://u@127.0.0.1:1/db"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mf-worker: error: MF_LLM_FALLBACK_TIMEOUT='soon': must be a number"]
    missing = {k: v for k, v in _BOTH.items() if k != "MF_LLM_FALLBACK_MODEL"}
    result = _cli(["run"], {**missing, "MF_DATABASE_URL": "postgresql://u@127.0.0.1:1/db"})
    assert result.returncode == 2
    assert "MF_LLM_FALLBACK_MODEL is not set" in result.stderr
