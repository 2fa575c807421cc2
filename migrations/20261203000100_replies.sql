-- Replies sent through the relay (POST /api/chats/{chat_id}/messages).
--
-- A reply is a message row like any other (is_sender true) with a state: `pending` while
-- Unipile is asked, then `sent` or `failed` (with the reason). The row is created under a
-- relay-made id (`relay_id`, `rl_...`) and takes Unipile's message id once Unipile gives
-- it, so the echo webhook (`message_received`, is_sender, the same id) finds it and adds
-- nothing. Messages that did not come through the relay have no state.
alter table messages
    add column state          text check (state in ('pending', 'sent', 'failed')),
    add column client_id      text,
    add column relay_id       text,
    add column failure_reason text;

create unique index messages_relay_id on messages (relay_id) where relay_id is not null;
-- Replies still without Unipile's id (sent answered with `message_id: null`): the echo
-- is matched to them by chat and text.
create index messages_replies_awaiting_id on messages (chat_id, created_at)
    where relay_id is not null and id = relay_id;

-- One row per (account, client_id): the idempotency key of a reply. The first POST
-- inserts it (`on conflict do nothing`), sends, and records its answer; a repeated POST
-- with the same key finds the row and answers the same status and body.
create table replies (
    account_id    text not null,
    client_id     text not null,
    relay_id      text not null unique,
    chat_id       text not null,
    text          text not null,
    answer_status smallint,
    answer_body   jsonb,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    primary key (account_id, client_id)
);
