-- Replies still `pending` (a process that died between storing a reply and recording
-- Unipile's answer leaves one): the sweeper marks old ones `failed` (`interrupted`).
-- Few rows are ever pending, so the partial index stays tiny.
create index messages_pending_replies on messages (created_at) where state = 'pending';
