//! Lifecycle: reloading and swapping a plugin's file (by the operator or
//! the file watcher), disabling and enabling it, handing its managed kinds
//! over, and its ticks.

use super::*;

impl PluginHost {
    /// Loads the slot's file again and swaps it in if it changed and loads
    /// cleanly. Calls already running finish on the old version.
    pub async fn reload(&self, name: &str) -> Result<bool, String> {
        self.swap_in(name, None).await
    }

    /// Replaces the plugin's file with `wasm` and swaps it in, if it loads
    /// cleanly; otherwise the file and the serving version stay as they were.
    pub async fn swap(&self, name: &str, wasm: &[u8]) -> Result<bool, String> {
        self.swap_in(name, Some(wasm)).await
    }

    /// Stops calling a plugin until [`Self::enable`] or its file changes:
    /// events it would see are refused, requests follow its `on_req_failure`.
    pub fn disable(&self, name: &str) -> Result<(), String> {
        let (_, slot) = self.slot(name)?;
        slot.disabled.store(true, Ordering::Relaxed);
        slot.stats.set_disabled(true);
        *slot.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some("disabled by an operator".into());
        tracing::warn!(plugin = %name, "plugin disabled by an operator");
        Ok(())
    }

    /// Serves plugin `name`'s managed kinds through the ordinary read paths
    /// (`release` true) or through the plugin again (false). The plugin
    /// keeps seeing events either way, so its state stays current.
    pub fn release_managed_kinds(&self, name: &str, release: bool) -> Result<(), String> {
        let (_, slot) = self.slot(name)?;
        slot.released.store(release, Ordering::Relaxed);
        self.publish_managed_kinds();
        tracing::warn!(plugin = %name, released = release, "managed kinds changed hands by an operator");
        Ok(())
    }

    pub fn enable(&self, name: &str) -> Result<(), String> {
        let (_, slot) = self.slot(name)?;
        slot.breaker.reset();
        slot.disabled.store(false, Ordering::Relaxed);
        slot.stats.set_disabled(false);
        tracing::info!(plugin = %name, "plugin enabled by an operator");
        Ok(())
    }

    async fn swap_in(&self, name: &str, replacement: Option<&[u8]>) -> Result<bool, String> {
        let (index, slot) = self.slot(name)?;
        let _one_at_a_time = slot.reload_lock.lock().await;
        let fail = |e: String| {
            slot.stats.swapped(false);
            tracing::error!(plugin = %name, error = %e, "plugin swap failed; the previous version keeps serving");
            *slot.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
            Err(e)
        };
        // A replacement is written beside the plugin's file and loaded from
        // there; only a component that loads takes the file's place.
        let mut config = slot.config.clone();
        let staged = match replacement {
            Some(bytes) => {
                let staged = staged_path(&slot.config.path);
                if let Err(e) = tokio::fs::write(&staged, bytes).await {
                    return fail(format!("cannot write {}: {e}", staged.display()));
                }
                config.path = staged.clone();
                Some(staged)
            }
            None => None,
        };
        let counters = slot.stats.counters.clone();
        let loaded = self.runtime.load(&config, slot.kv.clone(), self.events.clone(), counters).await;
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                if let Some(staged) = &staged {
                    let _ = tokio::fs::remove_file(staged).await;
                }
                return fail(e.to_string());
            }
        };
        if let Some(conflict) = self.managed_conflict(Some((index, &loaded))) {
            if let Some(staged) = &staged {
                let _ = tokio::fs::remove_file(staged).await;
            }
            return fail(conflict);
        }
        if let Some(staged) = &staged
            && let Err(e) = tokio::fs::rename(staged, &slot.config.path).await
        {
            let _ = tokio::fs::remove_file(staged).await;
            return fail(format!("cannot replace {}: {e}", slot.config.path.display()));
        }
        if loaded.hash == slot.current().hash && !slot.disabled.load(Ordering::Relaxed) && !slot.breaker.is_open() {
            return Ok(false);
        }
        tracing::info!(plugin = %name, version = %loaded.info.version, hash = %loaded.hash, "plugin swapped");
        slot.current.store(Arc::new(loaded));
        slot.breaker.reset();
        slot.disabled.store(false, Ordering::Relaxed);
        slot.stats.swapped(true);
        slot.stats.set_disabled(false);
        self.publish_managed_kinds();
        Ok(true)
    }

    /// Reloads every plugin (SIGHUP).
    pub async fn reload_all(&self) {
        for slot in &self.slots {
            let _ = self.reload(&slot.config.name).await;
        }
    }

    /// Watches every plugin file and swaps a plugin shortly after its file
    /// changes (writes are debounced).
    pub fn watch_files(self: &Arc<Self>) -> anyhow::Result<()> {
        use notify::Watcher;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let targets: Vec<(String, PathBuf)> =
            self.slots.iter().filter_map(|s| Some((s.config.name.clone(), absolute(&s.config.path)?))).collect();
        let watched = targets.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if event.kind.is_access() {
                return;
            }
            for path in &event.paths {
                for (name, target) in &watched {
                    if absolute(path).as_deref() == Some(target.as_path()) {
                        let _ = tx.send(name.clone());
                    }
                }
            }
        })?;
        let mut dirs: Vec<&Path> = targets.iter().filter_map(|(_, p)| p.parent()).collect();
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        }
        *self.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        let host = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Let a copy finish: wait until the file has been quiet briefly.
                let mut names = vec![first];
                while let Ok(Some(more)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                    names.push(more);
                }
                names.sort();
                names.dedup();
                let Some(host) = host.upgrade() else { return };
                for name in names {
                    let _ = host.reload(&name).await;
                }
            }
        });
        Ok(())
    }

    /// Calls every plugin's `tick` once, now, whatever its interval (for
    /// `plugin test`); the first failure is returned.
    pub async fn tick_once(&self, now: u64) -> Result<(), CallFailure> {
        for slot in &self.slots {
            let Ok(admission) = slot.admit(None) else { continue };
            slot.timed_call(&slot.current(), Hook::Tick, admission, None, move |p, s| {
                Box::pin(async move { p.call_tick(s, now).await })
            })
            .await?;
        }
        Ok(())
    }

    /// Starts the `tick` loop of every plugin that asks for one.
    /// With `shared` (a metadata store several replicas share, and this
    /// replica's name), each plugin's `tick` runs on one replica at a time:
    /// the holder of its lease (see [`crate::lease`]), held for three
    /// intervals and renewed at every tick, so another replica takes over
    /// when the holder stops.
    pub fn start_ticks(self: &Arc<Self>, shared: Option<(Arc<dyn MetadataStore>, String)>) {
        for slot in &self.slots {
            let slot = slot.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut lease: Option<(u32, crate::lease::Lease)> = None;
                loop {
                    let loaded = slot.current();
                    let Some(interval) = loaded.info.tick_interval_seconds else {
                        // A later version may ask for ticks.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    };
                    tokio::time::sleep(Duration::from_secs(u64::from(interval))).await;
                    if let Some((store, holder)) = &shared {
                        if lease.as_ref().is_none_or(|(i, _)| *i != interval) {
                            let key = format!("tick/{}", slot.config.name);
                            let duration = Duration::from_secs(3 * u64::from(interval));
                            lease = Some((
                                interval,
                                crate::lease::Lease::new(store.clone(), key, holder.clone(), duration),
                            ));
                        }
                        if let Some((_, lease)) = &lease
                            && !lease.hold().await
                        {
                            continue;
                        }
                    }
                    let Ok(admission) = slot.admit(None) else { continue };
                    let now = crate::event::unix_now();
                    let _ = slot
                        .timed_call(&slot.current(), Hook::Tick, admission, None, move |p, s| {
                            Box::pin(async move { p.call_tick(s, now).await })
                        })
                        .await;
                }
            });
        }
    }
}

/// Where a replacement for the plugin at `path` is written before it loads.
/// The name does not end in `.wasm`, so nothing mistakes it for a plugin.
fn staged_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".incoming-{}", std::process::id()));
    path.with_file_name(name)
}

fn absolute(path: &Path) -> Option<PathBuf> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Some(std::fs::canonicalize(parent).ok()?.join(path.file_name()?))
}
