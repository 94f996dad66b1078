"""The states and triggers of every statechart, as names mypy can check.

Generated from statecharts/*.yaml by `ferry statecharts render`: do not edit.
`ferry statecharts render --check` (run by CI) fails when it is stale.
"""

from enum import StrEnum

__all__ = [
    "ConnectionState",
    "ConnectionTrigger",
    "LeaseState",
    "LeaseTrigger",
    "MigrationState",
    "MigrationTrigger",
    "ProxyState",
    "ProxyTrigger",
    "RoleState",
    "RoleTrigger",
    "TakeoverState",
    "TakeoverTrigger",
]


class ConnectionState(StrEnum):
    """The states of statecharts/connection.yaml."""

    ESTABLISHED = "established"
    FROZEN = "frozen"
    CHECKPOINTED = "checkpointed"
    SENT = "sent"
    RESTORED = "restored"
    RELEASED = "released"
    ABORTED = "aborted"


class ConnectionTrigger(StrEnum):
    """The triggers of statecharts/connection.yaml."""

    ABORT = "abort"
    CHECKPOINT = "checkpoint"
    FREEZE = "freeze"
    RELEASE = "release"
    RESTORED = "restored"
    RESUME = "resume"
    SEND = "send"


class LeaseState(StrEnum):
    """The states of statecharts/lease.yaml."""

    UNREGISTERED = "unregistered"
    REGISTERED = "registered"
    INCOMING = "incoming"
    ACQUIRING = "acquiring"
    TAKING_OVER = "taking_over"
    HELD = "held"
    RENEW_FAILED = "renew_failed"
    TRANSFERRING = "transferring"
    PASSING = "passing"
    RELEASED = "released"
    FENCED = "fenced"
    STOPPED = "stopped"


class LeaseTrigger(StrEnum):
    """The triggers of statecharts/lease.yaml."""

    ACQUIRE = "acquire"
    ACQUIRE_FAILED = "acquire_failed"
    ACQUIRED = "acquired"
    ADOPTED = "adopted"
    CANCEL_INCOMING = "cancel_incoming"
    EXPIRED = "expired"
    KEPT = "kept"
    LOST = "lost"
    MIGRATED_OUT = "migrated_out"
    OFFER_FAILED = "offer_failed"
    PASS_ON = "pass_on"
    PASSED_ON = "passed_on"
    PREPARE_MIGRATE = "prepare_migrate"
    RECLAIMED = "reclaimed"
    REGISTER = "register"
    REGISTER_INCOMING = "register_incoming"
    RELEASE = "release"
    RENEWAL_FAILED = "renewal_failed"
    RENEWED = "renewed"
    SHUTDOWN = "shutdown"
    TAKE_OVER = "take_over"
    TAKE_OVER_FAILED = "take_over_failed"
    TAKEN_OVER = "taken_over"


class MigrationState(StrEnum):
    """The states of statecharts/migration.yaml."""

    CONNECTING = "connecting"
    NEGOTIATING = "negotiating"
    BULK_PASS = "bulk_pass"
    DIRTY_PASS = "dirty_pass"
    QUIESCING = "quiescing"
    OFFERING = "offering"
    COMMITTING = "committing"
    COMPLETED = "completed"
    RECLAIMING = "reclaiming"
    CANCELLING = "cancelling"
    IN_DOUBT = "in_doubt"
    RETRY_WAIT = "retry_wait"
    RECONNECTING = "reconnecting"
    RENEGOTIATING = "renegotiating"
    FAILED = "failed"
    CANCELLED = "cancelled"


class MigrationTrigger(StrEnum):
    """The triggers of statecharts/migration.yaml."""

    ACCEPTED = "accepted"
    BREAK_MIGRATION = "break_migration"
    COMMIT = "commit"
    COMMIT_REJECTED = "commit_rejected"
    COMMITTED = "committed"
    CONNECTED = "connected"
    FAIL = "fail"
    GIVE_UP = "give_up"
    LEASE_LOST = "lease_lost"
    MIRRORED = "mirrored"
    NEXT_PASS = "next_pass"
    OFFER = "offer"
    OFFER_FAILED = "offer_failed"
    QUIESCE = "quiesce"
    RECLAIM = "reclaim"
    RECLAIMED = "reclaimed"
    RESOLVE_ABORTED = "resolve_aborted"
    RESOLVE_COMMITTED = "resolve_committed"
    RETRY = "retry"
    STOP = "stop"
    VETO = "veto"


class ProxyState(StrEnum):
    """The states of statecharts/proxy.yaml."""

    ACCEPTED = "accepted"
    CONNECTED = "connected"
    UPSTREAM_LOST = "upstream_lost"
    RECONNECTING = "reconnecting"
    NEGOTIATING = "negotiating"
    REPLAYING = "replaying"
    FAILED = "failed"
    RETRYING = "retrying"
    CLOSED = "closed"


class ProxyTrigger(StrEnum):
    """The triggers of statecharts/proxy.yaml."""

    ATTEMPT_FAILED = "attempt_failed"
    CLOSE = "close"
    DIALED = "dialed"
    GIVE_UP = "give_up"
    LOST = "lost"
    MISMATCH = "mismatch"
    NEGOTIATED = "negotiated"
    RECONNECT = "reconnect"
    REDIRECTED = "redirected"
    REPLAYED = "replayed"
    RETRY = "retry"


class RoleState(StrEnum):
    """The states of statecharts/role.yaml."""

    STARTING = "starting"
    LISTENING = "listening"
    RECEIVING = "receiving"
    COMMITTING = "committing"
    SERVING = "serving"
    MIGRATING = "migrating"
    QUIESCING = "quiescing"
    HANDING_OFF = "handing_off"
    PASSING_ON = "passing_on"
    HANDED_OFF = "handed_off"
    IN_DOUBT = "in_doubt"
    FENCED = "fenced"
    STOPPED = "stopped"


class RoleTrigger(StrEnum):
    """The triggers of statecharts/role.yaml."""

    BREAK_MIGRATION = "break_migration"
    COMMIT = "commit"
    COMMIT_UNKNOWN = "commit_unknown"
    COMMITTED = "committed"
    HAND_OFF = "hand_off"
    HANDED_OFF = "handed_off"
    KEPT = "kept"
    LEASE_LOST = "lease_lost"
    LISTEN = "listen"
    MIGRATE = "migrate"
    MIGRATION_FAILED = "migration_failed"
    MIRRORED = "mirrored"
    PASS_ON = "pass_on"
    PASSED_ON = "passed_on"
    QUIESCE = "quiesce"
    RESOLVE_FENCED = "resolve_fenced"
    RESOLVE_HANDED_OFF = "resolve_handed_off"
    RESOLVE_SERVING = "resolve_serving"
    RETRY_MIGRATION = "retry_migration"
    SENDER_CONNECTED = "sender_connected"
    SENDER_LOST = "sender_lost"
    SERVE = "serve"
    SHUTDOWN = "shutdown"
    TAKEN_OVER = "taken_over"


class TakeoverState(StrEnum):
    """The states of statecharts/takeover.yaml."""

    HOLDING = "holding"
    OFFERED = "offered"
    SENT = "sent"
    COMMITTED = "committed"
    HANDED_OVER = "handed_over"
    RESUMED = "resumed"


class TakeoverTrigger(StrEnum):
    """The triggers of statecharts/takeover.yaml."""

    ACCEPTED = "accepted"
    COMMIT = "commit"
    CONFIRMED = "confirmed"
    OFFER = "offer"
    RESUME = "resume"
    UNCONFIRMED = "unconfirmed"
