//! The JetStream stream every event goes to: created or brought up to date at start-up.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};
use shared::subjects::Subjects;

/// What the stream should look like.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub name: String,
    pub subjects: Subjects,
    /// How long events are kept: how far back a client can resume.
    pub max_age: Duration,
    /// Republishes of an event id within this window are dropped by JetStream.
    pub duplicate_window: Duration,
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
            ..Default::default()
        }
    }
}

/// Creates the stream, or updates the settings this service owns if it exists.
/// Safe to run from several replicas at once.
#[tracing::instrument(skip_all, fields(stream = %spec.name), err)]
pub async fn ensure_stream(js: &jetstream::Context, spec: &StreamSpec) -> anyhow::Result<()> {
    let wanted = spec.config();
    match js.get_stream(&spec.name).await {
        Ok(mut existing) => {
            let current = existing.info().await.context("reading stream info")?.config.clone();
            let drifted = current.subjects != wanted.subjects
                || current.max_age != wanted.max_age
                || current.duplicate_window != wanted.duplicate_window;
            if drifted {
                let updated = stream::Config { storage: current.storage, ..wanted };
                js.update_stream(updated).await.context("updating stream")?;
                tracing::info!("stream settings updated");
            }
        }
        Err(_) => match js.create_stream(wanted.clone()).await {
            Ok(_) => tracing::info!(subjects = ?wanted.subjects, "stream created"),
            // Another replica may have created it between our look-up and create.
            Err(create_error) => {
                js.get_stream(&spec.name).await.map_err(|_| create_error).context("creating stream")?;
            }
        },
    }
    Ok(())
}
