//! `e2e`: end-to-end tests only (see `tests/`). The library is empty on purpose.
