-- 0005: several relays share one target's pause. A relay whose breaker opened for a target (transient
-- failures, refused credentials) writes until when it holds the pause; the other live relays of the
-- database pause that target too instead of probing it themselves (relay/core/peers.py).
alter table outbox.relay_targets add column paused_until timestamptz;
comment on column outbox.relay_targets.paused_until is
    'Until when this relay holds its own pause of the target (breaker open or probing); null while serving '
    'or while only following another relay''s pause.';
