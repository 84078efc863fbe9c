//! `cachepush copy --to URL PATHS...` and `cachepush push [URL] PATHS...`: their flags,
//! the flag > environment > file merge, and the [`Pusher`] (a connected
//! [`Session`] plus the terminal output) that the watch commands share with them. The push
//! itself runs in the library ([`cachepush::push::session`]).

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use cachepush::compression::Compression;
use cachepush::format::{SecretKey, StorePath};
use cachepush::push::{self, PlanOptions, PushOptions, Session};
use cachepush::storage::{AnyStorage, OpenOptions, Storage};
use cachepush::store::{LocalStore, StoreError};
use cachepush::target::TargetUrl;
use cachepush::upstream::Upstream;
use clap::Args;

use super::config::{self, FileSettings};
use super::failure::Failure;
use super::keys::read_secret_key;
use super::output::{Level, Output};
use super::report::Shown;
use super::s3args::S3Args;
use super::signal::{stop_signal, until_stopped};

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The binary cache to publish to: s3://BUCKET[/PREFIX]?endpoint=URL&region=R,
    /// file:///DIR, or https://GATEWAY (a cachepush gateway that takes pushes, with a
    /// token and no S3 credentials or key) [default: `to` in cachepush.toml].
    #[arg(long = "to", value_name = "URL", env = "CACHEPUSH_TO")]
    to: Option<String>,
    /// Store paths, or symlinks to them (./result, a profile, a gc-root).
    #[arg(value_name = "PATH")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    select: Selection,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// The cache URL (optional when CACHEPUSH_TO or cachepush.toml names one), then store
    /// paths or symlinks to them.
    #[arg(value_name = "[URL] PATH")]
    args: Vec<String>,
    #[command(flatten)]
    select: Selection,
    #[command(flatten)]
    settings: Settings,
}

/// What to publish and how to report it, for one-shot pushes.
#[derive(Args, Debug)]
pub struct Selection {
    /// Read more paths from standard input, one per line.
    #[arg(long)]
    stdin: bool,
    /// Publish only the given paths, not everything they refer to.
    #[arg(long)]
    no_closure: bool,
    /// Print the plan and stop; nothing is written.
    #[arg(long)]
    dry_run: bool,
    /// Also check that every narinfo already in the cache has its NAR, and push again the
    /// paths whose NAR is missing.
    #[arg(long)]
    repair: bool,
    /// Ask for each narinfo with a HEAD only, never list the bucket (for stores whose
    /// listings lag behind their writes). By default large closures also list the top
    /// level, which answers up to 1,000 paths per request.
    #[arg(long, env = "CACHEPUSH_NO_LIST",
          value_parser = clap::builder::BoolishValueParser::new())]
    no_list: bool,
    /// Print one JSON summary object on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Once everything is published, pin the given paths under NAME so that gc keeps
    /// them with their closures (docs/gc.md).
    #[arg(long, value_name = "NAME", env = "CACHEPUSH_PIN")]
    pin: Option<String>,
    /// Revisions of the --pin to keep.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pin_keep: u64,
}

/// How to publish: shared by `copy`, `push` and the watch commands. Every value can also
/// come from cachepush.toml.
#[derive(Args, Debug, Clone, Default)]
pub struct Settings {
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
    /// Ceiling on requests in flight. To S3 the number follows the link (it grows while
    /// the round trip holds and halves when the server throttles) up to this, or up to the
    /// provider's ceiling (256 for most); to a directory it is the number of NARs at once
    /// [default: 16]. Memory for large NARs is bounded apart from this.
    #[arg(short, long, value_name = "N", env = "CACHEPUSH_JOBS",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    jobs: Option<u16>,
    /// Skip paths that this binary cache already serves (e.g. https://cache.nixos.org);
    /// repeatable. Clients must list it as a substituter too.
    #[arg(
        long,
        value_name = "URL",
        env = "CACHEPUSH_UPSTREAM",
        value_delimiter = ' '
    )]
    upstream: Vec<String>,
    /// Skip paths whose local signatures include this key name (e.g. cache.nixos.org-1);
    /// repeatable.
    #[arg(
        long,
        value_name = "KEYNAME",
        env = "CACHEPUSH_SKIP_SIGNED_BY",
        value_delimiter = ' '
    )]
    skip_signed_by: Vec<String>,
    #[command(flatten)]
    s3: S3Args,
    /// Multipart part size in MiB (at least 5); NARs smaller than one part go in one PUT
    /// [default: 16].
    #[arg(long, value_name = "MIB", env = "CACHEPUSH_PART_SIZE",
          value_parser = clap::value_parser!(u32).range(5..=5120))]
    part_size: Option<u32>,
    /// A push killed mid-upload (SIGKILL, OOM, a lost runner) and run again within this
    /// long resumes its multipart uploads from a journal in ~/.cache/cachepush/uploads,
    /// sending only the parts the server does not have; 0 turns the journal off
    /// [default: 24h].
    #[arg(long, value_name = "DURATION", env = "CACHEPUSH_RESUME_WITHIN",
          value_parser = super::gc::parse_duration)]
    resume_within: Option<i64>,
    /// When no credentials are available (a pull request from a fork, where CI secrets are
    /// empty), warn and exit 0 instead of failing.
    #[arg(long, env = "CACHEPUSH_SKIP_IF_NO_CREDENTIALS",
          value_parser = clap::builder::BoolishValueParser::new())]
    skip_if_no_credentials: bool,
    /// Also write `<hash>.ls`, each NAR's file listing (as Nix's `write-nar-listing=true`,
    /// which the URL may say too), made in the same pass over the files.
    #[arg(long, env = "CACHEPUSH_WRITE_NAR_LISTING",
          value_parser = clap::builder::BoolishValueParser::new())]
    write_nar_listing: bool,
    /// Also upload the build log of each pushed path's derivation (`log/<drv>`, as
    /// `nix store copy-log --to` writes it; `nix log` reads it from the cache).
    #[arg(long, env = "CACHEPUSH_LOGS",
          value_parser = clap::builder::BoolishValueParser::new())]
    logs: bool,
    /// `Priority:` in the cache's nix-cache-info (lower is tried first; cache.nixos.org
    /// is 40): set on a new cache, updated with a warning on one that says otherwise.
    #[arg(long, value_name = "N", env = "CACHEPUSH_PRIORITY")]
    priority: Option<u32>,
    /// `WantMassQuery:` in nix-cache-info (true or false), set and updated as --priority.
    #[arg(long, value_name = "BOOL", env = "CACHEPUSH_WANT_MASS_QUERY",
          value_parser = clap::builder::BoolishValueParser::new())]
    want_mass_query: Option<bool>,
    /// Pushing through a gateway (`--to https://GATEWAY`): a file holding the token (a
    /// push-scope `cachepush token`, or a CI identity token). Else CACHEPUSH_TOKEN, else on
    /// GitHub Actions the job's own identity token.
    #[arg(long, value_name = "FILE", env = "CACHEPUSH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The audience of the identity token asked of GitHub Actions: the gateway's
    /// --push-oidc-audience [default: cachepush].
    #[arg(long, value_name = "AUD", env = "CACHEPUSH_AUDIENCE")]
    audience: Option<String>,
    /// More output (each path as it is published).
    #[arg(short, long, conflicts_with = "quiet")]
    verbose: bool,
    /// Only errors.
    #[arg(short, long)]
    quiet: bool,
}

pub fn run_copy(a: CopyArgs) -> Result<ExitCode, Failure> {
    let file = config::load()?;
    let url =
        a.to.clone()
            .or_else(|| file.to.clone())
            .ok_or_else(no_target)?;
    one_shot(&url, a.paths, &a.select, &a.settings, &file)
}

pub fn run_push(a: PushArgs) -> Result<ExitCode, Failure> {
    let file = config::load()?;
    let mut args = a.args.into_iter().peekable();
    // The first argument is the URL when it looks like one; otherwise every argument is a
    // path and the URL comes from CACHEPUSH_TO or cachepush.toml.
    let url = match args.peek() {
        Some(first) if first.contains("://") => args.next(),
        _ => std::env::var("CACHEPUSH_TO")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| file.to.clone()),
    };
    let paths: Vec<String> = args.collect();
    // `push ./result s3://...`: a URL after a path is the arguments swapped, not a path.
    if let Some(late) = paths.iter().find(|p| p.contains("://")) {
        return Err(Failure::input(format!(
            "{late} is a cache URL after a path: the URL must come first (cachepush push URL PATH...)"
        )));
    }
    let url = url.ok_or_else(no_target)?;
    let paths = paths.into_iter().map(PathBuf::from).collect();
    one_shot(&url, paths, &a.select, &a.settings, &file)
}

fn no_target() -> Failure {
    Failure::input("no cache to publish to").hint(
        "give a URL (s3://BUCKET?endpoint=... or file:///DIR), set CACHEPUSH_TO, or put `to = \"...\"` in cachepush.toml",
    )
}

pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::input(format!("cannot start the async runtime: {e}")))
}

fn level(s: &Settings) -> Level {
    if s.quiet {
        Level::Quiet
    } else if s.verbose {
        Level::Verbose
    } else {
        Level::Normal
    }
}

/// What an empty CI secret looks like: the variable is there, with nothing in it.
fn present_but_empty(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| v.is_empty())
}

/// The signing key from --signing-key / CACHEPUSH_SIGNING_KEY_FILE, CACHEPUSH_SIGNING_KEY,
/// the URL's `secret-key` parameter, or cachepush.toml, in that order.
fn signing_key(
    s: &Settings,
    url: &TargetUrl,
    file: &FileSettings,
) -> Result<Option<SecretKey>, Failure> {
    // Each error says where the path came from: a later page's key path that does not
    // exist here is easier to find that way.
    let from = |path: &std::path::Path, source: &str| {
        read_secret_key(path).map(Some).map_err(|mut f| {
            f.message.push_str(&format!(" (from {source})"));
            f
        })
    };
    if let Some(path) = &s.signing_key {
        let source = if std::env::var_os("CACHEPUSH_SIGNING_KEY_FILE")
            .is_some_and(|v| std::path::Path::new(&v) == path)
        {
            "CACHEPUSH_SIGNING_KEY_FILE"
        } else {
            "--signing-key"
        };
        return from(path, source);
    }
    if let Ok(text) = std::env::var("CACHEPUSH_SIGNING_KEY") {
        let text = zeroize::Zeroizing::new(text);
        if text.trim().is_empty() {
            // Set but empty is an unset CI secret (a fork's pull request, a misspelled
            // secret name): publishing unsigned would make every client refuse the paths.
            return Err(
                Failure::input("CACHEPUSH_SIGNING_KEY is set but empty").hint(
                    "set the secret; or unset the variable to push unsigned; or pass --skip-if-no-credentials to skip the push when CI secrets are missing",
                ),
            );
        }
        return SecretKey::parse(&text)
            .map(Some)
            .map_err(|e| Failure::input(format!("CACHEPUSH_SIGNING_KEY: {e}")));
    }
    if let Some(p) = url.param("secret-key") {
        return from(&PathBuf::from(p), "the cache URL's secret-key=");
    }
    match &file.signing_key_file {
        Some(p) => from(p, "signing-key-file in cachepush.toml"),
        None => Ok(None),
    }
}

fn compression(s: &Settings, url: &TargetUrl, file: &FileSettings) -> Result<Compression, Failure> {
    let name = s
        .compression
        .as_deref()
        .or(url.param("compression"))
        .or(file.compression.as_deref())
        .unwrap_or("zstd");
    let mut c: Compression = name.parse().map_err(Failure::input)?;
    if let Compression::Zstd { level, .. } = c {
        // Big NARs compress on every core; small ones run one per job already.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        c = Compression::Zstd { level, threads };
    }
    match s.compression_level.or(file.compression_level) {
        Some(l) => c.with_level(l).map_err(Failure::input),
        None => Ok(c),
    }
}

/// Resolves path arguments (store paths, ./result, profiles) and `--stdin` lines.
pub fn resolve_roots(
    store: &LocalStore,
    mut args: Vec<PathBuf>,
    stdin: bool,
) -> Result<Vec<StorePath>, Failure> {
    if stdin {
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

fn one_shot(
    url: &str,
    paths: Vec<PathBuf>,
    select: &Selection,
    settings: &Settings,
    file: &FileSettings,
) -> Result<ExitCode, Failure> {
    if let Some(name) = &select.pin {
        cachepush::gc::pins::check_name(name).map_err(|e| Failure::input(format!("--pin: {e}")))?;
    }
    let rt = runtime()?;
    let store = LocalStore::from_env().map_err(store_failure)?;
    let roots = resolve_roots(&store, paths, select.stdin)?;
    rt.block_on(async {
        let Some(mut pusher) = Pusher::connect(url, settings, file).await? else {
            return Ok(ExitCode::SUCCESS);
        };
        pusher.session.plan_opts.repair = select.repair;
        pusher.session.plan_opts.list = !select.no_list;
        let pin = select.pin.clone().map(|n| (n, select.pin_keep as usize));
        let outcome = pusher
            .push(roots, !select.no_closure, select.dry_run, select.json, pin)
            .await?;
        Ok(super::failure::exit_code(outcome))
    })
}

/// A connected target with everything needed to publish to it, reused across batches.
pub struct Pusher {
    pub store: LocalStore,
    session: Session<AnyStorage>,
    pub out: Output,
    stop: tokio::sync::watch::Receiver<bool>,
    /// Storage notes already shown: a watcher says each once, not every round.
    noted: std::collections::HashSet<String>,
}

/// How a push ended, as far as the exit status goes (the watch commands' batches too).
pub use cachepush::watch::Batch as Outcome;

impl Pusher {
    /// Connects to `url` with `settings` over `file`. `Ok(None)`: there are no credentials
    /// and `--skip-if-no-credentials` asked for a clean skip (already reported).
    pub async fn connect(
        url: &str,
        settings: &Settings,
        file: &FileSettings,
    ) -> Result<Option<Pusher>, Failure> {
        let out = Output::new(level(settings));
        let target = TargetUrl::parse(url).map_err(|e| Failure::input(e.to_string()))?;
        let skip = |out: &Output, why: &str| {
            out.warn(&format!(
                "{why}; skipping the push (--skip-if-no-credentials / CACHEPUSH_SKIP_IF_NO_CREDENTIALS)"
            ));
            Ok(None)
        };
        if settings.skip_if_no_credentials && present_but_empty("CACHEPUSH_SIGNING_KEY") {
            return skip(&out, "CACHEPUSH_SIGNING_KEY is empty");
        }
        let gateway = cachepush::storage::gateway::GatewayOptions {
            token_file: settings.token_file.clone(),
            audience: settings.audience.clone(),
        };
        // Through a gateway the gateway signs: the pusher holds no key (and none is read).
        let key = if target.is_gateway() {
            if settings.logs || settings.write_nar_listing || file.logs.unwrap_or(false) {
                return Err(Failure::input(
                    "--logs and --write-nar-listing are not available through a gateway",
                ));
            }
            if settings.skip_if_no_credentials
                && cachepush::storage::gateway::TokenSource::find(&gateway).is_err()
            {
                return skip(&out, "no push token is available");
            }
            None
        } else {
            signing_key(settings, &target, file)?
        };
        // No `::add-mask::` for the key: a value from the runner's secrets is masked
        // already, and re-printing a secret anywhere is how it leaks (stdout captured into
        // a file or `$GITHUB_OUTPUT` is never seen by the runner).
        let compression = compression(settings, &target, file)?;
        let upstream_urls = if settings.upstream.is_empty() {
            file.upstream.clone().unwrap_or_default()
        } else {
            settings.upstream.clone()
        };
        // CACHEPUSH_UPSTREAM may list several, separated by spaces or commas.
        let upstreams = upstream_urls
            .iter()
            .flat_map(|u| u.split([',', ' ']))
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| Upstream::new(u).map_err(|e| Failure::input(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let skip_signed_by = if settings.skip_signed_by.is_empty() {
            file.skip_signed_by.clone().unwrap_or_default()
        } else {
            settings.skip_signed_by.clone()
        };
        let jobs = settings.jobs.or(file.jobs).map(|j| usize::from(j.max(1)));
        let store = LocalStore::from_env().map_err(store_failure)?;
        // Flags and variables, then the URL's own parameters, then the files.
        let mut given = settings.s3.settings();
        given.part_size = settings
            .part_size
            .or(file.part_size)
            .map(|mib| mib as usize * (1 << 20));
        // Small requests follow the link (an adaptive limit); --jobs is its ceiling.
        given.paced = true;
        given.max_concurrency = jobs;
        given.resume_within = Some(std::time::Duration::from_secs(
            settings.resume_within.unwrap_or(24 * 3600).max(0) as u64,
        ));
        let opts = OpenOptions {
            given,
            fallback: file.s3_settings(),
            read_only: false,
            gateway,
        };
        let storage = cachepush::storage::open_target(&target, &opts).await?;
        // NAR uploads in flight: up to the ceiling of the adaptive limit, which then decides
        // how many requests are really out (a directory: --jobs, 16 by default).
        let heads = (jobs.unwrap_or(16) * 4).clamp(16, 256);
        // Through a gateway each path is three small requests that wait on the gateway's
        // checks: more in flight than to a directory.
        let jobs = if target.is_gateway() {
            jobs.unwrap_or(64)
        } else {
            storage.concurrency_ceiling().or(jobs).unwrap_or(16)
        };
        if settings.skip_if_no_credentials && !storage.has_credentials().await {
            return skip(&out, "no S3 credentials are available");
        }
        if key.is_none() && !target.is_gateway() {
            out.warn("no signing key given (--signing-key, CACHEPUSH_SIGNING_KEY_FILE, CACHEPUSH_SIGNING_KEY, or signing-key-file in cachepush.toml): narinfos will carry only the signatures the store already has, and Nix refuses unsigned paths unless require-sigs = false");
        }
        let session = Session::new(
            store.clone(),
            Arc::new(storage),
            PushOptions {
                compression,
                jobs,
                signing_key: key.map(Arc::new),
                logs: settings.logs || file.logs.unwrap_or(false),
                priority: match settings.priority.or(file.priority) {
                    Some(p) => Some(p),
                    None => target
                        .param("priority")
                        .map(|p| {
                            p.parse::<u32>().map_err(|_| {
                                Failure::input(format!(
                                    "the cache URL's priority={p} is not a whole number"
                                ))
                            })
                        })
                        .transpose()?,
                },
                want_mass_query: match settings.want_mass_query.or(file.want_mass_query) {
                    Some(w) => Some(w),
                    None => target
                        .param("want-mass-query")
                        .map(|v| match v {
                            "true" | "1" => Ok(true),
                            "false" | "0" => Ok(false),
                            _ => Err(Failure::input(format!(
                                "the cache URL's want-mass-query={v} is not true or false"
                            ))),
                        })
                        .transpose()?,
                },
                write_nar_listing: settings.write_nar_listing
                    || file.write_nar_listing.unwrap_or(false)
                    || target
                        .param("write-nar-listing")
                        .is_some_and(|v| v == "true" || v == "1"),
            },
            PlanOptions {
                // HEADs are small: more of them in flight hides the round-trip time (an
                // S3 target's adaptive limit decides how many are really out). Claimed
                // HEADs are sent even once the listing has answered for their keys, so
                // not many more are claimed than the limit lets out.
                concurrency: heads,
                skip_signed_by,
                upstreams,
                ..PlanOptions::default()
            },
        );
        Ok(Some(Pusher {
            store,
            session,
            out,
            stop: stop_signal(),
            noted: Default::default(),
        }))
    }

    /// Publishes `roots` (and their closure when `closure`), showing progress and the
    /// summary (and printing the `--json` object when `json`).
    pub async fn push(
        &mut self,
        roots: Vec<StorePath>,
        closure: bool,
        dry_run: bool,
        json: bool,
        pin: Option<(String, usize)>,
    ) -> Result<Outcome, Failure> {
        let req = push::Request {
            roots,
            closure,
            dry_run,
            pin,
        };
        let mut stop = self.stop.clone();
        let storage = self.session.storage().clone();
        let mut shown = Shown::new(&mut self.out, &self.session, storage.describe(), dry_run);
        let outcome = self
            .session
            .run(req, &mut shown, until_stopped(&mut stop))
            .await?;
        for note in storage.notes() {
            if self.noted.insert(note.clone()) {
                shown.note(&note);
            }
        }
        Ok(shown.summary(&outcome, storage.stats(), storage.left_open(), json))
    }
}

impl cachepush::watch::BatchPusher for Pusher {
    type Error = Failure;

    fn store(&self) -> &LocalStore {
        &self.store
    }

    async fn push_batch(&mut self, roots: Vec<StorePath>) -> Result<Outcome, Failure> {
        self.push(roots, true, false, false, None).await
    }

    fn warn(&self, message: &str) {
        self.out.warn(message)
    }
}
