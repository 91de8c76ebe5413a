//! A log-linear latency histogram that worker processes fill and the parent merges.
//!
//! Values below 256 are counted exactly; above, every power of two is split into 128 equal
//! buckets, so a reported percentile is within 0.8% of the true value. Fixed-size counting
//! makes recording one array increment (no allocation on the receive path), and merging
//! histograms from several processes exact, which averaging their percentiles would not be.

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two: 2^7.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for any u64 value.
const BUCKETS: usize = (2 * SUB + (64 - SUB_BITS as u64 - 1) * SUB) as usize;

#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

/// The wire form between processes: only the non-empty buckets.
#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct SparseHistogram {
    pub buckets: Vec<(u32, u64)>,
    pub max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn bucket_of(value: u64) -> usize {
    if value < 2 * SUB {
        return value as usize;
    }
    let log2 = 63 - value.leading_zeros();
    let shift = log2 - SUB_BITS;
    (2 * SUB + (shift as u64 - 1) * SUB + ((value >> shift) - SUB)) as usize
}

/// The midpoint of a bucket's range: the value reported for anything counted in it.
fn value_of(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < 2 * SUB {
        return bucket;
    }
    let shift = (bucket - 2 * SUB) / SUB + 1;
    let mantissa = (bucket - 2 * SUB) % SUB + SUB;
    (mantissa << shift) + (1u64 << shift) / 2
}

impl Histogram {
    pub fn record(&mut self, value: u64) {
        self.counts[bucket_of(value)] += 1;
        self.total += 1;
        self.max = self.max.max(value);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0.0..=1.0): the smallest recorded value such that at least
    /// `q` of all values are at or below it. 0 for an empty histogram.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                // The top bucket's midpoint may exceed the true maximum; never report more.
                return value_of(bucket).min(self.max);
            }
        }
        self.max
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn to_sparse(&self) -> SparseHistogram {
        SparseHistogram {
            buckets: (self.counts.iter().enumerate())
                .filter(|(_, &n)| n > 0)
                .map(|(b, &n)| (b as u32, n))
                .collect(),
            max: self.max,
        }
    }

    pub fn from_sparse(sparse: &SparseHistogram) -> Histogram {
        let mut h = Histogram::default();
        for &(bucket, n) in &sparse.buckets {
            if let Some(slot) = h.counts.get_mut(bucket as usize) {
                *slot += n;
                h.total += n;
            }
        }
        h.max = sparse.max;
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::default();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), 50);
        assert_eq!(h.quantile(0.99), 99);
        assert_eq!(h.quantile(1.0), 100);
        assert_eq!(h.quantile(0.0), 1);
        assert_eq!(h.count(), 100);
    }

    #[test]
    fn large_values_are_within_one_percent() {
        let mut h = Histogram::default();
        for v in 1..=1_000_000u64 {
            h.record(v * 1000);
        }
        for (q, want) in [
            (0.5, 500_000_000f64),
            (0.99, 990_000_000.0),
            (0.999, 999_000_000.0),
        ] {
            let got = h.quantile(q) as f64;
            assert!(
                (got - want).abs() / want < 0.01,
                "q={q}: got {got}, want {want}"
            );
        }
        assert_eq!(h.max(), 1_000_000_000);
        assert_eq!(h.quantile(1.0), 1_000_000_000);
    }

    #[test]
    fn buckets_are_monotonic_and_cover_u64() {
        let mut last = 0;
        for shift in 0..64 {
            for v in [
                1u64 << shift,
                (1u64 << shift) + 1,
                (1u64 << shift).wrapping_mul(3) / 2,
            ] {
                let b = bucket_of(v);
                assert!(b < BUCKETS, "value {v} -> bucket {b}");
                let mid = value_of(b) as f64;
                assert!((mid - v as f64).abs() / (v as f64) <= 0.008 || v < 256);
            }
            let b = bucket_of(1u64 << shift);
            assert!(b >= last);
            last = b;
        }
        assert!(bucket_of(u64::MAX) < BUCKETS);
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let (mut a, mut b, mut all) = (
            Histogram::default(),
            Histogram::default(),
            Histogram::default(),
        );
        for v in 0..5000u64 {
            let x = v * v % 100_003;
            if v % 3 == 0 {
                a.record(x)
            } else {
                b.record(x)
            }
            all.record(x);
        }
        let mut merged = Histogram::from_sparse(&a.to_sparse());
        merged.merge(&Histogram::from_sparse(&b.to_sparse()));
        for q in [0.1, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(merged.quantile(q), all.quantile(q));
        }
        assert_eq!(merged.count(), all.count());
    }

    #[test]
    fn empty_histogram_reports_zero() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), 0);
        assert_eq!(h.count(), 0);
    }
}
