//! How `pier sync` shows a job as it goes: a progress bar per image on a
//! terminal, a line per change otherwise (a CI log, a pipe).

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::job::{ImageJob, Job, State};
use super::jobs::Report;

pub trait Show: Send {
    /// The job as it stands now.
    fn show(&mut self, job: &Job);
}

/// Shows a job worked on in this process (`pier sync --config`).
pub struct Shown<'a>(pub &'a mut dyn Show);

#[async_trait::async_trait]
impl Report for Shown<'_> {
    async fn report(&mut self, job: &Job) -> bool {
        self.0.show(job);
        true
    }
}

/// Bars on a terminal, lines otherwise.
pub fn for_output(terminal: bool) -> Box<dyn Show> {
    if terminal {
        Box::new(Bars::new())
    } else {
        Box::new(Lines::new(std::io::stdout()))
    }
}

/// Like `for_output`, lines on stderr too (stdout carries other output).
pub fn for_stderr(terminal: bool) -> Box<dyn Show> {
    if terminal {
        Box::new(Bars::new())
    } else {
        Box::new(Lines::new(std::io::stderr()))
    }
}

/// Bytes in binary units, one decimal.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn short(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    hex.chars().take(12).collect()
}

/// What an image ended with, in a few words.
fn outcome(image: &ImageJob) -> String {
    let platforms = if image.platforms.is_empty() {
        String::new()
    } else {
        format!(" ({})", image.platforms.join(", "))
    };
    match image.state {
        State::Done => format!(
            "done {} · {} blobs, {}{platforms}",
            image.digest.as_deref().map(short).unwrap_or_default(),
            image.blobs_total,
            human(image.bytes_total)
        ),
        State::Failed => format!(
            "failed: {}",
            image.error.as_deref().unwrap_or("no reason given")
        ),
        State::Retrying => format!(
            "will try again: {}",
            image.error.as_deref().unwrap_or("no reason given")
        ),
        State::Pending => "waiting".into(),
        State::Running if image.blobs_total == 0 => "reading the manifests".into(),
        State::Running => format!("{}/{} blobs", image.blobs_done, image.blobs_total),
    }
}

struct Bars {
    multi: MultiProgress,
    bars: Vec<ProgressBar>,
}

impl Bars {
    fn new() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: Vec::new(),
        }
    }
}

impl Show for Bars {
    fn show(&mut self, job: &Job) {
        let running = ProgressStyle::with_template(
            "{prefix:.bold} {bar:28.cyan/blue} {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let waiting = ProgressStyle::with_template("{prefix:.bold} {spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let ended = ProgressStyle::with_template("{prefix:.bold} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let width = job.images.iter().map(|i| i.image.len()).max().unwrap_or(0);
        while self.bars.len() < job.images.len() {
            let image = &job.images[self.bars.len()];
            let bar = self.multi.add(ProgressBar::new(0));
            bar.set_style(waiting.clone());
            bar.set_prefix(format!("{:width$}", image.image));
            bar.enable_steady_tick(Duration::from_millis(120));
            self.bars.push(bar);
        }
        for (image, bar) in job.images.iter().zip(&self.bars) {
            if bar.is_finished() {
                continue;
            }
            match image.state {
                State::Done | State::Failed => {
                    bar.set_style(ended.clone());
                    bar.finish_with_message(outcome(image));
                }
                State::Running if image.bytes_total > 0 => {
                    bar.set_style(running.clone());
                    bar.set_length(image.bytes_total);
                    bar.set_position(image.bytes_done);
                    bar.set_message(outcome(image));
                }
                _ => bar.set_message(outcome(image)),
            }
        }
    }
}

/// One line per image whenever its state changes, and every few seconds
/// while its bytes move.
struct Lines<W: Write + Send> {
    out: W,
    /// Per image: state and blob count, bytes, and when it was last
    /// printed.
    last: HashMap<usize, ((State, u64), u64, Instant)>,
    every: Duration,
}

impl<W: Write + Send> Lines<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            last: HashMap::new(),
            every: Duration::from_secs(2),
        }
    }
}

impl<W: Write + Send> Show for Lines<W> {
    fn show(&mut self, job: &Job) {
        let now = Instant::now();
        for (i, image) in job.images.iter().enumerate() {
            let phase = (image.state, image.blobs_total);
            let line = match self.last.get(&i) {
                Some((was, _, _)) if *was != phase => true,
                Some((_, bytes, at)) => {
                    image.state == State::Running
                        && *bytes != image.bytes_done
                        && now.duration_since(*at) >= self.every
                }
                None => true,
            };
            if !line {
                continue;
            }
            let speed = match self.last.get(&i) {
                Some(((State::Running, total), bytes, at))
                    if image.state == State::Running && *total > 0 =>
                {
                    let secs = now.duration_since(*at).as_secs_f64();
                    let moved = image.bytes_done.saturating_sub(*bytes);
                    (secs > 0.0).then(|| format!(" {}/s", human((moved as f64 / secs) as u64)))
                }
                _ => None,
            };
            let text = if image.state == State::Running && image.bytes_total > 0 {
                format!(
                    "{} {}/{}{}",
                    outcome(image),
                    human(image.bytes_done),
                    human(image.bytes_total),
                    speed.unwrap_or_default()
                )
            } else {
                outcome(image)
            };
            let _ = writeln!(self.out, "{}: {text}", image.image);
            self.last.insert(i, (phase, image.bytes_done, now));
        }
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lines_say_each_change_once() {
        let mut job = Job {
            id: "0".into(),
            state: State::Running,
            platforms: Vec::new(),
            images: vec![ImageJob::new(
                "nginx".into(),
                "docker.io/library/nginx:latest".into(),
            )],
            created_ms: 0,
            updated_ms: 0,
            list: None,
        };
        let mut out = Vec::new();
        {
            let mut lines = Lines::new(&mut out);
            job.images[0].state = State::Running;
            lines.show(&job);
            lines.show(&job);
            job.images[0].blobs_total = 3;
            job.images[0].bytes_total = 3 << 20;
            lines.show(&job);
            job.images[0].state = State::Done;
            job.images[0].blobs_done = 3;
            job.images[0].bytes_done = 3 << 20;
            job.images[0].digest = Some(format!("sha256:{}", "ab".repeat(32)));
            lines.show(&job);
        }
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "nginx: reading the manifests\nnginx: 0/3 blobs 0 B/3.0 MiB\n\
             nginx: done abababababab · 3 blobs, 3.0 MiB\n"
        );
    }
}
