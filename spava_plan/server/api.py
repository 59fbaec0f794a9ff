"""The OpenAI chat-completions request, typed (pydantic, strict): body bytes -> ChatRequest.

Strict typing as OpenAI's own API: a string is not a boolean or a number ("stream": "false" is a
400 naming ``stream``); unknown fields are ignored (clients send fields of newer API versions);
what this server cannot honour yet is refused with a 400 naming the field instead of being
silently ignored: ``n`` > 1, ``tools`` / ``tool_choice``, ``logprobs`` / ``top_logprobs``, a
``response_format`` other than text, and conversations (system or developer messages, earlier
turns): a plan's prompt layout holds one user turn with one video, so they would otherwise be
dropped. Every malformed body (invalid JSON or UTF-8, deep nesting, lone surrogates) is a
RequestError (HTTP 400), never a 500.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ..entry.session import Sampling
from ..errors import InputError

MAX_STOP = 4
MAX_TEXT_CHARS = 1 << 20  # a question longer than this is no question (the plan's limit is in tokens anyway)


class RequestError(InputError):
    """A malformed or unsupported request body (HTTP 400); ``field`` is the JSON path."""

    def __init__(self, message: str, field: str, status: int = 400):
        super().__init__(f"'{field}': {message}", setting=field)
        self.field, self.status = field, status


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _URL(_Model):
    url: StrictStr


class TextPart(_Model):
    type: Literal["text"]
    text: Annotated[StrictStr, Field(max_length=MAX_TEXT_CHARS)]


class VideoPart(_Model):
    type: Literal["video_url"]
    video_url: _URL


class ImagePart(_Model):  # recognised so that the refusal names it (this server answers about videos)
    type: Literal["image_url", "input_audio", "file", "video"]


Part = Annotated[Union[TextPart, VideoPart, ImagePart], Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Annotated[StrictStr, Field(max_length=MAX_TEXT_CHARS)], List[Part], None] = None


class StreamOptions(_Model):
    include_usage: Optional[StrictBool] = None


class ChatBody(_Model):
    messages: Annotated[List[Message], Field(min_length=1, max_length=64)]
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = None
    max_completion_tokens: Optional[StrictInt] = None
    temperature: Optional[Union[StrictInt, StrictFloat]] = None
    top_p: Optional[Union[StrictInt, StrictFloat]] = None
    seed: Optional[StrictInt] = None
    stop: Union[StrictStr, List[StrictStr], None] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    # Accepted only at the values that mean "not used" (refused otherwise, by name).
    n: Optional[StrictInt] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    response_format: Optional[Any] = None


@dataclass
class ChatRequest:
    video_url: str
    question: str
    sampling: Sampling
    stop: list[str]
    stream: bool
    model: str


_TYPE_NAMES = {"int", "float", "str", "bool", "list", "dict", "none", "bytes"}


def _where(loc: tuple) -> str:
    """pydantic's error location -> a JSON path (messages[0].content[1].text), without the names of
    union branches pydantic adds (``int``, ``list[...]``, a tag repeated before its field)."""
    out, last = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_NAMES or any(c in part for c in "-[(") or part == last:
            pass
        else:
            out += f".{part}" if out else part
        last = part
    return out or "body"


def _first_error(exc: ValidationError) -> RequestError:
    errors = exc.errors(include_url=False, include_input=False)
    # The deepest location is the most specific (a union reports every branch that failed).
    err = max(errors, key=lambda e: len(e.get("loc", ())))
    where = _where(tuple(err.get("loc", ())))
    if err.get("type") in ("json_invalid", "json_type") or where == "body" and err.get("type") == "model_type":
        message = err.get("msg", "invalid JSON")
        if "recursion" in message.lower():
            message = "the JSON is nested too deeply"
        return RequestError(f"the body is not a valid JSON object: {message}", "body")
    return RequestError(f"{err.get('msg', 'is invalid')}", where)


def _refuse(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise RequestError(message, field)


def _check_unicode(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON allows "\\ud800"; a tokenizer does not)
        raise RequestError("is not valid Unicode (a lone surrogate)", field) from None
    _refuse("\x00" not in text, field, "must not contain a NUL character")


def parse_body(raw: bytes, max_tokens_cap: int, served_model: str | None = None) -> ChatRequest:
    """Body bytes -> ChatRequest, or RequestError (HTTP 400 naming the field; 404 for a ``model``
    other than ``served_model``, as OpenAI and vLLM answer)."""
    try:
        body = ChatBody.model_validate_json(raw)
    except ValidationError as exc:
        raise _first_error(exc) from None
    except (ValueError, RecursionError) as exc:  # the JSON parser itself (deep nesting, bad bytes)
        raise RequestError(f"the body is not a valid JSON object ({type(exc).__name__})", "body") from None
    if served_model is not None and body.model and body.model != served_model:
        raise RequestError(f"the model {body.model!r} does not exist; this server serves {served_model!r}", "model",
                           404)
    return _to_request(body, max_tokens_cap)


def _to_request(body: ChatBody, max_tokens_cap: int) -> ChatRequest:
    _refuse(body.n in (None, 1), "n", "must be 1: this server returns one choice per request")
    _refuse(not body.tools and body.tool_choice in (None, "none"), "tools", "tool calls are not supported")
    _refuse(not body.logprobs and not body.top_logprobs, "logprobs", "log probabilities are not supported")
    fmt = body.response_format
    _refuse(fmt is None or fmt == {"type": "text"}, "response_format",
            "only {'type': 'text'} is supported (no JSON mode or schemas)")
    roles = [m.role for m in body.messages]
    _refuse(roles == ["user"], "messages",
            f"must be one user message (got roles {roles}): system/developer messages and earlier turns are not "
            f"supported by this server's plans, which hold one user turn with one video")
    videos: list[str] = []
    texts: list[str] = []
    content = body.messages[0].content
    if isinstance(content, str):
        _check_unicode(content, "messages[0].content")
        texts.append(content)
    else:
        for i, part in enumerate(content or []):
            where = f"messages[0].content[{i}]"
            if isinstance(part, TextPart):
                _check_unicode(part.text, where + ".text")
                texts.append(part.text)
            elif isinstance(part, VideoPart):
                _check_unicode(part.video_url.url, where + ".video_url.url")
                videos.append(part.video_url.url)
            else:
                raise RequestError(f"{part.type!r} parts are not supported; send one 'video_url' and 'text'",
                                   where + ".type")
    _refuse(len(videos) == 1, "messages[0].content", f"needs exactly one video_url part, got {len(videos)}")
    question = "\n".join(t for t in texts if t.strip()).strip()
    _refuse(bool(question), "messages[0].content", "has no question text")

    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    max_tokens = 16 if max_tokens is None else max_tokens
    _refuse(1 <= max_tokens <= max_tokens_cap, "max_tokens", f"must be an integer within 1..{max_tokens_cap}, "
            f"got {max_tokens}")
    temperature = 0.0 if body.temperature is None else float(body.temperature)
    _refuse(0.0 <= temperature <= 2.0, "temperature", f"must be within 0..2, got {temperature!r}")
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    _refuse(1e-6 <= top_p <= 1.0, "top_p", f"must be within 1e-06..1, got {top_p!r}")
    _refuse(body.seed is None or 0 <= body.seed < 2 ** 63, "seed", f"must be a non-negative integer, got {body.seed}")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    _refuse(len(stop) <= MAX_STOP and all(s for s in stop), "stop",
            f"must be a string or a list of up to {MAX_STOP} non-empty strings")
    for i, s in enumerate(stop):
        _check_unicode(s, f"stop[{i}]")
    sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=body.seed)
    return ChatRequest(videos[0], question, sampling, stop, bool(body.stream), body.model or "")
