-- Accounts, chats and messages as the relay knows them, plus the outbox that carries
-- every event to JetStream and the dead letters that keep what could not be used.

create table accounts (
    id                text primary key,
    account_type      text,
    status            text,
    status_changed_at timestamptz,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now()
);

create table chats (
    id                   text primary key,
    account_id           text not null references accounts (id),
    account_type         text,
    provider_chat_id     text,
    name                 text,
    is_group             boolean not null default false,
    unread_count         bigint not null default 0 check (unread_count >= 0),
    last_message_at      timestamptz,
    last_message_id      text,
    last_message_preview text,
    created_at           timestamptz not null default now(),
    updated_at           timestamptz not null default now()
);

-- GET /api/chats: one account's chats, newest activity first, keyset-paginated.
create index chats_by_account_activity
    on chats (account_id, last_message_at desc nulls last, id desc);
-- The same across accounts, for tokens that see several or all.
create index chats_by_activity on chats (last_message_at desc nulls last, id desc);

create table messages (
    id                  text primary key,
    chat_id             text not null references chats (id),
    account_id          text not null references accounts (id),
    provider_message_id text,
    text                text,
    sender              jsonb not null default '{}',
    is_sender           boolean not null,
    sent_at             timestamptz not null,
    attachments         jsonb not null default '[]',
    quoted              jsonb,
    seen                boolean not null default false,
    seen_at             timestamptz,
    reactions           jsonb not null default '[]',
    edited_at           timestamptz,
    deleted_at          timestamptz,
    -- The delivery as Unipile sent it, for audits and re-processing.
    raw                 jsonb,
    created_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now()
);

-- GET /api/chats/{id}/messages: newest first, keyset on (sent_at, id).
create index messages_by_chat_time on messages (chat_id, sent_at desc, id desc);

create table outbox (
    id           bigserial primary key,
    event_id     uuid not null unique,
    subject      text not null,
    -- The serialized envelope, published byte for byte.
    payload      bytea not null,
    attempts     integer not null default 0,
    published_at timestamptz,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now()
);

-- The relay and the sweeper read only what is still unpublished, oldest first.
create index outbox_unpublished on outbox (id) where published_at is null;
-- Pruning of published rows.
create index outbox_published_at on outbox (published_at) where published_at is not null;

create table dead_letters (
    id           bigserial primary key,
    endpoint     text not null,
    reason       text not null,
    content_type text,
    body         bytea not null,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now()
);

create index dead_letters_by_time on dead_letters (created_at desc);
