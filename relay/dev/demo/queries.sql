-- The demo's progress and summary figures, read only (relay/dev/demo/figures.py).
-- Statements by name, in the format of relay/pg/queries.sql.

-- demo_counts --
select count(*) filter (where state = 'pending') as pending,
       count(*) filter (where state = 'in_flight') as in_flight,
       count(*) filter (where state = 'delivered') as delivered,
       count(*) filter (where state = 'dead') as dead
from outbox.action_status_updates

-- demo_summary --
-- latency is commit to delivery, from the database's own clock: delivered_at - created_at.
select (select count(*) from outbox.delivery_attempts) as requests,
       (select count(*) from outbox.delivery_attempts where outcome = 'retry') as retries,
       (select count(*) from outbox.delivery_attempts where outcome = 'delivered_earlier')
           as delivered_earlier,
       (select count(*) from outbox.delivery_attempts
        where outcome = 'delivered_earlier' and http_status = 400) as already_final_after_unknown,
       (select 1000 * percentile_cont(0.5) within group (
                   order by extract(epoch from delivered_at - created_at)::double precision)
        from outbox.action_status_updates where state = 'delivered') as latency_p50_ms,
       (select 1000 * percentile_cont(0.95) within group (
                   order by extract(epoch from delivered_at - created_at)::double precision)
        from outbox.action_status_updates where state = 'delivered') as latency_p95_ms

-- demo_outcomes --
-- Every update's final state, and whether a 404 after an unanswered attempt settled it.
select u.action_id, u.state,
       exists (select 1 from outbox.delivery_attempts d
               where d.update_id = u.id and d.outcome = 'delivered_earlier' and d.http_status = 404)
           as delivered_on_404
from outbox.action_status_updates u
order by u.id

-- demo_retried_example --
-- A delivered update that needed more than one request; one that went through the ambiguous
-- path (an answer lost, then ACTION_ALREADY_FINAL) first, as it tells the most.
select u.action_id
from outbox.action_status_updates u
where u.state = 'delivered' and u.requests > 1
order by exists (select 1 from outbox.delivery_attempts d
                 where d.update_id = u.id and d.outcome = 'delivered_earlier') desc,
         u.requests desc, u.id
limit 1
