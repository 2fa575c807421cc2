-- Accounts as `GET /api/accounts` lists them, and the backfill an account gets when it
-- comes back after a disconnect.
--
-- `name` comes from Unipile's account list (`ingest sync`, the start-up catch-up).
-- `backfill_requested_at` is set, in the transaction that stores the account's return
-- (`OK`/`RECONNECTED` after another status), with `backfill_since` the newest activity
-- the relay then held for the account (null: it held none, the whole history is
-- fetched). A worker in every ingest replica claims due rows with a lease
-- (`backfill_lease_until`), backfills, and clears the request unless a newer one came.
alter table accounts
    add column name                  text,
    add column backfill_requested_at timestamptz,
    add column backfill_since        timestamptz,
    add column backfill_lease_until  timestamptz;

create index accounts_backfill_due on accounts (backfill_requested_at)
    where backfill_requested_at is not null;
