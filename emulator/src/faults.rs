//! [`Faults`]: misbehaviour injected into an emulated expert, at start or at run time
//! (`POST /admin/faults`), so that tests can see how the daemon copes.

use serde::{Deserialize, Serialize};

/// Longest `slow_start_s` accepted, seconds.
pub const MAX_SLOW_START_S: f64 = 3600.0;
/// Largest `slowdown` accepted.
pub const MAX_SLOWDOWN: f64 = 1000.0;

/// Faults of an emulated expert. The default is none.
///
/// `hang` and `slow_start_s` apply to every endpoint but `/admin/*`; `error_rate` and
/// `fail_after_tokens` to chat completions. Fault durations are wall-clock seconds, not
/// scaled by the emulator's time scale. A request sees the faults in force when it arrives,
/// except `slowdown`, which is the engine's: it applies from the moment it is set to the moment
/// faults without it are set, to every request on the engine then.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Drop the connection (no terminating chunk, no `[DONE]`) after this many tokens of an
    /// answer were sent, when the next one is due; answers of at most this many tokens are
    /// unaffected. A whole (non-streamed) answer gets its headers, then the drop. The request
    /// keeps its engine slot until the engine would have finished it.
    pub fail_after_tokens: Option<u32>,
    /// Fraction of chat completions answered `500` at once (drawn from the emulator's seed),
    /// in `0..=1`. Such requests never reach the engine.
    pub error_rate: f64,
    /// Accept requests and never answer them (until the emulator shuts down, when they get a
    /// `503`). Hung requests never reach the engine.
    pub hang: bool,
    /// Wait this long before handling each request, seconds (so before the first byte of its
    /// response; a chat completion reaches the engine after the wait), in `0..=3600`.
    pub slow_start_s: f64,
    /// The engine runs this many times slower (prefill and decode alike: every engine duration
    /// takes `slowdown` times longer in wall-clock time), as a throttled GPU or one shared with
    /// a neighbour's job does, while health checks and `/metrics` answer as usual. From the
    /// moment it is set (time T) until faults without it are set (T2); requests already on the
    /// engine slow down too. In `1..=1000`; `None` (or 1) is full speed.
    pub slowdown: Option<f64>,
}

/// A fault setting out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("faults: {0}")]
pub struct InvalidFaults(pub String);

impl Faults {
    /// Checks the ranges documented on each field.
    pub fn validate(&self) -> Result<(), InvalidFaults> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(InvalidFaults(format!(
                "error_rate must be in 0..=1, got {}",
                self.error_rate
            )));
        }
        if !(0.0..=MAX_SLOW_START_S).contains(&self.slow_start_s) {
            return Err(InvalidFaults(format!(
                "slow_start_s must be in 0..={MAX_SLOW_START_S}, got {}",
                self.slow_start_s
            )));
        }
        if let Some(k) = self.slowdown
            && !(1.0..=MAX_SLOWDOWN).contains(&k)
        {
            return Err(InvalidFaults(format!(
                "slowdown must be in 1..={MAX_SLOWDOWN}, got {k}"
            )));
        }
        Ok(())
    }

    /// The engine's slowdown factor: `slowdown`, 1 without it.
    pub fn engine_slowdown(&self) -> f64 {
        self.slowdown.unwrap_or(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_and_missing_fields_mean_no_fault() {
        assert!(Faults::default().validate().is_ok());
        let f: Faults = serde_json::from_str(r#"{"hang":true}"#).unwrap();
        assert_eq!(
            f,
            Faults {
                hang: true,
                ..Faults::default()
            }
        );
        for bad in [
            Faults {
                error_rate: 1.5,
                ..Faults::default()
            },
            Faults {
                error_rate: f64::NAN,
                ..Faults::default()
            },
            Faults {
                slow_start_s: -1.0,
                ..Faults::default()
            },
            Faults {
                slow_start_s: f64::INFINITY,
                ..Faults::default()
            },
            Faults {
                slowdown: Some(0.5),
                ..Faults::default()
            },
            Faults {
                slowdown: Some(f64::NAN),
                ..Faults::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let slow: Faults = serde_json::from_str(r#"{"slowdown":5}"#).unwrap();
        assert_eq!(slow.engine_slowdown(), 5.0);
        assert!(slow.validate().is_ok());
        assert_eq!(Faults::default().engine_slowdown(), 1.0);
        assert!(serde_json::from_str::<Faults>(r#"{"hang":1}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"hnag":true}"#).is_err());
    }
}
