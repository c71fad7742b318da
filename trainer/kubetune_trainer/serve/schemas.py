"""Request and response bodies of the inference server (OpenAI wire format where one exists).

Requests reject unknown fields, so a typo comes back as a 400 naming the field instead of being
silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


def _unicode(value: str) -> str:
    # JSON may escape a lone UTF-16 surrogate ("\\ud800"); tokenizers raise TypeError on it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"lone UTF-16 surrogate at character {err.start}; expected valid Unicode text"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
StopField = Annotated[
    str | list[Annotated[str, Field(min_length=1)]] | None,
    Field(description="Up to 4 strings; generation stops before the first one produced."),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Request):
    """One part of a multi-part message content; only text is supported."""

    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _GenerationRequest(_Request):
    model: str | None = Field(default=None, description="Served model name; optional.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(default=1, description="Only one choice per request is supported.")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def stops(self) -> list[str]:
        # The validator above already turned the field into a list.
        return list(self.stop or [])


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_GenerationRequest):
    prompt: Text | list[Text] = Field(description="One prompt, or a list for one choice each.")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt list must not be empty")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ClassifyRequest(_Request):
    model: str | None = Field(default=None, description="Served model name; optional.")
    text: Text | list[Text] = Field(description="One text or a list of texts to classify.")

    @field_validator("text")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("text list must not be empty")
        texts = [value] if isinstance(value, str) else value
        if any(not t.strip() for t in texts):
            raise ValueError("text must not be empty or only whitespace")
        return value

    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


class Classification(BaseModel):
    label: str
    score: float = Field(description="Probability of the top label.")
    scores: dict[str, float] = Field(description="Probability of every label (sums to 1).")
    escalate: bool
    escalation_reason: Literal["low_confidence", "escalation_label"] | None = None


class ClassifyResponse(BaseModel):
    object: Literal["classification"] = "classification"
    model: str
    results: list[Classification]
    usage: Usage


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kubetune"
    task: str | None = None
    ready: bool
    card: dict[str, Any] | None = Field(default=None, description="The model's kubetune.json.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None
