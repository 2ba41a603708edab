"""What a generation costs: a price table per model, in GBP per million tokens, exact decimals.

The table ships with the package (``prices.toml``) and is overridden entry by entry by the
operator's ``MF_PRICING_FILE``. A model that is not in the table is priced by ``[default]`` —
as dear as the dearest shipped model — and logged once, so it is never silently free.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..generation import TokenUsage
from ..logs import get_logger

_MILLION = Decimal(1_000_000)
_COST_QUANTUM = Decimal("0.000001")  # token_usage.cost_gbp is numeric(14, 6)
_FIELDS = ("prompt_gbp_per_million", "completion_gbp_per_million")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    prompt_gbp_per_million: Decimal
    completion_gbp_per_million: Decimal


@dataclass
class PriceTable:
    """Prices per model name, with the default for unknown models."""

    models: dict[str, ModelPrice]
    default: ModelPrice
    _warned: set[str] = field(default_factory=set)

    def price_of(self, model: str) -> ModelPrice:
        price = self.models.get(model)
        if price is None:
            if model not in self._warned:
                self._warned.add(model)
                get_logger("mf_worker.pricing").warning(
                    "model_price_unknown", model=model,
                    detail="priced by [default]; add it to MF_PRICING_FILE",
                )
            return self.default
        return price

    def cost(self, usage: TokenUsage) -> Decimal:
        """Cost in GBP of one usage, rounded up to the micro-pound (never under-charged)."""
        price = self.price_of(usage.model)
        raw = (
            usage.prompt_tokens * price.prompt_gbp_per_million
            + usage.completion_tokens * price.completion_gbp_per_million
        ) / _MILLION
        return raw.quantize(_COST_QUANTUM, rounding=ROUND_CEILING)


def _price(where: str, entry: Any) -> ModelPrice:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table with {' and '.join(_FIELDS)}")
    unknown = set(entry) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    values = {}
    for name in _FIELDS:
        if name not in entry:
            raise ConfigError(f"{where}.{name}: missing")
        raw = entry[name]
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ConfigError(f"{where}.{name}: {raw!r} is not a number")
        try:
            value = Decimal(str(raw))
        except InvalidOperation:
            raise ConfigError(f"{where}.{name}: {raw!r} is not a number") from None
        if not value.is_finite() or value < 0:
            raise ConfigError(f"{where}.{name}: {raw!r} must be a non-negative number")
        values[name] = value
    return ModelPrice(**values)


def _parse(source: str, text: str) -> tuple[dict[str, ModelPrice], ModelPrice | None]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None
    unknown = set(data) - {"models", "default"}
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {', '.join(sorted(unknown))}")
    models_raw = data.get("models", {})
    if not isinstance(models_raw, dict):
        raise ConfigError(f"{source}: [models] must be a table of models")
    models = {
        name: _price(f'{source}: [models."{name}"]', entry) for name, entry in models_raw.items()
    }
    default = _price(f"{source}: [default]", data["default"]) if "default" in data else None
    return models, default


def load_price_table(override: Path | None = None) -> PriceTable:
    """The shipped prices, overridden by ``override`` (MF_PRICING_FILE) when given."""
    shipped = resources.files(__package__ or "mf_worker.cost").joinpath("prices.toml")
    models, default = _parse("shipped prices.toml", shipped.read_text(encoding="utf-8"))
    assert default is not None
    if override is not None:
        try:
            text = override.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"MF_PRICING_FILE={override}: cannot read ({exc.strerror})") from None
        extra, extra_default = _parse(f"MF_PRICING_FILE={override}", text)
        models.update(extra)
        default = extra_default or default
    return PriceTable(models=models, default=default)
