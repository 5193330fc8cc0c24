# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EmbeddingRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class EmbeddingReply(_message.Message):
    __slots__ = ("embedding", "spend_level", "stability", "recent_spend_anomaly", "payment_part_sha256")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    SPEND_LEVEL_FIELD_NUMBER: _ClassVar[int]
    STABILITY_FIELD_NUMBER: _ClassVar[int]
    RECENT_SPEND_ANOMALY_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_PART_SHA256_FIELD_NUMBER: _ClassVar[int]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    spend_level: str
    stability: str
    recent_spend_anomaly: bool
    payment_part_sha256: str
    def __init__(self, embedding: _Optional[_Iterable[float]] = ..., spend_level: _Optional[str] = ..., stability: _Optional[str] = ..., recent_spend_anomaly: bool = ..., payment_part_sha256: _Optional[str] = ...) -> None: ...
