-- Rows that can never be published (larger than the NATS server accepts, or refused by
-- JetStream again and again) are parked with their reason instead of blocking the rows
-- after them. Parked rows stay for an operator to inspect; they are never pruned.
alter table outbox
    add column parked_at   timestamptz,
    add column park_reason text;

drop index outbox_unpublished;
create index outbox_unpublished on outbox (id) where published_at is null and parked_at is null;
create index outbox_parked on outbox (parked_at) where parked_at is not null;
