-- Every SQL statement outbox-relay runs, by name. relay/pg/store.py loads this file once.
-- A block starts with a line "-- name --" and runs until the next one.

-- migrations_bootstrap --
create schema if not exists outbox;
create table if not exists outbox.schema_migrations (
    version    integer primary key,
    name       text not null,
    checksum   text not null,
    applied_at timestamptz not null default now()
)

-- migrations_lock --
-- Held until the transaction ends: with a transaction-mode pooler (PgBouncer) a session lock
-- would stay on whichever server connection ran it.
select pg_advisory_xact_lock(hashtext('outbox-relay migrations'))

-- migrations_applied --
select version, name, checksum, applied_at from outbox.schema_migrations order by version

-- migrations_record --
insert into outbox.schema_migrations (version, name, checksum) values (:version, :name, :checksum)

-- ping --
select 1 as one

-- backend_pid --
select pg_backend_pid() as pid

-- probe_statement_timeout --
select set_config('statement_timeout', :timeout, true) as timeout

-- schema_version --
select coalesce(max(version), 0) as version
from outbox.schema_migrations

-- schema_exists --
select to_regclass('outbox.schema_migrations') is not null as present

-- whoami --
select current_user as name

-- roles_missing --
select r.rolname
from unnest(cast(:roles as text[])) with ordinality as r (rolname, n)
where not exists (select 1 from pg_catalog.pg_roles p where p.rolname = r.rolname)
order by r.n

-- privileges_relay --
-- What the daemon needs (README "Roles", outbox_relay) that current_user lacks, read by object
-- id from the catalogs: no name lookup, so a user without USAGE on the schema may ask too.
with ns as (
    select n.oid, n.nspowner from pg_catalog.pg_namespace n where n.nspname = 'outbox'
), on_tables (rel, priv) as (
    values ('action_status_updates', 'SELECT'), ('delivery_attempts', 'SELECT'),
           ('relay_targets', 'SELECT'), ('relay_targets', 'INSERT'), ('relay_targets', 'UPDATE'),
           ('relay_targets', 'DELETE'), ('error_codes', 'SELECT'), ('schema_migrations', 'SELECT'),
           ('delivery_audit', 'SELECT')
), on_columns (rel, priv, col) as (
    select 'action_status_updates', 'UPDATE', unnest(array[
        'state', 'attempts', 'next_attempt_at', 'delivered_at', 'dead_at', 'last_error', 'last_http_status',
        'requests', 'outcome_unknown', 'claim_token', 'claimed_by', 'sending_at', 'last_error_code'])
    union all
    select 'delivery_attempts', 'INSERT', unnest(array[
        'update_id', 'action_id', 'target', 'attempt', 'started_at', 'duration_ms', 'http_status', 'outcome',
        'error_code', 'error_message', 'response_body', 'relay_id', 'reached_api'])
), lacking (what) as (
    select 'usage on schema outbox' from ns where not has_schema_privilege(ns.oid, 'USAGE')
    union all
    select lower(w.priv) || ' on outbox.' || w.rel
    from on_tables w
    join pg_catalog.pg_class c on c.relname = w.rel
    join ns on c.relnamespace = ns.oid
    where not has_table_privilege(c.oid, w.priv)
    union all
    select lower(w.priv) || ' (' || string_agg(w.col, ', ' order by a.attnum) || ') on outbox.' || w.rel
    from on_columns w
    join pg_catalog.pg_class c on c.relname = w.rel
    join ns on c.relnamespace = ns.oid
    join pg_catalog.pg_attribute a on a.attrelid = c.oid and a.attname = w.col and not a.attisdropped
    where not has_column_privilege(c.oid, a.attnum, w.priv)
    group by w.rel, w.priv
    union all
    select 'execute on outbox.' || p.proname
    from pg_catalog.pg_proc p
    join ns on p.pronamespace = ns.oid
    where (p.proname in ('ensure_attempt_partitions', 'rollup_reports')
           or (p.proname in ('purge_finished', 'drop_old_attempts') and cast(:retention as boolean)))
      and not has_function_privilege(p.oid, 'EXECUTE')
    union all
    select 'usage on sequence outbox.' || c.relname
    from pg_catalog.pg_class c
    join ns on c.relnamespace = ns.oid
    where c.relname = 'delivery_attempts_id_seq' and not has_sequence_privilege(c.oid, 'USAGE')
)
select current_user as usr,
       exists (select 1 from pg_catalog.pg_class c join ns on c.relnamespace = ns.oid
               where c.relname = 'schema_migrations') as found,
       (select array_agg(what order by what) from lacking) as missing,
       (select pg_has_role(current_user, r.oid, 'USAGE') from pg_catalog.pg_roles r
        where r.rolname = cast(:role as text)) as member,
       coalesce((select pg_has_role(current_user, ns.nspowner, 'USAGE') from ns), false) as owner

-- updates_enqueue --
select outbox.enqueue_action_status(:action_id, :status, cast(:errors as jsonb), :target) as id

-- updates_claim --
-- Claims due rows for one target under a new lease and token. The first :send_now rows are
-- also marked as being sent (sending_at), since the relay sends them at once; the rest are
-- marked by updates_mark_sending when their turn comes. A row re-claimed after a lease ran
-- out while it was marked may have reached the API: it becomes outcome_unknown, and an
-- attempt row with the outcome 'unknown' says so. A row whose lease ran out unmarked never
-- left: nothing about it changes but its claim.
with locked as (
    select id, state = 'in_flight' and sending_at is not null as lost, sending_at, claimed_by,
           next_attempt_at
    from outbox.action_status_updates
    where target = :target
      and state in ('pending', 'in_flight')
      and next_attempt_at <= now()
    order by next_attempt_at
    limit :limit
    for update skip locked
), due as (
    select locked.*, row_number() over (order by next_attempt_at, id) as place from locked
), claimed as (
    update outbox.action_status_updates u
    set state = 'in_flight',
        outcome_unknown = u.outcome_unknown or due.lost,
        requests = u.requests + case when due.lost then 1 else 0 end,
        next_attempt_at = now() + make_interval(secs => :lease),
        claim_token = :token,
        claimed_by = :relay_id,
        sending_at = case when due.place <= :send_now then now() end
    from due
    where u.id = due.id
    returning u.id, u.action_id, u.status, u.errors, u.target, u.attempts, u.requests,
              u.created_at, coalesce(u.requeued_at, u.created_at) as budget_from, u.outcome_unknown,
              u.next_attempt_at as lease_until, u.sending_at is not null as marked
), lost as (
    insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at,
        duration_ms, http_status, outcome, error_code, error_message, relay_id, reached_api)
    select c.id, c.action_id, c.target, c.requests, due.sending_at, 0, null, 'unknown', 'LeaseExpired',
           'the relay that sent this request stopped or lost its lease before recording an answer; '
           || 'the request may have reached the API', coalesce(due.claimed_by, :relay_id), 'maybe'
    from claimed c join due on due.id = c.id
    where due.lost
)
select * from claimed

-- updates_mark_sending --
-- Just before requests leave: marks the rows (still under their claims) as possibly sent.
update outbox.action_status_updates u
set sending_at = now()
from unnest(cast(:ids as bigint[]), cast(:tokens as uuid[])) as m(id, token)
where u.id = m.id and u.claim_token = m.token
returning u.id

-- updates_record --
with r as (
    select *
    from unnest(cast(:ids as bigint[]), cast(:tokens as uuid[]), cast(:states as text[]),
                cast(:retry_at as timestamptz[]), cast(:charged as integer[]),
                cast(:requests as integer[]), cast(:unknown as boolean[]),
                cast(:http_status as integer[]), cast(:last_error as text[]), cast(:last_error_code as text[]))
         as r(id, token, state, retry_at, charged, requests, unknown, http_status, last_error, last_error_code)
), gone as (
    -- Rows this database does not hold: deleted, or lost with a primary that failed over (whose
    -- ids the promoted standby's sequence may hand out again, to other actions).
    select x.id, x.action_id
    from (select * from unnest(cast(:ids as bigint[]), cast(:actions as text[]))
          union
          select * from unnest(cast(:a_update_id as bigint[]), cast(:a_action_id as text[]))) as x(id, action_id)
    where not exists (select 1 from outbox.action_status_updates u
                      where u.id = x.id and (x.action_id is null or u.action_id = x.action_id))
), done as (
    update outbox.action_status_updates u
    set state = r.state,
        attempts = u.attempts + r.charged,
        requests = u.requests + r.requests,
        outcome_unknown = u.outcome_unknown or r.unknown,
        next_attempt_at = case when r.state = 'pending' then coalesce(r.retry_at, now())
                               else u.next_attempt_at end,
        delivered_at = case when r.state = 'delivered' then now() end,
        dead_at = case when r.state = 'dead' then now() end,
        last_http_status = case when r.requests > 0 then r.http_status else u.last_http_status end,
        last_error = case when r.requests > 0 then r.last_error else u.last_error end,
        last_error_code = case when r.requests > 0 then r.last_error_code else u.last_error_code end,
        claim_token = null,
        claimed_by = null,
        sending_at = null
    from r
    where u.id = r.id and u.claim_token = r.token
    returning u.id, r.token
), attempts as (
    insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at,
        duration_ms, http_status, outcome, error_code, error_message, response_body, relay_id, reached_api)
    select a.update_id, a.action_id, a.target, a.attempt, a.started_at, a.duration_ms, a.http_status,
           case when (a.update_id, a.token) in (select id, token from done) then a.outcome
                else 'superseded' end,
           a.error_code, a.error_message, a.response_body, :relay_id, a.reached_api
    from unnest(cast(:a_update_id as bigint[]), cast(:a_token as uuid[]),
                cast(:a_action_id as text[]), cast(:a_target as text[]),
                cast(:a_attempt as integer[]), cast(:a_started_at as timestamptz[]),
                cast(:a_duration_ms as double precision[]), cast(:a_http_status as integer[]),
                cast(:a_outcome as text[]), cast(:a_error_code as text[]), cast(:a_error_message as text[]),
                cast(:a_response_body as text[]), cast(:a_reached_api as text[]))
         as a(update_id, token, action_id, target, attempt, started_at, duration_ms, http_status, outcome,
              error_code, error_message, response_body, reached_api)
    -- no attempt row for a row it does not hold (it would be an orphan, or another action's)
    where not exists (select 1 from gone g where g.id = a.update_id and coalesce(g.action_id, a.action_id) = a.action_id)
    returning 1
)
select (select count(*) from done) as recorded, (select count(*) from attempts) as attempts,
       array(select distinct id from gone order by id) as dropped

-- relay_targets_heartbeat --
insert into outbox.relay_targets as t (relay_id, target, state, reason, paused_until)
select :relay_id, s.target, s.state, s.reason, now() + make_interval(secs => s.paused_for)
from unnest(cast(:targets as text[]), cast(:states as text[]), cast(:reasons as text[]),
            cast(:paused_for as double precision[]))
     as s(target, state, reason, paused_for)
on conflict (relay_id, target) do update
set state = excluded.state,
    reason = excluded.reason,
    paused_until = excluded.paused_until,
    -- paused and probing alternate during one pause: since counts from when it stopped serving
    since = case when (t.state = 'serving') = (excluded.state = 'serving') then t.since else now() end,
    heartbeat_at = now()

-- relay_targets_forget --
delete from outbox.relay_targets where relay_id = :relay_id

-- relay_targets_expire --
delete from outbox.relay_targets where heartbeat_at < now() - interval '1 day'

-- relay_peers --
-- One round trip a second (relay/core/peers.py): this relay's presence (heartbeat_at, and until
-- when it holds its own pauses) and what it sees of the others. A row is live while its relay
-- touched it within :alive seconds. A relay is dead when every row of it is older than this
-- relay's own previous touch minus :alive: measured against our own touch, a database that
-- stalls everyone's writes makes nobody look dead. Dead relays older than a lease are left out:
-- their claims have run out by themselves.
with mine as (
    select max(heartbeat_at) as at from outbox.relay_targets where relay_id = :relay_id
), touched as (
    update outbox.relay_targets t
    set heartbeat_at = now(),
        paused_until = now() + make_interval(secs => p.paused_for)
    from unnest(cast(:targets as text[]), cast(:paused_for as double precision[])) as p(target, paused_for)
    where t.relay_id = :relay_id and t.target = p.target
    returning 1
)
select t.relay_id, t.target, t.state, t.reason,
       extract(epoch from t.paused_until - now())::double precision as paused_for,
       t.heartbeat_at > now() - make_interval(secs => :alive) as alive
from outbox.relay_targets t cross join mine
where t.relay_id <> :relay_id
  and (t.heartbeat_at > now() - make_interval(secs => :alive)
       or (t.heartbeat_at < mine.at - make_interval(secs => :alive)
           and t.heartbeat_at > now() - make_interval(secs => :alive + :lease)))
order by t.relay_id, t.target

-- relay_claims_release --
-- The claims of relays that are gone (dead, or this relay's own previous process) made due: the
-- next claim takes them, and a row that was being sent becomes an outcome-unknown re-send. Due as
-- of just before the row was written (or re-queued), not now: they were claimed first because
-- they were the oldest, so they go before the backlog, even before rows written in the same
-- transaction (same created_at), instead of waiting behind it. The claim token is left alone: a
-- late answer of the old claim is fenced off by the new one.
with released as (
    update outbox.action_status_updates
    set next_attempt_at = least(now(), coalesce(requeued_at, created_at)) - interval '1 microsecond'
    where state = 'in_flight' and claimed_by = any(cast(:relay_ids as text[])) and next_attempt_at > now()
    returning target
)
select target, count(*) as released from released group by target order by target

-- notify_relays --
select pg_notify('outbox_action_status', '')

-- ==== maintenance (relay/core/retention.py): partitions, the report rollup, retention ==== --

-- ledger_partitions_ensure --
-- The monthly partitions of delivery_attempts up to :months_ahead months ahead (SECURITY DEFINER).
select name from outbox.ensure_attempt_partitions(cast(:months_ahead as integer)) as name

-- ledger_rollup --
-- Counts the delivered updates of up to :max_days ended UTC days not counted yet (SECURITY DEFINER).
select day, reports from outbox.rollup_reports(cast(:max_days as integer))

-- ledger_drop_attempts --
-- One step of attempt retention: the oldest partition that ended more than :older_than seconds
-- ago, detached and dropped, the rows of updates that still exist kept; no row: nothing left.
select partition_name, attempts, kept
from outbox.drop_old_attempts(make_interval(secs => cast(:older_than as double precision)))

-- ==== operators (relay/cli/ops.py) and metrics: status, audit, dead letters, retention ==== --

-- ops_server_version --
select current_setting('server_version') as version

-- ops_status_target_names --
-- Every target with at least one row, by a loose index scan over the unique (target, action_id)
-- index: one index probe per target, never a scan of the table.
with recursive names (target) as (
    (select u.target from outbox.action_status_updates u order by u.target limit 1)
    union all
    select (select u.target from outbox.action_status_updates u
            where u.target > names.target order by u.target limit 1)
    from names
    where names.target is not null
)
select target from names where target is not null

-- ops_status_waiting --
-- Pending and in-flight rows per target, and the oldest one's age: the claimable partial index
-- holds only these rows, so the cost is the backlog's, not the table's.
select target,
       count(*) filter (where state = 'pending') as pending,
       count(*) filter (where state = 'in_flight') as in_flight,
       extract(epoch from now() - min(coalesce(requeued_at, created_at)))::double precision
           as oldest_pending_seconds
from outbox.action_status_updates
where state in ('pending', 'in_flight')
group by target

-- ops_status_dead --
-- Dead rows per target: an index-only scan of action_status_updates_dead, which carries the target
-- (0007).
select target, count(*) as dead
from outbox.action_status_updates
where state = 'dead'
group by target

-- ops_status_last_hour --
-- Deliveries and dead letters of the last hour per target: range scans of the delivered_at and
-- dead partial indexes.
select target, sum(delivered)::bigint as delivered_last_hour, sum(dead)::bigint as dead_last_hour
from (
    select target, 1 as delivered, 0 as dead
    from outbox.action_status_updates
    where state = 'delivered' and delivered_at > now() - interval '1 hour'
    union all
    select target, 0, 1
    from outbox.action_status_updates
    where state = 'dead' and dead_at > now() - interval '1 hour'
) recent
group by target

-- ops_status_delivered_plan --
-- The planner's estimate of a target's delivered rows (nothing is executed). Delivered rows are
-- nearly all of the table and only retention bounds them, so status does not count them: the
-- planner already applies the target column's statistics (its most common values) to the
-- table's current size (reltuples scaled by the pages it has now), which a hand-made
-- "reltuples minus the exact counts" could not split per target.
explain (format json)
select 1 from outbox.action_status_updates where target = :target and state = 'delivered'

-- ops_status_delivered_count --
-- A target's delivered rows counted, at most :limit of them (status counts when the estimate is
-- small: an index scan on the target's rows).
select count(*) as delivered
from (select 1 from outbox.action_status_updates
      where target = :target and state = 'delivered'
      limit :limit) found

-- ops_ledger --
-- The attempt partitions (0006): until when monthly ones exist, and the default partition's rows.
select max(to_time) filter (where not is_default) as covered_until,
       count(*) filter (where not is_default) as partitions,
       coalesce(sum(rows_estimate) filter (where is_default), 0)::bigint as default_rows,
       max(to_time) filter (where not is_default) < now() + interval '1 month' as short
from outbox.attempt_partitions

-- ops_live_relays --
select relay_id, target, state, reason, since,
       extract(epoch from now() - heartbeat_at)::double precision as heartbeat_age_seconds
from outbox.relay_targets
where heartbeat_at > now() - make_interval(secs => :fresh)
order by relay_id, target

-- ops_backlog --
select target,
       count(*) as pending,
       extract(epoch from now() - min(coalesce(requeued_at, created_at)))::double precision
           as oldest_pending_seconds
from outbox.action_status_updates
where state in ('pending', 'in_flight')
group by target
order by target

-- ops_audit_updates --
select *
from outbox.delivery_audit
where action_id = :action_id
  and (cast(:target as text) is null or target = cast(:target as text))
order by target, id

-- ops_audit_attempts --
select update_id, attempt, started_at, duration_ms, http_status, reached_api, outcome, error_code,
       error_message, response_body, relay_id
from outbox.delivery_attempts
where update_id = any(cast(:ids as bigint[]))
order by update_id, started_at, attempt, id

-- ops_audit_report --
-- What was reported between two UTC days (inclusive), per target, status and error code (null:
-- every report of the status), from outbox.delivery_report: days the relay rolled up are read
-- from outbox.daily_reports, only the others are counted from the updates. `rolled`: every day
-- of the figure came from the rollup; `live_reports`: how many of its reports were counted live.
select target, status, error_code, sum(reports)::bigint as reports, bool_and(rolled) as rolled,
       coalesce(sum(reports) filter (where not rolled), 0)::bigint as live_reports
from outbox.delivery_report
where day between cast(:day_from as date) and cast(:day_to as date)
  and (cast(:target as text) is null or target = cast(:target as text))
group by target, status, error_code
order by target, status, error_code nulls first

-- ops_dead_list --
-- The error code of the last request: last_error_code, written by the relay with the result;
-- for rows an older relay recorded (null) the last attempt's, looked up only for those (COALESCE
-- evaluates its second argument only when the first is null). Newest first through the dead_at
-- partial index, which also bounds --since.
select u.id, u.action_id, u.target, u.status, u.attempts, u.created_at, u.dead_at,
       u.last_http_status, last.error_code as last_error_code, u.last_error
from outbox.action_status_updates u
cross join lateral (
    select coalesce(u.last_error_code, (
        select d.error_code
        from outbox.delivery_attempts d
        where d.update_id = u.id
        order by d.attempt desc, d.id desc
        limit 1
    )) as error_code
) last
where u.state = 'dead'
  and (cast(:since as double precision) is null
       or u.dead_at >= now() - make_interval(secs => cast(:since as double precision)))
  and (cast(:target as text) is null or u.target = cast(:target as text))
  and (cast(:code as text) is null or upper(last.error_code) = upper(cast(:code as text)))
order by u.dead_at desc, u.id desc
limit :limit

-- ops_dead_count --
-- How many dead rows `dead list` (without its limit) or `dead retry --all` matches; the error code
-- as ops_dead_list reads it. Two counts: the rows whose last_error_code says the code, read from
-- action_status_updates_dead alone (an index-only scan: it carries target, last_error_code and
-- id), and the few rows an older relay left without one, whose last attempt is looked up. In one
-- count, the planner priced that lookup on every dead row and chose to read the table (2.7 s at
-- 10 M updates, against 21 ms).
select (
    select count(*)
    from outbox.action_status_updates u
    where u.state = 'dead'
      and (cast(:since as double precision) is null
           or u.dead_at >= now() - make_interval(secs => cast(:since as double precision)))
      and (cast(:target as text) is null or u.target = cast(:target as text))
      and (cast(:code as text) is null or upper(u.last_error_code) = upper(cast(:code as text)))
) + (
    select count(*)
    from (
        -- OFFSET 0 plans this scan on its own, without the attempt lookup's cost per row: the
        -- statistics see last_error_code null on nearly every row (delivered ones have none), and
        -- priced that way the planner read the table through a bitmap (1.3 s at 10 M updates).
        select u.id
        from outbox.action_status_updates u
        where u.state = 'dead'
          and cast(:code as text) is not null
          and u.last_error_code is null
          and (cast(:since as double precision) is null
               or u.dead_at >= now() - make_interval(secs => cast(:since as double precision)))
          and (cast(:target as text) is null or u.target = cast(:target as text))
        offset 0
    ) uncoded
    where upper((
        select d.error_code from outbox.delivery_attempts d
        where d.update_id = uncoded.id order by d.attempt desc, d.id desc limit 1
    )) = upper(cast(:code as text))
) as n

-- ops_dead_count_ids --
-- The same for `dead retry ACTION_ID...`: through the action_id index.
select count(*) as n
from outbox.action_status_updates u
where u.state = 'dead'
  and u.action_id = any(cast(:action_ids as text[]))
  and (cast(:since as double precision) is null
       or u.dead_at >= now() - make_interval(secs => cast(:since as double precision)))
  and (cast(:target as text) is null or u.target = cast(:target as text))
  and (cast(:code as text) is null or upper(coalesce(u.last_error_code, (
        select d.error_code from outbox.delivery_attempts d
        where d.update_id = u.id order by d.attempt desc, d.id desc limit 1
      ))) = upper(cast(:code as text)))

-- ops_dead_retry --
-- One batch: dead rows with an id above the cursor, back to pending with attempts counted afresh,
-- through outbox.requeue_dead (granted to outbox_operator). A trigger records who (current_user)
-- and when, in the row (requeued_by, requeued_at) and in outbox.requeues.
select r.id, r.action_id, r.target
from outbox.requeue_dead(cast(:after as bigint), cast(:limit as integer), cast(:reason as text),
                         cast(:action_ids as text[]), cast(:target as text), cast(:code as text)) r

-- ops_purge_count --
-- The updates a purge would delete now, counted through the delivered_at and dead_at partial
-- indexes (index-only). Delivered rows as outbox.purge_finished takes them once `purge` has
-- rolled up every ended day (outbox.rollup_reports counts a day an hour after it ended): finished
-- before the cutoff and before the UTC day that has not ended an hour ago.
select (select count(*) from outbox.action_status_updates u
        where u.state = 'delivered'
          and u.delivered_at < least(now() - make_interval(secs => :older_than),
                                     ((now() - interval '1 hour') at time zone 'UTC')::date::timestamp
                                         at time zone 'UTC'))
       + (select count(*) from outbox.action_status_updates u
          where cast(:include_dead as boolean) and u.state = 'dead'
            and u.dead_at < now() - make_interval(secs => :older_than)) as updates

-- ops_purge_partitions --
-- The attempt partitions a purge would drop (outbox.drop_old_attempts): those that ended more
-- than :older_than ago, oldest first, with the planner's estimate of their rows.
select name, from_time, to_time, rows_estimate
from outbox.attempt_partitions
where not is_default and to_time <= now() - make_interval(secs => :older_than)
order by to_time

-- ops_purge_batch --
-- One small batch of old finished rows with their attempts, through outbox.purge_finished
-- (SECURITY DEFINER: nobody else may delete them). Delivered rows first, oldest first from
-- (from_state, from_time), then dead ones with include_dead; it answers where the next batch
-- starts (next_state null: done). Rows another transaction holds are skipped, never waited for;
-- pending and in-flight rows never match; it refuses older_than under one hour.
select updates, attempts, next_state, next_from
from outbox.purge_finished(make_interval(secs => :older_than), cast(:include_dead as boolean),
                           cast(:limit as integer),
                           cast(:from_state as text), cast(:from_time as timestamptz))
