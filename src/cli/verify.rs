//! `cachepush verify URL [--trusted-key KEY]... [--full] [--json]`.

use std::process::ExitCode;

use cachepush::format::PublicKey;
use cachepush::storage::{OpenOptions, Storage, open_target};
use cachepush::target::TargetUrl;
use cachepush::verify::{VerifyOptions, VerifyReport, verify};
use clap::Args;

use super::Failure;
use super::output::count;
use super::push::runtime;
use super::s3args::S3Args;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The cache to check: s3://BUCKET[/PREFIX]?endpoint=... or file:///DIR.
    #[arg(value_name = "URL")]
    url: String,
    /// A public key (`name:base64`) whose signature every narinfo must carry; repeatable.
    /// Without any, signatures are not checked.
    #[arg(
        long,
        value_name = "KEY",
        env = "CACHEPUSH_TRUSTED_KEYS",
        value_delimiter = ' '
    )]
    trusted_key: Vec<String>,
    /// Also download every NAR and check FileHash, FileSize, NarHash and NarSize.
    #[arg(long)]
    full: bool,
    /// Abort every open multipart upload under the cache first (only when no push runs).
    #[arg(long)]
    abort_open_uploads: bool,
    /// Requests in flight at once.
    #[arg(short, long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    jobs: u16,
    /// Print one JSON object on stdout instead of lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Args,
}

pub fn run(a: VerifyArgs) -> Result<ExitCode, Failure> {
    let target = TargetUrl::parse_cache(&a.url).map_err(|e| Failure::input(e.to_string()))?;
    let trusted = a
        .trusted_key
        .iter()
        .filter(|k| !k.is_empty())
        .map(|k| {
            PublicKey::parse(k).map_err(|e| Failure::input(format!("--trusted-key {k:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let opts = VerifyOptions {
        trusted,
        full: a.full,
        concurrency: a.jobs as usize,
    };
    let rt = runtime()?;
    rt.block_on(async {
        let opts_open = OpenOptions {
            given: a.s3.settings(),
            read_only: true,
            ..OpenOptions::default()
        };
        let s = open_target(&target, &opts_open).await?;
        check(&s, &a, &opts).await
    })
}

async fn check<S: Storage>(
    s: &S,
    a: &VerifyArgs,
    opts: &VerifyOptions,
) -> Result<ExitCode, Failure> {
    if a.abort_open_uploads {
        let n = s
            .abort_all_open_uploads()
            .await
            .map_err(|e| Failure::target(format!("{}: {e}", s.describe())))?;
        eprintln!("aborted {n} open multipart uploads");
    }
    let report: VerifyReport = verify(s, opts)
        .await
        .map_err(|e| Failure::target(format!("cannot read {}: {e}", s.describe())))?;
    for n in &report.not_checked {
        eprintln!("warning: not checked: {n}");
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&report).unwrap_or_else(|_| "{}".into())
        );
    } else {
        for p in &report.problems {
            println!("{}: {}", p.key, p.problem);
        }
        eprintln!(
            "{}: {}{}, {}",
            s.describe(),
            count(report.narinfos as u64, "narinfo"),
            if opts.full {
                format!(
                    ", {} downloaded and checked",
                    count(report.nars_checked as u64, "NAR")
                )
            } else {
                String::new()
            },
            count(report.problems.len() as u64, "problem")
        );
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
