//! `cachepush copy --to URL PATHS...` and `cachepush push URL PATHS...`.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use cachepush::compression::Compression;
use cachepush::format::{CacheInfo, SecretKey, StorePath};
use cachepush::push::{self, Event, PushOptions, Report};
use cachepush::storage::{LocalDir, Storage, content_type};
use cachepush::store::{LocalStore, StoreError};
use cachepush::target::TargetUrl;
use clap::Args;

use super::Failure;
use super::keys::read_secret_key;
use super::output::{Level, Output, human_bytes};

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The binary cache to publish to: file:///DIR.
    #[arg(long = "to", value_name = "URL", env = "CACHEPUSH_TO")]
    to: String,
    #[command(flatten)]
    opts: PushOpts,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// The binary cache to publish to: file:///DIR.
    #[arg(value_name = "URL")]
    url: String,
    #[command(flatten)]
    opts: PushOpts,
}

#[derive(Args, Debug)]
pub struct PushOpts {
    /// Store paths, or symlinks to them (./result, a profile, a gc-root).
    #[arg(value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Read more paths from standard input, one per line.
    #[arg(long)]
    stdin: bool,
    /// Publish only the given paths, not everything they refer to.
    #[arg(long)]
    no_closure: bool,
    /// Secret key file to sign narinfos with. The key text itself may instead be given in
    /// the environment variable CACHEPUSH_SIGNING_KEY (for CI secrets).
    #[arg(long, value_name = "FILE", env = "CACHEPUSH_SIGNING_KEY_FILE")]
    signing_key: Option<PathBuf>,
    /// NAR compression: zstd, xz or none [default: zstd].
    #[arg(long, value_name = "ALGO", env = "CACHEPUSH_COMPRESSION")]
    compression: Option<String>,
    /// Compression level (zstd 1-19, default 3; xz 0-9, default 6).
    #[arg(long, value_name = "N", env = "CACHEPUSH_COMPRESSION_LEVEL")]
    compression_level: Option<i32>,
    /// Uploads in flight at once.
    #[arg(short, long, value_name = "N", env = "CACHEPUSH_JOBS", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    jobs: u16,
    /// Print the plan and stop; nothing is written.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON summary object on stdout at the end.
    #[arg(long)]
    json: bool,
    /// More output (each path as it is published).
    #[arg(short, long, conflicts_with = "quiet")]
    verbose: bool,
    /// Only errors.
    #[arg(short, long)]
    quiet: bool,
}

pub fn run_copy(a: CopyArgs) -> Result<ExitCode, Failure> {
    run(&a.to, a.opts)
}

pub fn run_push(a: PushArgs) -> Result<ExitCode, Failure> {
    run(&a.url, a.opts)
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::input(format!("cannot start the async runtime: {e}")))
}

/// The signing key from --signing-key / CACHEPUSH_SIGNING_KEY_FILE, CACHEPUSH_SIGNING_KEY,
/// or the URL's `secret-key` parameter, in that order.
fn signing_key(opts: &PushOpts, url: &TargetUrl) -> Result<Option<SecretKey>, Failure> {
    if let Some(path) = &opts.signing_key {
        return read_secret_key(path).map(Some);
    }
    if let Ok(text) = std::env::var("CACHEPUSH_SIGNING_KEY") {
        let text = zeroize::Zeroizing::new(text);
        if !text.trim().is_empty() {
            return SecretKey::parse(&text)
                .map(Some)
                .map_err(|e| Failure::input(format!("CACHEPUSH_SIGNING_KEY: {e}")));
        }
    }
    match url.param("secret-key") {
        Some(p) => read_secret_key(&PathBuf::from(p)).map(Some),
        None => Ok(None),
    }
}

fn compression(opts: &PushOpts, url: &TargetUrl) -> Result<Compression, Failure> {
    let name = opts
        .compression
        .as_deref()
        .or(url.param("compression"))
        .unwrap_or("zstd");
    let mut c: Compression = name.parse().map_err(Failure::input)?;
    if let Compression::Zstd { level, .. } = c {
        // Big NARs compress on every core; small ones run one per job already.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        c = Compression::Zstd { level, threads };
    }
    match opts.compression_level {
        Some(l) => c.with_level(l).map_err(Failure::input),
        None => Ok(c),
    }
}

fn roots(opts: &PushOpts, store: &LocalStore) -> Result<Vec<StorePath>, Failure> {
    let mut args = opts.paths.clone();
    if opts.stdin {
        for line in std::io::stdin().lock().lines() {
            let line = line.map_err(|e| Failure::input(format!("reading standard input: {e}")))?;
            let line = line.trim();
            if !line.is_empty() {
                args.push(PathBuf::from(line));
            }
        }
    }
    if args.is_empty() {
        return Err(Failure::input("no store paths given")
            .hint("pass store paths or ./result, or --stdin to read them from standard input"));
    }
    let mut out = Vec::with_capacity(args.len());
    for a in &args {
        out.push(store.resolve(a).map_err(store_failure)?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn store_failure(e: StoreError) -> Failure {
    Failure::input(e.to_string())
}

fn run(url: &str, opts: PushOpts) -> Result<ExitCode, Failure> {
    let level = if opts.quiet {
        Level::Quiet
    } else if opts.verbose {
        Level::Verbose
    } else {
        Level::Normal
    };
    let target = TargetUrl::parse(url).map_err(|e| Failure::input(e.to_string()))?;
    let key = signing_key(&opts, &target)?;
    let compression = compression(&opts, &target)?;
    let store = LocalStore::from_env().map_err(store_failure)?;
    let roots = roots(&opts, &store)?;
    let mut out = Output::new(level);
    if key.is_none() {
        out.warn("no signing key given (--signing-key or CACHEPUSH_SIGNING_KEY): narinfos will carry only the signatures the store already has, and Nix refuses unsigned paths unless require-sigs = false");
    }
    let push_opts = PushOptions {
        compression,
        jobs: opts.jobs as usize,
        signing_key: key.map(Arc::new),
    };
    let rt = runtime()?;
    match target {
        TargetUrl::File { dir, .. } => {
            let storage = LocalDir::open(&dir)
                .map_err(|e| Failure::target(format!("cannot open the cache directory: {e}")))?;
            rt.block_on(run_with(
                store,
                Arc::new(storage),
                roots,
                &opts,
                &push_opts,
                &mut out,
            ))
        }
    }
}

/// Creates `nix-cache-info` when missing; refuses a cache made for another store directory.
async fn ensure_cache_info<S: Storage>(storage: &S, store: &LocalStore) -> Result<(), Failure> {
    let ours = CacheInfo {
        store_dir: store.store_dir().to_string(),
        ..CacheInfo::default()
    };
    let target_failure = |e: cachepush::storage::StorageError| {
        Failure::target(format!("cannot write to {}: {e}", storage.describe()))
    };
    let created = storage
        .put_if_absent(
            "nix-cache-info",
            content_type::CACHE_INFO,
            Bytes::from(ours.to_string()),
        )
        .await
        .map_err(target_failure)?;
    if created {
        return Ok(());
    }
    let text = storage
        .get("nix-cache-info")
        .await
        .map_err(target_failure)?
        .unwrap_or_default();
    let theirs = CacheInfo::parse(&String::from_utf8_lossy(&text)).map_err(|e| {
        Failure::target(format!(
            "{}: existing nix-cache-info is unreadable: {e}",
            storage.describe()
        ))
    })?;
    if theirs.store_dir != ours.store_dir {
        return Err(Failure::input(format!(
            "{} is a cache for store {}, but the local store is {}",
            storage.describe(),
            theirs.store_dir,
            ours.store_dir
        )));
    }
    Ok(())
}

async fn run_with<S: Storage>(
    store: LocalStore,
    storage: Arc<S>,
    roots: Vec<StorePath>,
    opts: &PushOpts,
    push_opts: &PushOptions,
    out: &mut Output,
) -> Result<ExitCode, Failure> {
    let closure = store
        .query(&roots, !opts.no_closure)
        .await
        .map_err(store_failure)?;
    if !opts.dry_run {
        ensure_cache_info(&*storage, &store).await?;
    }
    let plan = push::plan(&*storage, closure, push_opts.jobs * 4)
        .await
        .map_err(|e| {
            Failure::target(format!("cannot check what {} has: {e}", storage.describe()))
        })?;
    out.info(&format!(
        "{} paths in the closure, {} already in {}, {} to push ({} of NAR, compression {})",
        plan.closure,
        plan.present.len(),
        storage.describe(),
        plan.to_send.len(),
        human_bytes(plan.nar_bytes_to_send()),
        push_opts.compression,
    ));
    if opts.dry_run {
        for p in &plan.to_send {
            out.info(&format!(
                "would push {}",
                store.store_dir().display(&p.path)
            ));
        }
        if opts.json {
            print_json(
                &Report {
                    skipped: plan.present.len(),
                    ..Report::default()
                },
                plan.to_send.len(),
                true,
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let to_send = plan.to_send.len();
    out.start_progress(to_send as u64, plan.nar_bytes_to_send());
    let dir = store.store_dir().clone();
    let report = {
        let out_ref = &*out;
        let on_event = |e: Event<'_>| match e {
            Event::NarStarted { .. } => {}
            Event::NarDone { nar_size, .. } => out_ref.path_done(nar_size),
            Event::Published { path } => {
                out_ref.path_published();
                out_ref.verbose(&format!("pushed {}", dir.display(path)));
            }
            Event::Failed { path, error } => {
                out_ref.error(&format!("{}: {error}", dir.display(path)))
            }
        };
        let exec = push::execute(&store, storage.clone(), plan, push_opts, &on_event);
        tokio::select! {
            r = exec => r,
            _ = tokio::signal::ctrl_c() => {
                // Dropping the pipeline aborts every upload; narinfos are only ever written
                // whole and after their NARs, so what is visible stays consistent.
                out.finish_progress();
                out.error("interrupted; re-run the same command to finish the push");
                return Ok(ExitCode::from(130));
            }
        }
    };
    out.finish_progress();
    let failed = report.failed.len();
    out.info(&format!(
        "pushed {} paths ({} NAR, {} sent), skipped {}, failed {} in {:.1}s",
        report.pushed,
        human_bytes(report.nar_bytes),
        human_bytes(report.sent_bytes),
        report.skipped,
        failed,
        report.seconds
    ));
    if opts.json {
        print_json(&report, 0, false);
    }
    if failed > 0 {
        eprintln!("error: {failed} of {to_send} paths were not published:");
        for (p, e) in &report.failed {
            eprintln!("  {}: {e}", store.store_dir().display(p));
        }
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json(r: &Report, would_push: usize, dry_run: bool) {
    let failed: Vec<serde_json::Value> = r
        .failed
        .iter()
        .map(|(p, e)| serde_json::json!({"path": p.to_string(), "error": e.to_string()}))
        .collect();
    let v = serde_json::json!({
        "dry_run": dry_run,
        "pushed": r.pushed,
        "skipped": r.skipped,
        "failed": r.failed.len(),
        "would_push": would_push,
        "failures": failed,
        "nar_bytes": r.nar_bytes,
        "sent_bytes": r.sent_bytes,
        "seconds": r.seconds,
    });
    println!("{v}");
}
