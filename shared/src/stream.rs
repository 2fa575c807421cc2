//! The JetStream stream every event goes to, and its settings: part of the contract.
//!
//! One owner creates it and keeps its settings: ingest, at start-up and whenever its
//! relay finds it gone. fanout only reads it, and waits (not ready) while it does not
//! exist, so it can never create the stream with other settings by starting first.
//! Tools that stand in for ingest (loadgen's publishers, tests) create it the same way.

use std::time::Duration;

use crate::subjects::Subjects;
use anyhow::Context;
use async_nats::jetstream::{self, stream};

/// What the stream should look like.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub name: String,
    pub subjects: Subjects,
    /// How long events are kept: how far back a client can resume.
    pub max_age: Duration,
    /// Republishes of an event id within this window are dropped by JetStream.
    pub duplicate_window: Duration,
    /// Copies JetStream keeps of the stream: 1 on a single server, 3 (or 5) in a
    /// cluster, where a stream survives the loss of a minority of its servers.
    pub replicas: usize,
}

/// How long the stream keeps events by default: how far back a client can resume.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// JetStream's duplicate window by default.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(300);
/// Replicas by default: one, what a single server can hold.
pub const DEFAULT_REPLICAS: usize = 1;

impl StreamSpec {
    /// The stream `name` capturing `subjects`, with the default retention and window.
    pub fn with_defaults(name: impl Into<String>, subjects: Subjects) -> Self {
        Self {
            name: name.into(),
            subjects,
            max_age: DEFAULT_MAX_AGE,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            replicas: DEFAULT_REPLICAS,
        }
    }
}

impl StreamSpec {
    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: vec![self.subjects.all()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            max_age: self.max_age,
            duplicate_window: self.duplicate_window.min(self.max_age),
            num_replicas: self.replicas,
            ..Default::default()
        }
    }
}

/// Creates the stream, or updates the settings this service owns if it exists.
/// Safe to run from several replicas at once.
///
/// A stream whose replica count differs from the spec's is rescaled (JetStream moves
/// the copies in the background); when the cluster refuses (fewer servers than the
/// count asks for, say), the other settings are still applied and the refusal is
/// logged as an error naming both counts, so the relay keeps running on what it has.
#[tracing::instrument(skip_all, fields(stream = %spec.name), err)]
pub async fn ensure_stream(js: &jetstream::Context, spec: &StreamSpec) -> anyhow::Result<()> {
    let wanted = spec.config();
    match js.get_stream(&spec.name).await {
        Ok(mut existing) => {
            let current = existing.info().await.context("reading stream info")?.config.clone();
            let drifted = current.subjects != wanted.subjects
                || current.max_age != wanted.max_age
                || current.duplicate_window != wanted.duplicate_window;
            let rescale = current.num_replicas != wanted.num_replicas;
            if drifted || rescale {
                let updated = stream::Config { storage: current.storage, ..wanted.clone() };
                match js.update_stream(updated).await {
                    Ok(_) if rescale => tracing::info!(
                        from = current.num_replicas,
                        to = wanted.num_replicas,
                        "stream settings updated, replicas changed"
                    ),
                    Ok(_) => tracing::info!("stream settings updated"),
                    Err(error) if rescale => {
                        tracing::error!(
                            %error,
                            replicas = current.num_replicas,
                            wanted = wanted.num_replicas,
                            "the stream keeps its replica count: JetStream refused to change it (STREAM_REPLICAS)"
                        );
                        if drifted {
                            let kept = stream::Config {
                                storage: current.storage,
                                num_replicas: current.num_replicas,
                                ..wanted
                            };
                            js.update_stream(kept).await.context("updating stream")?;
                            tracing::info!("stream settings updated");
                        }
                    }
                    Err(error) => return Err(error).context("updating stream"),
                }
            }
        }
        Err(_) => match js.create_stream(wanted.clone()).await {
            Ok(_) => {
                tracing::info!(subjects = ?wanted.subjects, replicas = wanted.num_replicas, "stream created")
            }
            // Another replica may have created it between our look-up and create.
            Err(create_error) => {
                js.get_stream(&spec.name).await.map_err(|_| create_error).context("creating stream")?;
            }
        },
    }
    Ok(())
}

/// For tools that stand in for ingest (loadgen, tests): creates the stream as ingest
/// would when it is missing, and leaves an existing one as its owner set it.
pub async fn create_if_missing(js: &jetstream::Context, spec: &StreamSpec) -> anyhow::Result<()> {
    if js.get_stream(&spec.name).await.is_ok() {
        return Ok(());
    }
    ensure_stream(js, spec).await
}
