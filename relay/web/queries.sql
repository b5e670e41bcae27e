-- The web console's statements (relay/web/data.py), run through the store (Store.fetch).
-- Lists are newest first and paginated by keyset, never OFFSET. A filtered list reads at most
-- :scan rows of its index per page: a filter that matches little answers in bounded time with
-- where it stopped, and the next page carries on from there.

-- web_capabilities --
-- What the console's database role may do: redrive needs outbox.requeue_dead and UPDATE of the
-- state (outbox_operator); an auditor has neither.
select current_user as role,
       coalesce(has_function_privilege('outbox.requeue_dead(bigint, integer, text, text[], text, text)',
                                        'EXECUTE')
                and has_column_privilege('outbox.action_status_updates', 'state', 'UPDATE'),
                false) as may_redrive

-- web_find_ids --
-- Updates of these action ids (pasted, one or many), through the action_id index.
select id, action_id, target, status, state, attempts, created_at, delivered_at, dead_at,
       last_http_status, last_error_code
from outbox.action_status_updates
where action_id = any(cast(:action_ids as text[]))
order by action_id, target
limit :limit

-- web_find_prefix --
-- Updates whose action id starts with :prefix (its % _ \ escaped in :pattern): a range of the
-- text_pattern_ops index (0008), whatever the database's collation, read in that index's order
-- (USING ~<~) so a short prefix matching millions stops at :limit instead of sorting them all.
select id, action_id, target, status, state, attempts, created_at, delivered_at, dead_at,
       last_http_status, last_error_code
from outbox.action_status_updates
where action_id ~>=~ cast(:prefix as text)
  and action_id like cast(:pattern as text) escape '\'
order by action_id using ~<~
limit :limit

-- web_update --
select u.id, u.action_id, u.target, u.status, u.errors, u.state, u.attempts, u.requests,
       u.created_at, u.next_attempt_at, u.delivered_at, u.dead_at, u.delivered_at - u.created_at as time_to_deliver,
       u.last_http_status, u.last_error_code, u.last_error, u.outcome_unknown, u.claimed_by,
       u.sending_at, u.requeued_at, u.requeued_by, u.requeue_reason
from outbox.action_status_updates u
where u.id = :id

-- web_update_attempts --
select attempt, started_at, duration_ms, http_status, reached_api, outcome, error_code, error_message,
       response_body, relay_id, db_role
from outbox.delivery_attempts
where update_id = :id
order by started_at, attempt, id

-- web_update_requeues --
select requeued_at, requeued_by, reason, dead_at, attempts
from outbox.requeues
where update_id = :id
order by requeued_at, id

-- web_updates_page --
-- Updates newest first by (created_at, id) through action_status_updates_created_at (0008), from
-- the cursor (before_at, before_id) back to from_at. The inner query reads at most :scan rows of
-- the index, numbered n; the outer one keeps those matching the filters ('hit') and the row
-- n = :scan (the oldest read, where the next page goes on when this one is short), and stops at
-- :page_plus rows: a common filter reads about a page, a rare one at most :scan rows.
select s.*
from (
    select u.id, u.action_id, u.target, u.status, u.state, u.attempts, u.created_at, u.delivered_at,
           u.dead_at, u.last_http_status, u.last_error_code, u.last_error, u.created_at as position_at,
           (cast(:state as text) is null or u.state = cast(:state as text))
           and (cast(:target as text) is null or u.target = cast(:target as text))
           and (cast(:status as text) is null or u.status = cast(:status as text))
           and (cast(:code as text) is null or upper(u.last_error_code) = upper(cast(:code as text)))
               as hit,
           row_number() over (order by u.created_at desc, u.id desc) as n
    from outbox.action_status_updates u
    where (u.created_at, u.id) < (cast(:before_at as timestamptz), cast(:before_id as bigint))
      and u.created_at >= cast(:from_at as timestamptz)
    order by u.created_at desc, u.id desc
    limit :scan
) s
where s.hit or s.n = :scan
limit :page_plus

-- web_dead_page --
-- Dead updates newest first by (dead_at, id), as web_updates_page, but the rows read are only
-- index entries: action_status_updates_dead carries target, last_error_code and id (0007), so
-- the scan is index-only and the table is visited for the page's rows alone (and for the status,
-- only when it is asked).
select u.id, u.action_id, u.target, u.status, u.state, u.attempts, u.created_at, u.delivered_at,
       u.dead_at, u.last_http_status, u.last_error_code, u.last_error, s.position_at, s.hit, s.n
from (
    select d.id, d.position_at, d.hit, d.n
    from (
        select x.id, x.dead_at as position_at,
               (cast(:target as text) is null or x.target = cast(:target as text))
               and (cast(:code as text) is null or upper(x.last_error_code) = upper(cast(:code as text)))
               and (cast(:status as text) is null
                    or (select y.status from outbox.action_status_updates y where y.id = x.id)
                       = cast(:status as text))
                   as hit,
               row_number() over (order by x.dead_at desc, x.id desc) as n
        from outbox.action_status_updates x
        where x.state = 'dead'
          and (x.dead_at, x.id) < (cast(:before_at as timestamptz), cast(:before_id as bigint))
          and x.dead_at >= cast(:from_at as timestamptz)
        order by x.dead_at desc, x.id desc
        limit :scan
    ) d
    where d.hit or d.n = :scan
    limit :page_plus
) s
join outbox.action_status_updates u on u.id = s.id
order by s.n

-- web_dead_groups --
-- Dead updates per target and error code: an index-only scan of action_status_updates_dead.
select target, last_error_code as code, count(*) as dead, max(dead_at) as newest, min(dead_at) as oldest
from outbox.action_status_updates
where state = 'dead'
group by target, last_error_code
order by count(*) desc, target, last_error_code nulls first

-- web_dead_selected --
-- Of the updates an operator ticked, those still dead: what a redrive of them would re-queue.
select id, action_id, target
from outbox.action_status_updates
where id = any(cast(:ids as bigint[])) and state = 'dead'
order by id

-- web_per_minute --
-- Deliveries and dead letters per minute over the last :minutes minutes (the current one
-- included), through the delivered_at and dead partial indexes.
with minutes as (
    select generate_series(date_trunc('minute', now()) - make_interval(mins => :minutes - 1),
                           date_trunc('minute', now()), interval '1 minute') as minute
),
delivered as (
    select date_trunc('minute', delivered_at) as minute, count(*) as n
    from outbox.action_status_updates
    where state = 'delivered'
      and delivered_at >= date_trunc('minute', now()) - make_interval(mins => :minutes - 1)
    group by 1
),
dead as (
    select date_trunc('minute', dead_at) as minute, count(*) as n
    from outbox.action_status_updates
    where state = 'dead'
      and dead_at >= date_trunc('minute', now()) - make_interval(mins => :minutes - 1)
    group by 1
)
select m.minute, coalesce(d.n, 0)::bigint as delivered, coalesce(x.n, 0)::bigint as dead
from minutes m
left join delivered d on d.minute = m.minute
left join dead x on x.minute = m.minute
order by m.minute
