"""The MQTT protocol between the aggregator and devices: topics, envelopes, messages, chunks.

Topics (prefix `fedclip`, QoS 1; the broker ACL is written against exactly these):

- `fedclip/<job>/global`           aggregator, retained: the current global adapter
- `fedclip/<job>/control`          aggregator, retained: job state (running / done)
- `fedclip/<job>/update/<client>`  one device: its update for a round
- `fedclip/<job>/status/<client>`  one device, retained: hello/status; its last will "offline"

Every payload is an envelope

    b"FCMQ" | version u8 | header length u32 (little-endian) | JSON header | binary body

The JSON header carries the message type and metadata; the body carries a wire frame
(`fedclip_edge.wire`) for global models and updates. Never pickle, never JSON lists of floats.
A payload above the transport's `max_payload` travels as N chunk envelopes (type `chunk`) that
carry a transfer id, index, count, total length and the sha256 of the whole; `Reassembler`
puts them back together with bounded memory and time. Decoding treats input as hostile and
raises `MessageRejected` with a `reason` a receiver can count.

The protocol, by layer (each imports only those above it):

- `broker/envelope.py`: the envelope, `MessageRejected` and its reasons, `peek_type`;
- `broker/topics.py`: topic names, id checks, filter matching;
- `broker/chunks.py`: `split_payload` and the `Reassembler`;
- `broker/fields.py`: the bounds and checks of every field a message carries;
- `broker/messages.py`: the typed messages (with their signed fields) and `decode_message`.

Import from `fedclip_edge.broker.protocol`: the names below are the public API.
"""

from __future__ import annotations

from fedclip_edge.broker.chunks import (
    MAX_CHUNKS,
    MAX_TRANSFERS_PER_TOPIC,
    Reassembler,
    split_payload,
)
from fedclip_edge.broker.envelope import (
    DEFAULT_MAX_PAYLOAD,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    REASONS,
    MessageRejected,
    decode_envelope,
    encode_envelope,
    peek_type,
)
from fedclip_edge.broker.fields import (
    MAX_DIM,
    MAX_ENTRIES,
    MAX_HAVE,
    MAX_METRIC,
    MAX_ROUND,
    MAX_SAMPLES,
    MAX_SECONDS,
    MAX_TEXT,
    SEED_RANGE,
    TEXT_METRICS,
)
from fedclip_edge.broker.messages import (
    CONTROL_STATES,
    STATES,
    Control,
    GlobalModel,
    Message,
    Status,
    Update,
    decode_message,
    offline_status,
)
from fedclip_edge.broker.topics import (
    AGGREGATOR_ID,
    PREFIX,
    QOS,
    BadId,
    check_id,
    control_topic,
    global_topic,
    parse_topic,
    status_filter,
    status_topic,
    topic_matches,
    update_filter,
    update_topic,
)

__all__ = [
    "AGGREGATOR_ID",
    "CONTROL_STATES",
    "DEFAULT_MAX_PAYLOAD",
    "MAGIC",
    "MAX_CHUNKS",
    "MAX_DIM",
    "MAX_ENTRIES",
    "MAX_HAVE",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_METRIC",
    "MAX_ROUND",
    "MAX_SAMPLES",
    "MAX_SECONDS",
    "MAX_TEXT",
    "MAX_TRANSFERS_PER_TOPIC",
    "MESSAGE_TYPES",
    "PREFIX",
    "PROTOCOL_VERSION",
    "QOS",
    "REASONS",
    "SEED_RANGE",
    "STATES",
    "TEXT_METRICS",
    "BadId",
    "Control",
    "GlobalModel",
    "Message",
    "MessageRejected",
    "Reassembler",
    "Status",
    "Update",
    "check_id",
    "control_topic",
    "decode_envelope",
    "decode_message",
    "encode_envelope",
    "global_topic",
    "offline_status",
    "parse_topic",
    "peek_type",
    "split_payload",
    "status_filter",
    "status_topic",
    "topic_matches",
    "update_filter",
    "update_topic",
]
