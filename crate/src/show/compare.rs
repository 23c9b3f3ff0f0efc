//! A measured run beside the estimate: the peaks a PyTorch memory snapshot recorded (`snapshot`) and the ones
//! vramfit predicts for the setup a person enters, with the difference in percent.

use serde::Serialize;

use crate::report::Report;
use crate::snapshot::Measured;

/// The four peaks and their differences; `measured` carries the timeline and the blocks at the peak.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub measured_peak_allocated_bytes: u64,
    pub measured_peak_reserved_bytes: u64,
    pub predicted_peak_allocated_bytes: u64,
    pub predicted_peak_reserved_bytes: u64,
    /// (predicted - measured) / measured, in percent (0 when nothing was measured).
    pub allocated_difference_percent: f64,
    pub reserved_difference_percent: f64,
    pub measured: Measured,
}

/// `(predicted - measured) / measured` in percent, rounded to 0.01.
pub fn difference_percent(predicted: u64, measured: u64) -> f64 {
    if measured == 0 {
        return 0.0;
    }
    let d = (predicted as f64 - measured as f64) / measured as f64 * 100.0;
    // + 0.0 turns a rounded -0.0 into 0.0.
    (d * 100.0).round() / 100.0 + 0.0
}

impl Comparison {
    pub fn new(measured: Measured, predicted: &Report) -> Comparison {
        Comparison::from_peaks(
            measured,
            predicted.peak_allocated_bytes,
            predicted.peak_reserved_bytes,
        )
    }

    /// From the predicted peaks alone (the page's snapshot module has no estimator: the page hands them over).
    pub fn from_peaks(measured: Measured, allocated: u64, reserved: u64) -> Comparison {
        Comparison {
            measured_peak_allocated_bytes: measured.peak_allocated_bytes,
            measured_peak_reserved_bytes: measured.peak_reserved_bytes,
            predicted_peak_allocated_bytes: allocated,
            predicted_peak_reserved_bytes: reserved,
            allocated_difference_percent: difference_percent(
                allocated,
                measured.peak_allocated_bytes,
            ),
            reserved_difference_percent: difference_percent(reserved, measured.peak_reserved_bytes),
            measured,
        }
    }

    /// "+1.25%" / "-0.40%" / "0.00%": the differences as a person reads them.
    pub fn fmt_percent(d: f64) -> String {
        if d > 0.0 {
            format!("+{d:.2}%")
        } else {
            format!("{d:.2}%")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_relative_to_the_measurement() {
        assert_eq!(difference_percent(110, 100), 10.0);
        assert_eq!(difference_percent(90, 100), -10.0);
        assert_eq!(difference_percent(1, 3), -66.67);
        assert_eq!(difference_percent(5, 0), 0.0);
        assert_eq!(
            Comparison::fmt_percent(difference_percent(99_999, 100_000)),
            "0.00%"
        );
        assert_eq!(Comparison::fmt_percent(1.5), "+1.50%");
        assert_eq!(Comparison::fmt_percent(-0.25), "-0.25%");
    }
}
