"""How a model samples its replies: part of an agent's definition, recorded in SessionStarted.

Every provider adapter sends these on every call (a server's own defaults differ: llama.cpp
samples at temperature 0.8 with no output cap), so the same agent behaves the same however
its model is reached, and a resume or fork samples as the original run did.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_TEMPERATURE = 0.0
DEFAULT_MAX_OUTPUT_TOKENS = 1024  # a runaway reply (small models loop) ends here, not at the context's end
MAX_STOP_SEQUENCES = 4  # OpenAI's limit; Anthropic takes more


class SamplingError(ValueError):
    """Sampling settings that cannot be used; a one-line message naming the setting."""

    def __init__(self, where: str, setting: str, reason: str) -> None:
        super().__init__(f"{where}: {setting}: {reason}")
        self.setting, self.reason = setting, reason


class Sampling(BaseModel):
    """The sampling settings of an agent; the defaults are the safe ones (deterministic, capped)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0, allow_inf_nan=False)
    """0 picks the likeliest token: replies are repeatable and tool calls stay well-formed."""
    max_output_tokens: int = Field(DEFAULT_MAX_OUTPUT_TOKENS, ge=1, le=1_000_000)
    """Cap on the tokens of one reply (OpenAI `max_tokens`, Anthropic `max_tokens`)."""
    stop: tuple[str, ...] = ()
    """Texts that end a reply where they appear (not included in it)."""
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    """Nucleus sampling; None leaves the server's default (Anthropic refuses it with temperature)."""
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    """For servers that honour one (OpenAI, llama.cpp); None: the server's choice."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> tuple[str, ...]:
        if value is None or isinstance(value, str):
            return (value,) if value else ()
        if not isinstance(value, list | tuple):
            raise ValueError("a list of texts")
        items = tuple(value)
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        for s in items:
            if not isinstance(s, str) or not s or len(s) > 200:
                raise ValueError("a stop sequence is a non-empty text of at most 200 characters")
        return items


def sampling_from(values: dict[str, Any] | None = None, base: Sampling | None = None, where: str = "sampling") -> Sampling:
    """`base` (default: the safe defaults) with `values` changed; SamplingError names what is wrong."""
    merged = {**(base or Sampling()).model_dump(), **(values or {})}
    try:
        return Sampling(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "sampling"
        raise SamplingError(where, name, first["msg"].removeprefix("Value error, ")) from None


def recorded(temperature: float | None, max_output_tokens: int | None, stop: list[str] | tuple[str, ...],
             top_p: float | None, seed: int | None) -> Sampling:
    """The settings a SessionStarted records (trusted: our schema decoded them); what it
    leaves None (a v1 event from before they were recorded) takes the default."""
    return Sampling.model_construct(
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
        max_output_tokens=DEFAULT_MAX_OUTPUT_TOKENS if max_output_tokens is None else max_output_tokens,
        stop=tuple(stop), top_p=top_p, seed=seed,
    )


def record_fields(sampling: Sampling) -> dict[str, Any]:
    """SessionStarted's fields for `sampling` (every one given: a session records what it sends)."""
    return {"temperature": sampling.temperature, "max_output_tokens": sampling.max_output_tokens,
            "stop": list(sampling.stop), "top_p": sampling.top_p, "seed": sampling.seed}
