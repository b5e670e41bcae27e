-- 0004: a refused repeat says what differs. outbox.enqueue_action_status raised
-- `... different outcome queued for target "T" (FAILED)` even when only an error message differed;
-- it now names the queued status and the new one, or says the status is the same and the errors
-- differ. Same signature, same grants (CREATE OR REPLACE keeps them), same fixed search_path.

create or replace function outbox.enqueue_action_status(
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
