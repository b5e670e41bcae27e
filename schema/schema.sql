-- The canonical DDL of the outbox schema: what every migration in migrations/ adds up to.
-- Read this to know the schema; apply migrations/ (outbox-relay migrate) to create it.
-- tests/test_schema.py proves that both produce the same catalog.

create schema if not exists outbox;
create table if not exists outbox.schema_migrations (
    version    integer primary key,
    name       text not null,
    checksum   text not null,
    applied_at timestamptz not null default now()
);


create table outbox.error_codes (
    code        text primary key,
    description text not null default '',
    constraint error_code_format check (code ~ '^[A-Z][A-Z0-9_]{0,63}$')
);
comment on table outbox.error_codes is
    'Accepted errors[].code values for updateActionStatus. Add one with a plain INSERT.';

insert into outbox.error_codes (code, description) values
    ('INVALID_INPUT',          'The action''s input was invalid'),
    ('DATA_NOT_FOUND',         'Data needed for the action was not found'),
    ('UNEXPECTED',             'An unexpected error occurred'),
    ('UNAVAILABLE',            'A system needed for the action was unavailable'),
    ('TOO_MANY_REQUEST',       'The action was refused for too many requests'),
    ('ACTION_NOT_SUPPORTED',   'The action is not supported'),
    ('ORDER_IN_WRONG_STATE',   'The order is in a state that does not allow the action'),
    ('RETURN_IN_WRONG_STATE',  'The return is in a state that does not allow the action'),
    ('OTHER',                  'Any other failure'),
    ('CARRIER_NOT_SUPPORTED',  'The carrier is not supported'),
    ('MISSING_CARRIER',        'The carrier is missing'),
    ('WAREHOUSE_ID_NOT_FOUND', 'The warehouse id was not found'),
    ('WAREHOUSE_ID_REQUIRED',  'A warehouse id is required');

-- One row per action outcome to report.
-- States and what moves a row out of them:
--   pending    claimed by a relay when next_attempt_at <= now()         -> in_flight
--   in_flight  the relay records the answer                              -> delivered | pending (retry) | dead
--              or its lease (next_attempt_at while in flight) runs out   -> claimable again
--   delivered  final (purged by retention)
--   dead       final; `outbox-relay dead retry` puts it back             -> pending
create table outbox.action_status_updates (
    id               bigint generated always as identity primary key,
    action_id        text not null,
    status           text not null,
    errors           jsonb not null default '[]',
    target           text not null default 'default',
    state            text not null default 'pending',
    attempts         integer not null default 0,
    created_at       timestamptz not null default now(),
    next_attempt_at  timestamptz not null default now(),
    delivered_at     timestamptz,
    dead_at          timestamptz,
    last_error       text,
    last_http_status integer,
    requests         integer not null default 0,
    outcome_unknown  boolean not null default false,
    claim_token      uuid,
    claimed_by       text,
    requeued_at      timestamptz,
    requeue_reason   text,
    sending_at       timestamptz,
    requeued_by      text,
    last_error_code  text,
    constraint action_status_updates_target_action_id_key unique (target, action_id),
    constraint action_id_length check (char_length(action_id) between 1 and 255),
    constraint action_id_printable check (
        action_id !~ '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]'),
    constraint status_known check (status in ('SUCCESS', 'FAILED')),
    constraint errors_is_array check (jsonb_typeof(errors) = 'array'),
    constraint failed_requires_errors check (
        status <> 'FAILED' or (jsonb_typeof(errors) = 'array' and jsonb_array_length(errors) > 0)),
    constraint success_has_no_errors check (status <> 'SUCCESS' or errors = '[]'::jsonb),
    constraint target_name check (target ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    constraint state_known check (state in ('pending', 'in_flight', 'delivered', 'dead')),
    constraint attempts_counted check (attempts >= 0 and requests >= attempts),
    constraint delivered_at_iff_delivered check ((state = 'delivered') = (delivered_at is not null)),
    constraint dead_at_iff_dead check ((state = 'dead') = (dead_at is not null)),
    constraint claim_iff_in_flight check ((state = 'in_flight') = (claim_token is not null))
);
comment on column outbox.action_status_updates.next_attempt_at is
    'Not claimed before this. While in_flight it is the end of the claim''s lease.';
comment on column outbox.action_status_updates.attempts is
    'HTTP attempts charged so far (auth retries and paused targets charge none).';
comment on column outbox.action_status_updates.requests is 'HTTP requests made so far.';
comment on column outbox.action_status_updates.outcome_unknown is
    'An earlier request may have been applied without its answer being seen.';
comment on column outbox.action_status_updates.claim_token is
    'Fencing token of the current claim: a result is recorded only under the same token.';
comment on column outbox.action_status_updates.sending_at is
    'Set just before the current claim''s request is sent; a claim that expires with it set may have reached the API.';
comment on column outbox.action_status_updates.last_error_code is
    'error_code of the last request recorded for this update (null: none, or recorded by a relay older than 0006).';
comment on column outbox.action_status_updates.requeued_by is
    'The database role (current_user) that last put this dead row back to pending; set by a trigger.';

-- Vacuumed after 2% of its rows changed instead of 20%: retention's deletes are reclaimed (and
-- the space reused) within about a day at 200,000 rows a day, and the visibility map stays fresh
-- for the index-only counts of `status`.
alter table outbox.action_status_updates set (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);

-- What a relay claims: due rows per target. Finished rows are not in it, so the claim's
-- cost does not grow with history.
create index action_status_updates_claimable
    on outbox.action_status_updates (target, next_attempt_at)
    where state in ('pending', 'in_flight');
-- Actions found by id or by a prefix (action_id like 'abc%'): text_pattern_ops serves a LIKE prefix
-- under any collation, and equality (0008).
create index action_status_updates_action_id_pattern
    on outbox.action_status_updates (action_id text_pattern_ops);
-- The audit console's lists: newest first by (created_at, id), paged by keyset, by date range (0008).
create index action_status_updates_created_at
    on outbox.action_status_updates (created_at, id);
create index action_status_updates_delivered_at
    on outbox.action_status_updates (delivered_at) where state = 'delivered';
-- Dead rows, newest first, with what `status` and `dead list` read: no visit to the table (0007).
create index action_status_updates_dead
    on outbox.action_status_updates (dead_at) include (target, last_error_code, id) where state = 'dead';

-- Refuse bad rows inside the writer's transaction, naming the rule and saying what is wrong.
create function outbox.validate_action_status_update() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    item  jsonb;
    pos   integer := 0;
    key   text;
    err_code text;
    msg   jsonb;
    bad   text;
    fail  text;
begin
    if new.action_id is null or new.status is null or new.errors is null or new.target is null then
        raise exception using
            errcode = 'not_null_violation', schema = 'outbox', table = 'action_status_updates',
            message = format('%s must not be null', case when new.action_id is null then 'action_id'
                when new.status is null then 'status' when new.errors is null then 'errors' else 'target' end);
    end if;
    if char_length(new.action_id) = 0 then
        bad := 'action_id_length'; fail := 'action_id must not be empty';
    elsif char_length(new.action_id) > 255 then
        bad := 'action_id_length';
        fail := format('action_id is %s characters long; at most 255 are allowed', char_length(new.action_id));
    elsif new.action_id ~ '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]' then
        bad := 'action_id_printable'; fail := 'action_id must not contain whitespace or control characters';
    elsif new.status is distinct from 'SUCCESS' and new.status is distinct from 'FAILED' then
        bad := 'status_known'; fail := format('status must be SUCCESS or FAILED, not %s', coalesce('"' || new.status || '"', 'null'));
    elsif new.target !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$' then
        bad := 'target_name'; fail := format('target "%s" is not a valid name (1-63 letters, digits, "_", "-" or ".")', new.target);
    elsif jsonb_typeof(new.errors) <> 'array' then
        bad := 'errors_is_array';
        fail := format('errors must be a JSON array of {"code", "message"} objects, not a JSON %s', jsonb_typeof(new.errors));
    elsif jsonb_array_length(new.errors) > 100 then
        bad := 'errors_count';
        fail := format('errors has %s entries; at most 100 are allowed', jsonb_array_length(new.errors));
    elsif octet_length(new.errors::text) > 65536 then
        bad := 'errors_size';
        fail := format('errors is %s bytes long as JSON text; at most 65536 (64 KiB) are allowed',
                       octet_length(new.errors::text));
    elsif new.status = 'FAILED' and jsonb_array_length(new.errors) = 0 then
        bad := 'failed_requires_errors'; fail := 'FAILED requires at least one error';
    elsif new.status = 'SUCCESS' and jsonb_array_length(new.errors) > 0 then
        bad := 'success_has_no_errors'; fail := 'SUCCESS must not carry errors';
    end if;

    if fail is null then
        for item in select value from jsonb_array_elements(new.errors) loop
            if jsonb_typeof(item) <> 'object' then
                bad := 'error_shape';
                fail := format('errors[%s] must be an object with "code" and "message", not a JSON %s', pos, jsonb_typeof(item));
                exit;
            end if;
            select k into key from jsonb_object_keys(item) as k where k not in ('code', 'message') limit 1;
            if key is not null then
                bad := 'error_shape';
                fail := format('errors[%s] has unknown key "%s"; only "code" and "message" are allowed', pos, key);
                exit;
            end if;
            if jsonb_typeof(item -> 'code') is distinct from 'string' then
                bad := 'error_code_known'; fail := format('errors[%s].code must be a string', pos);
                exit;
            end if;
            err_code := item ->> 'code';
            if not exists (select 1 from outbox.error_codes c where c.code = err_code) then
                bad := 'error_code_known';
                fail := format('unknown error code "%s" in errors[%s] (accepted codes are listed in outbox.error_codes)', err_code, pos);
                exit;
            end if;
            msg := item -> 'message';
            if jsonb_typeof(msg) is distinct from 'string' or btrim(msg #>> '{}') = '' then
                bad := 'error_message_valid'; fail := format('errors[%s].message must be a non-empty string', pos);
                exit;
            end if;
            if char_length(msg #>> '{}') > 2000 then
                bad := 'error_message_valid';
                fail := format('errors[%s].message is %s characters long; at most 2000 are allowed', pos, char_length(msg #>> '{}'));
                exit;
            end if;
            pos := pos + 1;
        end loop;
    end if;

    if fail is not null then
        raise exception using
            errcode = 'check_violation', message = fail, constraint = bad,
            schema = 'outbox', table = 'action_status_updates',
            hint = 'See README.md, "The SQL surface", for what a valid row holds.';
    end if;
    return new;
end $$;

create trigger action_status_updates_validate
    before insert or update of action_id, status, errors, target on outbox.action_status_updates
    for each row execute function outbox.validate_action_status_update();

-- Commit wakes the relay: NOTIFY is delivered when the writer's transaction commits.
create function outbox.notify_relay() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    perform pg_notify('outbox_action_status', '');
    return null;
end $$;

create trigger action_status_updates_notify
    after insert on outbox.action_status_updates
    for each statement execute function outbox.notify_relay();

-- The recommended way to write: an identical repeat returns the existing id; a different
-- outcome for the same action raises an error naming it and what differs (0004).
create function outbox.enqueue_action_status(
    action_id text, status text, errors jsonb default '[]', target text default 'default'
) returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    new_id   bigint;
    existing record;
begin
    errors := coalesce(errors, '[]'::jsonb);
    target := coalesce(target, 'default');
    for round in 1..3 loop
        insert into outbox.action_status_updates as u (action_id, status, errors, target)
        values (action_id, status, errors, target)
        on conflict on constraint action_status_updates_target_action_id_key do nothing
        returning u.id into new_id;
        if new_id is not null then
            return new_id;
        end if;
        select u.id, u.status, u.errors into existing
        from outbox.action_status_updates u
        where u.target = target and u.action_id = action_id;
        if found then
            if existing.status = status and existing.errors = errors then
                return existing.id;
            end if;
            raise exception using
                errcode = 'unique_violation',
                constraint = 'action_status_updates_target_action_id_key',
                schema = 'outbox', table = 'action_status_updates',
                message = format('action "%s" already has a different outcome queued for target "%s": %s',
                                 action_id, target,
                                 case when existing.status is distinct from status
                                      then format('its status is %s, not %s', existing.status, status)
                                      else format('the same status (%s) with different errors', status)
                                 end),
                hint = 'An action''s outcome is reported once; an identical repeat is accepted.';
        end if;
    end loop;
    raise exception 'action "%" could not be enqueued: it was removed while being written', action_id;
end $$;

create sequence outbox.delivery_attempts_id_seq;
-- One row per HTTP request made, append-only, partitioned by month of started_at (UTC).
create table outbox.delivery_attempts (
    id            bigint not null default nextval('outbox.delivery_attempts_id_seq'),
    update_id     bigint not null,
    action_id     text not null,
    target        text not null,
    attempt       integer not null,
    started_at    timestamptz not null,
    duration_ms   double precision not null,
    http_status   integer,
    outcome       text not null,
    error_code    text,
    error_message text,
    response_body text,
    relay_id      text not null,
    reached_api   text,
    db_role       text default current_user,
    constraint attempt_positive check (attempt >= 1),
    constraint outcome_known check (
        outcome in ('delivered', 'delivered_earlier', 'retry', 'dead', 'reauth', 'paused', 'superseded',
                    'unknown')),
    constraint response_body_max_4kib check (octet_length(response_body) <= 4096),
    constraint reached_api_known check (reached_api in ('answered', 'maybe', 'no'))
) partition by range (started_at);
alter sequence outbox.delivery_attempts_id_seq owned by outbox.delivery_attempts.id;
comment on table outbox.delivery_attempts is
    'One row per HTTP request made, append-only. Partitioned by month of started_at (UTC): '
    'see outbox.attempt_partitions. A row outlives its update until its partition is dropped by retention.';
comment on column outbox.delivery_attempts.id is 'From outbox.delivery_attempts_id_seq: unique across partitions.';
comment on column outbox.delivery_attempts.update_id is
    'The action_status_updates.id this request was made for (the update may have been purged since).';
comment on column outbox.delivery_attempts.attempt is 'Request number for this update: 1, 2, ...';
comment on column outbox.delivery_attempts.outcome is
    'delivered; delivered_earlier (an earlier unknown attempt had landed); retry; dead; '
    'reauth (401, token renewed); paused (target paused, no attempt charged); '
    'superseded (answer arrived after the lease was lost, not recorded on the update); '
    'unknown (the request may have reached the API but no answer was recorded: the relay stopped, '
    'or the request was cut off)';
comment on column outbox.delivery_attempts.reached_api is
    'answered: an HTTP answer arrived; maybe: no answer, the request may have been applied; '
    'no: it never left (the connection was not established). Null for requests made before 0002.';
comment on column outbox.delivery_attempts.db_role is
    'The database role that wrote this attempt (current_user); null for attempts written before 0003.';

-- Rows no other partition covers (a clock far off); moved out when a partition for them is made.
create table outbox.delivery_attempts_default partition of outbox.delivery_attempts default;

-- Finds the partition of each update's attempts by index; on the 0.1.0 partition the existing
-- index is attached, not rebuilt. The BRIN index serves date ranges inside a partition.
create index delivery_attempts_update_id on outbox.delivery_attempts (update_id, attempt);
create index delivery_attempts_started_at on outbox.delivery_attempts using brin (started_at);

-- The partitions, oldest first, with their ranges (null: unbounded) and sizes.
create view outbox.attempt_partitions as
with parts as (
    select c.oid, c.relname::text as name, pg_get_expr(c.relpartbound, c.oid) as bound, c.reltuples
    from pg_catalog.pg_inherits i
    join pg_catalog.pg_class c on c.oid = i.inhrelid
    where i.inhparent = 'outbox.delivery_attempts'::regclass
)
select p.name,
       cast(nullif(btrim(substring(p.bound from 'FROM \((.*)\) TO'), ''''), 'MINVALUE') as timestamptz)
           as from_time,
       cast(nullif(btrim(substring(p.bound from 'TO \((.*)\)$'), ''''), 'MAXVALUE') as timestamptz) as to_time,
       p.bound = 'DEFAULT' as is_default,
       greatest(p.reltuples, 0)::bigint as rows_estimate,
       pg_catalog.pg_total_relation_size(p.oid) as bytes
from parts p
order by p.bound = 'DEFAULT', 2 nulls first;
comment on view outbox.attempt_partitions is
    'The partitions of outbox.delivery_attempts: range of started_at (null: unbounded), estimated rows, bytes.';

-- The relay's maintenance job (hourly): monthly partitions from from_time (default: now) to
-- months_ahead months after this one, where no partition covers the month yet. Rows the default
-- partition holds for a new month are moved into it. Returns the names created.
create function outbox.ensure_attempt_partitions(months_ahead integer default 2, from_time timestamptz default null)
returns setof text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    month timestamp;
    last_month timestamp;
    lo timestamptz;
    hi timestamptz;
    name text;
begin
    if months_ahead is null or months_ahead < 0 or months_ahead > 24 then
        raise exception using errcode = 'invalid_parameter_value',
            message = format('months_ahead must be between 0 and 24, not %s', coalesce(months_ahead::text, 'null'));
    end if;
    perform pg_advisory_xact_lock(hashtext('outbox.delivery_attempts partitions'));  -- one at a time
    month := date_trunc('month', least(coalesce(from_time, now()), now()) at time zone 'UTC');
    last_month := date_trunc('month', now() at time zone 'UTC') + make_interval(months => months_ahead);
    if month < last_month - interval '25 years' then
        raise exception using errcode = 'invalid_parameter_value',
            message = format('from_time %s is more than 25 years back', from_time);
    end if;
    while month <= last_month loop
        lo := month at time zone 'UTC';
        hi := (month + interval '1 month') at time zone 'UTC';
        if not exists (select 1 from outbox.attempt_partitions p
                       where not p.is_default
                         and coalesce(p.from_time, '-infinity') < hi and coalesce(p.to_time, 'infinity') > lo) then
            name := 'delivery_attempts_' || to_char(month, 'YYYY_MM');
            execute format('create table outbox.%I (like outbox.delivery_attempts including defaults including constraints)',
                           name);
            execute format('with moved as (delete from outbox.delivery_attempts_default '
                           'where started_at >= %L and started_at < %L returning *) '
                           'insert into outbox.%I select * from moved', lo, hi, name);
            execute format('alter table outbox.delivery_attempts attach partition outbox.%I for values from (%L) to (%L)',
                           name, lo, hi);
            return next name;
        end if;
        month := month + interval '1 month';
    end loop;
end $$;

-- What each running relay does with each target; read by `outbox-relay status`.
create table outbox.relay_targets (
    relay_id     text not null,
    target       text not null,
    state        text not null,
    reason       text,
    since        timestamptz not null default now(),
    heartbeat_at timestamptz not null default now(),
    paused_until timestamptz,
    primary key (relay_id, target),
    constraint relay_target_state check (state in ('serving', 'paused', 'probing'))
);
comment on column outbox.relay_targets.paused_until is
    'Until when this relay holds its own pause of the target (breaker open or probing); null while serving '
    'or while only following another relay''s pause.';

-- The row's state machine, for every role but the table's owner (and the operator's re-queue):
--   pending | in_flight (lease run out)  -> in_flight under a new claim token     (a claim)
--   in_flight                            -> in_flight under the same token        (being sent)
--   in_flight                            -> delivered | dead | pending, token cleared (a result)
--   dead                                 -> pending, by outbox_operator only      (a re-queue)
-- The relay's moves are recognised first, without a catalog lookup: they are its hot path.
create function outbox.check_state_transition() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    owner_oid oid;
begin
    if new.attempts >= old.attempts and new.requests >= old.requests then
        if new.state = 'in_flight' and old.state in ('pending', 'in_flight')
           and new.claim_token is distinct from old.claim_token and old.next_attempt_at <= now()
           and new.attempts = old.attempts then
            return new;
        end if;
        if new.state = 'in_flight' and old.state = 'in_flight' and new.claim_token = old.claim_token then
            return new;
        end if;
        if old.state = 'in_flight' and new.state in ('delivered', 'dead', 'pending') and new.claim_token is null then
            return new;
        end if;
    end if;
    if old.state = 'dead' and new.state = 'pending' then
        select c.relowner into owner_oid from pg_class c where c.oid = tg_relid;
        if not pg_has_role(current_user, owner_oid, 'USAGE') and not exists (
            select 1 from pg_roles r where r.rolname = 'outbox_operator' and pg_has_role(current_user, r.oid, 'USAGE')
        ) then
            raise exception using
                errcode = 'insufficient_privilege', schema = 'outbox', table = 'action_status_updates',
                message = format('only outbox_operator may put dead row %s back to pending, not %s', old.id, current_user),
                hint = 'Use `outbox-relay dead retry` (outbox.requeue_dead) as a member of outbox_operator.';
        end if;
        new.requeued_by := current_user;
        new.requeued_at := now();
        return new;
    end if;
    select c.relowner into owner_oid from pg_class c where c.oid = tg_relid;
    if pg_has_role(current_user, owner_oid, 'USAGE') then
        return new;
    end if;
    raise exception using
        errcode = 'check_violation', constraint = 'state_transition',
        schema = 'outbox', table = 'action_status_updates',
        message = format('row %s may not go from %s to %s this way (as %s): %s', old.id, old.state, new.state,
            current_user, case
                when old.state = 'pending' and new.state <> 'in_flight' then
                    'a pending row changes only when it is claimed (in_flight, with a new claim token); '
                    || 'its result is then recorded under that claim'
                when old.state in ('delivered', 'dead') then
                    'delivered and dead rows are final; only outbox_operator re-queues a dead row'
                when new.attempts < old.attempts or new.requests < old.requests then
                    'attempts and requests are never counted down'
                when new.state = 'in_flight' then
                    'a claim needs a due row (or a lease that ran out) and a new claim token'
                else 'a result is recorded only under the claim, which it ends' end),
        hint = 'See README.md, "Roles", for what each role may change.';
end $$;

create trigger action_status_updates_transition
    before update on outbox.action_status_updates
    for each row execute function outbox.check_state_transition();

-- Every re-queue, append-only: who (the database role), when, why, and what the row had been.
create table outbox.requeues (
    id          bigint generated always as identity primary key,
    update_id   bigint not null references outbox.action_status_updates (id) on delete cascade,
    action_id   text not null,
    target      text not null,
    requeued_at timestamptz not null,
    requeued_by text not null,
    reason      text,
    dead_at     timestamptz,
    attempts    integer not null
);
comment on table outbox.requeues is
    'One row per dead row put back to pending (by outbox.requeue_dead or any other update): append-only.';
create index requeues_update_id on outbox.requeues (update_id);

-- Written by the trigger below from the values check_state_transition set, so the caller needs
-- no privilege on outbox.requeues and cannot choose what it says.
create function outbox.record_requeue() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    insert into outbox.requeues (update_id, action_id, target, requeued_at, requeued_by, reason, dead_at, attempts)
    values (new.id, new.action_id, new.target, new.requeued_at, new.requeued_by, new.requeue_reason,
            old.dead_at, old.attempts);
    return null;
end $$;

create trigger action_status_updates_requeued
    after update on outbox.action_status_updates
    for each row when (old.state = 'dead' and new.state = 'pending')
    execute function outbox.record_requeue();

-- History tables are append-only for every role but their owner (which is also who runs
-- outbox.purge_finished and the foreign keys' cascades).
create function outbox.refuse_history_change() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if pg_has_role(current_user, (select c.relowner from pg_class c where c.oid = tg_relid), 'USAGE') then
        return null;
    end if;
    raise exception using
        errcode = 'insufficient_privilege', schema = 'outbox', table = tg_table_name,
        message = format('outbox.%s is append-only: %s may not %s its rows', tg_table_name, current_user,
                         lower(tg_op)),
        hint = 'Old rows are removed with their update by outbox.purge_finished (retention).';
end $$;

create trigger delivery_attempts_append_only
    before update or delete or truncate on outbox.delivery_attempts
    for each statement execute function outbox.refuse_history_change();
create trigger requeues_append_only
    before update or delete or truncate on outbox.requeues
    for each statement execute function outbox.refuse_history_change();

-- `outbox-relay dead retry`: one batch of dead rows with an id above after_id, back to pending
-- with attempts counted afresh. It runs with the caller's rights (outbox_operator); the
-- trigger records who and when.
create function outbox.requeue_dead(
    after_id bigint, batch_limit integer, reason text,
    only_action_ids text[] default null, only_target text default null, only_code text default null
) returns table (id bigint, action_id text, target text)
language sql
set search_path = pg_catalog, pg_temp
as $$
with picked as (
    select u.id
    from outbox.action_status_updates u
    where u.state = 'dead'
      and u.id > requeue_dead.after_id
      and (requeue_dead.only_action_ids is null or u.action_id = any(requeue_dead.only_action_ids))
      and (requeue_dead.only_target is null or u.target = requeue_dead.only_target)
      and (requeue_dead.only_code is null or upper(coalesce(u.last_error_code, (
            select d.error_code from outbox.delivery_attempts d
            where d.update_id = u.id order by d.attempt desc, d.id desc limit 1
          ))) = upper(requeue_dead.only_code))
    order by u.id
    limit requeue_dead.batch_limit
    for update
)
update outbox.action_status_updates u
set state = 'pending',
    next_attempt_at = now(),
    attempts = 0,
    dead_at = null,
    requeue_reason = requeue_dead.reason
from picked
where u.id = picked.id and u.state = 'dead'
returning u.id, u.action_id, u.target
$$;

-- Retention of attempts, one step per call (each in its own transaction, so the lock on
-- delivery_attempts is short): detaches and drops the oldest partition that ended more than
-- older_than ago, keeping (in the default partition) the rows of updates that still exist: dead
-- rows retention keeps, rows still being retried. Call it after outbox.purge_finished: the
-- updates it deleted are what makes their attempts droppable. With no such partition, it deletes
-- the default partition's rows older than that whose update is gone. Returns what it did, or no
-- row when there is nothing left to do.
create function outbox.drop_old_attempts(older_than interval)
returns table (partition_name text, attempts bigint, kept bigint)
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    cutoff timestamptz;
    doomed text;
    seen bigint;
    now_held bigint;
begin
    if older_than is null or older_than < interval '1 hour' then
        raise exception using
            errcode = 'invalid_parameter_value',
            message = format('older_than must be at least 1 hour, not %s: attempts of the last hour are never dropped',
                             coalesce(older_than::text, 'null'));
    end if;
    cutoff := now() - older_than;
    perform pg_advisory_xact_lock(hashtext('outbox.delivery_attempts partitions'));  -- one at a time
    select p.name into doomed
    from outbox.attempt_partitions p
    where not p.is_default and p.to_time <= cutoff
    order by p.to_time
    limit 1;
    if doomed is null then
        delete from outbox.delivery_attempts_default d
        where d.started_at < cutoff
          and not exists (select 1 from outbox.action_status_updates u
                          where u.id = d.update_id and u.action_id = d.action_id);
        get diagnostics seen = row_count;
        if seen > 0 then
            partition_name := 'delivery_attempts_default';
            attempts := seen;
            kept := 0;
            return next;
        end if;
        return;
    end if;
    -- What to keep is read before the lock; the count taken again under it tells whether a row
    -- arrived meanwhile (a claim recording a lost request of long ago), and if so it is read again.
    create temporary table if not exists drop_old_attempts_keep
        (like outbox.delivery_attempts) on commit drop;
    truncate drop_old_attempts_keep;
    execute format('select count(*) from outbox.%I', doomed) into seen;
    execute format('insert into drop_old_attempts_keep select d.* from outbox.%I d '
                   'where exists (select 1 from outbox.action_status_updates u '
                   'where u.id = d.update_id and u.action_id = d.action_id)', doomed);
    execute format('alter table outbox.delivery_attempts detach partition outbox.%I', doomed);
    execute format('select count(*) from outbox.%I', doomed) into now_held;
    if now_held <> seen then
        truncate drop_old_attempts_keep;
        execute format('insert into drop_old_attempts_keep select d.* from outbox.%I d '
                       'where exists (select 1 from outbox.action_status_updates u '
                       'where u.id = d.update_id and u.action_id = d.action_id)', doomed);
    end if;
    insert into outbox.delivery_attempts select * from drop_old_attempts_keep;
    get diagnostics kept = row_count;
    execute format('drop table outbox.%I', doomed);
    partition_name := doomed;
    attempts := now_held;
    return next;
end $$;

-- Delivered outcomes per UTC day, kept when retention deletes the rows.
create table outbox.report_days (
    day       date primary key,
    rolled_at timestamptz not null default now(),
    reports   bigint not null
);
comment on table outbox.report_days is
    'UTC days whose delivered updates are counted in outbox.daily_reports (outbox.rollup_reports).';
create table outbox.daily_reports (
    day        date not null,
    target     text not null,
    status     text not null,
    error_code text not null default '',
    reports    bigint not null,
    primary key (day, target, status, error_code)
);
comment on table outbox.daily_reports is
    'Per UTC day of delivered_at, target and status: the updates delivered (error_code ''''), and for each '
    'errors[].code how many of them carried it. Read it through outbox.delivery_report.';

-- Counts the delivered updates of every UTC day not counted yet that ended more than an hour ago
-- (a result's delivered_at is its transaction's start: it has committed by then), at most
-- max_days days per call. Returns the days counted.
create function outbox.rollup_reports(max_days integer default 31)
returns table (day date, reports bigint)
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    d    date;
    stop date;
    done integer := 0;
begin
    if max_days is null or max_days < 1 then
        raise exception using errcode = 'invalid_parameter_value',
            message = format('max_days must be at least 1, not %s', coalesce(max_days::text, 'null'));
    end if;
    lock table outbox.report_days in share row exclusive mode;  -- one rollup at a time
    stop := ((now() - interval '1 hour') at time zone 'UTC')::date;  -- days before this one have ended
    select max(r.day) + 1 into d from outbox.report_days r;
    if d is null then
        select (min(u.delivered_at) at time zone 'UTC')::date into d
        from outbox.action_status_updates u where u.state = 'delivered';
    end if;
    while d is not null and d < stop and done < max_days loop
        insert into outbox.daily_reports (day, target, status, error_code, reports)
        select d, u.target, u.status, coalesce(c.code, ''), count(*)
        from outbox.action_status_updates u
        cross join lateral (
            select null::text as code
            union
            select e ->> 'code' from jsonb_array_elements(u.errors) e
        ) c
        where u.state = 'delivered'
          and u.delivered_at >= d::timestamp at time zone 'UTC'
          and u.delivered_at < (d + 1)::timestamp at time zone 'UTC'
        group by u.target, u.status, c.code;
        insert into outbox.report_days (day, reports)
        select d, coalesce(sum(x.reports), 0) from outbox.daily_reports x where x.day = d and x.error_code = ''
        returning report_days.day, report_days.reports into day, reports;
        return next;
        done := done + 1;
        d := d + 1;
    end loop;
end $$;

-- What was reported, per UTC day, target, status and error code (null: every report of that
-- status): counted days from the rollup, the others (today, yesterday until the rollup runs)
-- counted from the rows.
create view outbox.delivery_report as
select r.day, r.target, r.status, nullif(r.error_code, '') as error_code, r.reports, true as rolled
from outbox.daily_reports r
union all
select l.day, l.target, l.status, l.code, l.reports, false
from (
    select cast(u.delivered_at at time zone 'UTC' as date) as day, u.target, u.status, c.code, count(*) as reports
    from outbox.action_status_updates u
    cross join lateral (
        select null::text as code
        union
        select e ->> 'code' from jsonb_array_elements(u.errors) e
    ) c
    where u.state = 'delivered'
      and u.delivered_at >= coalesce((select (max(d.day) + 1)::timestamp at time zone 'UTC' from outbox.report_days d),
                                     '-infinity')
    group by 1, 2, 3, 4
) l;
comment on view outbox.delivery_report is
    'Delivered updates per UTC day, target, status and error code (null: all of that status); rolled: from '
    'outbox.daily_reports, which keeps the counts after retention.';

-- Retention: one batch of finished updates (delivered, then dead with include_dead) that finished
-- more than older_than ago, oldest first from (from_state, from_time), skipping rows others hold.
-- Their attempts go with their partition (drop_old_attempts); delivered rows are deleted once
-- their day is counted in the rollup. Returns what it deleted and where the next batch starts
-- (next_state null: nothing left). It runs with its owner's rights: nobody else may delete updates.
create function outbox.purge_finished(
    older_than interval, include_dead boolean, batch_limit integer,
    from_state text default 'delivered', from_time timestamptz default null
) returns table (updates bigint, attempts bigint, next_state text, next_from timestamptz)
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    cutoff  timestamptz;
    counted timestamptz;
    reached timestamptz;
begin
    if older_than is null or older_than < interval '1 hour' then
        raise exception using
            errcode = 'invalid_parameter_value',
            message = format('older_than must be at least 1 hour, not %s: rows finished more recently are never purged',
                             coalesce(older_than::text, 'null'));
    end if;
    if batch_limit is null or batch_limit < 1 then
        raise exception using errcode = 'invalid_parameter_value',
            message = format('batch_limit must be at least 1, not %s', coalesce(batch_limit::text, 'null'));
    end if;
    if from_state is distinct from 'delivered' and (from_state is distinct from 'dead' or include_dead is not true) then
        raise exception using errcode = 'invalid_parameter_value',
            message = format('from_state must be delivered (or dead with include_dead), not %s',
                             coalesce(from_state, 'null'));
    end if;
    cutoff := now() - older_than;
    attempts := 0;
    if from_state = 'delivered' then
        if from_time is null then
            perform outbox.rollup_reports();
        end if;
        select (max(r.day) + 1)::timestamp at time zone 'UTC' into counted from outbox.report_days r;
        with doomed as (
            select u.id, u.delivered_at as finished_at
            from outbox.action_status_updates u
            where u.state = 'delivered' and u.delivered_at < least(cutoff, coalesce(counted, '-infinity'))
              and u.delivered_at >= coalesce(from_time, '-infinity')
            order by u.delivered_at
            limit batch_limit
            for update skip locked
        ), gone as (
            delete from outbox.action_status_updates u using doomed where u.id = doomed.id returning u.id
        )
        select (select count(*) from gone), (select max(doomed.finished_at) from doomed)
        into updates, reached;
    else
        with doomed as (
            select u.id, u.dead_at as finished_at
            from outbox.action_status_updates u
            where u.state = 'dead' and u.dead_at < cutoff
              and u.dead_at >= coalesce(from_time, '-infinity')
            order by u.dead_at
            limit batch_limit
            for update skip locked
        ), gone as (
            delete from outbox.action_status_updates u using doomed where u.id = doomed.id returning u.id
        )
        select (select count(*) from gone), (select max(doomed.finished_at) from doomed)
        into updates, reached;
    end if;
    if updates < batch_limit then
        next_state := case when from_state = 'delivered' and include_dead then 'dead' end;
        next_from := null;
    else
        next_state := from_state;
        next_from := coalesce(reached, from_time);
    end if;
    return next;
end $$;

create view outbox.delivery_audit as
select u.id,
       u.action_id,
       u.target,
       u.status,
       u.errors,
       u.state,
       u.attempts,
       u.created_at,
       u.delivered_at,
       u.dead_at,
       u.delivered_at - u.created_at as time_to_deliver,
       u.last_http_status,
       u.last_error,
       u.next_attempt_at,
       u.requeued_at,
       u.requeue_reason,
       u.requeued_by,
       u.last_error_code
from outbox.action_status_updates u;
comment on view outbox.delivery_audit is 'One row per update, for auditors.';

-- Group roles, when the migrating user may create roles; grants whenever the roles exist.
do $$
declare
    name text;
    may  boolean;
begin
    select rolsuper or rolcreaterole into may from pg_roles where rolname = current_user;
    foreach name in array array['outbox_writer', 'outbox_relay', 'outbox_operator', 'outbox_auditor'] loop
        if not exists (select 1 from pg_roles where rolname = name) then
            if may then
                execute format('create role %I nologin', name);
            else
                raise notice 'role % does not exist and % may not create it; ask a DBA', name, current_user;
            end if;
        end if;
    end loop;

    if exists (select 1 from pg_roles where rolname = 'outbox_writer') then
        grant usage on schema outbox to outbox_writer;
        grant insert (action_id, status, errors, target) on outbox.action_status_updates to outbox_writer;
        grant select (id, action_id, status, errors, target, state, attempts, created_at,
                      next_attempt_at, delivered_at, dead_at, last_error)
            on outbox.action_status_updates to outbox_writer;
        grant select on outbox.error_codes to outbox_writer;
        grant execute on function outbox.enqueue_action_status(text, text, jsonb, text) to outbox_writer;
    end if;
    if exists (select 1 from pg_roles where rolname = 'outbox_relay') then
        grant usage on schema outbox to outbox_relay;
        grant select on outbox.action_status_updates to outbox_relay;
        grant update (state, attempts, next_attempt_at, delivered_at, dead_at, last_error,
                      last_http_status, requests, outcome_unknown, claim_token, claimed_by, sending_at,
                      last_error_code)
            on outbox.action_status_updates to outbox_relay;
        grant select on outbox.delivery_attempts to outbox_relay;
        grant insert (update_id, action_id, target, attempt, started_at, duration_ms, http_status, outcome,
                      error_code, error_message, response_body, relay_id, reached_api)
            on outbox.delivery_attempts to outbox_relay;
        grant usage on sequence outbox.delivery_attempts_id_seq to outbox_relay;
        grant select, insert, update, delete on outbox.relay_targets to outbox_relay;
        grant select on outbox.error_codes, outbox.schema_migrations, outbox.delivery_audit to outbox_relay;
        grant execute on function outbox.purge_finished(interval, boolean, integer, text, timestamptz)
            to outbox_relay;
        grant select on outbox.attempt_partitions, outbox.report_days, outbox.daily_reports,
                        outbox.delivery_report to outbox_relay;
        grant execute on function outbox.ensure_attempt_partitions(integer, timestamptz),
                                  outbox.drop_old_attempts(interval), outbox.rollup_reports(integer)
            to outbox_relay;
    end if;
    if exists (select 1 from pg_roles where rolname = 'outbox_operator') then
        grant usage on schema outbox to outbox_operator;
        grant select on outbox.action_status_updates, outbox.delivery_attempts, outbox.error_codes,
                        outbox.relay_targets, outbox.delivery_audit, outbox.schema_migrations, outbox.requeues
            to outbox_operator;
        grant update (state, next_attempt_at, attempts, dead_at, requeue_reason)
            on outbox.action_status_updates to outbox_operator;
        grant insert on outbox.error_codes to outbox_operator;
        grant execute on function outbox.requeue_dead(bigint, integer, text, text[], text, text) to outbox_operator;
        grant execute on function outbox.purge_finished(interval, boolean, integer, text, timestamptz)
            to outbox_operator;
        grant select on outbox.attempt_partitions, outbox.report_days, outbox.daily_reports,
                        outbox.delivery_report to outbox_operator;
        grant execute on function outbox.ensure_attempt_partitions(integer, timestamptz),
                                  outbox.drop_old_attempts(interval), outbox.rollup_reports(integer)
            to outbox_operator;
    end if;
    if exists (select 1 from pg_roles where rolname = 'outbox_auditor') then
        grant usage on schema outbox to outbox_auditor;
        grant select on outbox.action_status_updates, outbox.delivery_attempts, outbox.error_codes,
                        outbox.relay_targets, outbox.delivery_audit, outbox.schema_migrations, outbox.requeues
            to outbox_auditor;
        grant select on outbox.attempt_partitions, outbox.report_days, outbox.daily_reports,
                        outbox.delivery_report to outbox_auditor;
    end if;
end $$;

revoke execute on function outbox.enqueue_action_status(text, text, jsonb, text) from public;
revoke execute on function outbox.record_requeue() from public;
revoke execute on function outbox.requeue_dead(bigint, integer, text, text[], text, text) from public;
revoke execute on function outbox.purge_finished(interval, boolean, integer, text, timestamptz) from public;
revoke execute on function outbox.ensure_attempt_partitions(integer, timestamptz) from public;
revoke execute on function outbox.drop_old_attempts(interval) from public;
revoke execute on function outbox.rollup_reports(integer) from public;

-- The monthly partitions of delivery_attempts, this month and the next two.
select outbox.ensure_attempt_partitions(2);
