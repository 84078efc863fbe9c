//! What the user sees while a push runs: progress bars on a terminal, plain timestamped
//! lines elsewhere (CI logs), nothing but errors with `-q`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How chatty to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Quiet,
    Normal,
    Verbose,
}

pub struct Output {
    level: Level,
    /// Running under GitHub Actions: errors become `::error::` annotations and long
    /// listings are folded into `::group::`s. Workflow commands go to stderr (the runner
    /// reads both streams), so stdout carries only what the user asked for (`--json`).
    gha: bool,
    bars: Option<Bars>,
    lock: Mutex<()>,
}

struct Bars {
    multi: MultiProgress,
    paths: ProgressBar,
    bytes: ProgressBar,
    /// One spinner line per NAR upload in flight, by store-path hash.
    uploads: Mutex<HashMap<String, ProgressBar>>,
}

use cachepush::timestamp;

impl Output {
    pub fn new(level: Level) -> Self {
        Output {
            level,
            gha: std::env::var_os("GITHUB_ACTIONS").is_some_and(|v| v == "true"),
            bars: None,
            lock: Mutex::new(()),
        }
    }

    /// Starts progress bars when stderr is a terminal and the user did not ask for quiet.
    pub fn start_progress(&mut self, paths: u64, bytes: u64) {
        if self.level == Level::Quiet || !std::io::stderr().is_terminal() {
            return;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let style = |t: &str| {
            ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar())
        };
        let paths_bar = multi.add(ProgressBar::new(paths));
        paths_bar.set_style(style(
            "{prefix:>6} [{bar:30}] {pos}/{len} paths  {elapsed_precise}",
        ));
        paths_bar.set_prefix("push");
        let bytes_bar = multi.add(ProgressBar::new(bytes));
        bytes_bar.set_style(style(
            "{prefix:>6} [{bar:30}] {bytes}/{total_bytes} NAR  {bytes_per_sec}",
        ));
        bytes_bar.set_prefix("read");
        paths_bar.enable_steady_tick(Duration::from_millis(200));
        self.bars = Some(Bars {
            multi,
            paths: paths_bar,
            bytes: bytes_bar,
            uploads: Mutex::new(HashMap::new()),
        });
    }

    /// A NAR upload began: a line of its own on a terminal, a log line with `-v` elsewhere.
    pub fn upload_started(&self, id: &str, name: &str, nar_bytes: u64) {
        let Some(b) = &self.bars else {
            self.verbose(&format!("uploading {name} ({})", human_bytes(nar_bytes)));
            return;
        };
        let bar = b.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("  {spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(format!("{name} ({})", human_bytes(nar_bytes)));
        bar.enable_steady_tick(Duration::from_millis(200));
        if let Ok(mut m) = b.uploads.lock() {
            m.insert(id.to_owned(), bar);
        }
    }

    pub fn upload_finished(&self, id: &str) {
        if let Some(b) = &self.bars
            && let Ok(mut m) = b.uploads.lock()
            && let Some(bar) = m.remove(id)
        {
            bar.finish_and_clear();
            b.multi.remove(&bar);
        }
    }

    pub fn path_done(&self, nar_bytes: u64) {
        if let Some(b) = &self.bars {
            b.bytes.inc(nar_bytes);
        }
    }

    pub fn path_published(&self) {
        if let Some(b) = &self.bars {
            b.paths.inc(1);
        }
    }

    pub fn finish_progress(&mut self) {
        if let Some(b) = self.bars.take() {
            if let Ok(mut m) = b.uploads.lock() {
                for (_, bar) in m.drain() {
                    bar.finish_and_clear();
                }
            }
            b.paths.finish_and_clear();
            b.bytes.finish_and_clear();
            let _ = b.multi.clear();
        }
    }

    fn line(&self, text: &str) {
        let _guard = self.lock.lock();
        match &self.bars {
            // Printing through the bars keeps log lines from tearing the progress display.
            Some(b) => b.multi.suspend(|| eprintln!("{text}")),
            None if std::io::stderr().is_terminal() => eprintln!("{text}"),
            None => eprintln!("{} {text}", timestamp()),
        }
    }

    pub fn info(&self, text: &str) {
        if self.level >= Level::Normal {
            self.line(text);
        }
    }

    pub fn verbose(&self, text: &str) {
        if self.level >= Level::Verbose {
            self.line(text);
        }
    }

    /// A line per path: shown with -v, and in GitHub Actions (folded in a group there).
    pub fn detail(&self, text: &str) {
        if self.level >= Level::Verbose || (self.gha && self.level >= Level::Normal) {
            self.line(text);
        }
    }

    pub fn warn(&self, text: &str) {
        if self.level >= Level::Normal {
            if self.gha {
                eprintln!("::warning::{}", gha_escape(text));
            }
            self.line(&format!("warning: {text}"));
        }
    }

    pub fn error(&self, text: &str) {
        if self.gha {
            // An annotation on the run's summary page, and the line in the log.
            eprintln!("::error::{}", gha_escape(text));
        }
        self.line(&format!("error: {text}"));
    }

    /// Starts a foldable group in a GitHub Actions log; a no-op elsewhere.
    pub fn group(&self, title: &str) {
        if self.gha && self.level >= Level::Normal {
            eprintln!("::group::{}", gha_escape(title));
        }
    }

    pub fn end_group(&self) {
        if self.gha && self.level >= Level::Normal {
            eprintln!("::endgroup::");
        }
    }
}

/// `1 path`, `2 paths`: a count with its noun in the right number (`noun` is singular;
/// the plural adds an s).
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Bytes for people: `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Workflow commands end at a newline; `%`, CR and LF must be escaped inside them.
pub fn gha_escape(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}
