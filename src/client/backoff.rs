//! Reconnect backoff: exponential, capped, jittered (the gRPC connection-backoff schedule).

use std::time::Duration;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    multiplier: f64,
    max: Duration,
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_secs(1), 1.6, Duration::from_secs(120))
    }
}

impl Backoff {
    pub(crate) fn new(initial: Duration, multiplier: f64, max: Duration) -> Backoff {
        let multiplier = if multiplier.is_finite() && multiplier >= 1.0 {
            multiplier
        } else {
            1.0
        };
        Backoff {
            initial,
            multiplier,
            max: max.max(initial),
            current: initial,
        }
    }

    /// The next wait: the current step with ±20 % jitter; then the step grows.
    pub(crate) fn next(&mut self, rng: &mut fastrand::Rng) -> Duration {
        let jitter = 0.8 + 0.4 * rng.f64();
        let wait = self.current.mul_f64(jitter);
        self.current = self.current.mul_f64(self.multiplier).min(self.max);
        wait
    }

    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_grows_caps_and_jitters() {
        let mut b = Backoff::default();
        let mut rng = fastrand::Rng::with_seed(7);
        let waits: Vec<f64> = (0..20).map(|_| b.next(&mut rng).as_secs_f64()).collect();
        let mut nominal = 1.0f64;
        for w in &waits {
            assert!(
                *w >= nominal * 0.8 - 1e-9 && *w <= nominal * 1.2 + 1e-9,
                "{w} vs {nominal}"
            );
            nominal = (nominal * 1.6).min(120.0);
        }
        // At most 15 attempts fit in 10 minutes, whatever the jitter draws (the real schedule,
        // over many seeds).
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut b = Backoff::default();
            let (mut t, mut attempts) = (0.0, 0);
            while t < 600.0 {
                attempts += 1;
                t += b.next(&mut rng).as_secs_f64();
            }
            assert!(attempts <= 15, "seed {seed}: {attempts} attempts");
        }
        b.reset();
        let w = b.next(&mut rng).as_secs_f64();
        assert!((0.8..=1.2).contains(&w));
    }
}
