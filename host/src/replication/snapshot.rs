//! Joining the shared log from a snapshot instead of replaying it.
//!
//! A replica's `wasm-relay export` starts with the replica's position in the
//! shared log (the `read_time` its follower saved: every log document up to
//! it is in the store). A new replica configured with
//! `replication.snapshot_url` loads such an export into its empty store,
//! takes that position as its own, and its follower then resumes the log
//! there: it applies only what changed after the snapshot was taken.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use super::{CURSOR_FILE, Cursor, read_cursor, write_cursor};
use crate::tools::ImportSummary;

/// The shared-log position saved in `data_dir`, for an export to start
/// with; `None` when the directory is not a replica's.
pub fn log_position(data_dir: &Path) -> Option<serde_json::Value> {
    read_cursor(&data_dir.join(CURSOR_FILE)).and_then(|c| serde_json::to_value(c).ok())
}

/// Whether the replica in `data_dir` has never followed the shared log (a
/// new replica, which a snapshot can start).
pub fn is_new_replica(data_dir: &Path) -> bool {
    !data_dir.join(CURSOR_FILE).exists()
}

/// Loads the snapshot at `source` (an `http://` or `https://` URL, a
/// `file://` URL or a path) into the store in `data_dir`, through the same
/// checks as `import` (ids, signatures, NIP-09/62 tombstones), and saves its
/// log position as this replica's. A snapshot without a position (an export
/// of a relay that was not a replica) is loaded, and the whole log is then
/// replayed as without one.
pub async fn join_from_snapshot(source: &str, data_dir: &Path) -> anyhow::Result<ImportSummary> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let started = Instant::now();
    let (path, downloaded) = if source.starts_with("http://") || source.starts_with("https://") {
        let path = data_dir.join("snapshot.download");
        let bytes = download(source, &path).await?;
        tracing::info!(bytes, "snapshot downloaded");
        (path, true)
    } else {
        (PathBuf::from(source.strip_prefix("file://").unwrap_or(source)), false)
    };
    let (dir, input) = (data_dir.to_owned(), path.clone());
    let summary = tokio::task::spawn_blocking(move || crate::tools::import(&dir, &input, None))
        .await
        .context("the snapshot import stopped")??;
    if downloaded {
        let _ = std::fs::remove_file(&path);
    }
    let position = summary.log_position.clone().and_then(|v| serde_json::from_value::<Cursor>(v).ok());
    match position {
        Some(cursor) => {
            write_cursor(&data_dir.join(CURSOR_FILE), &cursor).context("saving the snapshot's log position")?;
            tracing::info!(
                events = summary.stored,
                tombstones = summary.tombstones,
                log_position = ?(cursor.seconds, cursor.nanos),
                seconds = started.elapsed().as_secs_f64(),
                "joined from a snapshot; following the shared log from its position"
            );
        }
        None => tracing::warn!(
            events = summary.stored,
            "the snapshot has no log position (not a replica's export): the whole shared log is replayed"
        ),
    }
    Ok(summary)
}

/// Streams `url` into the file `to`; returns its size.
async fn download(url: &str, to: &Path) -> anyhow::Result<u64> {
    use tokio::io::AsyncWriteExt;
    // A server that stops answering fails the start instead of hanging it.
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .read_timeout(std::time::Duration::from_secs(60))
        .build()
        .context("an HTTP client for the snapshot")?;
    let mut response = client
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("downloading the snapshot from {url}"))?;
    let mut file = tokio::fs::File::create(to).await.with_context(|| format!("creating {}", to.display()))?;
    let mut bytes = 0u64;
    while let Some(chunk) = response.chunk().await.with_context(|| format!("downloading the snapshot from {url}"))? {
        file.write_all(&chunk).await?;
        bytes += chunk.len() as u64;
    }
    file.sync_all().await?;
    Ok(bytes)
}
