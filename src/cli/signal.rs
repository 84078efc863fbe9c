//! Signals: the one listener per process that turns SIGINT, SIGTERM, SIGHUP and SIGQUIT
//! into a stop request every long-running command watches (the library is handed the
//! resulting future; it never installs handlers itself).

/// Resolves on Ctrl-C (SIGINT), SIGTERM, SIGHUP (the terminal or ssh session closed) or
/// SIGQUIT, whichever comes first: each would otherwise kill the process on the spot and
/// leave its multipart uploads open (security review L3).
pub async fn interrupted() {
    ctrl_c_or(&["terminate", "hangup", "quit"]).await
}

/// Resolves on Ctrl-C or on the first of the named Unix signals.
async fn ctrl_c_or(names: &[&str]) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let kinds = names.iter().filter_map(|n| match *n {
            "terminate" => Some(SignalKind::terminate()),
            "hangup" => Some(SignalKind::hangup()),
            "quit" => Some(SignalKind::quit()),
            _ => None,
        });
        let mut streams: Vec<_> = kinds.filter_map(|k| signal(k).ok()).collect();
        if streams.is_empty() {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
        let others = futures::future::select_all(streams.iter_mut().map(|s| Box::pin(s.recv())));
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = others => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = names;
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A stop request (SIGINT or SIGTERM) that every part of a long-running command can watch,
/// with one signal listener for the whole process so that no signal is missed between
/// rounds.
pub fn stop_signal() -> tokio::sync::watch::Receiver<bool> {
    static STOP: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>> =
        std::sync::OnceLock::new();
    STOP.get_or_init(|| {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            interrupted().await;
            let _ = tx.send(true);
            // Aborting open uploads can take a while with retries; a second signal means
            // "now": exit at once (what is left open, `verify --abort-open-uploads` or a
            // lifecycle rule cleans up).
            interrupted().await;
            eprintln!("interrupted again: exiting without waiting for the cleanup");
            // (Never returns, so `tx` lives on: a dropped sender would read as "stopped".)
            std::process::exit(130);
        });
        rx
    })
    .clone()
}

/// Resolves once a stop was requested.
pub async fn until_stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    if rx.wait_for(|stopped| *stopped).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves on Ctrl-C (SIGINT), SIGTERM or SIGQUIT: a server's stop signals. SIGHUP is not
/// one of them (for the gateway it means "reload", as for most daemons).
pub async fn terminated() {
    ctrl_c_or(&["terminate", "quit"]).await
}

/// Each SIGHUP, as a stream (none where the signal cannot be listened for).
pub fn hangups() -> Option<cachepush::gateway::Reload> {
    use tokio::signal::unix::{SignalKind, signal};
    let s = signal(SignalKind::hangup()).ok()?;
    Some(Box::pin(futures::stream::unfold(s, |mut s| async move {
        s.recv().await.map(|()| ((), s))
    })))
}
