//! Wall time per section of the training step (see `bench train`).

use std::time::Instant;

/// Wall time per section of the step, summed over steps.
#[derive(Debug)]
pub struct Profile {
    last: Instant,
    /// (section, seconds), in first-seen order.
    pub sections: Vec<(&'static str, f64)>,
}

impl Profile {
    pub(super) fn new() -> Self {
        Profile {
            last: Instant::now(),
            sections: Vec::new(),
        }
    }
    /// Start timing (the time since the last lap is dropped).
    pub(super) fn start(&mut self) {
        self.last = Instant::now();
    }
    /// Charge the time since the last lap to `name`.
    pub(super) fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        let dt = (now - self.last).as_secs_f64();
        self.last = now;
        match self.sections.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => *s += dt,
            None => self.sections.push((name, dt)),
        }
    }
}
