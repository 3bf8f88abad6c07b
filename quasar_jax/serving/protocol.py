"""Request bodies of the OpenAI-compatible API as typed (pydantic) models, and their errors.

Every field the server accepts is declared here, with its type and range; anything else is
refused (``extra="forbid"``), so an unknown parameter is a 400 that names it, never silently
ignored. Validation is strict (no "8" for 8, no 1.5 for an integer). A pydantic error becomes
OpenAI's error object: ``param`` (the field, ``messages[1].content`` for nested ones) and
``code`` (``unsupported_parameter``, ``missing_required_parameter``, ``invalid_type``,
``invalid_value``, ``invalid_json``). Checks that need the served model (vocabulary, context
length, stop-id slots) are made by ``quasar_jax.serving.api``. docs/serving.md has the table of
every OpenAI and vLLM field and what this server does with it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quasar_jax.speculative.logits import MAX_LOGIT_BIAS, MAX_LOGPROBS

MAX_STOP_STRINGS = 16
MAX_CHOICES = 128  # prompts x n per request
INT64 = dict(ge=-2**63, le=2**63 - 1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]
    name: str | None = None  # accepted, not used


Probability = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class _Common(_Strict):
    """Fields of both endpoints (OpenAI's, then vLLM's extensions)."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=100)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    seed: Annotated[int, Field(**INT64)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = None  # accepted, not used
    best_of: Annotated[int, Field(ge=1)] | None = None  # only null or n
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None  # 0 or -1 = off
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=100)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Annotated[int, Field(ge=1)] | None = None
    return_tokens_as_token_ids: bool | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: str | None = None  # only null
    add_special_tokens: bool = True  # vLLM


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True  # vLLM
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: e.g. {"enable_thinking": false}


_WHAT = {"prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
         "stop": f"a string or a list of at most {MAX_STOP_STRINGS} strings",
         "content": "a string or a list of text parts"}
_TYPE_ERRORS = ("type", "parsing", "model_attributes_type", "union_tag_invalid", "is_instance_of")


_DICTS = ("logit_bias", "chat_template_kwargs")  # fields whose keys are data, not names


def _is_tag(part) -> bool:
    """A union member's tag in an error location (``str``, ``list[int]``), not a field name."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def _param(loc: tuple) -> str | None:
    """``("messages", 0, "content", "str")`` -> ``messages[0].content`` (union member tags and
    dict keys dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_tag(part):
            out += ("." if out else "") + part
        if part in _DICTS:
            break
    return out or None


def api_error(err: ValidationError) -> ApiError:
    """The first pydantic error as an OpenAI error object."""
    e = err.errors(include_url=False)[0]
    kind, param = e["type"], _param(e["loc"])
    if param is None:
        return ApiError(400, "the request body must be a JSON object" if kind == "model_type"
                        else f"invalid JSON body: {e['msg']}", None, "invalid_json")
    if kind == "extra_forbidden":
        return ApiError(400, f"unsupported parameter '{param}'", param, "unsupported_parameter")
    if kind == "missing":
        return ApiError(400, f"'{param}' is required", param, "missing_required_parameter")
    field = param.rsplit(".", 1)[-1].split("[")[0]
    typed = kind.endswith(_TYPE_ERRORS) or kind in _TYPE_ERRORS
    if typed and field in _WHAT:  # a union: pydantic's message names only one of its members
        return ApiError(400, f"'{param}' must be {_WHAT[field]}", param, "invalid_type")
    got = e.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else type(got).__name__
    return ApiError(400, f"'{param}': {e['msg']} (got {shown})", param, "invalid_type" if typed else "invalid_value")


def parse(body: bytes, kind: str) -> CompletionRequest | ChatRequest:
    """A request body (``kind``: completions | chat) -> its model; ``ApiError`` when invalid."""
    model = ChatRequest if kind == "chat" else CompletionRequest
    try:
        return model.model_validate_json(body or b"null", strict=True)
    except ValidationError as err:
        raise api_error(err) from None
