-- 0006: years of history. outbox.delivery_attempts is partitioned by month of started_at, so
-- retention drops whole partitions instead of deleting rows; delivered outcomes are counted per
-- day in a rollup that outlives retention; the last error code is kept on the update.
--
-- The 0.1.0 table is not copied: it becomes one partition (delivery_attempts_legacy, from the
-- beginning of time to the first day of next month), attached after one scan that checks its
-- rows. The relay's statements on delivery_attempts wait for the whole migration; writers
-- (inserts into action_status_updates) only for the short steps of part 6, at the end.

-- 1. The 0.1.0 table steps aside, without its trigger and identity (its foreign key goes in part 6:
-- dropping it locks action_status_updates).
lock table outbox.delivery_attempts in access exclusive mode;
create temporary table migration_0006_ids on commit drop as
select greatest(coalesce((select max(id) from outbox.delivery_attempts), 0),
                coalesce(pg_sequence_last_value(pg_get_serial_sequence('outbox.delivery_attempts', 'id')::regclass), 0))
       as top;
alter table outbox.delivery_attempts rename to delivery_attempts_legacy;
alter table outbox.delivery_attempts_legacy rename constraint delivery_attempts_pkey to delivery_attempts_legacy_pkey;
alter index outbox.delivery_attempts_update_id rename to delivery_attempts_legacy_update_id;
alter table outbox.delivery_attempts_legacy alter column id drop identity;
drop trigger delivery_attempts_append_only on outbox.delivery_attempts_legacy;
do $$
declare
    name text;
begin
    foreach name in array array['outbox_relay', 'outbox_operator', 'outbox_auditor'] loop
        if exists (select 1 from pg_roles where rolname = name) then
            execute format('revoke all on outbox.delivery_attempts_legacy from %I', name);
        end if;
    end loop;
end $$;

-- 2. The partitioned ledger.
create sequence outbox.delivery_attempts_id_seq;
select setval('outbox.delivery_attempts_id_seq', top + 1, false) from migration_0006_ids;

-- One row per HTTP request made, append-only, partitioned by month of started_at (UTC). The NOT NULL
-- constraints are named as on a new table (PostgreSQL 18 names them; the 0.1.0 table holds the defaults).
create table outbox.delivery_attempts (
    id            bigint constraint delivery_attempts_id_not_null not null default nextval('outbox.delivery_attempts_id_seq'),
    update_id     bigint constraint delivery_attempts_update_id_not_null not null,
    action_id     text constraint delivery_attempts_action_id_not_null not null,
    target        text constraint delivery_attempts_target_not_null not null,
    attempt       integer constraint delivery_attempts_attempt_not_null not null,
    started_at    timestamptz constraint delivery_attempts_started_at_not_null not null,
    duration_ms   double precision constraint delivery_attempts_duration_ms_not_null not null,
    http_status   integer,
    outcome       text constraint delivery_attempts_outcome_not_null not null,
    error_code    text,
    error_message text,
    response_body text,
    relay_id      text constraint delivery_attempts_relay_id_not_null not null,
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

-- The 0.1.0 rows: one partition up to the first day of next month, or nothing when there were none.
-- Rows dated later than that (a relay's clock ahead) are set aside and routed like new rows.
create temporary table migration_0006_ahead on commit drop as
select * from outbox.delivery_attempts_legacy where false;
do $$
declare
    upto timestamptz := (date_trunc('month', now() at time zone 'UTC') + interval '1 month') at time zone 'UTC';
begin
    if not exists (select 1 from outbox.delivery_attempts_legacy) then
        drop table outbox.delivery_attempts_legacy;
        return;
    end if;
    with ahead as (
        delete from outbox.delivery_attempts_legacy where started_at >= upto returning *
    )
    insert into migration_0006_ahead select * from ahead;
    execute format('alter table outbox.delivery_attempts attach partition outbox.delivery_attempts_legacy '
                   'for values from (minvalue) to (%L)', upto);
end $$;

-- Finds the partition of each update's attempts by index; on the 0.1.0 partition the existing
-- index is attached, not rebuilt. The BRIN index serves date ranges inside a partition.
create index delivery_attempts_update_id on outbox.delivery_attempts (update_id, attempt);
create index delivery_attempts_started_at on outbox.delivery_attempts using brin (started_at);

create trigger delivery_attempts_append_only
    before update or delete or truncate on outbox.delivery_attempts
    for each statement execute function outbox.refuse_history_change();

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

insert into outbox.delivery_attempts select * from migration_0006_ahead;

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

-- 3. Delivered outcomes per UTC day, kept when retention deletes the rows.
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

-- 4. Retention deletes updates only; their attempts go with their partition (drop_old_attempts).
-- Delivered rows are deleted once their day is counted in the rollup.
create or replace function outbox.purge_finished(
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

-- 5. Grants, where the roles exist.
do $$
begin
    if exists (select 1 from pg_roles where rolname = 'outbox_relay') then
        grant select on outbox.delivery_attempts to outbox_relay;
        grant insert (update_id, action_id, target, attempt, started_at, duration_ms, http_status, outcome,
                      error_code, error_message, response_body, relay_id, reached_api)
            on outbox.delivery_attempts to outbox_relay;
        grant usage on sequence outbox.delivery_attempts_id_seq to outbox_relay;
        grant select on outbox.attempt_partitions, outbox.report_days, outbox.daily_reports,
                        outbox.delivery_report to outbox_relay;
        grant execute on function outbox.ensure_attempt_partitions(integer, timestamptz),
                                  outbox.drop_old_attempts(interval), outbox.rollup_reports(integer)
            to outbox_relay;
    end if;
    if exists (select 1 from pg_roles where rolname = 'outbox_operator') then
        grant select on outbox.delivery_attempts, outbox.attempt_partitions, outbox.report_days,
                        outbox.daily_reports, outbox.delivery_report to outbox_operator;
        grant execute on function outbox.ensure_attempt_partitions(integer, timestamptz),
                                  outbox.drop_old_attempts(interval), outbox.rollup_reports(integer)
            to outbox_operator;
    end if;
    if exists (select 1 from pg_roles where rolname = 'outbox_auditor') then
        grant select on outbox.delivery_attempts, outbox.attempt_partitions, outbox.report_days,
                        outbox.daily_reports, outbox.delivery_report to outbox_auditor;
    end if;
end $$;
revoke execute on function outbox.ensure_attempt_partitions(integer, timestamptz) from public;
revoke execute on function outbox.drop_old_attempts(interval) from public;
revoke execute on function outbox.rollup_reports(integer) from public;

select outbox.ensure_attempt_partitions(2);

-- 6. What locks action_status_updates, last, so writers wait only for these short steps: the 0.1.0
-- table's foreign key dropped; the last error code on the update (set by the relay with each
-- result; dead retry's --code reads it; 0007 fills it in for dead rows and indexes it).
do $$
begin
    if to_regclass('outbox.delivery_attempts_legacy') is not null then
        alter table outbox.delivery_attempts_legacy drop constraint delivery_attempts_update_id_fkey;
    end if;
end $$;
alter table outbox.action_status_updates add column if not exists last_error_code text;
-- Vacuumed after 2% of its rows changed instead of 20%: retention's deletes are reclaimed (and
-- the space reused) within about a day at 200,000 rows a day, and the visibility map stays fresh
-- for the index-only counts of `status`.
alter table outbox.action_status_updates set (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
comment on column outbox.action_status_updates.last_error_code is
    'error_code of the last request recorded for this update (null: none, or recorded by a relay older than 0006).';

create or replace view outbox.delivery_audit as
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

create or replace function outbox.requeue_dead(
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

do $$
begin
    if exists (select 1 from pg_roles where rolname = 'outbox_relay') then
        grant update (last_error_code) on outbox.action_status_updates to outbox_relay;
    end if;
end $$;
