-- 0007: the dead rows' last error code filled in (0006 added the column), and the dead rows' index
-- carrying what `status` and `dead list` read (target, last_error_code, id), so they count and list
-- dead rows without visiting the table. Apart from 0006 so that writers wait only for this index's
-- build (it reads the whole table), not for the backfill; made beforehand with CREATE INDEX
-- CONCURRENTLY (README "Upgrading to 0006"), it is not built here at all.

-- The dead rows' last codes, read from the attempts before any lock on action_status_updates.
create temporary table migration_0007_codes on commit drop as
select distinct on (d.update_id) d.update_id as id, d.error_code
from outbox.delivery_attempts d
where d.update_id in (select u.id from outbox.action_status_updates u where u.state = 'dead')
order by d.update_id, d.attempt desc, d.id desc;
analyze migration_0007_codes;
update outbox.action_status_updates u
set last_error_code = c.error_code
from migration_0007_codes c
where u.id = c.id and u.state = 'dead' and c.error_code is not null;

do $$
begin
    if exists (select 1 from pg_index i where i.indexrelid = to_regclass('outbox.action_status_updates_dead')
               and not i.indisvalid) then
        drop index outbox.action_status_updates_dead;  -- a CREATE INDEX CONCURRENTLY that failed
    end if;
end $$;
create index if not exists action_status_updates_dead
    on outbox.action_status_updates (dead_at) include (target, last_error_code, id) where state = 'dead';
drop index outbox.action_status_updates_dead_at;
