-- 0008: what the audit console reads, answered through indexes at 10 million updates.
--
-- action_status_updates_action_id_pattern replaces action_status_updates_action_id. The console
-- finds actions by a prefix (action_id like 'abc%', its % and _ escaped); under a database
-- collation other than C (en_US.UTF-8, the usual case) a default btree cannot serve a LIKE
-- prefix, a text_pattern_ops one can, and it serves the equality lookups too (`audit`,
-- `dead retry ACTION_ID`). The writers' conflict checks use the unique (target, action_id).
-- action_status_updates_created_at: the console's lists, newest first by (created_at, id), paged
-- by keyset, bounded by a created_at range.
--
-- The builds hold writers and relays (not readers) until this migration commits; the old index is
-- dropped last, so readers wait only for that step. Made beforehand with CREATE INDEX CONCURRENTLY
-- (README "Upgrading to 0008"), they are not built here at all; an index a failed concurrent
-- build left (invalid) is dropped and built again.

do $$
begin
    if exists (select 1 from pg_index i
               where i.indexrelid = to_regclass('outbox.action_status_updates_action_id_pattern')
                 and not i.indisvalid) then
        drop index outbox.action_status_updates_action_id_pattern;  -- a CREATE INDEX CONCURRENTLY that failed
    end if;
    if exists (select 1 from pg_index i
               where i.indexrelid = to_regclass('outbox.action_status_updates_created_at')
                 and not i.indisvalid) then
        drop index outbox.action_status_updates_created_at;  -- a CREATE INDEX CONCURRENTLY that failed
    end if;
end $$;
create index if not exists action_status_updates_action_id_pattern
    on outbox.action_status_updates (action_id text_pattern_ops);
create index if not exists action_status_updates_created_at
    on outbox.action_status_updates (created_at, id);
drop index if exists outbox.action_status_updates_action_id;  -- dropped beforehand: nothing to do
