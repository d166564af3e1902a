//! Progress of a build: a small trait the builder reports to, so the
//! library stays quiet and testable and the CLI decides how to show it.
//!
//! [`Quiet`] ignores everything; [`Bars`] draws an `indicatif` bar on
//! stderr for layers big enough to take a while, and only when stderr is a
//! terminal (never in CI logs or pipes).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What the builder reports. Every method has a no-op default.
pub trait Progress {
    /// `name`'s layer is about to be written: `bytes` of file content.
    fn layer_started(&mut self, _name: &str, _bytes: u64) {}
    /// `bytes` more content were written.
    fn layer_advanced(&mut self, _bytes: u64) {}
    /// The layer is written (or the build failed).
    fn layer_finished(&mut self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Progress for Quiet {}

/// `indicatif` bars on stderr.
#[derive(Debug)]
pub struct Bars {
    enabled: bool,
    /// Layers smaller than this get no bar.
    min_bytes: u64,
    bar: Option<ProgressBar>,
}

impl Bars {
    /// Bars when stderr is a terminal, nothing otherwise.
    pub fn stderr() -> Bars {
        Bars {
            enabled: std::io::stderr().is_terminal(),
            min_bytes: 16 << 20,
            bar: None,
        }
    }
}

impl Progress for Bars {
    fn layer_started(&mut self, name: &str, bytes: u64) {
        if !self.enabled || bytes < self.min_bytes {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(bytes), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("building {name}"));
        bar.enable_steady_tick(Duration::from_millis(200));
        self.bar = Some(bar);
    }

    fn layer_advanced(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn layer_finished(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_stay_quiet_when_disabled() {
        let mut bars = Bars {
            enabled: false,
            min_bytes: 0,
            bar: None,
        };
        bars.layer_started("web", 1 << 30);
        assert!(bars.bar.is_none());
        bars.layer_advanced(10);
        bars.layer_finished();
    }
}
