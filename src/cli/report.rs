//! What a push shows: the plan line, progress, the per-path lines, the summary and the
//! `--json` object. The push itself tells [`Shown`] what happens (it is the session's
//! [`Observer`]).

use cachepush::format::StoreDir;
use cachepush::push::{Event, Observer, Outcome as Ended, Plan, PlanCounts, Report, Session};
use cachepush::storage::{AnyStorage, RequestStats};

use super::output::{Output, count, human_bytes};
use super::push::Outcome;

/// The terminal side of one push.
pub struct Shown<'a> {
    out: &'a mut Output,
    session: &'a Session<AnyStorage>,
    target: String,
    dir: StoreDir,
    dry_run: bool,
}

impl<'a> Shown<'a> {
    pub fn new(
        out: &'a mut Output,
        session: &'a Session<AnyStorage>,
        target: String,
        dry_run: bool,
    ) -> Self {
        let dir = session.store().store_dir().clone();
        Shown {
            out,
            session,
            target,
            dir,
            dry_run,
        }
    }

    /// Something the storage could not do and did without.
    pub fn note(&self, text: &str) {
        self.out.warn(text);
    }

    /// Prints how the push ended (and the `--json` object when `json`); the exit status's
    /// outcome.
    pub fn summary(
        self,
        ended: &Ended,
        requests: RequestStats,
        left_open: usize,
        json: bool,
    ) -> Outcome {
        let out = self.out;
        match ended {
            Ended::Planned { counts } => {
                if json {
                    let report = Report {
                        skipped: counts.present + counts.upstream + counts.signed_elsewhere,
                        ..Report::default()
                    };
                    print_json(&report, *counts, requests, true);
                }
                Outcome::Done {
                    pushed: 0,
                    failed: 0,
                }
            }
            Ended::Interrupted { aborted } => {
                out.error(&format!(
                    "interrupted ({aborted} unfinished uploads aborted); nothing half-published is visible, re-run the same command to finish the push"
                ));
                warn_left_open(out, left_open);
                Outcome::Interrupted
            }
            Ended::Done { counts, report } => {
                warn_left_open(out, left_open);
                let failed = report.failed.len();
                out.info(&format!(
                    "pushed {} ({} NAR, {} sent), skipped {}, failed {} in {:.1}s",
                    count(report.pushed as u64, "path"),
                    human_bytes(report.nar_bytes),
                    human_bytes(report.sent_bytes),
                    report.skipped,
                    failed,
                    report.seconds
                ));
                for (drv, e) in &report.log_failures {
                    out.warn(&format!(
                        "the build log of {} was not uploaded: {e}",
                        self.dir.display(drv)
                    ));
                }
                if json {
                    print_json(report, *counts, requests, false);
                }
                if failed > 0 {
                    eprintln!(
                        "error: {failed} of {} {} not published:",
                        count(counts.to_send as u64, "path"),
                        if failed == 1 { "was" } else { "were" }
                    );
                    for (p, e) in &report.failed {
                        eprintln!("  {}: {e}", self.dir.display(p));
                    }
                }
                Outcome::Done {
                    pushed: report.pushed,
                    failed,
                }
            }
        }
    }
}

impl Observer for Shown<'_> {
    fn planned(&mut self, plan: &Plan) {
        let (out, dir) = (&*self.out, &self.dir);
        let plan_opts = &self.session.plan_opts;
        for p in &plan.repaired {
            out.warn(&format!(
                "{}: its narinfo is in the cache but its NAR is not; pushing it again",
                dir.display(p)
            ));
        }
        if let Some(e) = &plan.listing_error {
            out.info(&format!(
                "listing the cache stopped ({e}); asked for each remaining path instead"
            ));
        }
        for e in &plan.upstream_errors {
            out.warn(&match e {
                cachepush::upstream::UpstreamError::Down { .. } => format!("upstream {e}"),
                _ => format!("upstream lookup failed, pushing the path anyway: {e}"),
            });
        }
        let mut line = format!(
            "{} in the closure, {} already in {}",
            count(plan.closure as u64, "path"),
            plan.present.len(),
            self.target
        );
        if !plan_opts.upstreams.is_empty() {
            line.push_str(&format!(", {} available upstream", plan.upstream.len()));
        }
        if !plan_opts.skip_signed_by.is_empty() {
            line.push_str(&format!(
                ", {} signed by {}",
                plan.signed_elsewhere.len(),
                plan_opts.skip_signed_by.join(", ")
            ));
        }
        line.push_str(&format!(
            "; {} to push ({} of NAR, compression {})",
            plan.to_send.len(),
            human_bytes(plan.nar_bytes_to_send()),
            self.session.push_opts.compression,
        ));
        out.info(&line);
        if self.dry_run {
            out.group(&format!(
                "{} would be pushed",
                count(plan.to_send.len() as u64, "path")
            ));
            for p in &plan.to_send {
                out.info(&format!(
                    "would push {} ({})",
                    dir.display(&p.path),
                    human_bytes(p.nar_size)
                ));
            }
            out.end_group();
        }
    }

    fn uploading(&mut self, paths: usize, nar_bytes: u64) {
        self.out
            .group(&format!("pushing {}", count(paths as u64, "path")));
        self.out.start_progress(paths as u64, nar_bytes);
    }

    fn event(&self, e: Event<'_>) {
        let (out, dir) = (&*self.out, &self.dir);
        match e {
            Event::NarStarted { path, nar_size } => {
                out.upload_started(path.hash_part(), path.name(), nar_size)
            }
            Event::NarDone { path, nar_size, .. } => {
                out.upload_finished(path.hash_part());
                out.path_done(nar_size)
            }
            Event::Published { path } => {
                out.path_published();
                out.detail(&format!("pushed {}", dir.display(path)));
            }
            Event::Failed { path, error } => {
                out.upload_finished(path.hash_part());
                out.error(&format!("{}: {error}", dir.display(path)))
            }
        }
    }

    fn notice(&mut self, text: &str) {
        self.out.warn(text);
    }

    fn info(&mut self, text: &str) {
        self.out.info(text);
    }

    fn waiting_for_gc(&mut self, m: &cachepush::gc::records::GcMarker) {
        self.out.info(&format!(
            "waiting for a gc (pid {} on {:?}, started {}) to see this push before going on",
            m.pid,
            m.host,
            cachepush::timestamp_of(m.started)
        ));
    }

    fn uploaded(&mut self) {
        self.out.finish_progress();
        self.out.end_group();
    }
}

fn print_json(r: &Report, plan: PlanCounts, requests: RequestStats, dry_run: bool) {
    let failed: Vec<serde_json::Value> = r
        .failed
        .iter()
        .map(|(p, e)| serde_json::json!({"path": p.to_string(), "error": e.to_string()}))
        .collect();
    let v = serde_json::json!({
        "dry_run": dry_run,
        "closure": plan.closure,
        "present": plan.present,
        "upstream": plan.upstream,
        "signed_elsewhere": plan.signed_elsewhere,
        "to_push": plan.to_send,
        "pushed": r.pushed,
        "skipped": r.skipped,
        "failed": r.failed.len(),
        "failures": failed,
        "logs": r.logs,
        "nar_bytes": r.nar_bytes,
        "sent_bytes": r.sent_bytes,
        "seconds": r.seconds,
        "requests": requests,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{v}");
}

/// The most memory this process has held (VmHWM), to show it does not grow with NAR size.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Uploads whose abort failed are billed until something removes them: say so, and how.
fn warn_left_open(out: &Output, n: usize) {
    if n > 0 {
        out.warn(&format!(
            "{} could not be aborted and stay open (invisible to Nix, but stored and billed); `cachepush verify --abort-open-uploads` or a lifecycle rule removes them",
            count(n as u64, "multipart upload")
        ));
    }
}
