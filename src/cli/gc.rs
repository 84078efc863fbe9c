//! `cachepush gc`, `cachepush pin add|list|rm` and `cachepush stats`.

use std::process::ExitCode;

use cachepush::format::layout;
use cachepush::gc::{self, GcOptions, GcReport, pins, stats};
use cachepush::storage::{AnyStorage, OpenOptions, Storage, open_target};
use cachepush::target::TargetUrl;
use clap::{Args, Subcommand};

use super::Failure;
use super::output::{count, human_bytes};
use super::push::runtime;
use super::s3args::S3Args;

/// The options gc and stats share.
#[derive(Args, Debug)]
pub struct Policy {
    /// Keep narinfos written or pushed within this many days, with their closures
    /// (0: keep only pins, leases and reads).
    #[arg(long, value_name = "N", default_value_t = 30)]
    keep_days: u64,
    /// Keep paths read through a gateway running with --record-access within this many
    /// days [default: --keep-days].
    #[arg(long, value_name = "N")]
    keep_read_days: Option<u64>,
    /// How old a NAR, listing, log or multipart upload no narinfo names must be before it
    /// goes: 30s, 15m, 6h, 7d.
    #[arg(long, value_name = "DURATION", default_value = "6h", value_parser = parse_duration)]
    grace: i64,
}

impl Policy {
    fn options(&self) -> GcOptions {
        GcOptions {
            keep_days: self.keep_days,
            keep_read_days: self.keep_read_days.unwrap_or(self.keep_days),
            grace_secs: self.grace,
            ..GcOptions::default()
        }
    }
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// The cache: s3://BUCKET[/PREFIX]?endpoint=... or file:///DIR.
    #[arg(value_name = "URL")]
    url: String,
    #[command(flatten)]
    policy: Policy,
    /// Print what would go and the bytes it would free; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Stop after deleting this many objects (a safety stop; run again for the rest).
    #[arg(long, value_name = "N")]
    max_delete: Option<u64>,
    /// Deletions in flight at once.
    #[arg(short, long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    jobs: u16,
    /// Print one JSON object on stdout instead of lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Args,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[arg(value_name = "URL")]
    url: String,
    /// The gc options whose effect `stats` reports.
    #[command(flatten)]
    policy: Policy,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Args,
}

#[derive(Args, Debug)]
pub struct PinArgs {
    #[command(subcommand)]
    command: PinCommand,
}

#[derive(Subcommand, Debug)]
enum PinCommand {
    /// Keep PATHs (store paths already in the cache, or their hash parts) and their
    /// closures under NAME; a new `add` of the same NAME is a new revision.
    Add {
        #[arg(value_name = "URL")]
        url: String,
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<String>,
        /// Revisions of NAME to keep (the oldest go).
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u64).range(1..=1000))]
        keep: u64,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Every pin with its revisions.
    List {
        #[arg(value_name = "URL")]
        url: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Removes pin NAME (its paths go at the next gc unless something else keeps them).
    Rm {
        #[arg(value_name = "URL")]
        url: String,
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        s3: S3Args,
    },
}

/// `30s`, `15m`, `6h`, `7d` in seconds.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let bad =
        || format!("{s:?} is not a duration: write a number and a unit, as 30s, 15m, 6h or 7d");
    let unit = s.chars().last().ok_or_else(bad)?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    let n: i64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
    if n < 0 {
        return Err(bad());
    }
    n.checked_mul(mult).ok_or_else(bad)
}

/// Opens an existing cache (never creates one) and refuses a place with no
/// `nix-cache-info`: gc pointed at the wrong bucket or prefix must delete nothing.
async fn open_cache(url: &str, s3: &S3Args) -> Result<AnyStorage, Failure> {
    let target = TargetUrl::parse_cache(url).map_err(|e| Failure::input(e.to_string()))?;
    let opts = OpenOptions {
        given: s3.settings(),
        read_only: true,
        ..OpenOptions::default()
    };
    let s = open_target(&target, &opts).await?;
    match s.head(layout::CACHE_INFO).await {
        Ok(Some(_)) => Ok(s),
        Ok(None) => Err(Failure::input(format!(
            "{} has no nix-cache-info: it is not a binary cache (check the bucket and prefix)",
            s.describe()
        ))),
        Err(e) => Err(Failure::target(format!("{}: {e}", s.describe()))),
    }
}

fn progress(json: bool) -> impl FnMut(&str) {
    move |text: &str| {
        if !json {
            eprintln!("{} {text}", cachepush::timestamp());
        }
    }
}

pub fn run_gc(a: GcArgs) -> Result<ExitCode, Failure> {
    let rt = runtime()?;
    rt.block_on(async {
        let s = open_cache(&a.url, &a.s3).await?;
        let opts = GcOptions {
            dry_run: a.dry_run,
            max_delete: a.max_delete,
            concurrency: a.jobs as usize,
            ..a.policy.options()
        };
        let report = gc::run(&s, &opts, &mut progress(a.json))
            .await
            .map_err(Failure::from)?;
        show_gc(&s, &report, a.json);
        Ok(if report.failed.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}

fn show_gc(s: &AnyStorage, r: &GcReport, json: bool) {
    for n in &r.notes {
        eprintln!("warning: {n}");
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(r).unwrap_or_else(|_| "{}".into())
        );
        return;
    }
    for k in &r.would_delete {
        println!("would delete {k}");
    }
    for k in &r.failed {
        eprintln!("could not delete {k} (it stays, and so does everything it names)");
    }
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    eprintln!(
        "{}: {verb} {}, {}, {}, {} ({}); kept {} ({} pinned, {} recent, {} read, {} leased, {} unreadable as roots)",
        s.describe(),
        count(r.deleted_narinfos, "narinfo"),
        count(r.deleted_nars, "NAR"),
        count(r.deleted_listings, "listing"),
        count(r.deleted_logs, "log"),
        human_bytes(r.freed_bytes),
        count(r.kept_narinfos, "narinfo"),
        r.roots.pinned,
        r.roots.recent,
        r.roots.read,
        r.roots.leased,
        r.roots.unreadable,
    );
    if r.kept_unreferenced_nars > 0 {
        eprintln!(
            "{} no narinfo names stayed for the grace period or a running push",
            count(r.kept_unreferenced_nars, "NAR")
        );
    }
    if r.aborted_uploads > 0 {
        eprintln!(
            "aborted {}",
            count(r.aborted_uploads, "abandoned multipart upload")
        );
    }
    if let Some(why) = &r.stopped {
        eprintln!("{why}");
    }
}

pub fn run_stats(a: StatsArgs) -> Result<ExitCode, Failure> {
    let rt = runtime()?;
    rt.block_on(async {
        let s = open_cache(&a.url, &a.s3).await?;
        let st = stats::stats(&s, &a.policy.options(), &mut progress(a.json))
            .await
            .map_err(Failure::from)?;
        if a.json {
            println!(
                "{}",
                serde_json::to_string(&st).unwrap_or_else(|_| "{}".into())
            );
            return Ok(ExitCode::SUCCESS);
        }
        let line = |label: &str, x: &stats::Amount| {
            println!(
                "  {label:<12} {:>8} paths  {:>10} stored  {:>10} NAR",
                x.paths,
                human_bytes(x.file_bytes),
                human_bytes(x.nar_bytes)
            );
        };
        println!("{}", s.describe());
        line("total", &st.total);
        println!("by age (last written or pushed):");
        for (k, v) in &st.by_age {
            line(k, v);
        }
        println!("by pin (whole closures):");
        for (k, v) in &st.by_pin {
            line(k, v);
        }
        println!("by compression:");
        for (k, v) in &st.by_compression {
            line(k, v);
        }
        println!(
            "unreferenced NARs: {} ({}); unreadable narinfos: {}; open multipart uploads: {}",
            st.orphaned_nars,
            human_bytes(st.orphaned_nar_bytes),
            st.unreadable_narinfos,
            st.open_uploads
                .map_or("not listed by this server".into(), |n| n.to_string())
        );
        println!(
            "gc with these options would delete {}, {} and free {}",
            count(st.gc.deleted_narinfos, "narinfo"),
            count(st.gc.deleted_nars, "NAR"),
            human_bytes(st.gc.freed_bytes)
        );
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_pin(a: PinArgs) -> Result<ExitCode, Failure> {
    let rt = runtime()?;
    rt.block_on(async {
        match a.command {
            PinCommand::Add {
                url,
                name,
                paths,
                keep,
                s3,
            } => {
                pins::check_name(&name).map_err(Failure::from)?;
                // `./result` and other links to store paths, as `copy` takes them; a store
                // path this machine does not have is still named by its text.
                let paths: Vec<String> = paths
                    .iter()
                    .map(|p| {
                        std::fs::canonicalize(p)
                            .map_or_else(|_| p.clone(), |real| real.display().to_string())
                    })
                    .collect();
                let s = open_cache(&url, &s3).await?;
                let pin = pins::add(&s, &name, &paths, keep as usize)
                    .await
                    .map_err(Failure::from)?;
                eprintln!(
                    "pinned {} as {name} in {} ({} kept)",
                    count(paths.len() as u64, "path"),
                    s.describe(),
                    count(pin.revisions.len() as u64, "revision")
                );
            }
            PinCommand::List { url, json, s3 } => {
                let s = open_cache(&url, &s3).await?;
                let (pins, notes) = pins::list(&s).await.map_err(Failure::from)?;
                for n in notes {
                    eprintln!("warning: {n}");
                }
                if json {
                    println!(
                        "{}",
                        serde_json::to_string(&pins).unwrap_or_else(|_| "[]".into())
                    );
                } else {
                    for p in &pins {
                        for r in &p.revisions {
                            println!(
                                "{}\t{}\t{}",
                                p.name,
                                cachepush::timestamp_of(r.added),
                                r.paths.join(" ")
                            );
                        }
                    }
                }
            }
            PinCommand::Rm { url, name, s3 } => {
                pins::check_name(&name).map_err(Failure::from)?;
                let s = open_cache(&url, &s3).await?;
                pins::remove(&s, &name).await.map_err(Failure::from)?;
                eprintln!("removed pin {name} from {}", s.describe());
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::parse_duration("30s"), Ok(30));
        assert_eq!(super::parse_duration("0s"), Ok(0));
        assert_eq!(super::parse_duration("6h"), Ok(21_600));
        assert_eq!(super::parse_duration("7d"), Ok(604_800));
        assert_eq!(super::parse_duration("15m"), Ok(900));
        for bad in ["", "6", "h", "-1h", "1.5h", "6x", "99999999999999999d"] {
            assert!(super::parse_duration(bad).is_err(), "{bad}");
        }
    }
}
