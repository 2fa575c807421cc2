-- The inbox model: what read receipts, reactions, edits and deletions need beyond the
-- first migration.

-- A placeholder row stands for a message the relay has not received yet but already
-- got an update for (a reaction or read receipt that overtook it, or one for a message
-- older than the relay). The update is applied to it; the message_received (or the
-- backfill) that brings the message later fills the row in and keeps the update.
-- Placeholders are not listed by the REST API and do not count in chat activity.
alter table messages add column placeholder boolean not null default false;

-- When the provider confirmed delivery (`message_delivered`).
alter table messages add column delivered_at timestamptz;
