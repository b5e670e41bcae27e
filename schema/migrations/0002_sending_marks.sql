-- 0002: what "may have reached the API" means, recorded before a request leaves.
--
-- sending_at: set (under the claim's token) just before a relay sends the row's request, and
-- cleared when the result is recorded. A row whose lease ran out while it is set may have
-- reached the API: the next claim marks it outcome_unknown and writes an attempt row with the
-- outcome 'unknown'. A row whose lease ran out while it is null never left: a later 404 means
-- the action is unknown to the API, and the row goes dead instead of being read as delivered.

alter table outbox.action_status_updates add column sending_at timestamptz;
comment on column outbox.action_status_updates.sending_at is
    'Set just before the current claim''s request is sent; a claim that expires with it set may have reached the API.';

alter table outbox.delivery_attempts add column reached_api text;
alter table outbox.delivery_attempts add constraint reached_api_known check (reached_api in ('answered', 'maybe', 'no'));
comment on column outbox.delivery_attempts.reached_api is
    'answered: an HTTP answer arrived; maybe: no answer, the request may have been applied; '
    'no: it never left (the connection was not established). Null for requests made before 0002.';

alter table outbox.delivery_attempts drop constraint outcome_known;
alter table outbox.delivery_attempts add constraint outcome_known check (
    outcome in ('delivered', 'delivered_earlier', 'retry', 'dead', 'reauth', 'paused', 'superseded',
                'unknown'));
comment on column outbox.delivery_attempts.outcome is
    'delivered; delivered_earlier (an earlier unknown attempt had landed); retry; dead; '
    'reauth (401, token renewed); paused (target paused, no attempt charged); '
    'superseded (answer arrived after the lease was lost, not recorded on the update); '
    'unknown (the request may have reached the API but no answer was recorded: the relay stopped, '
    'or the request was cut off)';

do $$
begin
    if exists (select 1 from pg_roles where rolname = 'outbox_relay') then
        grant update (sending_at) on outbox.action_status_updates to outbox_relay;
    end if;
end $$;
